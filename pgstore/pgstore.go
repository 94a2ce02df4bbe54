// Package pgstore is the store of a cluster of hl7mail nodes on PostgreSQL.
// First, the CA path: Accept takes a message into the
// shared database and returns once the transaction holding it has
// committed (synchronous_commit on), so that a surrogate on any node may
// answer CA and a node that dies loses nothing. Accepts that come at once,
// on any connection of the node, share one transaction (group commit), as
// the embedded spool shares one sync. A message accepted twice (a router
// that failed over and sent it again to the other node) is one message:
// the same partner, direction, control ID and payload digest give the id
// it was accepted with before.
//
// The evidence journals are kept in the database too (journal.go), and
// export to the mbox files a single node writes. What a partner's sender
// needs (outbound.go: the queue, preparation, state changes, retries,
// alerts), what a router's deliverer and the responder need (inbound.go)
// and what the receiver needs (receive.go: replays, receipts, reports,
// bounces, quarantine) are there: the three services run on it as on the
// embedded store.
//
// The operators' views (ops.go: listings, the dashboard's figures,
// alerts and their notices), the wake-up of the node that runs a queue
// when another node took a message for it (notify.go: LISTEN/NOTIFY) and
// the moving in of an embedded store (migrate.go) are there too. The
// embedded store stays the default.
//
// It imports, of this module, journal (the mbox format of an export),
// roles (the schema's lock), spool (the message it accepts) and store (the
// types the services share).
package pgstore

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/hl7mail/hl7mail/roles"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

// schema is applied at Open, each statement idempotent.
var schema = []string{
	`CREATE TABLE IF NOT EXISTS messages (
		id           BIGSERIAL PRIMARY KEY,
		direction    TEXT        NOT NULL,
		partner      TEXT        NOT NULL,
		control_id   TEXT        NOT NULL,
		message_type TEXT        NOT NULL,
		sha256       BYTEA       NOT NULL,
		payload      BYTEA       NOT NULL,
		message_id   TEXT        NOT NULL DEFAULT '',
		mic          TEXT        NOT NULL DEFAULT '',
		kind         TEXT        NOT NULL DEFAULT '',
		in_reply_to  TEXT        NOT NULL DEFAULT '',
		recipient    TEXT        NOT NULL DEFAULT '',
		receipt_note TEXT        NOT NULL DEFAULT '',
		answer_to    TEXT        NOT NULL DEFAULT '',
		state        TEXT        NOT NULL DEFAULT 'queued',
		node         TEXT        NOT NULL,
		received     TIMESTAMPTZ NOT NULL DEFAULT now()
	)`,
	// One message however many nodes it was sent to: the duplicate check.
	`CREATE UNIQUE INDEX IF NOT EXISTS messages_once ON messages(partner, direction, control_id, sha256)`,
}

// Options configure Open.
type Options struct {
	DSN  string // postgres://…; required
	Node string // this node's name, recorded with what it accepts; required
	// MaxBatch bounds the messages of one transaction (default 256).
	MaxBatch int
	// Writers is how many transactions may be committing at once
	// (default 4): while some wait for the WAL to be flushed, the next
	// batch gathers and goes. An Accept that finds one free commits
	// itself; others queue for the writers.
	Writers int
	Logger  *slog.Logger
}

// Store is the shared store, as far as it goes.
type Store struct {
	o     Options
	pool  *pgxpool.Pool
	reqs  chan *acceptReq
	slots chan struct{} // one per transaction that may be committing: Writers
	quit  chan struct{}
	wg    sync.WaitGroup

	commits, messages atomic.Int64
}

type acceptReq struct {
	m    spool.Message
	hash [32]byte
	res  chan acceptRes
}

type acceptRes struct {
	a   spool.Accepted
	err error
}

// ErrClosed is returned by Accept after Close.
var ErrClosed = errors.New("pgstore: closed")

// Open connects to the database, creates what is missing of the schema and
// starts the writers.
func Open(ctx context.Context, o Options) (*Store, error) {
	if o.DSN == "" || o.Node == "" {
		return nil, errors.New("pgstore: a DSN and a node name are required")
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 256
	}
	if o.Writers <= 0 {
		o.Writers = 4
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	cfg, err := pgxpool.ParseConfig(o.DSN)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	cfg.MaxConns = int32(o.Writers + 2)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	s := &Store{o: o, pool: pool, reqs: make(chan *acceptReq, 4*o.MaxBatch), slots: make(chan struct{}, o.Writers),
		quit: make(chan struct{})}
	// Nodes starting together would race on CREATE ... IF NOT EXISTS:
	// one at a time, under the schema's advisory lock.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, roles.SchemaLock); err != nil {
			return err
		}
		for _, stmt := range slices.Concat(schema, journalSchema, outboundSchema, inboundSchema, receiveSchema, opsSchema) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("pgstore: schema: %w", err)
	}
	// A message is acknowledged only once durable: refuse a database set
	// to acknowledge commits before they are flushed.
	var sc string
	if err := pool.QueryRow(ctx, "SHOW synchronous_commit").Scan(&sc); err != nil {
		pool.Close()
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	if sc == "off" {
		pool.Close()
		return nil, errors.New("pgstore: the database has synchronous_commit off: a CA'd message could be lost; set it on (or remote_apply with a standby)")
	}
	for range o.Writers {
		s.wg.Add(1)
		go s.writer()
	}
	return s, nil
}

// Accept stores m in the shared database and returns its id once the
// transaction holding it has committed. The same message accepted before
// (same partner, direction, control ID and payload) returns the id it got
// then.
func (s *Store) Accept(ctx context.Context, m spool.Message) (spool.Accepted, error) {
	req := &acceptReq{m: m, hash: sha256.Sum256(m.Payload), res: make(chan acceptRes, 1)}
	select {
	case <-s.quit:
		return spool.Accepted{}, ErrClosed
	default:
	}
	select {
	case s.slots <- struct{}{}:
		// A commit slot is free: commit here, with whatever waits, and
		// spare the hand-over to a writer.
		s.commit(s.fill([]*acceptReq{req}))
		<-s.slots
		r := <-req.res
		return r.a, r.err
	default:
	}
	select {
	case s.reqs <- req:
	case <-s.quit:
		return spool.Accepted{}, ErrClosed
	case <-ctx.Done():
		return spool.Accepted{}, fmt.Errorf("pgstore: queue for commit: %w", ctx.Err())
	}
	select {
	case r := <-req.res:
		return r.a, r.err
	case <-ctx.Done():
		// The message may still commit: the router, getting no CA, sends
		// it again, and the duplicate check makes it one.
		return spool.Accepted{}, fmt.Errorf("pgstore: wait for commit: %w", ctx.Err())
	case <-s.quit:
		// Closing: if a writer had it, it may have committed; as above,
		// a resend is the same message.
		select {
		case r := <-req.res:
			return r.a, r.err
		default:
			return spool.Accepted{}, ErrClosed
		}
	}
}

// writer commits batches of waiting requests, in a free commit slot,
// until Close.
func (s *Store) writer() {
	defer s.wg.Done()
	for {
		var first *acceptReq
		select {
		case first = <-s.reqs:
		case <-s.quit:
			return
		}
		select {
		case s.slots <- struct{}{}:
		case <-s.quit:
			first.res <- acceptRes{err: ErrClosed}
			return
		}
		s.commit(s.fill([]*acceptReq{first}))
		<-s.slots
	}
}

// fill adds the requests already waiting to batch, up to MaxBatch; it does
// not wait.
func (s *Store) fill(batch []*acceptReq) []*acceptReq {
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

// insert takes one message; no row comes back when it was taken before,
// and insertAll looks its id up.
const insert = `INSERT INTO messages (direction, partner, control_id, message_type, sha256, payload, message_id, mic, kind,
		in_reply_to, recipient, receipt_note, answer_to, node)
	VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
	ON CONFLICT (partner, direction, control_id, sha256) DO NOTHING
	RETURNING id`

// commit takes batch in one transaction and answers each request. The
// statements go in one pipeline with one Sync: PostgreSQL runs them as one
// implicit transaction, committed at the Sync, so that a batch costs one
// round trip and one WAL flush, as a lone INSERT in autocommit does.
func (s *Store) commit(batch []*acceptReq) {
	ctx := context.Background()
	ids := make([]int64, len(batch))
	err := s.insertAll(ctx, batch, ids)
	s.commits.Add(1)
	if err != nil {
		s.o.Logger.Error("pgstore: commit failed", "messages", len(batch), "err", err)
		for _, r := range batch {
			r.res <- acceptRes{err: fmt.Errorf("pgstore: commit: %w", err)}
		}
		return
	}
	s.messages.Add(int64(len(batch)))
	for i, r := range batch {
		r.res <- acceptRes{a: spool.Accepted{ID: ids[i]}}
	}
}

func (s *Store) insertAll(ctx context.Context, batch []*acceptReq, ids []int64) error {
	b := &pgx.Batch{}
	for _, r := range batch {
		m := r.m
		if m.Kind == "" {
			m.Kind = store.KindHL7 // as the embedded store records it
		}
		b.Queue(insert, string(m.Direction), m.Partner, m.ControlID, m.MessageType, r.hash[:], m.Payload, m.MessageID,
			m.MIC, m.Kind, m.InReplyTo, m.Recipient, m.ReceiptNote, m.AnswerTo, s.o.Node)
	}
	told := map[string]bool{}
	for _, r := range batch {
		if w := ingestPayload(r.m.Partner, r.m.Direction); !told[w] {
			told[w] = true
			b.Queue(notifyIngest, w)
		}
	}
	br := s.pool.SendBatch(ctx, b)
	for i := range batch {
		if err := br.QueryRow().Scan(&ids[i]); errors.Is(err, pgx.ErrNoRows) {
			ids[i] = 0 // the same message, taken before: looked up below
		} else if err != nil {
			br.Close()
			return err
		}
	}
	for range told {
		if _, err := br.Exec(); err != nil {
			br.Close()
			return err
		}
	}
	// Close reads the Sync's answer: the implicit transaction has
	// committed (or failed, and none of the batch is stored).
	if err := br.Close(); err != nil {
		return err
	}
	for i, r := range batch {
		if ids[i] != 0 {
			continue
		}
		// Taken before, by this node or another (ON CONFLICT waited for
		// a transaction taking it at the same moment to commit): a new
		// statement, after the batch's commit, sees it.
		m := r.m
		if err := s.pool.QueryRow(ctx, `SELECT id FROM messages WHERE partner = $1 AND direction = $2 AND control_id = $3
			AND sha256 = $4`, m.Partner, string(m.Direction), m.ControlID, r.hash[:]).Scan(&ids[i]); err != nil {
			return err
		}
	}
	return nil
}

// Stats are the commits made since Open and the messages in them.
func (s *Store) Stats() spool.CommitStats {
	return spool.CommitStats{Commits: s.commits.Load(), Messages: s.messages.Load()}
}

// Close stops the writers, after the batches they hold, and disconnects.
// Requests still queued get ErrClosed.
func (s *Store) Close() error {
	close(s.quit)
	s.wg.Wait()
	for {
		select {
		case r := <-s.reqs:
			r.res <- acceptRes{err: ErrClosed}
		default:
			s.pool.Close()
			return nil
		}
	}
}
