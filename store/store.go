// Package store holds every message hl7mail has taken responsibility for,
// with its state, and what belongs to them: receipts, reports, quarantine,
// alerts, journal digests. One file per aggregate: delivery.go (messages
// and their states), receipts in ops.go and reports.go, alerts.go, query.go.
//
// Accept is the spool's (package spool: the write-ahead log, group commit,
// the lock), which never waits on the database. An ingester copies what the
// spool committed into an embedded SQLite database (WAL journal, one
// writer; state changes are synchronous=FULL), which every query reads;
// Open replays what the database lacks after a crash. The ingester copies
// each message at once while the store is quiet and paces itself when busy;
// queries that must see every accepted message wait for it, the queues
// (NextQueued, QueuedHeads) read the database as it is and learn of new
// messages from OnIngest.
//
// It imports, of this module, only internal/safefile and spool.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/hl7mail/hl7mail/internal/safefile"
	"github.com/hl7mail/hl7mail/spool"
)

// Store is the database and the spool that feeds it. Its methods are safe
// for concurrent use.
type Store struct {
	dir      string
	readOnly bool
	db       *sql.DB
	q        *cachedDB // db, with the frequent queries prepared once
	log      *slog.Logger
	now      func() time.Time
	sp       *spool.Spool
	quit     chan struct{} // Close: the ingester and the checkpointer end

	ingestDone  chan struct{}
	kick        chan struct{} // a query waits for the ingester
	pauseIngest atomic.Bool   // tests: leave records in the log only
	ingMu       sync.Mutex
	ingested    int64         // guarded by ingMu: highest id in the database
	ingestedCh  chan struct{} // guarded by ingMu: closed when ingested advances
	ingestErr   error         // guarded by ingMu
	ckDone      chan struct{}
	// onIngest, when set, is told of every partner and direction whose
	// messages just entered the database.
	onIngest atomic.Pointer[func(partner string, d Direction)]

	writer *sql.Conn
	stmts  writerStmts

	// updater makes the state changes of delivery, each synced
	// (synchronous=FULL) before it returns; updMu serializes its use and
	// the ingester's writes, and waiting holds the changes the next commit
	// takes (update).
	updMu   sync.Mutex
	updater *sql.Conn
	waitMu  sync.Mutex
	waiting []*change
	commits atomic.Int64 // update transactions committed
}

// writerStmts are prepared once on the database writer connection. The
// ingester owns that connection, so it runs its transactions with these
// statements rather than database/sql's Tx, which would prepare every
// statement again.
type writerStmts struct {
	begin, insert, commit, rollback *sql.Stmt
	findIn, findOut                 *sql.Stmt // findOriginal for each direction
}

func (w *writerStmts) prepare(ctx context.Context, c *sql.Conn) error {
	for _, p := range []struct {
		dst   **sql.Stmt
		query string
	}{{&w.begin, "BEGIN IMMEDIATE"}, {&w.findIn, fmt.Sprintf(findOriginal, directionIs(Inbound))},
		{&w.findOut, fmt.Sprintf(findOriginal, directionIs(Outbound))}, {&w.insert, insertMessage},
		{&w.commit, "COMMIT"}, {&w.rollback, "ROLLBACK"}} {
		st, err := c.PrepareContext(ctx, p.query)
		if err != nil {
			return fmt.Errorf("store: prepare %q: %w", p.query, err)
		}
		*p.dst = st
	}
	return nil
}

func (w *writerStmts) close() {
	for _, st := range []*sql.Stmt{w.begin, w.findIn, w.findOut, w.insert, w.commit, w.rollback} {
		if st != nil {
			st.Close()
		}
	}
}

// Open opens (creating if needed) the store in opts.Dir and replays into the
// database any message the spool log holds that the database lacks.
func Open(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("store: Options.Dir is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	// PHI at rest: the folder and its files are private to us, and hold
	// no link that another user could have planted.
	if err := safefile.MakePrivateDir(opts.Dir); err != nil {
		return nil, fmt.Errorf("store: create folder: %w", err)
	}
	problems := safefile.CheckDir(opts.Dir)
	if err := problems.Err(); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	for _, w := range problems.Warnings {
		opts.Logger.Warn("store folder", "warning", w)
	}
	sp, recs, err := spool.Open(spool.Options{Dir: opts.Dir, Logger: opts.Logger, MaxBatch: opts.MaxBatch,
		MaxBacklog: opts.MaxBacklog, Now: opts.Now, SegmentSize: opts.segmentSize})
	if err != nil {
		return nil, err
	}
	// SQLite creates the -wal and -shm files with the database file's mode.
	if f, err := safefile.OpenPrivate(filepath.Join(opts.Dir, FileName)); err != nil {
		sp.Close()
		return nil, fmt.Errorf("store: %w", err)
	} else {
		f.Close()
	}
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)",
		// Checkpoints run in the background (checkpointLoop), not inside
		// the ingester's commits.
		"wal_autocheckpoint(0)", "journal_size_limit(67108864)"} {
		q.Add("_pragma", p)
	}
	// Transactions (the updater's, the migrations') take the write lock at
	// BEGIN, waiting for it up to busy_timeout: a deferred one that reads
	// before it writes is refused at once, without waiting (SQLITE_BUSY,
	// SQLITE_BUSY_SNAPSHOT), whenever the ingester writes meanwhile.
	q.Set("_txlock", "immediate")
	dsn := "file:" + filepath.Join(opts.Dir, FileName) + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		sp.Close()
		return nil, fmt.Errorf("store: open: %w", err)
	}
	s := &Store{
		dir: opts.Dir, db: db, q: newCachedDB(db), log: opts.Logger, now: opts.Now, sp: sp, quit: make(chan struct{}),
		ingestDone: make(chan struct{}), kick: make(chan struct{}, 1), ingestedCh: make(chan struct{}),
		ckDone: make(chan struct{}),
	}
	if err := s.open(recs); err != nil {
		s.stmts.close()
		if s.writer != nil {
			s.writer.Close()
		}
		if s.updater != nil {
			s.updater.Close()
		}
		db.Close()
		sp.Close()
		return nil, err
	}
	go s.ingestLoop()
	go s.checkpointLoop()
	return s, nil
}

// open readies the database and replays into it the spool's records recs
// that it lacks; then the spool starts accepting.
func (s *Store) open(recs []spool.Record) error {
	ctx := context.Background()
	if err := migrate(ctx, s.db); err != nil {
		return err
	}
	w, err := s.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("store: writer connection: %w", err)
	}
	s.writer = w
	// The ingester's commits need not sync: every message is already synced
	// in the spool log, which is reused only after a checkpoint has synced
	// the database (checkpointLoop). A process crash loses no committed
	// transaction either way.
	if _, err := w.ExecContext(ctx, "PRAGMA synchronous = NORMAL"); err != nil {
		return fmt.Errorf("store: writer connection: %w", err)
	}
	if err := s.stmts.prepare(ctx, w); err != nil {
		return err
	}
	if s.updater, err = s.db.Conn(ctx); err != nil {
		return fmt.Errorf("store: updater connection: %w", err)
	}
	var maxID int64
	if err := s.db.QueryRowContext(ctx, "SELECT COALESCE(MAX(id), 0) FROM messages").Scan(&maxID); err != nil {
		return fmt.Errorf("store: read last id: %w", err)
	}
	var replay []spool.Record
	for _, r := range recs {
		if r.ID > maxID {
			replay = append(replay, r)
		}
	}
	if len(replay) > 0 {
		if err := s.insert(replay); err != nil {
			return fmt.Errorf("store: replay spool log: %w", err)
		}
		s.log.Info("store replayed messages from the spool log", "messages", len(replay),
			"first_id", replay[0].ID, "last_id", replay[len(replay)-1].ID)
		maxID = replay[len(replay)-1].ID
	}
	// Sync the database before the log is written over.
	var busy, frames, copied int
	if err := s.db.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &frames, &copied); err != nil {
		return fmt.Errorf("store: checkpoint: %w", err)
	}
	if busy != 0 {
		return errors.New("store: checkpoint at open was blocked: is another hl7mail using this store?")
	}
	s.ingested = maxID
	s.sp.Start(maxID)
	return nil
}

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

// OpenReadOnly opens the store in dir for queries only, whether or not
// another process has it open for writing. It sees the messages that
// process has moved into the database (within a fraction of a second of
// accepting them); after a crash, messages still only in the spool log
// appear once the store is opened for writing again.
func OpenReadOnly(dir string) (*Store, error) {
	path := filepath.Join(dir, FileName)
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	q := url.Values{}
	q.Set("mode", "ro")
	q.Add("_pragma", "busy_timeout(10000)")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("store: open: %w", err)
	}
	return &Store{dir: dir, db: db, q: newCachedDB(db), readOnly: true}, nil
}

func kindOr(k string) string {
	if k == "" {
		return KindHL7
	}
	return k
}

// Close commits what is queued, waits until it is in the database, stops
// the background work and closes the files. Close must not be called twice.
func (s *Store) Close() error {
	if s.readOnly {
		s.q.close()
		return s.db.Close()
	}
	s.sp.Stop()
	close(s.quit)
	<-s.ingestDone
	<-s.ckDone
	s.stmts.close()
	s.q.close()
	s.writer.Close()
	s.updater.Close()
	// A last full checkpoint syncs everything ingested and leaves a small
	// WAL behind. Records it does not cover are replayed at Open.
	s.checkpoint("TRUNCATE")
	err := s.db.Close()
	s.sp.Close()
	return err
}
