package store

import (
	"time"
)

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
