package store

import (
	"context"
	"time"
)

// Accept stores m durably and returns its id once it is on disk (in the
// spool's log; the database has it soon after). A message repeating an
// earlier one (same partner, direction, control ID and payload) is kept in
// state Duplicate and never sent. When ctx ends first an error is returned;
// the message may still be stored. While too many accepted messages wait
// for the database it returns ErrBacklog and stores nothing.
func (s *Store) Accept(ctx context.Context, m NewMessage) (Accepted, error) {
	if s.readOnly {
		return Accepted{}, ErrReadOnly
	}
	return s.sp.Accept(ctx, m)
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
		s.sp.Durable(ingested)
	}
}
