package pgstore

import (
	"context"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/store"
)

// ingestChannel is the PostgreSQL notification channel on which a commit
// of new messages tells every node their partner and direction: the node
// running that partner's sender or deliverer learns at once that it has
// work, whichever node's surrogate or watcher took the message. A
// notification missed (a listener reconnecting) costs only a poll
// interval: the queues are read from the database anyway.
const ingestChannel = "hl7mail_ingest"

// notifyIngest is queued in an accept's batch: PostgreSQL delivers it when
// the batch commits, and never when it does not.
const notifyIngest = `SELECT pg_notify('` + ingestChannel + `', $1)`

// ingestPayload is what a notification carries: direction, then partner.
func ingestPayload(partner string, d store.Direction) string { return string(d) + " " + partner }

// OnIngest sets f to be called with the partner and direction of messages
// each time some have committed, on any node (store.Store.OnIngest). f
// must not block. It listens on a connection of its own until Close.
func (s *Store) OnIngest(f func(partner string, d store.Direction)) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-s.quit; cancel() }()
		for ctx.Err() == nil {
			err := s.listen(ctx, f)
			if ctx.Err() != nil {
				return
			}
			s.o.Logger.Warn("pgstore: the wake-up of new messages broke; listening again (queues are polled meanwhile)", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
}

// listen holds one listening connection until it fails or ctx ends.
func (s *Store) listen(ctx context.Context, f func(partner string, d store.Direction)) error {
	conn, err := pgx.Connect(ctx, s.o.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "LISTEN "+ingestChannel); err != nil {
		return err
	}
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		if d, partner, ok := strings.Cut(n.Payload, " "); ok {
			f(partner, store.Direction(d))
		}
	}
}
