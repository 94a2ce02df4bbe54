// Package store is hl7mail's durable spool: an embedded SQLite database
// (WAL journal, synchronous=FULL) holding every message hl7mail has taken
// responsibility for, with its state.
//
// Writes that acknowledge a message go through one writer goroutine that
// commits waiting requests together, so that many connections share one
// fsync (group commit). Accept returns only after the commit is on disk,
// which is what lets a surrogate answer CA (draft-ietf-ediint-hl7-02 §6.5.1).
package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Direction says which way a message travels.
type Direction string

// Directions.
const (
	Outbound Direction = "out" // router → partner (received by a surrogate)
	Inbound  Direction = "in"  // partner → router (received by mail)
)

// State is where a message is in its life.
type State string

// States.
const (
	// Queued: durable and waiting to be sent.
	Queued State = "queued"
	// Duplicate: a resend of a message already stored (same partner,
	// direction, control ID and payload); kept as evidence, never sent.
	Duplicate State = "duplicate"
)

// ErrClosed is returned by Accept after Close.
var ErrClosed = errors.New("store: closed")

// ErrNotFound is returned when no message has the given id.
var ErrNotFound = errors.New("store: no such message")

// FileName is the database file inside the store folder.
const FileName = "hl7mail.db"

// NewMessage is a message to take responsibility for.
type NewMessage struct {
	Direction   Direction
	Partner     string
	ControlID   string // MSH-10
	MessageType string // MSH-9
	Payload     []byte
}

// Accepted is the outcome of Accept.
type Accepted struct {
	ID int64
	// DuplicateOf is the id of the earlier message this one repeats, or 0.
	DuplicateOf int64
}

// Message is a stored message. Payload is filled only by Get.
type Message struct {
	ID          int64     `json:"id"`
	Direction   Direction `json:"direction"`
	Partner     string    `json:"partner"`
	ControlID   string    `json:"control_id"`
	MessageType string    `json:"message_type"`
	MessageID   string    `json:"message_id"`
	State       State     `json:"state"`
	DuplicateOf int64     `json:"duplicate_of,omitempty"`
	Size        int       `json:"size"`
	SHA256      []byte    `json:"sha256"`
	Received    time.Time `json:"received"`
	Updated     time.Time `json:"updated"`
	Payload     []byte    `json:"-"`
}

// Options configure Open.
type Options struct {
	// Dir is the store folder (required); it is created when missing.
	Dir string
	// Logger receives the store's records (default slog.Default()).
	Logger *slog.Logger
	// MaxBatch bounds how many messages share one commit (default 256).
	MaxBatch int
	// Now returns the current time (default time.Now).
	Now func() time.Time
}

// Store is the spool database. Its methods are safe for concurrent use.
type Store struct {
	dir    string
	db     *sql.DB
	log    *slog.Logger
	now    func() time.Time
	max    int
	reqs   chan *acceptReq
	quit   chan struct{}
	done   chan struct{}
	ckDone chan struct{}
	writer *sql.Conn
	stmts  writerStmts
	stats  commitStats
}

// writerStmts are prepared once on the writer connection. The writer owns
// that connection, so it runs its transactions with these statements rather
// than database/sql's Tx, which would prepare every statement again.
type writerStmts struct {
	begin, find, insert, commit, rollback *sql.Stmt
}

func (w *writerStmts) prepare(ctx context.Context, c *sql.Conn) error {
	for _, p := range []struct {
		dst   **sql.Stmt
		query string
	}{{&w.begin, "BEGIN IMMEDIATE"}, {&w.find, findOriginal}, {&w.insert, insertMessage},
		{&w.commit, "COMMIT"}, {&w.rollback, "ROLLBACK"}} {
		st, err := c.PrepareContext(ctx, p.query)
		if err != nil {
			return fmt.Errorf("store: prepare %q: %w", p.query, err)
		}
		*p.dst = st
	}
	return nil
}

type acceptReq struct {
	m    NewMessage
	hash [32]byte
	res  chan acceptRes
}

type acceptRes struct {
	a   Accepted
	err error
}

// Open opens (creating if needed) the store in opts.Dir.
func Open(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("store: Options.Dir is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 256
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("store: create folder: %w", err)
	}
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)",
		// Checkpoints run in the background (checkpointLoop), not inside
		// the commit that acknowledges a message.
		"wal_autocheckpoint(0)", "journal_size_limit(67108864)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	dsn := "file:" + filepath.Join(opts.Dir, FileName) + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("store: open: %w", err)
	}
	ctx := context.Background()
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, err
	}
	w, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("store: writer connection: %w", err)
	}
	var stmts writerStmts
	if err := stmts.prepare(ctx, w); err != nil {
		w.Close()
		db.Close()
		return nil, err
	}
	s := &Store{
		stmts: stmts, dir: opts.Dir, db: db, log: opts.Logger, now: opts.Now, max: opts.MaxBatch,
		reqs: make(chan *acceptReq, 4*opts.MaxBatch), quit: make(chan struct{}), done: make(chan struct{}), ckDone: make(chan struct{}),
		writer: w,
	}
	go s.writeLoop()
	go s.checkpointLoop()
	return s, nil
}

// schema lists the migrations; user_version counts those applied.
var schema = []string{
	`CREATE TABLE messages (
		id            INTEGER PRIMARY KEY,
		direction     TEXT    NOT NULL,
		partner       TEXT    NOT NULL,
		control_id    TEXT    NOT NULL,
		message_type  TEXT    NOT NULL,
		message_id    TEXT    NOT NULL DEFAULT '',
		state         TEXT    NOT NULL,
		duplicate_of  INTEGER REFERENCES messages(id),
		size          INTEGER NOT NULL,
		sha256        BLOB    NOT NULL,
		payload       BLOB    NOT NULL,
		received      INTEGER NOT NULL,
		updated       INTEGER NOT NULL
	);
	CREATE INDEX messages_dedupe ON messages(partner, direction, control_id);`,
}

func migrate(ctx context.Context, db *sql.DB) error {
	var v int
	if err := db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return fmt.Errorf("store: read schema version: %w", err)
	}
	if v > len(schema) {
		return fmt.Errorf("store: database schema version %d is newer than this hl7mail (%d)", v, len(schema))
	}
	for ; v < len(schema); v++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("store: migrate: %w", err)
		}
		if _, err := tx.ExecContext(ctx, schema[v]); err != nil {
			tx.Rollback()
			return fmt.Errorf("store: migrate to %d: %w", v+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("store: migrate to %d: %w", v+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("store: migrate to %d: %w", v+1, err)
		}
	}
	return nil
}

// Accept stores m durably and returns its id once the commit is on disk.
// A message repeating an earlier one (same partner, direction, control ID
// and payload) is stored in state Duplicate. When ctx ends first an error is
// returned; the message may still be committed later.
func (s *Store) Accept(ctx context.Context, m NewMessage) (Accepted, error) {
	req := &acceptReq{m: m, hash: sha256.Sum256(m.Payload), res: make(chan acceptRes, 1)}
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
			s.commit(s.fill(append(batch[:0], r)))
		case <-s.quit:
			// Commit what was queued before Close.
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
// connection of its own. A passive checkpoint never blocks the writer, so
// acknowledgements do not wait for it.
func (s *Store) checkpointLoop() {
	defer close(s.ckDone)
	t := time.NewTicker(checkpointInterval)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-t.C:
			if _, err := s.db.Exec("PRAGMA wal_checkpoint(PASSIVE)"); err != nil {
				s.log.Warn("store checkpoint failed", "err", err)
			}
		}
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

const (
	findOriginal = `SELECT id FROM messages WHERE partner = ? AND direction = ? AND control_id = ?
		AND sha256 = ? AND duplicate_of IS NULL ORDER BY id LIMIT 1`
	insertMessage = `INSERT INTO messages (direction, partner, control_id, message_type, state, duplicate_of,
		size, sha256, payload, received, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
)

// commit writes batch in one transaction and answers every request.
func (s *Store) commit(batch []*acceptReq) {
	start := time.Now()
	res := make([]acceptRes, len(batch))
	err := s.commitTx(batch, res)
	s.stats.record(len(batch), time.Since(start))
	for i, r := range batch {
		if err != nil {
			r.res <- acceptRes{err: err}
			continue
		}
		r.res <- res[i]
	}
	if err != nil {
		s.log.Error("store commit failed", "messages", len(batch), "err", err)
	}
}

func (s *Store) commitTx(batch []*acceptReq, res []acceptRes) (err error) {
	ctx := context.Background()
	st := &s.stmts
	if _, err := st.begin.ExecContext(ctx); err != nil {
		return fmt.Errorf("store: begin: %w", err)
	}
	defer func() {
		if err != nil {
			st.rollback.ExecContext(ctx)
		}
	}()
	now := s.now().UnixMicro()
	for i, r := range batch {
		var orig int64
		err := st.find.QueryRowContext(ctx, r.m.Partner, r.m.Direction, r.m.ControlID, r.hash[:]).Scan(&orig)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("store: look up duplicate: %w", err)
		}
		state, dup := Queued, sql.NullInt64{}
		if orig != 0 {
			state, dup = Duplicate, sql.NullInt64{Int64: orig, Valid: true}
		}
		out, err := st.insert.ExecContext(ctx, r.m.Direction, r.m.Partner, r.m.ControlID, r.m.MessageType,
			state, dup, len(r.m.Payload), r.hash[:], r.m.Payload, now, now)
		if err != nil {
			return fmt.Errorf("store: insert: %w", err)
		}
		id, err := out.LastInsertId()
		if err != nil {
			return fmt.Errorf("store: insert: %w", err)
		}
		res[i] = acceptRes{a: Accepted{ID: id, DuplicateOf: orig}}
	}
	if _, err := st.commit.ExecContext(ctx); err != nil {
		return fmt.Errorf("store: commit: %w", err)
	}
	return nil
}

// Close commits what is queued, stops the writer and closes the database.
// Close must not be called twice.
func (s *Store) Close() error {
	close(s.quit)
	<-s.done
	<-s.ckDone
	for _, st := range []*sql.Stmt{s.stmts.begin, s.stmts.find, s.stmts.insert, s.stmts.commit, s.stmts.rollback} {
		st.Close()
	}
	s.writer.Close()
	// A last full checkpoint leaves a small WAL behind.
	s.db.Exec("PRAGMA wal_checkpoint(TRUNCATE)")
	return s.db.Close()
}
