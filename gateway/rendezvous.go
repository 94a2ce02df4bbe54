package gateway

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/mailbox"
)

// rendezvous hands partners' responses to the router connections that wait
// for them (ack_mode: rendezvous, draft-ietf-ediint-hl7-02 §4.1.4, last
// paragraphs): a virtual end-to-end acknowledgement over mail.
type rendezvous struct {
	mu      sync.Mutex
	waiting map[int64]chan response // outbound message id → its waiting connection
	quit    chan struct{}           // closed at shutdown: every wait ends
	once    sync.Once
}

// stop ends every wait.
func (r *rendezvous) stop() { r.once.Do(func() { close(r.quit) }) }

// response is a partner's response on its way to a waiting connection.
type response struct {
	payload []byte
	written func(error)
}

var errShutdown = errors.New("shutting down")

func newRendezvous() *rendezvous {
	return &rendezvous{waiting: map[int64]chan response{}, quit: make(chan struct{})}
}

// wait blocks until the response to message id is offered, timeout passes
// or the gateway shuts down.
func (r *rendezvous) wait(ctx context.Context, id int64, timeout time.Duration) ([]byte, func(error), error) {
	ch := make(chan response, 1)
	r.mu.Lock()
	r.waiting[id] = ch
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.waiting, id)
		r.mu.Unlock()
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case resp := <-ch:
		return resp.payload, resp.written, nil
	case <-t.C:
		return nil, nil, fmt.Errorf("no response within rendezvous_timeout %s", timeout)
	case <-r.quit:
		return nil, nil, errShutdown
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
}

// offer gives the response to message id to the connection waiting for
// it; it reports false when none waits.
func (r *rendezvous) offer(id int64, resp response) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	ch, ok := r.waiting[id]
	if !ok {
		return false
	}
	delete(r.waiting, id)
	ch <- resp
	return true
}

// rendezvousResponse offers a stored response to the connection waiting
// for it, if any: the response is held back from the deliverer meanwhile,
// marked delivered once written, and released to the deliverer (an
// unsolicited message to the router) when the connection could not take
// it. It reports whether a connection took it.
func (g *Gateway) rendezvousResponse(r mailbox.Result) bool {
	if r.ReceiptFor == 0 || r.ID == 0 || r.Incoming == nil || r.Incoming.Payload == nil {
		return false
	}
	g.rdv.mu.Lock()
	_, waiting := g.rdv.waiting[r.ReceiptFor]
	g.rdv.mu.Unlock()
	if !waiting {
		return false
	}
	ctx := context.Background()
	partner := r.Incoming.Partner.Name
	if err := g.store.MarkRetry(ctx, r.ID, "held for the router's waiting connection (rendezvous)", time.Now().Add(time.Hour)); err != nil {
		g.log.Error("store", "err", err)
		return false
	}
	release := func(why string) {
		if err := g.store.MarkRetry(ctx, r.ID, why, time.Now()); err != nil {
			g.log.Error("store", "err", err)
		}
		g.deliverer.Notify(partner)
	}
	written := func(err error) {
		if err != nil {
			release("rendezvous connection: " + err.Error())
			return
		}
		if err := g.store.MarkDelivered(ctx, r.ID, nil); err != nil {
			g.log.Error("store", "err", err)
		}
	}
	if !g.rdv.offer(r.ReceiptFor, response{payload: r.Incoming.Payload, written: written}) {
		release("the waiting connection gave up")
		return true
	}
	return true
}
