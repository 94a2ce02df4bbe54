package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/store"
)

// rendezvous hands partners' responses to the router connections that wait
// for them (ack_mode: rendezvous, draft-ietf-ediint-hl7-02 §4.1.4, last
// paragraphs): a virtual end-to-end acknowledgement over mail.
type rendezvous struct {
	mu      sync.Mutex
	waiting map[int64]chan response // outbound message id → its waiting connection
	// inflight holds the responses offered and not yet written or given
	// back. One written is marked delivered before it leaves inflight, so
	// a deliverer that finds it neither waited for nor in flight learns
	// from the store's state whether it is still to deliver (held).
	inflight map[int64]bool
	quit     chan struct{} // closed at shutdown: every wait ends
	once     sync.Once
}

// stop ends every wait.
func (r *rendezvous) stop() { r.once.Do(func() { close(r.quit) }) }

// response is a partner's response on its way to a waiting connection;
// written is called once it was written to the router, or could not be.
type response struct {
	payload []byte
	written func(error)
}

var (
	errShutdown = errors.New("shutting down")
	errGaveUp   = errors.New("the waiting connection gave up")
)

func newRendezvous() *rendezvous {
	return &rendezvous{waiting: map[int64]chan response{}, inflight: map[int64]bool{}, quit: make(chan struct{})}
}

// wait blocks until the response to message id is offered, timeout passes
// or the gateway shuts down.
func (r *rendezvous) wait(ctx context.Context, id int64, timeout time.Duration) ([]byte, func(error), error) {
	ch := make(chan response, 1)
	r.mu.Lock()
	r.waiting[id] = ch
	r.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	var err error
	select {
	case resp := <-ch:
		return resp.payload, resp.written, nil
	case <-t.C:
		err = fmt.Errorf("no response within rendezvous_timeout %s", timeout)
	case <-r.quit:
		err = errShutdown
	case <-ctx.Done():
		err = ctx.Err()
	}
	r.mu.Lock()
	delete(r.waiting, id)
	r.mu.Unlock()
	// An offer that came as the wait ended is given back, for the
	// deliverer to take.
	select {
	case resp := <-ch:
		resp.written(errGaveUp)
	default:
	}
	return nil, nil, err
}

// offer gives the response to message id to the connection waiting for
// it; it reports false when none waits. Until resp.written is called the
// response counts as held (holds).
func (r *rendezvous) offer(id int64, resp response) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch, ok := r.waiting[id]
	if !ok {
		return false
	}
	delete(r.waiting, id)
	r.inflight[id] = true
	done := resp.written
	resp.written = func(err error) {
		if err == nil {
			done(nil) // marked delivered while still held
		}
		r.mu.Lock()
		delete(r.inflight, id)
		r.mu.Unlock()
		if err != nil {
			done(err) // the deliverer may take it now
		}
	}
	ch <- resp
	return true
}

// holds reports whether the response to message id belongs to a waiting
// connection: waited for, or offered and not yet written.
func (r *rendezvous) holds(id int64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.waiting[id] != nil || r.inflight[id]
}

// held tells the deliverer to leave alone a partner's response that a
// router connection waits for, or that one wrote since the deliverer read
// its queue (the store says it is no longer queued).
func (g *Gateway) held(m store.Message) bool {
	if p := g.Config().Partner(m.Partner); p == nil || p.AckMode != config.AckRendezvous {
		return false
	}
	return g.rdv.leaveAlone(context.Background(), g.store, m)
}

// leaveAlone reports whether the deliverer must leave m alone: a response
// a connection waits for or is writing, or one it wrote since the
// deliverer read its queue (no longer queued). State changes compare and
// set, and a written response is marked delivered before it leaves
// inflight, so no time-bound hold is needed.
func (r *rendezvous) leaveAlone(ctx context.Context, st Store, m store.Message) bool {
	if m.Kind != store.KindResponse || m.InReplyTo == "" {
		return false
	}
	if p, err := st.PendingByMessageID(ctx, m.InReplyTo); err == nil && r.holds(p.ID) {
		return true
	}
	state, err := st.StateOf(ctx, m.ID)
	return err != nil || state != store.Queued
}

// rendezvousResponse offers a stored response to the connection waiting
// for it, if any; the deliverer leaves it alone meanwhile (held). Once
// written it is marked delivered; when the connection could not take it,
// the deliverer delivers it as a message of its own. It reports whether a
// connection took it.
func (g *Gateway) rendezvousResponse(r inbound.Result) bool {
	if r.ReceiptFor == 0 || r.ID == 0 || r.Incoming == nil || r.Incoming.Payload == nil {
		return false
	}
	partner := r.Incoming.Partner.Name
	written := func(err error) {
		if err != nil {
			g.log.Info("response left for the deliverer", "partner", partner, "id", r.ID, "reason", err.Error())
			g.side().deliverer.Notify(partner)
			return
		}
		if err := g.store.MarkDelivered(context.Background(), r.ID, nil); err != nil {
			// ErrStateChanged would mean the deliverer took it too.
			g.log.Error("store", "err", err)
		}
	}
	return g.rdv.offer(r.ReceiptFor, response{payload: r.Incoming.Payload, written: written})
}
