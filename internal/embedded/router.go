package embedded

import (
	"bytes"
	"context"
	"net"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
)

// Router is a running stand-in router.
type Router struct {
	Addr string
	srv  *mllp.Server
	mu   sync.Mutex
	msgs [][]byte
	at   []time.Time
	ids  *hl7.IDGen
}

// StartRouter listens on addr ("127.0.0.1:0" for any port).
func StartRouter(addr string) (*Router, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	r := &Router{Addr: ln.Addr().String(), ids: hl7.NewIDGen("RT", time.Now())}
	r.start(ln)
	return r, nil
}

func (r *Router) start(ln net.Listener) {
	srv := &mllp.Server{Handler: mllp.HandlerFunc(r.serveConn)}
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	go srv.Serve(ln)
}

// serveConn stores each message and answers it AA, as an application
// that took it would; acknowledgements and NE messages get no answer.
func (r *Router) serveConn(_ context.Context, c net.Conn) {
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
	srv := r.srv
	r.mu.Unlock()
	return srv.Close()
}

// Restart listens again on the router's address.
func (r *Router) Restart() error {
	ln, err := net.Listen("tcp", r.Addr)
	if err != nil {
		return err
	}
	r.start(ln)
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
