package deliver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/store"
)

// Inbound order (draft-ietf-ediint-hl7-02 §6.1.2). Mail may overtake mail
// on the way; the router gets a partner's messages in the order the partner
// sent them:
//   - where the partner numbers its messages (the HL7 sequence number
//     protocol, MSH-13), in that order: a gap is waited for, up to the
//     partner's order_wait, then passed with an alert;
//   - a message that answers another (In-Reply-To) not before the message
//     it answers has come; after order_wait it goes anyway, with an alert.
//     Meanwhile the partner's other messages go on.
// Otherwise in the order the mails arrived.

// sequenceOf returns the MSH-13 sequence number of msg, 0 when it has none
// (or one of the protocol's special values, 0 and -1).
func sequenceOf(msg []byte) int64 {
	h, err := hl7.ParseHeader(msg)
	if err != nil || h.SequenceNumber == "" {
		return 0
	}
	n, err := strconv.ParseInt(h.SequenceNumber, 10, 64)
	if err != nil || n < 1 {
		return 0
	}
	return n
}

func sequenceKey(p *config.Partner) string { return "sequence-delivered:" + p.Name }

// lastSequence returns the highest sequence number of partner p delivered
// so far, 0 when none.
func (d *Deliverer) lastSequence(ctx context.Context, p *config.Partner) int64 {
	v, _ := d.o.Store.Value(ctx, sequenceKey(p))
	n, _ := strconv.ParseInt(v, 10, 64)
	return n
}

// nextInOrder picks partner p's next message for the router. It looks at
// the oldest few queued messages first; only when they hold a numbered
// message, or none of them may go, does it look at up to 500, as the
// order rules need.
func (d *Deliverer) nextInOrder(ctx context.Context, p *config.Partner, now time.Time) (store.Message, error) {
	for _, limit := range []int{32, 500} {
		m, sure, err := d.pick(ctx, p, now, limit)
		if err != nil || sure {
			return m, err
		}
	}
	return store.Message{}, store.ErrNotFound
}

// pick chooses among up to limit of p's oldest queued messages; sure is
// false when a longer look might choose otherwise.
func (d *Deliverer) pick(ctx context.Context, p *config.Partner, now time.Time, limit int) (m store.Message, sure bool, err error) {
	list, seqs, err := d.queued(ctx, p, limit)
	if err != nil {
		return store.Message{}, true, err
	}
	if len(list) == 0 {
		return store.Message{}, true, store.ErrNotFound
	}
	whole := len(list) < limit // the whole queue was read
	wait := p.OrderWait.D()
	// A message waiting for the router's retry holds back the others.
	if list[0].Next.After(now) {
		return store.Message{}, true, store.ErrNotFound
	}
	// Numbered messages go in their order; seqNext is the one that may go.
	var seqNext *store.QueuedMessage
	for i := range list {
		if seqs[i] > 0 {
			if !whole {
				return store.Message{}, false, nil // their order needs every one of them
			}
			if seqNext, err = d.bySequence(ctx, p, list, seqs, now, wait); err != nil && !errors.Is(err, store.ErrNotFound) {
				return store.Message{}, true, err
			}
			break
		}
	}
	var chosen *store.QueuedMessage
	for i := range list {
		q := &list[i]
		if q.Next.After(now) || seqs[i] > 0 && q != seqNext || d.o.Held != nil && d.o.Held(q.Message) ||
			!d.replyReady(ctx, p, q, now, wait) {
			continue
		}
		chosen = q
		break
	}
	if chosen == nil {
		return store.Message{}, whole || limit >= 500, store.ErrNotFound
	}
	m, err = d.o.Store.Get(ctx, chosen.ID) // with its payload
	return m, true, err
}

// queued returns up to limit of p's queued inbound messages, oldest
// first, without their payloads, and the sequence number of each. A
// message's payload is read once, the first time it is seen here, for its
// number: not every queued payload at every pick.
func (d *Deliverer) queued(ctx context.Context, p *config.Partner, limit int) ([]store.QueuedMessage, []int64, error) {
	list, err := d.o.Store.QueuedHeads(ctx, p.Name, store.Inbound, limit)
	if err != nil || len(list) == 0 {
		return nil, nil, err
	}
	seqs := make([]int64, len(list))
	d.seqMu.Lock()
	defer d.seqMu.Unlock()
	if d.seqs == nil {
		d.seqs = map[string]map[int64]int64{}
	}
	known := d.seqs[p.Name]
	if known == nil {
		known = map[int64]int64{}
		d.seqs[p.Name] = known
	}
	for id := range known {
		if id < list[0].ID { // older than the oldest queued: gone from the queue
			delete(known, id)
		}
	}
	for i, q := range list {
		n, ok := known[q.ID]
		if !ok {
			m, err := d.o.Store.Get(ctx, q.ID)
			if err != nil {
				return nil, nil, err
			}
			n = sequenceOf(m.Payload)
			known[q.ID] = n
		}
		seqs[i] = n
	}
	return list, seqs, nil
}

// bySequence picks, among the numbered messages, the next number; it
// returns nil and ErrNotFound while a gap is waited for.
func (d *Deliverer) bySequence(ctx context.Context, p *config.Partner, list []store.QueuedMessage, seqs []int64, now time.Time,
	wait time.Duration) (*store.QueuedMessage, error) {
	var lowest *store.QueuedMessage
	var lowestSeq int64
	oldest := now
	bySeq := map[int64]*store.QueuedMessage{}
	for i := range list {
		q := &list[i]
		n := seqs[i]
		if n == 0 {
			continue
		}
		bySeq[n] = q
		if lowest == nil || n < lowestSeq {
			lowest, lowestSeq = q, n
		}
		if q.Received.Before(oldest) {
			oldest = q.Received
		}
	}
	last := d.lastSequence(ctx, p)
	expected := last + 1
	if last == 0 || lowestSeq <= last {
		return lowest, nil // the first we see, or a number sent again: in order
	}
	if q := bySeq[expected]; q != nil {
		return q, nil
	}
	if now.Sub(oldest) < wait {
		return nil, store.ErrNotFound // wait for the gap to fill
	}
	d.alertOnce(ctx, p, lowest, fmt.Sprintf("sequence gap: message %d never came; delivering %d after waiting %s",
		expected, lowestSeq, wait))
	return lowest, nil
}

// replyReady reports whether q may go now: it answers nothing, or what it
// answers went out from here or reached the router already, or has not
// come within order_wait.
func (d *Deliverer) replyReady(ctx context.Context, p *config.Partner, q *store.QueuedMessage, now time.Time, wait time.Duration) bool {
	if q.InReplyTo == "" {
		return true
	}
	m, err := d.o.Store.ByMessageID(ctx, q.InReplyTo)
	switch {
	case err == nil:
		// Ours, or the partner's and delivered: this one may follow.
		return m.Direction == store.Outbound || m.State != store.Queued
	case !errors.Is(err, store.ErrNotFound):
		return false
	}
	if now.Sub(q.Received) < wait {
		return false
	}
	d.alertOnce(ctx, p, q, fmt.Sprintf("the message it answers (%s) never came; delivered after waiting %s", q.InReplyTo, wait))
	return true
}

func (d *Deliverer) alertOnce(ctx context.Context, p *config.Partner, q *store.QueuedMessage, text string) {
	raised, err := d.o.Store.RaiseOnceEver(context.WithoutCancel(ctx), fmt.Sprintf("order:%d", q.ID), store.Alert{
		Kind: store.AlertOrder, Partner: p.Name, ControlID: q.ControlID, MessageID: q.MessageID, Text: text})
	if err != nil {
		d.log.Error("alert not recorded", "alert", store.AlertOrder, "err", err)
	}
	if raised {
		d.log.Error("ALERT "+text, "alert", store.AlertOrder, "partner", p.Name, "id", q.ID, "control_id", q.ControlID)
	}
}
