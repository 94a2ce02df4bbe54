// Package store is hl7mail's durable spool: every message hl7mail has
// taken responsibility for, with its state.
//
// Accept appends messages to a write-ahead spool log and fdatasyncs it before
// it returns, committing the messages that arrive together with one sync
// (group commit); that is what lets a surrogate answer CA
// (draft-ietf-ediint-hl7-02 §6.5.1). An ingester copies the log into an
// embedded SQLite database (WAL journal, one writer; state changes are
// synchronous=FULL), which every query reads; Open replays what the
// database lacks after a crash. The ingester copies each message at once
// while the store is quiet and paces itself when busy; queries that must
// see every accepted message wait for it, the queues (NextQueued,
// QueuedList) read the database as it is and learn of new messages from
// OnIngest.
//
// It imports, of this module, only internal/safefile.
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
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/hl7mail/hl7mail/internal/safefile"
)

// Store is the spool. Its methods are safe for concurrent use.
type Store struct {
	dir         string
	segmentSize int64
	lock        *os.File // held (flock) while the store is open for writing
	readOnly    bool
	db          *sql.DB
	log         *slog.Logger
	now         func() time.Time
	max         int
	reqs        chan *acceptReq
	quit        chan struct{}
	done        chan struct{} // writeLoop has ended

	// commitMu is held by whoever appends to the spool log: the writer
	// goroutine, or an Accept that finds it free and commits on its own
	// goroutine (sparing two goroutine handoffs when the store is not busy).
	commitMu  sync.Mutex
	spool     *spoolLog // guarded by commitMu
	nextSeq   int64     // guarded by commitMu
	logClosed bool      // guarded by commitMu
	appended  atomic.Int64
	// appendedIn is the highest inbound id appended: what queries about
	// received mail (replays, ordering) wait for.
	appendedIn atomic.Int64
	// durable is the highest id known to be synced in the database file:
	// the spool log may be reused only when it reaches the last id appended.
	durable atomic.Int64

	ingest      chan []logRecord
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
	stats  commitStats

	// updater makes the state changes of delivery, each synced
	// (synchronous=FULL) before it returns; updMu serializes its use.
	updMu   sync.Mutex
	updater *sql.Conn
}

// writerStmts are prepared once on the database writer connection. The
// ingester owns that connection, so it runs its transactions with these
// statements rather than database/sql's Tx, which would prepare every
// statement again.
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

func (w *writerStmts) close() {
	for _, st := range []*sql.Stmt{w.begin, w.find, w.insert, w.commit, w.rollback} {
		if st != nil {
			st.Close()
		}
	}
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

// Open opens (creating if needed) the store in opts.Dir and replays into the
// database any message the spool log holds that the database lacks.
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
	lock, err := lockDir(opts.Dir)
	if err != nil {
		return nil, err
	}
	// SQLite creates the -wal and -shm files with the database file's mode.
	if f, err := safefile.OpenPrivate(filepath.Join(opts.Dir, FileName)); err != nil {
		lock.Close()
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
	dsn := "file:" + filepath.Join(opts.Dir, FileName) + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("store: open: %w", err)
	}
	s := &Store{
		lock: lock,
		dir:  opts.Dir, segmentSize: opts.segmentSize, db: db, log: opts.Logger, now: opts.Now, max: opts.MaxBatch,
		reqs: make(chan *acceptReq, 4*opts.MaxBatch), quit: make(chan struct{}), done: make(chan struct{}),
		ingest: make(chan []logRecord, 1024), ingestDone: make(chan struct{}), kick: make(chan struct{}, 1), ingestedCh: make(chan struct{}),
		ckDone: make(chan struct{}),
	}
	if err := s.open(); err != nil {
		s.stmts.close()
		if s.writer != nil {
			s.writer.Close()
		}
		if s.updater != nil {
			s.updater.Close()
		}
		if s.spool != nil {
			s.spool.close()
		}
		db.Close()
		lock.Close()
		return nil, err
	}
	go s.writeLoop()
	go s.ingestLoop()
	go s.checkpointLoop()
	return s, nil
}

func (s *Store) open() error {
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
	spool, recs, err := openSpoolLog(s.dir, s.segmentSize)
	if err != nil {
		return err
	}
	s.spool = spool
	var maxID int64
	if err := s.db.QueryRowContext(ctx, "SELECT COALESCE(MAX(id), 0) FROM messages").Scan(&maxID); err != nil {
		return fmt.Errorf("store: read last id: %w", err)
	}
	var replay []logRecord
	for _, r := range recs {
		if r.seq > maxID {
			replay = append(replay, r)
		}
	}
	if len(replay) > 0 {
		if err := s.insert(replay); err != nil {
			return fmt.Errorf("store: replay spool log: %w", err)
		}
		s.log.Info("store replayed messages from the spool log", "messages", len(replay),
			"first_id", replay[0].seq, "last_id", replay[len(replay)-1].seq)
		maxID = replay[len(replay)-1].seq
	}
	// Sync the database before the log is written over.
	var busy, frames, copied int
	if err := s.db.QueryRowContext(ctx, "PRAGMA wal_checkpoint(TRUNCATE)").Scan(&busy, &frames, &copied); err != nil {
		return fmt.Errorf("store: checkpoint: %w", err)
	}
	if busy != 0 {
		return errors.New("store: checkpoint at open was blocked: is another hl7mail using this store?")
	}
	s.nextSeq = maxID + 1
	s.appended.Store(maxID)
	s.ingested = maxID
	s.durable.Store(maxID)
	return nil
}

// lockDir takes the store's lock file, so that one process at a time
// writes to a store.
func lockDir(dir string) (*os.File, error) {
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
	return &Store{dir: dir, db: db, readOnly: true}, nil
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
		return s.db.Close()
	}
	close(s.quit)
	<-s.done
	s.commitMu.Lock()
	s.logClosed = true
	s.commitMu.Unlock()
	close(s.ingest)
	<-s.ingestDone
	<-s.ckDone
	s.stmts.close()
	s.writer.Close()
	s.updater.Close()
	// A last full checkpoint syncs everything ingested and leaves a small
	// WAL behind. Records it does not cover are replayed at Open.
	s.checkpoint("TRUNCATE")
	s.spool.close()
	err := s.db.Close()
	s.lock.Close()
	return err
}
