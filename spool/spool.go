// Package spool is the fast path of hl7mail's durable store: the
// write-ahead log that Accept appends every message to and fdatasyncs
// before it returns, committing the messages that arrive together with one
// sync (group commit). That is what lets a surrogate answer CA
// (draft-ietf-ediint-hl7-02 §6.5.1). The spool never waits on the
// database: committed records wait, in memory and in the log, until the
// store's ingester takes them (Ready, Take); while more than MaxBacklog
// wait, Accept refuses with ErrBacklog instead.
//
// The lock file keeps a second process from writing the same spool.
//
// It imports, of this module, only internal/safefile.
package spool

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hl7mail/hl7mail/internal/safefile"
)

// DefaultMaxBacklog is Options.MaxBacklog's default: at the 200 messages a
// second of a busy router, almost ten minutes of a database that takes
// nothing.
const DefaultMaxBacklog = 100_000

// Options configure Open.
type Options struct {
	// Dir is the folder of the log segments and the lock file (required,
	// and existing).
	Dir string
	// Logger receives the spool's records (default slog.Default()).
	Logger *slog.Logger
	// MaxBatch bounds how many messages share one sync (default 256).
	MaxBatch int
	// MaxBacklog bounds the messages committed and not yet in the
	// database (default DefaultMaxBacklog); see ErrBacklog.
	MaxBacklog int64
	// Now returns the current time (default time.Now).
	Now func() time.Time
	// SegmentSize is the size of a log segment (default 16 MiB; tests).
	SegmentSize int64
}

// Spool is the log and its writer. Its methods are safe for concurrent use.
type Spool struct {
	o    Options
	lock *os.File
	reqs chan *acceptReq
	quit chan struct{}
	done chan struct{} // writeLoop has ended

	// commitMu is held by whoever appends to the log: the writer
	// goroutine, or an Accept that finds it free and commits on its own
	// goroutine (sparing two goroutine handoffs when the spool is not busy).
	commitMu  sync.Mutex
	log       *spoolLog // guarded by commitMu
	nextID    int64     // guarded by commitMu
	logClosed bool      // guarded by commitMu
	appended  atomic.Int64
	// appendedIn is the highest inbound id appended: what queries about
	// received mail (replays, ordering) wait for.
	appendedIn atomic.Int64
	// ingested is the highest id the store has in its database; durable,
	// the highest it has synced there: a segment is reused only when its
	// records are all durable.
	ingested atomic.Int64
	durable  atomic.Int64

	// committed holds records appended and not yet taken by the ingester;
	// ready has a value when it is not empty.
	takeMu    sync.Mutex
	committed []Record
	ready     chan struct{}

	statsMu  sync.Mutex
	stats    CommitStats
	started  atomic.Bool
	stopOnce sync.Once
}

type acceptReq struct {
	m    Message
	hash [32]byte
	res  chan acceptRes
}

type acceptRes struct {
	a   Accepted
	err error
}

// Open takes the lock of the spool in o.Dir and opens its log. It returns
// the records the log holds, in id order, for the caller to replay what
// its database lacks; then Start begins accepting.
func Open(o Options) (*Spool, []Record, error) {
	if o.Dir == "" {
		return nil, nil, fmt.Errorf("spool: Options.Dir is required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 256
	}
	if o.MaxBacklog <= 0 {
		o.MaxBacklog = DefaultMaxBacklog
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	lock, err := LockDir(o.Dir)
	if err != nil {
		return nil, nil, err
	}
	l, recs, err := openSpoolLog(o.Dir, o.SegmentSize)
	if err != nil {
		lock.Close()
		return nil, nil, err
	}
	s := &Spool{o: o, lock: lock, log: l, reqs: make(chan *acceptReq, 4*o.MaxBatch), quit: make(chan struct{}),
		done: make(chan struct{}), ready: make(chan struct{}, 1)}
	return s, recs, nil
}

// Start begins accepting, with last the highest id the database holds (and
// has synced): new messages get the ids after it, and the log may be
// written over.
func (s *Spool) Start(last int64) {
	s.nextID = last + 1
	s.appended.Store(last)
	s.ingested.Store(last)
	s.durable.Store(last)
	s.started.Store(true)
	go s.writeLoop()
}

// LockDir takes the lock file of folder dir, so that one process at a
// time writes to it: the spool's, and a cluster node's own folder.
func LockDir(dir string) (*os.File, error) {
	f, err := safefile.OpenPrivate(filepath.Join(dir, "hl7mail.lock"))
	if err != nil {
		return nil, fmt.Errorf("store: lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		pid, _ := os.ReadFile(f.Name())
		f.Close()
		return nil, fmt.Errorf("%w (held by process %s)", ErrLocked, strings.TrimSpace(string(pid)))
	}
	f.Truncate(0)
	f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	return f, nil
}

// Accept stores m durably and returns its id once it is on disk. When ctx
// ends first an error is returned; the message may still be stored. While
// more than MaxBacklog messages wait for the database it returns
// ErrBacklog and stores nothing.
func (s *Spool) Accept(ctx context.Context, m Message) (Accepted, error) {
	if s.Backlog() >= s.o.MaxBacklog {
		return Accepted{}, ErrBacklog
	}
	req := &acceptReq{m: m, hash: sha256.Sum256(m.Payload), res: make(chan acceptRes, 1)}
	if s.commitMu.TryLock() {
		if s.logClosed {
			s.commitMu.Unlock()
			return Accepted{}, ErrClosed
		}
		// Requests already queued share this sync.
		s.commit(s.fill([]*acceptReq{req}))
		s.commitMu.Unlock()
		r := <-req.res
		return r.a, r.err
	}
	select {
	case s.reqs <- req:
	case <-s.quit:
		return Accepted{}, ErrClosed
	case <-ctx.Done():
		return Accepted{}, fmt.Errorf("store: queue for commit: %w", ctx.Err())
	}
	select {
	case r := <-req.res:
		return r.a, r.err
	case <-ctx.Done():
		return Accepted{}, fmt.Errorf("store: wait for commit: %w", ctx.Err())
	case <-s.done:
		// The writer has ended. Holding commitMu, no fast-path commit is
		// under way: commit what is queued (req with it) unless the log is
		// closed, then req has its answer or never will.
		s.commitMu.Lock()
		if !s.logClosed {
			if batch := s.fill(nil); len(batch) > 0 {
				s.commit(batch)
			}
		}
		s.commitMu.Unlock()
		select {
		case r := <-req.res:
			return r.a, r.err
		default:
			return Accepted{}, ErrClosed
		}
	}
}

func (s *Spool) writeLoop() {
	defer close(s.done)
	batch := make([]*acceptReq, 0, s.o.MaxBatch)
	for {
		select {
		case r := <-s.reqs:
			s.commitMu.Lock()
			s.commit(s.fill(append(batch[:0], r)))
			s.commitMu.Unlock()
		case <-s.quit:
			// Commit what was queued before Stop.
			s.commitMu.Lock()
			defer s.commitMu.Unlock()
			for {
				batch = s.fill(batch[:0])
				if len(batch) == 0 {
					return
				}
				s.commit(batch)
			}
		}
	}
}

// fill adds the requests already waiting to batch, up to the batch limit.
// It does not wait: a lone request is committed at once, and requests that
// arrive during a commit form the next batch.
func (s *Spool) fill(batch []*acceptReq) []*acceptReq {
	for len(batch) < s.o.MaxBatch {
		select {
		case r := <-s.reqs:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// commit appends batch to the log with one sync, answers every request and
// leaves the records for the ingester. Called under commitMu; it never
// waits for the database.
func (s *Spool) commit(batch []*acceptReq) {
	now := s.o.Now().UnixMicro()
	recs := make([]Record, len(batch))
	var lastIn int64
	for i, r := range batch {
		recs[i] = Record{ID: s.nextID + int64(i), Time: now, Msg: r.m, Hash: r.hash}
		if r.m.Direction == Inbound {
			lastIn = recs[i].ID
		}
	}
	err := s.log.append(recs, s.durable.Load())
	s.statsMu.Lock()
	s.stats.Commits++
	s.stats.Messages += int64(len(batch))
	s.statsMu.Unlock()
	if err != nil {
		s.o.Logger.Error("store commit failed", "messages", len(batch), "err", err)
		for _, r := range batch {
			r.res <- acceptRes{err: err}
		}
		return
	}
	s.nextID += int64(len(batch))
	s.takeMu.Lock()
	s.committed = append(s.committed, recs...)
	s.takeMu.Unlock()
	if lastIn != 0 {
		s.appendedIn.Store(lastIn)
	}
	s.appended.Store(s.nextID - 1)
	for i, r := range batch {
		r.res <- acceptRes{a: Accepted{ID: recs[i].ID}}
	}
	s.signal()
}

func (s *Spool) signal() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// Ready has a value when committed records wait for Take.
func (s *Spool) Ready() <-chan struct{} { return s.ready }

// Take returns up to max of the committed records not taken yet, in id
// order. The caller puts them in its database and then reports Ingested.
func (s *Spool) Take(max int) []Record {
	s.takeMu.Lock()
	defer s.takeMu.Unlock()
	n := min(max, len(s.committed))
	out := append([]Record(nil), s.committed[:n]...)
	s.committed = s.committed[n:]
	if len(s.committed) == 0 {
		s.committed = nil // let the taken records go
	} else {
		s.signal()
	}
	return out
}

// Ingested reports that every record up to id is in the database.
func (s *Spool) Ingested(id int64) { s.ingested.Store(id) }

// Durable reports that every record up to id is synced in the database
// file: the log may write over them.
func (s *Spool) Durable(id int64) { s.durable.Store(id) }

// Appended is the highest id appended; AppendedInbound, the highest of an
// inbound message.
func (s *Spool) Appended() int64        { return s.appended.Load() }
func (s *Spool) AppendedInbound() int64 { return s.appendedIn.Load() }

// Backlog is the number of messages accepted and not yet in the database.
func (s *Spool) Backlog() int64 { return max(s.appended.Load()-s.ingested.Load(), 0) }

// Stats returns the commit statistics.
func (s *Spool) Stats() CommitStats {
	s.statsMu.Lock()
	defer s.statsMu.Unlock()
	return s.stats
}

// Stop commits what is queued and stops accepting; what was committed can
// still be taken.
func (s *Spool) Stop() {
	s.stopOnce.Do(func() {
		close(s.quit)
		if s.started.Load() {
			<-s.done
		}
		s.commitMu.Lock()
		s.logClosed = true
		s.commitMu.Unlock()
	})
}

// Close stops the spool if needed, then closes the log and releases the
// lock. Records not ingested stay in the log, for the next Open.
func (s *Spool) Close() error {
	s.Stop()
	err := s.log.close()
	s.lock.Close()
	return err
}
