package embedded

import (
	"bytes"
	"net"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
)

// Router is a running stand-in router.
type Router struct {
	Addr  string
	ln    net.Listener
	mu    sync.Mutex
	msgs  [][]byte
	at    []time.Time
	ids   *hl7.IDGen
	conns map[net.Conn]struct{}
}

// StartRouter listens on addr ("127.0.0.1:0" for any port).
func StartRouter(addr string) (*Router, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	r := &Router{Addr: ln.Addr().String(), ln: ln, ids: hl7.NewIDGen("RT", time.Now()), conns: map[net.Conn]struct{}{}}
	go r.serve(ln)
	return r, nil
}

func (r *Router) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r.mu.Lock()
		r.conns[c] = struct{}{}
		r.mu.Unlock()
		go func() {
			defer func() {
				c.Close()
				r.mu.Lock()
				delete(r.conns, c)
				r.mu.Unlock()
			}()
			rd := mllp.NewReader(c, 0)
			for {
				frame, err := rd.ReadFrame()
				if err != nil {
					return
				}
				h, err := hl7.ParseHeader(frame)
				r.mu.Lock()
				r.msgs = append(r.msgs, bytes.Clone(frame))
				r.at = append(r.at, time.Now())
				r.mu.Unlock()
				if err != nil || h.IsAck() || h.AcceptAckType == "NE" {
					continue
				}
				ack := hl7.BuildAck(h, hl7.Ack{Code: hl7.ApplicationAccept, ControlID: r.ids.Next()})
				if mllp.WriteFrame(c, ack) != nil {
					return
				}
			}
		}()
	}
}

// Messages returns what the router received so far.
func (r *Router) Messages() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.msgs...)
}

// Arrivals returns what the router received so far and when.
func (r *Router) Arrivals() ([][]byte, []time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.msgs...), append([]time.Time(nil), r.at...)
}

// Close stops the router.
func (r *Router) Close() error { return r.Stop() }

// Stop closes the listener and every connection, as a router that goes
// down; Restart brings it back on the same address, keeping what it
// received.
func (r *Router) Stop() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
	}
	return r.ln.Close()
}

// Restart listens again on the router's address.
func (r *Router) Restart() error {
	ln, err := net.Listen("tcp", r.Addr)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.ln = ln
	r.mu.Unlock()
	go r.serve(ln)
	return nil
}

// Received returns what the router got, by kind: the control IDs (MSH-10)
// of messages, and, as "answer to ID", the acknowledgements by the ID
// they acknowledge (MSA-2).
func (r *Router) Received() map[string]bool {
	out := map[string]bool{}
	for _, m := range r.Messages() {
		if a, err := hl7.ParseAck(m); err == nil {
			out["answer to "+a.ControlID] = true
		} else if h, err := hl7.ParseHeader(m); err == nil {
			out[h.ControlID] = true
		}
	}
	return out
}
