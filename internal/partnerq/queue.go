// Package partnerq drains stored messages partner by partner: one worker
// per partner, in the order the messages were accepted, woken at once by
// Notify or every poll interval. The outbound Sender and the Deliverer to
// the router run on it; Record keeps their record of work done waiting
// for a store that cannot write, rather than having the work done twice.
//
// It imports, of this module, only config and store.
package partnerq

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/store"
)

// Source gives a partner's next message due at now, or store.ErrNotFound
// (*store.Store does).
type Source interface {
	NextQueued(ctx context.Context, partner string, dir store.Direction, now time.Time) (store.Message, error)
}

// Queue drains, for every partner, the stored messages of one direction.
type Queue struct {
	cfg  *config.Config
	dir  store.Direction
	poll time.Duration
	now  func() time.Time
	log  *slog.Logger
	wake map[string]chan struct{}
	// Next picks a partner's next message (New: the oldest due, from the
	// Source). A caller may replace it before Run, to pick in another order.
	Next func(ctx context.Context, p *config.Partner, now time.Time) (store.Message, error)
}

// New returns the queue of direction dir over src for cfg's partners.
func New(cfg *config.Config, src Source, dir store.Direction, poll time.Duration, now func() time.Time, log *slog.Logger) *Queue {
	q := &Queue{cfg: cfg, dir: dir, poll: poll, now: now, log: log, wake: map[string]chan struct{}{}}
	q.Next = func(ctx context.Context, p *config.Partner, now time.Time) (store.Message, error) {
		return src.NextQueued(ctx, p.Name, dir, now)
	}
	for _, p := range cfg.Partners {
		q.wake[p.Name] = make(chan struct{}, 1)
	}
	return q
}

// Notify wakes partner's worker, if it sleeps.
func (q *Queue) Notify(partner string) {
	if ch, ok := q.wake[partner]; ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Worker handles one partner's messages: Step makes one attempt and
// reports whether the queue may go on at once; Stop releases what the
// worker holds (may be nil).
type Worker struct {
	Step func(ctx context.Context, m store.Message) bool
	Stop func()
}

// Run drains every partner's queue, with the Worker start returns for it,
// until ctx ends.
func (q *Queue) Run(ctx context.Context, start func(p *config.Partner) Worker) {
	var wg sync.WaitGroup
	for i := range q.cfg.Partners {
		p := &q.cfg.Partners[i]
		w := start(p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if w.Stop != nil {
				defer w.Stop()
			}
			q.runPartner(ctx, p, w.Step)
		}()
	}
	wg.Wait()
}

func (q *Queue) runPartner(ctx context.Context, p *config.Partner, step func(context.Context, store.Message) bool) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-q.wake[p.Name]:
		}
		for ctx.Err() == nil {
			m, err := q.Next(ctx, p, q.now())
			if errors.Is(err, store.ErrNotFound) {
				break
			}
			if err != nil {
				if ctx.Err() == nil {
					q.log.Error("queue not readable", "partner", p.Name, "direction", string(q.dir), "err", err)
				}
				break
			}
			if !step(ctx, m) {
				break // wait before the next attempt
			}
		}
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		t.Reset(q.poll)
	}
}

// Backoff is the wait after attempts failed attempts: base, doubling each
// time, at most max.
func Backoff(base, max time.Duration, attempts int) time.Duration {
	d := base
	for i := 0; i < attempts && d < max; i++ {
		d *= 2
	}
	return min(d, max)
}

// Record runs record, a store write of what happened already (the SMTP
// server took the mails, the router the message), until it succeeds,
// fails for good (store.ErrStateChanged, store.ErrNotFound: the message
// changed meanwhile) or stop ends. A store that cannot write for a while
// (a full disk) is waited for, rather than the work done again; only a
// stop gives up, and the next start does it again (at least once).
func Record(stop <-chan struct{}, log *slog.Logger, what string, record func() error) error {
	wait := 50 * time.Millisecond
	for told := false; ; told = true {
		err := record()
		if err == nil || errors.Is(err, store.ErrStateChanged) || errors.Is(err, store.ErrNotFound) {
			return err
		}
		if !told {
			log.Error("store: "+what+"; trying again until the store writes", "err", err)
		}
		select {
		case <-stop:
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}
