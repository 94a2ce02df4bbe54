package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"runtime"
	"time"

	"github.com/hl7mail/hl7mail/spool"
)

// ingestInterval is the least time between two ingests while the store is
// busy. Each database transaction costs writes of its own beside the spool
// log's syncs that acknowledgements wait on; under load, fewer and larger
// transactions keep them off that disk. A query that needs the database up
// to date cuts the wait short.
const ingestInterval = 250 * time.Millisecond

// busyLoad is the recent ingest load, in records (decaying with time
// constant ingestInterval), above which the store is busy: about 200
// messages a second. Below it each record goes into the database at once,
// so that a message's way through the gateway waits for no ingest.
const busyLoad = 50

// ingestLoad is a count of ingested records that decays with time
// constant ingestInterval, and when records were last added.
type ingestLoad struct {
	n  float64
	at time.Time
}

func (l ingestLoad) value(now time.Time) float64 {
	return l.n * math.Exp(-now.Sub(l.at).Seconds()/ingestInterval.Seconds())
}

func (l *ingestLoad) add(now time.Time, n int) {
	l.n, l.at = l.value(now)+float64(n), now
}

// maxIngest bounds the records of one ingest transaction.
const maxIngest = 4096

// OnIngest sets f to be called, from the ingester, with the partner and
// direction of the messages each time some enter the database: a queue
// reading the database (NextQueued) learns then that it has work. f must
// not block.
func (s *Store) OnIngest(f func(partner string, d Direction)) {
	s.onIngest.Store(&f)
}

// ingestLoop copies the records the spool committed into the database,
// retrying while the database fails; the records stay in the spool log
// until they are in. At Close it takes what is left, once.
func (s *Store) ingestLoop() {
	defer close(s.ingestDone)
	var load ingestLoad // load.at: when the last ingest ended
	timer := time.NewTimer(ingestInterval)
	timer.Stop()
	for {
		select {
		case <-s.sp.Ready():
		case <-s.quit:
			for {
				recs := s.sp.Take(maxIngest)
				if len(recs) == 0 || !s.ingestWithRetry(recs) {
					return
				}
				s.announce(recs)
			}
		}
		// Busy, wait out the interval since the last ingest (unless a
		// query asks for the database to be up to date); else take only
		// what is committed already.
		if now := time.Now(); load.value(now) > busyLoad {
			timer.Reset(max(load.at.Add(ingestInterval).Sub(now), 0))
			select {
			case <-s.kick:
			case <-timer.C:
			case <-s.quit:
			}
			timer.Stop()
		}
		recs := s.sp.Take(maxIngest)
		if len(recs) == 0 {
			continue
		}
		if !s.ingestWithRetry(recs) {
			return
		}
		load.add(time.Now(), len(recs))
		s.announce(recs)
	}
}

// announce tells the OnIngest function of the partners and directions of
// recs, once each.
func (s *Store) announce(recs []spool.Record) {
	f := s.onIngest.Load()
	if f == nil {
		return
	}
	type key struct {
		partner string
		d       Direction
	}
	seen := map[key]bool{}
	for _, r := range recs {
		k := key{r.Msg.Partner, r.Msg.Direction}
		if !seen[k] {
			seen[k] = true
			(*f)(k.partner, k.d)
		}
	}
}

// ingestWithRetry inserts recs until it succeeds; it reports false when the
// store is closing with recs not inserted (they are replayed at Open).
func (s *Store) ingestWithRetry(recs []spool.Record) bool {
	delay := 10 * time.Millisecond
	for {
		var err error
		if s.pauseIngest.Load() {
			err = errors.New("ingest paused")
		} else {
			err = s.insert(recs)
		}
		s.ingMu.Lock()
		s.ingestErr = err
		if err == nil {
			s.ingested = recs[len(recs)-1].ID
			s.sp.Ingested(s.ingested)
			close(s.ingestedCh)
			s.ingestedCh = make(chan struct{})
		}
		s.ingMu.Unlock()
		if err == nil {
			return true
		}
		if !s.pauseIngest.Load() {
			s.log.Error("store: messages not yet in the database; retrying (they are safe in the spool log)",
				"messages", len(recs), "err", err, "delay", delay)
		}
		select {
		case <-time.After(delay):
			delay = min(2*delay, 5*time.Second)
		case <-s.quit:
			return false
		}
	}
}

// Backlog is the number of messages accepted (safe in the spool log) and not
// yet in the database. It stays high while the database fails.
func (s *Store) Backlog() int64 {
	if s.readOnly {
		return 0
	}
	return s.sp.Backlog()
}

// Flush waits until every message accepted so far is in the database.
func (s *Store) Flush(ctx context.Context) error { return s.waitIngested(ctx) }

// waitIngested waits until every message accepted so far is in the
// database, so that queries see them.
func (s *Store) waitIngested(ctx context.Context) error {
	if s.readOnly {
		return nil
	}
	return s.waitIngestedUpTo(ctx, s.sp.Appended())
}

// waitInbound waits until every inbound message accepted so far is in the
// database.
func (s *Store) waitInbound(ctx context.Context) error {
	if s.readOnly {
		return nil
	}
	return s.waitIngestedUpTo(ctx, s.sp.AppendedInbound())
}

// waitID waits until message id, if it was accepted, is in the database.
// Work on one message that is in the database never waits: the messages
// accepted after it go in at the ingester's pace.
func (s *Store) waitID(ctx context.Context, id int64) error {
	if s.readOnly {
		return nil
	}
	return s.waitIngestedUpTo(ctx, min(id, s.sp.Appended()))
}

// waitIngestedUpTo waits until the messages up to id target are in the
// database, asking the ingester not to wait for more.
func (s *Store) waitIngestedUpTo(ctx context.Context, target int64) error {
	if s.readOnly {
		return nil
	}
	var timeout <-chan time.Time // made on the first wait: most calls wait for nothing
	for {
		s.ingMu.Lock()
		got, ch, ierr := s.ingested, s.ingestedCh, s.ingestErr
		s.ingMu.Unlock()
		if got >= target {
			return nil
		}
		if timeout == nil {
			t := time.NewTimer(30 * time.Second)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case s.kick <- struct{}{}:
		default:
		}
		var err error
		select {
		case <-ch:
			continue
		case <-ctx.Done():
			err = ctx.Err()
		case <-timeout:
			err = context.DeadlineExceeded
		}
		return fmt.Errorf("store: %d accepted messages not yet in the database (last error: %v): %w", target-got, ierr, err)
	}
}

const (
	// findOriginal takes the direction's condition (directionIs).
	findOriginal = `SELECT id FROM messages WHERE partner = ? AND %s AND control_id = ?
		AND sha256 = ? AND duplicate_of IS NULL ORDER BY id LIMIT 1`
	insertMessage = `INSERT INTO messages (id, direction, partner, control_id, message_type, state, duplicate_of,
		size, sha256, payload, received, updated, message_id, mic, kind, in_reply_to, recipient, receipt_note, answer_to)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
)

// insert writes recs into the database in one transaction, marking
// duplicates. Only the ingester (or Open, before it starts) calls it.
func (s *Store) insert(recs []spool.Record) (err error) {
	ctx := context.Background()
	st := &s.stmts
	// One writer at a time, in turn with the updater (update): SQLite's own
	// lock would let the ingester, committing batch after batch, starve
	// the updater's wait for it (its busy handler polls, and rarely finds
	// the lock free).
	s.updMu.Lock()
	defer s.updMu.Unlock()
	if _, err := st.begin.ExecContext(ctx); err != nil {
		return fmt.Errorf("store: begin: %w", err)
	}
	defer func() {
		if err != nil {
			st.rollback.ExecContext(ctx)
		}
	}()
	for _, r := range recs {
		var orig int64
		m := &r.Msg
		find := st.findOut
		if m.Direction == Inbound {
			find = st.findIn
		}
		err := find.QueryRowContext(ctx, m.Partner, m.ControlID, r.Hash[:]).Scan(&orig)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("store: look up duplicate: %w", err)
		}
		state, dup := Queued, sql.NullInt64{}
		if orig != 0 {
			state, dup = Duplicate, sql.NullInt64{Int64: orig, Valid: true}
			s.log.Info("duplicate stored; it will not be sent", "id", r.ID, "duplicate_of", orig,
				"partner", m.Partner, "control_id", m.ControlID)
		}
		if _, err := st.insert.ExecContext(ctx, r.ID, m.Direction, m.Partner, m.ControlID, m.MessageType,
			state, dup, len(m.Payload), r.Hash[:], m.Payload, r.Time, r.Time, m.MessageID, m.MIC,
			kindOr(m.Kind), m.InReplyTo, m.Recipient, m.ReceiptNote, m.AnswerTo); err != nil {
			return fmt.Errorf("store: insert: %w", err)
		}
		// A batch is milliseconds of CPU: yield between rows so that the
		// goroutines answering routers are not kept waiting for a CPU.
		runtime.Gosched()
	}
	if _, err := st.commit.ExecContext(ctx); err != nil {
		return fmt.Errorf("store: commit: %w", err)
	}
	return nil
}
