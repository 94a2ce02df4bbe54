package mailbox

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/store"
)

// queue drains, for every partner, the stored messages of one direction in
// the order they were accepted: one goroutine per partner, woken by notify
// or every poll interval. The Sender and the Deliverer run on it.
type queue struct {
	cfg  *config.Config
	dir  store.Direction
	poll time.Duration
	now  func() time.Time
	log  *slog.Logger
	wake map[string]chan struct{}
	// next picks a partner's next message (newQueue: the oldest due,
	// Store.NextQueued).
	next func(ctx context.Context, p *config.Partner, now time.Time) (store.Message, error)
}

func newQueue(cfg *config.Config, st *store.Store, dir store.Direction, poll time.Duration, now func() time.Time, log *slog.Logger) *queue {
	q := &queue{cfg: cfg, dir: dir, poll: poll, now: now, log: log, wake: map[string]chan struct{}{}}
	q.next = func(ctx context.Context, p *config.Partner, now time.Time) (store.Message, error) {
		return st.NextQueued(ctx, p.Name, dir, now)
	}
	for _, p := range cfg.Partners {
		q.wake[p.Name] = make(chan struct{}, 1)
	}
	return q
}

func (q *queue) notify(partner string) {
	if ch, ok := q.wake[partner]; ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// partnerWorker handles one partner's messages: step makes one attempt and
// reports whether the queue may go on at once; stop releases what the
// worker holds (may be nil).
type partnerWorker struct {
	step func(ctx context.Context, m store.Message) bool
	stop func()
}

// run drains every partner's queue until ctx ends.
func (q *queue) run(ctx context.Context, start func(p *config.Partner) partnerWorker) {
	var wg sync.WaitGroup
	for i := range q.cfg.Partners {
		p := &q.cfg.Partners[i]
		w := start(p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if w.stop != nil {
				defer w.stop()
			}
			q.runPartner(ctx, p, w.step)
		}()
	}
	wg.Wait()
}

func (q *queue) runPartner(ctx context.Context, p *config.Partner, step func(context.Context, store.Message) bool) {
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
			m, err := q.next(ctx, p, q.now())
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

// backoff is the wait after attempts failed attempts: base, doubling each
// time, at most max.
func backoff(base, max time.Duration, attempts int) time.Duration {
	d := base
	for i := 0; i < attempts && d < max; i++ {
		d *= 2
	}
	return min(d, max)
}
