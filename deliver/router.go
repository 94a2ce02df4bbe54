package deliver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/partnerq"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/store"
)

// DelivererOptions configure a Deliverer. Config and Store are required.
type DelivererOptions struct {
	Config *config.Config
	Store  Store
	Logger *slog.Logger
	Now    func() time.Time
	// RetryBase is the wait after the first failed delivery, doubling up
	// to RetryMax (defaults 5s and 5m). Zero in tests.
	RetryBase, RetryMax time.Duration
	// Poll is how often each partner's inbound queue is looked at without
	// a Notify (default 5s).
	Poll time.Duration
	// Delivered is called after the router acknowledged message m with
	// ack (nil for a message that expects no acknowledgement), and that
	// was recorded: to send the partner its response.
	Delivered func(ctx context.Context, m store.Message, ack []byte)
	// Expired is called after message m was marked expired: the router
	// did not take it within the partner's expire_after.
	Expired func(ctx context.Context, m store.Message)
	// Held, when set, tells of a message to leave alone for now (a
	// response that a router connection waits to be handed, ack_mode
	// rendezvous).
	Held func(m store.Message) bool
	// TLS, when set, is MLLP over TLS to the router (router.tls): the
	// router's certificate is verified for the host of its address.
	TLS *tls.Config
}

// Deliverer takes inbound messages to the internal router over MLLP
// (draft-ietf-ediint-hl7-02 §6.3), one goroutine per partner, in the order
// they arrived. A message counts as delivered when the router answered it;
// while the router is down or silent the message waits and is tried again.
type Deliverer struct {
	o   DelivererOptions
	log *slog.Logger
	q   *partnerq.Queue
	// seqs holds, by partner, the sequence number (MSH-13) of each queued
	// message seen, so that its payload is read once for it.
	seqMu sync.Mutex
	seqs  map[string]map[int64]int64
}

// NewDeliverer returns a Deliverer; Run starts it.
func NewDeliverer(o DelivererOptions) (*Deliverer, error) {
	if o.Config == nil || o.Store == nil {
		return nil, errors.New("deliver: DelivererOptions.Config and Store are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.RetryMax == 0 {
		o.RetryMax = 5 * time.Minute
	}
	if o.Poll == 0 {
		o.Poll = 5 * time.Second
	}
	d := &Deliverer{o: o, log: o.Logger, q: partnerq.New(o.Config, o.Store, store.Inbound, o.Poll, o.Now, o.Logger)}
	d.q.Next = d.nextInOrder
	return d, nil
}

// Notify tells the deliverer that partner has a new inbound message.
func (d *Deliverer) Notify(partner string) { d.q.Notify(partner) }

// Run delivers until ctx ends. Each partner's worker keeps its router
// connection open between messages.
func (d *Deliverer) Run(ctx context.Context) {
	d.q.Run(ctx, func(p *config.Partner) partnerq.Worker {
		var conn *mllp.Client
		return partnerq.Worker{
			Step: func(ctx context.Context, m store.Message) bool {
				var ok bool
				conn, ok = d.deliver(ctx, p, m, conn)
				return ok
			},
			Stop: func() {
				if conn != nil {
					conn.Close()
				}
			},
		}
	})
}

// expire ends m as expired when the router has not taken it within the
// partner's expire_after (counted from when it came, or from an operator's
// retry), and reports whether it did.
func (d *Deliverer) expire(ctx context.Context, p *config.Partner, m store.Message, log *slog.Logger) bool {
	since := m.Received
	if m.Retried.After(since) {
		since = m.Retried
	}
	age := d.o.Now().Sub(since)
	if age <= p.ExpireAfter.D() {
		return false
	}
	ctx = context.WithoutCancel(ctx)
	attempts, _, lastErr, _ := d.o.Store.Delivery(ctx, m.ID)
	reason := fmt.Sprintf("not delivered to the router within expire_after %s", p.ExpireAfter.D())
	if err := d.o.Store.MarkFinal(ctx, m.ID, store.Expired, reason); err != nil {
		log.Error("store", "err", err)
		return false
	}
	notify.Raise(ctx, d.o.Store, log, store.Alert{Kind: store.AlertExpired, Partner: p.Name, ControlID: m.ControlID,
		MessageID: m.MessageID, Text: "inbound message expired before the router took it (deleted/expired)"},
		"age", age.Round(time.Second).String(), "attempts", attempts, "last_error", lastErr)
	if d.o.Expired != nil {
		d.o.Expired(ctx, m)
	}
	return true
}

// deliver sends m to the router over conn (dialling when nil) and records
// the outcome; it returns the connection to reuse and whether to go on.
func (d *Deliverer) deliver(ctx context.Context, p *config.Partner, m store.Message, conn *mllp.Client) (*mllp.Client, bool) {
	log := d.log.With("partner", p.Name, "id", m.ID, "control_id", m.ControlID)
	if d.expire(ctx, p, m, log) {
		return conn, true
	}
	addr := d.o.Config.RouterForMail(p, m.Recipient)
	var ack []byte
	var err error
	split := hl7.IsBatch(m.Payload) && p.BatchSplit
	if split {
		conn, ack, err = d.deliverSplit(ctx, m, addr, conn, log)
	} else {
		wants := expectsAnswer(m.Payload)
		conn, ack, err = d.exchange(ctx, conn, addr, m.Payload, wants)
		if err == nil && wants {
			err = replyError(m.ControlID, ack)
		}
	}
	// What happened is recorded even when shutdown begins meanwhile.
	rctx := context.WithoutCancel(ctx)
	if err != nil {
		if conn != nil {
			conn.Close()
			conn = nil
		}
		attempts, _, _, _ := d.o.Store.Delivery(rctx, m.ID)
		next := d.o.Now().Add(partnerq.Backoff(d.o.RetryBase, d.o.RetryMax, attempts))
		if serr := d.o.Store.MarkRetry(rctx, m.ID, "router "+addr+": "+err.Error(), next); serr != nil {
			log.Error("store", "err", serr)
		}
		log.Warn("router delivery failed; will retry", "router", addr, "err", err, "attempt", attempts+1,
			"next", next.Format(time.RFC3339))
		return conn, false
	}
	// The router has it: a store that cannot record that now is waited
	// for, so that the router does not get it again.
	if err := partnerq.Record(ctx.Done(), log, "delivered to the router, not yet recorded",
		func() error { return d.o.Store.MarkDelivered(rctx, m.ID, ack) }); err != nil {
		log.Error("store", "err", err)
		return conn, false
	}
	if split {
		if err := d.o.Store.SetValue(rctx, batchKey(m.ID), ""); err != nil {
			log.Error("store", "err", err)
		}
	}
	if seq := sequenceOf(m.Payload); seq > 0 && seq > d.lastSequence(rctx, p) {
		if err := d.o.Store.SetValue(rctx, sequenceKey(p), strconv.FormatInt(seq, 10)); err != nil {
			log.Error("store", "err", err)
		}
	}
	code := "none expected"
	if c, _, _, err := answerOf(ack); err == nil {
		code = string(c)
	}
	log.Info("delivered to router", "router", addr, "ack", code)
	if d.o.Delivered != nil {
		d.o.Delivered(rctx, m, ack)
	}
	return conn, true
}

// exchange sends payload to the router at addr over conn (dialling when
// nil) and returns the connection and the router's answer (none when
// wantsAck is false).
func (d *Deliverer) exchange(ctx context.Context, conn *mllp.Client, addr string, payload []byte, wantsAck bool) (*mllp.Client, []byte, error) {
	timeout := d.o.Config.Router.AckTimeout.D()
	if conn == nil {
		dctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var c *mllp.Client
		var err error
		if d.o.TLS != nil {
			tc := d.o.TLS.Clone()
			tc.ServerName, _, _ = net.SplitHostPort(addr)
			c, err = mllp.DialTLS(dctx, addr, tc)
		} else {
			c, err = mllp.Dial(dctx, addr)
		}
		if err != nil {
			return nil, nil, err
		}
		conn = c
	}
	sctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !wantsAck {
		return conn, nil, conn.Write(sctx, payload)
	}
	reply, err := conn.Send(sctx, payload)
	if err != nil {
		return conn, nil, err
	}
	return conn, bytes.Clone(reply), nil
}

// expectsAnswer reports whether the router answers payload: not an
// acknowledgement, nor a message asking for none (MSH-15 NE), nor a batch
// acknowledgement; those are delivered once written. Any other message or
// batch is answered (HL7 v2.5 §2.9, §2.10.3).
func expectsAnswer(payload []byte) bool {
	if h, err := hl7.ParseHeader(payload); err == nil {
		return !h.IsAck() && h.AcceptAckType != "NE"
	}
	_, err := hl7.ParseBatchAck(payload)
	return err != nil
}

// replyError says what is wrong with the router's answer to the message
// (or batch) controlID: nil for an answer to keep. CE means the router could
// not take responsibility: send again. AE, AR and CR are its answer,
// delivered and passed on to the partner in the response. A batch may be
// answered with a batch acknowledgement or with one ACK naming the batch.
func replyError(controlID string, reply []byte) error {
	if hl7.IsBatch(reply) {
		r, err := hl7.ParseBatchAck(reply)
		if err != nil || r.Reference != "" && r.Reference != controlID {
			return fmt.Errorf("router answered with something else than a batch acknowledgement for %s", controlID)
		}
		if r.Code() == hl7.CommitError {
			return errors.New("router answered CE in its batch acknowledgement (could not take responsibility yet)")
		}
		return nil
	}
	r, err := hl7.ParseAck(reply)
	switch {
	case err != nil || r.ControlID != controlID:
		return fmt.Errorf("router answered with something else than an ACK for %s", controlID)
	case r.Code == hl7.CommitError:
		return errors.New("router answered CE (could not take responsibility yet)")
	}
	return nil
}

func batchKey(id int64) string { return fmt.Sprintf("batch-delivered:%d", id) }

// deliverSplit delivers the batch m to the router as its messages, one by
// one (partners[].batch_split), and returns the router's answers as one
// batch acknowledgement. Which messages the router has taken is recorded as
// it goes, with their answers, so that a retry after a CE, a silence or a
// crash goes on from the first it has not.
func (d *Deliverer) deliverSplit(ctx context.Context, m store.Message, addr string, conn *mllp.Client,
	log *slog.Logger) (*mllp.Client, []byte, error) {
	b, err := hl7.ParseBatch(m.Payload)
	if err != nil {
		return conn, nil, err // checked when it came; not retried into success
	}
	// The progress is "<messages taken>" and the answers, parted by FS
	// (0x1C), which cannot occur inside an MLLP frame.
	key := batchKey(m.ID)
	rctx := context.WithoutCancel(ctx)
	done := 0
	var acks [][]byte
	if v, _ := d.o.Store.Value(rctx, key); v != "" {
		parts := bytes.Split([]byte(v), []byte{0x1c})
		done, _ = strconv.Atoi(string(parts[0]))
		acks = append(acks, parts[1:]...)
	}
	for i := done; i < len(b.Messages); i++ {
		h := b.Headers[i]
		wants := expectsAnswer(b.Messages[i])
		var reply []byte
		conn, reply, err = d.exchange(ctx, conn, addr, b.Messages[i], wants)
		if err == nil && wants {
			err = replyError(h.ControlID, reply)
		}
		if err != nil {
			return conn, nil, fmt.Errorf("message %d of %d of the batch: %w", i+1, len(b.Messages), err)
		}
		if wants { // a message asking for no answer has none in the batch's
			acks = append(acks, reply)
		}
		progress := append([][]byte{[]byte(strconv.Itoa(i + 1))}, acks...)
		if err := d.o.Store.SetValue(rctx, key, string(bytes.Join(progress, []byte{0x1c}))); err != nil {
			return conn, nil, err
		}
	}
	log.Info("batch delivered as its messages", "messages", len(b.Messages))
	ack := hl7.BuildBatchAck(b, "BA"+strconv.FormatInt(m.ID, 10), acks, time.Time{})
	return conn, ack, nil
}
