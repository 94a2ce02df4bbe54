package outbound

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/partnerq"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// A partner's queue drains through a pipeline:
//
//   - ahead: the messages after the one being submitted, up to the window,
//     are read in accepted order and sealed by the Sender's sealers, one
//     per core, shared by every partner;
//   - in order: the sealed ones are taken in groups of those ready, each
//     group composed, journalled with one sync, prepared (Message-ID,
//     awaited receipt, journal index) in one commit, submitted one after
//     another on the partner's SMTP session, and marked sent in one commit.
//     While a group is on the session, the next one is prepared.
//
// Nothing sealed ahead is kept: a mail not submitted when the pipeline
// stops (a failure, a retry, a shutdown) is sealed again at its next
// attempt, under the Message-ID its preparation recorded. A crash after the
// server took a mail and before its group's commit sends it again at the
// next start (same Message-ID, absorbed by the partner's replay check):
// that is the window, at most Group mails.

// sealJob is one message sealed ahead.
type sealJob struct {
	p      *config.Partner
	m      store.Message
	now    time.Time
	sealed []byte
	mic    security.MIC
	err    error
	done   chan struct{}
}

// sealQueue hands sealing jobs to the sealers fairly: the next job is
// from the partner that has had the least sealing time, so that a partner
// whose suite is slow (RSA signing for S/MIME) does not hold back one
// whose suite is fast, and each gets its share of the cores.
type sealQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	jobs   map[string][]*sealJob
	used   map[string]time.Duration
	closed bool
}

func newSealQueue() *sealQueue {
	q := &sealQueue{jobs: map[string][]*sealJob{}, used: map[string]time.Duration{}}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// put queues j for sealing.
func (q *sealQueue) put(j *sealJob) {
	q.mu.Lock()
	defer q.mu.Unlock()
	name := j.p.Name
	if len(q.jobs[name]) == 0 {
		// A partner that was idle starts level with the busy ones, not
		// ahead of them by the time it did not use.
		if least, ok := q.least(); ok {
			q.used[name] = max(q.used[name], q.used[least])
		}
	}
	q.jobs[name] = append(q.jobs[name], j)
	q.cond.Signal()
}

// least is the partner with jobs waiting that has had the least time.
func (q *sealQueue) least() (string, bool) {
	best, found := "", false
	for name, js := range q.jobs {
		if len(js) > 0 && (!found || q.used[name] < q.used[best]) {
			best, found = name, true
		}
	}
	return best, found
}

// take waits for the next job; false once the queue is closed.
func (q *sealQueue) take() (*sealJob, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		if q.closed {
			return nil, false
		}
		if name, ok := q.least(); ok {
			j := q.jobs[name][0]
			q.jobs[name] = q.jobs[name][1:]
			return j, true
		}
		q.cond.Wait()
	}
}

// spent adds d to partner's sealing time.
func (q *sealQueue) spent(partner string, d time.Duration) {
	q.mu.Lock()
	q.used[partner] += d
	q.mu.Unlock()
}

// close ends take for every sealer.
func (q *sealQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.cond.Broadcast()
	q.mu.Unlock()
}

// sealers seals jobs on n goroutines until the queue is closed.
func (s *Sender) sealers(n int) {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				j, ok := s.seal.take()
				if !ok {
					return
				}
				start := time.Now()
				j.sealed, j.mic, j.err = Seal(s.o.Keys, j.p, j.m.Payload, j.m.Kind, j.now)
				s.seal.spent(j.p.Name, time.Since(start))
				close(j.done)
			}
		}()
	}
	wg.Wait()
}

// partnerSender drains one partner's queue and holds its SMTP session.
type partnerSender struct {
	s    *Sender
	p    *config.Partner
	sess sessionHolder
}

// step drains p's queue from head on, as far as it goes without a wait; it
// reports whether the queue may go on at once.
func (w *partnerSender) step(ctx context.Context, head store.Message) bool {
	w.sess.busy()
	defer w.sess.idle(w.s.o.SessionIdle)
	// What happened is recorded even when shutdown begins meanwhile: a mail
	// the server took but the store does not know of would be sent twice.
	rctx := context.WithoutCancel(ctx)
	after := head.ID - 1
	if attempts, _, _, err := w.s.o.Store.Delivery(ctx, head.ID); err == nil && attempts > 0 {
		// Its last attempt failed (an outage, a hold): it is tried alone
		// before anything after it is sealed and journalled, so that a
		// queue waiting out an outage costs one mail an attempt.
		j := &sealJob{p: w.p, m: head, now: w.s.o.Now()}
		j.sealed, j.mic, j.err = Seal(w.s.o.Keys, w.p, head.Payload, head.Kind, j.now)
		out, goOn := w.prepareGroup(rctx, []*sealJob{j})
		if len(out) > 0 {
			took, ok := w.submitGroup(rctx, out, func() {})
			goOn = w.record(rctx, ctx.Done(), took) && ok && goOn
		}
		if !goOn || ctx.Err() != nil {
			return false
		}
		after = head.ID
	}
	ahead, stop := context.WithCancel(ctx)
	defer stop()
	jobs := make(chan *sealJob, w.s.o.Window)
	go w.readAhead(ahead, after, jobs)
	// The next group is journalled and prepared while this one is on the
	// session, so that its syncs cost no submission time. A group is
	// recorded as sent before the next one goes: a kill sends again at
	// most the group on the session.
	var once sync.Once
	flowing := make(chan struct{})
	prepared, prepOK := w.preparer(ctx, ahead, jobs, flowing)
	goOn := true
	for out := range prepared {
		if !goOn || ctx.Err() != nil {
			stop() // the preparer stops at its next group
			continue
		}
		flow := func() { once.Do(func() { close(flowing) }) }
		took, ok := w.submitGroup(rctx, out, flow)
		if !w.record(rctx, ctx.Done(), took) || !ok {
			goOn = false
			stop()
			continue
		}
		flow() // the group went through, though the server may have refused some of it
	}
	return goOn && prepOK() && ctx.Err() == nil
}

// preparer takes the sealed jobs in groups (ready), composes and prepares
// each (prepareGroup) and hands it on prepared, which it closes at the end
// of the queue, on a failure or when ahead ends. A group prepared but not
// submitted (the session failed, a shutdown) is as a mail the server
// refused for now: it goes at the next attempt under the Message-ID
// recorded. After the first group it waits for flowing, closed once the
// session took a mail or the first group went through: a queue waiting out
// an outage journals one group an attempt, not two. ok, called once
// prepared is closed, says whether the queue may go on.
func (w *partnerSender) preparer(ctx, ahead context.Context, jobs <-chan *sealJob, flowing <-chan struct{}) (
	prepared <-chan []outgoing, ok func() bool) {
	rctx := context.WithoutCancel(ctx)
	out := make(chan []outgoing)
	var goOn bool
	go func() {
		defer close(out)
		var carry *sealJob
		for n := 0; ; n++ {
			if n > 0 {
				select {
				case <-flowing:
				case <-ahead.Done():
					return
				}
			}
			group, more := w.ready(jobs, &carry)
			if len(group) == 0 {
				goOn = true
				return
			}
			ready, fine := w.prepareGroup(rctx, group)
			if len(ready) > 0 {
				select {
				case out <- ready:
				case <-ahead.Done():
					return
				}
			}
			if !fine || !more || ctx.Err() != nil {
				goOn = fine && ctx.Err() == nil
				return
			}
		}
	}()
	return out, func() bool { return goOn }
}

// readAhead hands jobs, in accepted order, the queued messages after the
// id after, each also given to the sealers, until the queue has no more
// due messages or ctx ends; then it closes jobs.
func (w *partnerSender) readAhead(ctx context.Context, after int64, jobs chan<- *sealJob) {
	defer close(jobs)
	for ctx.Err() == nil {
		ms, err := w.s.o.Store.QueuedAfter(ctx, w.p.Name, store.Outbound, w.s.o.Now(), after, w.s.o.Window)
		if err != nil {
			if ctx.Err() == nil {
				w.s.log.Error("queue not readable", "partner", w.p.Name, "err", err)
			}
			return
		}
		if len(ms) == 0 {
			return
		}
		for _, m := range ms {
			// To the sealers first: a job handed on is always sealed.
			j := &sealJob{p: w.p, m: m, now: w.s.o.Now(), done: make(chan struct{})}
			w.s.seal.put(j)
			select {
			case jobs <- j:
			case <-ctx.Done():
				return
			}
			after = m.ID
		}
	}
}

// ready returns the next group: the first job, once sealed, and those
// after it that are sealed already, up to Group. A job read but not yet
// sealed is kept in carry for the next group. more is false once jobs is
// closed and drained.
func (w *partnerSender) ready(jobs <-chan *sealJob, carry **sealJob) (group []*sealJob, more bool) {
	first := *carry
	*carry = nil
	if first == nil {
		var ok bool
		if first, ok = <-jobs; !ok {
			return nil, false
		}
	}
	<-first.done
	group = append(group, first)
collect:
	for len(group) < w.s.o.Group {
		select {
		case j, ok := <-jobs:
			if !ok {
				return group, false
			}
			select {
			case <-j.done:
				group = append(group, j)
			default:
				*carry = j
				break collect
			}
		default:
			break collect
		}
	}
	return group, true
}

// outgoing is a sealed message composed as the mail to submit.
type outgoing struct {
	m     store.Message
	from  string
	msgID string
	mail  []byte
	mic   security.MIC
	log   *slog.Logger
}

// prepareGroup composes a group of sealed messages, in order, and prepares
// those it may send (prepare); goOn says whether the queue may go on after
// them. A message expired or failed on the way is settled here.
func (w *partnerSender) prepareGroup(ctx context.Context, group []*sealJob) (out []outgoing, goOn bool) {
	s, p := w.s, w.p
	from := s.o.Config.FromFor(p) // the local address this partner talks to
	now := s.o.Now()
	goOn = true
	for _, j := range group {
		m := j.m
		log := s.log.With("partner", p.Name, "id", m.ID, "control_id", m.ControlID)
		if s.expired(ctx, p, m, now, log) {
			continue
		}
		if j.err != nil {
			if goOn = s.sealFailed(ctx, p, m, j.err, log); !goOn {
				break
			}
			continue
		}
		msgID := m.MessageID
		if msgID == "" {
			msgID = newMessageID(m.ID, from)
		}
		mail, err := s.compose(p, from, m, msgID, now, j.sealed)
		if err != nil {
			log.Error("compose", "err", err)
			goOn = false
			break
		}
		out = append(out, outgoing{m: m, from: from, msgID: msgID, mail: mail, mic: j.mic, log: log})
	}
	if len(out) == 0 {
		return nil, goOn
	}
	if !w.prepare(ctx, from, now, out) {
		return nil, false
	}
	return out, goOn
}

// submitGroup submits a prepared group on the partner's session, in order,
// until one fails; it returns those the server took, and whether the queue
// may go on after the one that failed. flowing is called after each mail
// the server took.
func (w *partnerSender) submitGroup(ctx context.Context, out []outgoing, flowing func()) (took []outgoing, goOn bool) {
	for _, o := range out {
		ok, goOnAfter := w.submit(ctx, o)
		if ok {
			took = append(took, o)
			flowing()
			continue
		}
		if !goOnAfter {
			return took, false
		}
	}
	return took, true
}

// record marks the mails the server took as sent, in one commit, waiting
// out a store that cannot write (partnerq.Record); it reports whether the
// queue may go on.
func (w *partnerSender) record(ctx context.Context, stop <-chan struct{}, took []outgoing) bool {
	s, p := w.s, w.p
	if len(took) == 0 {
		return true
	}
	sent := make([]int64, len(took))
	for i, o := range took {
		sent[i] = o.m.ID
	}
	if err := partnerq.Record(stop, s.log.With("partner", p.Name), "mails submitted, not yet recorded as sent",
		func() error { return s.o.Store.MarkSentAll(ctx, sent) }); err != nil {
		s.log.Error("store: mails submitted but not all recorded as sent", "partner", p.Name, "err", err)
		if !errors.Is(err, store.ErrStateChanged) && !errors.Is(err, store.ErrNotFound) {
			return false
		}
	}
	for _, o := range took {
		o.log.Info("mail submitted", "message_id", o.msgID, "mic", o.mic.String())
	}
	s.submitted(ctx, p)
	return true
}

// prepare journals the group's mails with one sync and records their
// Message-IDs, awaited receipts and journal places in one commit: nothing
// is submitted that is not journalled and indexed.
func (w *partnerSender) prepare(ctx context.Context, from string, now time.Time, out []outgoing) bool {
	s, p := w.s, w.p
	ms := make([]journal.Mail, len(out))
	for i, o := range out {
		ms[i] = journal.Mail{From: from, Time: now, MessageID: o.msgID, Bytes: o.mail}
	}
	offs, err := s.o.Journal.AppendAll(ms)
	if err != nil {
		s.log.Error("outgoing journal not written; not sending", "partner", p.Name, "err", err)
		return false
	}
	file := filepath.Base(s.o.Journal.Path())
	preps := make([]store.Preparation, len(out))
	for i, o := range out {
		sum := sha256.Sum256(o.mail)
		preps[i] = store.Preparation{ID: o.m.ID, MessageID: o.msgID, JournalFile: file, JournalOffset: offs[i], Sum: sum[:]}
		if p.MDN != config.ReceiptNone && o.m.Kind != store.KindBundle {
			preps[i].Pending = &store.Pending{Partner: p.Name, ControlID: o.m.ControlID, MIC: o.mic.String(), Sent: now,
				Due: now.Add(p.MDNTimeout.D())}
		}
	}
	if err := s.o.Store.PrepareAll(ctx, preps); err != nil {
		s.log.Error("store", "partner", p.Name, "err", err)
		return false
	}
	return true
}

// submit sends one mail on the partner's session: ok when the server took
// it; else the failure is recorded (submitFailed) and goOn says whether
// the mails after it may still go.
func (w *partnerSender) submit(ctx context.Context, o outgoing) (ok, goOn bool) {
	s, p := w.s, w.p
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.o.Abort, cancel)()
	opts := SubmitOptions{RequireTLS: p.RequireTLS, EnvelopeID: strings.Trim(o.msgID, "<>")}
	err := w.sess.submit(sctx, s.o.Submitter, s.o.SessionMails, s.o.SessionIdle, o.from, []string{p.Email}, o.mail, opts)
	switch {
	case err == nil:
		return true, true
	case s.o.Abort.Err() != nil:
		// Cut short by the shutdown: nothing is known of this attempt. The
		// message stays queued and goes at the next start under the same
		// Message-ID.
		o.log.Warn("submission cut short by the shutdown; the message is sent at the next start", "message_id", o.msgID)
		return false, false
	}
	return false, s.submitFailed(ctx, p, o.m, o.msgID, err, o.log)
}
