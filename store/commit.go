package store

import (
	"context"
	"crypto/sha256"
	"fmt"
	"time"
)

// Accept stores m durably and returns its id once it is on disk. A message
// repeating an earlier one (same partner, direction, control ID and payload)
// is kept in state Duplicate and never sent. When ctx ends first an error is
// returned; the message may still be stored.
func (s *Store) Accept(ctx context.Context, m NewMessage) (Accepted, error) {
	if s.readOnly {
		return Accepted{}, ErrReadOnly
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

func (s *Store) writeLoop() {
	defer close(s.done)
	batch := make([]*acceptReq, 0, s.max)
	for {
		select {
		case r := <-s.reqs:
			s.commitMu.Lock()
			s.commit(s.fill(append(batch[:0], r)))
			s.commitMu.Unlock()
		case <-s.quit:
			// Commit what was queued before Close.
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

// checkpointInterval is how often the WAL is copied into the database.
const checkpointInterval = 2 * time.Second

// checkpointLoop copies committed WAL frames into the database file from a
// connection of its own. A passive checkpoint never blocks the ingester.
func (s *Store) checkpointLoop() {
	defer close(s.ckDone)
	t := time.NewTicker(checkpointInterval)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-t.C:
			s.checkpoint("PASSIVE")
		}
	}
}

// checkpoint runs a WAL checkpoint of the given mode. A checkpoint syncs
// the WAL before copying it and the database after; when it copied every
// frame, all that was ingested before it started is durable.
func (s *Store) checkpoint(mode string) {
	s.ingMu.Lock()
	ingested := s.ingested
	s.ingMu.Unlock()
	var busy, frames, copied int
	err := s.db.QueryRow("PRAGMA wal_checkpoint("+mode+")").Scan(&busy, &frames, &copied)
	switch {
	case err != nil:
		s.log.Warn("store checkpoint failed", "err", err)
	case busy == 0 && frames == copied:
		s.durable.Store(ingested)
	}
}

// fill adds the requests already waiting to batch, up to the batch limit.
// It does not wait: a lone request is committed at once, and requests that
// arrive during a commit form the next batch.
func (s *Store) fill(batch []*acceptReq) []*acceptReq {
	for len(batch) < s.max {
		select {
		case r := <-s.reqs:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

// commit appends batch to the spool log with one sync, answers every
// request and hands the records to the ingester. Called under commitMu.
func (s *Store) commit(batch []*acceptReq) {
	now := s.now().UnixMicro()
	recs := make([]logRecord, len(batch))
	var lastIn int64
	for i, r := range batch {
		recs[i] = logRecord{seq: s.nextSeq + int64(i), time: now, m: r.m, hash: r.hash}
		if r.m.Direction == Inbound {
			lastIn = recs[i].seq
		}
	}
	err := s.spool.append(recs, s.durable.Load())
	s.stats.record(len(batch))
	if err != nil {
		s.log.Error("store commit failed", "messages", len(batch), "err", err)
		for _, r := range batch {
			r.res <- acceptRes{err: err}
		}
		return
	}
	s.nextSeq += int64(len(batch))
	if lastIn != 0 {
		s.appendedIn.Store(lastIn)
	}
	s.appended.Store(s.nextSeq - 1)
	for i, r := range batch {
		r.res <- acceptRes{a: Accepted{ID: recs[i].seq}}
	}
	select {
	case s.ingest <- recs:
	case <-s.ingestDone:
		// Closing with the database failing: the records stay in the
		// spool log and are replayed at Open.
	}
}
