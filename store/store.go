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
package store

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver

	"github.com/hl7mail/hl7mail/internal/safefile"
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
	// Sent: handed to the SMTP server; its receipt is pending.
	Sent State = "sent"
	// Failed: refused for good (an SMTP 5xx reply, or no usable key).
	Failed State = "failed"
	// Expired: not delivered within the partner's expire_after
	// (deleted/expired, draft-ietf-ediint-hl7-02 §4.1.3 table 5).
	Expired State = "expired"
	// Bounced: the mail was sent, and a mail server reported it could not
	// be delivered (a DSN, RFC 3464, with Action: failed).
	Bounced State = "bounced"
	// Acknowledged: the partner's receipt matched (Message-ID and MIC).
	Acknowledged State = "acknowledged"
	// Delivered: an inbound message the router acknowledged.
	Delivered State = "delivered"
)

// ErrClosed is returned by Accept after Close.
var ErrClosed = errors.New("store: closed")

// ErrLocked is returned by Open when another process has the store open.
var ErrLocked = errors.New("store: in use by another hl7mail process")

// ErrReadOnly is returned by Accept on a store opened with OpenReadOnly.
var ErrReadOnly = errors.New("store: opened read-only")

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
	// MessageID and MIC are those of the mail an inbound message came in:
	// a replay is recognized by the first, the receipt carries the second.
	MessageID string
	MIC       string
	// Kind says what the payload is (default KindHL7).
	Kind string
	// InReplyTo is the Message-ID of the mail an outbound response answers.
	InReplyTo string
	// Recipient is the address of ours an inbound message was sent to.
	Recipient string
	// ReceiptNote is a warning for the receipt an inbound message gets
	// (processed/warning), in our own words.
	ReceiptNote string
	// AnswerTo is the partner an inbound request's answer goes to when it
	// is not the sender (a return route, draft-ietf-ediint-hl7-02 §4.1.4).
	AnswerTo string
}

// Message kinds.
const (
	// KindHL7: an HL7 message from the router to a partner.
	KindHL7 = "hl7"
	// KindBundle: a response bundle to a partner (HL7 response and MDN,
	// draft-ietf-ediint-hl7-02 §4.1.4), signed and encrypted as it is.
	KindBundle = "bundle"
	// KindRequest: an HL7 message from a partner; it gets a response.
	KindRequest = "request"
	// KindResponse: a partner's HL7 response to one of ours; it gets none.
	KindResponse = "response"
)

// Accepted is the outcome of Accept.
type Accepted struct {
	ID int64 // the message's id, in the order messages were accepted
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
	MIC         string    `json:"mic,omitempty"`
	Kind        string    `json:"kind"`
	InReplyTo   string    `json:"in_reply_to,omitempty"`
	// Retried is when an operator last put the message back in its queue;
	// expire_after counts from then.
	Retried   time.Time `json:"retried,omitzero"`
	Recipient string    `json:"recipient,omitempty"`
	// ReceiptNote and AnswerTo: see NewMessage.
	ReceiptNote string `json:"receipt_note,omitempty"`
	AnswerTo    string `json:"answer_to,omitempty"`
	Payload     []byte `json:"-"`
}

// Options configure Open.
type Options struct {
	// Dir is the store folder (required); it is created when missing.
	Dir string
	// Logger receives the store's records (default slog.Default()).
	Logger *slog.Logger
	// MaxBatch bounds how many messages share one sync (default 256).
	MaxBatch int
	// Now returns the current time (default time.Now).
	Now func() time.Time

	segmentSize int64 // spool log segment size (tests)
}

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
	// 2: delivery. Queued outbound messages are found through a partial
	// index; pending holds what a receipt must match (§6.4 tables 6, 7).
	`ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE messages ADD COLUMN next_attempt INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE messages ADD COLUMN last_error TEXT NOT NULL DEFAULT '';
	CREATE INDEX messages_queued ON messages(partner, id) WHERE state = 'queued';
	CREATE TABLE pending (
		message_id TEXT    PRIMARY KEY,
		id         INTEGER NOT NULL REFERENCES messages(id),
		partner    TEXT    NOT NULL,
		control_id TEXT    NOT NULL,
		mic        TEXT    NOT NULL,
		sent       INTEGER NOT NULL,
		due        INTEGER NOT NULL,
		state      TEXT    NOT NULL,
		updated    INTEGER NOT NULL
	);
	CREATE INDEX pending_due ON pending(state, due);`,
	// 3: inbound mail. The MIC of the mail a message came in; replays are
	// found by partner and Message-ID; refused mail is recorded with why.
	`ALTER TABLE messages ADD COLUMN mic TEXT NOT NULL DEFAULT '';
	CREATE INDEX messages_inbound ON messages(partner, message_id) WHERE direction = 'in';
	CREATE TABLE quarantine (
		id         INTEGER PRIMARY KEY,
		partner    TEXT    NOT NULL,
		sender     TEXT    NOT NULL,
		message_id TEXT    NOT NULL,
		reason     TEXT    NOT NULL,
		detail     TEXT    NOT NULL,
		received   INTEGER NOT NULL
	);`,
	// 4: the router's acknowledgement of a delivered inbound message.
	`ALTER TABLE messages ADD COLUMN response BLOB;`,
	// 5: what a message is (see the Kind constants) and the Message-ID of
	// the mail it answers.
	`ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'hl7';
	ALTER TABLE messages ADD COLUMN in_reply_to TEXT NOT NULL DEFAULT '';`,
	// 6: small named values, e.g. the IMAP watcher's position.
	`CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);`,
	// 7: operations. Alerts an operator acknowledges; quarantined mail kept
	// whole, so that a person can release it, with who and why.
	`CREATE TABLE alerts (
		id         INTEGER PRIMARY KEY,
		raised     INTEGER NOT NULL,
		kind       TEXT    NOT NULL,
		partner    TEXT    NOT NULL,
		control_id TEXT    NOT NULL,
		message_id TEXT    NOT NULL,
		text       TEXT    NOT NULL,
		acked      INTEGER NOT NULL DEFAULT 0,
		acked_by   TEXT    NOT NULL DEFAULT ''
	);
	CREATE INDEX alerts_open ON alerts(acked, id);
	ALTER TABLE quarantine ADD COLUMN raw BLOB;
	ALTER TABLE quarantine ADD COLUMN released INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE quarantine ADD COLUMN released_by TEXT NOT NULL DEFAULT '';
	ALTER TABLE quarantine ADD COLUMN release_note TEXT NOT NULL DEFAULT '';
	ALTER TABLE quarantine ADD COLUMN released_as INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE messages ADD COLUMN retried INTEGER NOT NULL DEFAULT 0;`,
	// 8: the digest of every mail written to a journal, where it was
	// written: evidence finds an altered journal by it.
	`CREATE TABLE journal_entries (
		file       TEXT    NOT NULL,
		offset     INTEGER NOT NULL,
		message_id TEXT    NOT NULL,
		sha256     BLOB    NOT NULL,
		PRIMARY KEY (file, offset)
	);`,
	// 9: which rule matched a receipt: "message-id" (Original-Message-ID)
	// or "mic" (Received-Content-MIC alone, when a gateway rewrote the
	// Message-ID on the way).
	`ALTER TABLE pending ADD COLUMN matched_by TEXT NOT NULL DEFAULT '';
	CREATE INDEX pending_mic ON pending(partner, mic);`,
	// 10: the address of ours an inbound message was sent to: its router
	// (draft-ietf-ediint-hl7-02 §6.3).
	`ALTER TABLE messages ADD COLUMN recipient TEXT NOT NULL DEFAULT '';`,
	// 11: a request's response is found by the Message-ID it answers.
	`CREATE INDEX messages_reply ON messages(partner, in_reply_to) WHERE direction = 'out';`,
	// 12: an alert about a condition rather than one event (a mail server
	// down, a partner's key unusable) has a key: at most one is open per
	// key, and it is cleared by itself when the condition ends. notified
	// and clear_notified record what the notices to personnel told.
	`ALTER TABLE alerts ADD COLUMN key TEXT NOT NULL DEFAULT '';
	ALTER TABLE alerts ADD COLUMN cleared INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE alerts ADD COLUMN notified INTEGER NOT NULL DEFAULT 0;
	ALTER TABLE alerts ADD COLUMN clear_notified INTEGER NOT NULL DEFAULT 0;
	UPDATE alerts SET notified = raised;
	CREATE UNIQUE INDEX alerts_key_open ON alerts(key) WHERE key != '' AND acked = 0 AND cleared = 0;
	CREATE INDEX alerts_notify ON alerts(notified) WHERE notified = 0;`,
	// 13: a receipt that came unsigned (mdn: unsigned) is weaker evidence.
	`ALTER TABLE pending ADD COLUMN unsigned INTEGER NOT NULL DEFAULT 0;`,
	// 14: every report that came back about a mail of ours, MDN or DSN
	// (see Report); a note on the receipt an inbound message is to get
	// (a request's Disposition-Notification-Options that could not be
	// read, say), and the partner its answer goes to when another.
	`CREATE TABLE reports (
		id                  INTEGER PRIMARY KEY,
		received            INTEGER NOT NULL,
		type                TEXT    NOT NULL,
		partner             TEXT    NOT NULL,
		message             INTEGER NOT NULL DEFAULT 0,
		original_message_id TEXT    NOT NULL,
		mail_message_id     TEXT    NOT NULL,
		disposition         TEXT    NOT NULL,
		detail              TEXT    NOT NULL,
		outcome             TEXT    NOT NULL,
		matched_by          TEXT    NOT NULL DEFAULT '',
		unsigned            INTEGER NOT NULL DEFAULT 0,
		final_delivery      INTEGER NOT NULL DEFAULT 0
	);
	CREATE INDEX reports_message ON reports(message) WHERE message != 0;
	CREATE INDEX reports_mail ON reports(mail_message_id);
	CREATE INDEX messages_outbound ON messages(message_id) WHERE direction = 'out';
	ALTER TABLE messages ADD COLUMN receipt_note TEXT NOT NULL DEFAULT '';
	ALTER TABLE messages ADD COLUMN answer_to TEXT NOT NULL DEFAULT '';`,
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

// ingestLoop copies committed records into the database, retrying while the
// database fails; the records stay in the spool log until they are in.
func (s *Store) ingestLoop() {
	defer close(s.ingestDone)
	var pending []logRecord
	var load ingestLoad // load.at: when the last ingest ended
	timer := time.NewTimer(ingestInterval)
	timer.Stop()
	for recs := range s.ingest {
		pending = append(pending[:0], recs...)
		// Busy, wait out the interval since the last ingest; else take
		// only what is queued already.
		var wait time.Duration
		if now := time.Now(); load.value(now) > busyLoad {
			wait = load.at.Add(ingestInterval).Sub(now)
		}
		timer.Reset(max(wait, 0))
	gather:
		for len(pending) < maxIngest {
			select {
			case r, ok := <-s.ingest:
				if !ok {
					break gather
				}
				pending = append(pending, r...)
			case <-s.kick:
				break gather
			case <-timer.C:
				break gather
			case <-s.quit:
				break gather
			}
		}
		timer.Stop()
		if !s.ingestWithRetry(pending) {
			return
		}
		load.add(time.Now(), len(pending))
		s.announce(pending)
	}
}

// announce tells the OnIngest function of the partners and directions of
// recs, once each.
func (s *Store) announce(recs []logRecord) {
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
		k := key{r.m.Partner, r.m.Direction}
		if !seen[k] {
			seen[k] = true
			(*f)(k.partner, k.d)
		}
	}
}

// ingestWithRetry inserts recs until it succeeds; it reports false when the
// store is closing with recs not inserted (they are replayed at Open).
func (s *Store) ingestWithRetry(recs []logRecord) bool {
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
			s.ingested = recs[len(recs)-1].seq
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
	s.ingMu.Lock()
	defer s.ingMu.Unlock()
	return max(s.appended.Load()-s.ingested, 0)
}

// Flush waits until every message accepted so far is in the database.
func (s *Store) Flush(ctx context.Context) error { return s.waitIngested(ctx) }

// waitIngested waits until every message accepted so far is in the
// database, so that queries see them.
func (s *Store) waitIngested(ctx context.Context) error {
	return s.waitIngestedUpTo(ctx, s.appended.Load())
}

// waitInbound waits until every inbound message accepted so far is in the
// database.
func (s *Store) waitInbound(ctx context.Context) error {
	return s.waitIngestedUpTo(ctx, s.appendedIn.Load())
}

// waitID waits until message id, if it was accepted, is in the database.
// Work on one message that is in the database never waits: the messages
// accepted after it go in at the ingester's pace.
func (s *Store) waitID(ctx context.Context, id int64) error {
	return s.waitIngestedUpTo(ctx, min(id, s.appended.Load()))
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
	findOriginal = `SELECT id FROM messages WHERE partner = ? AND direction = ? AND control_id = ?
		AND sha256 = ? AND duplicate_of IS NULL ORDER BY id LIMIT 1`
	insertMessage = `INSERT INTO messages (id, direction, partner, control_id, message_type, state, duplicate_of,
		size, sha256, payload, received, updated, message_id, mic, kind, in_reply_to, recipient, receipt_note, answer_to)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
)

// insert writes recs into the database in one transaction, marking
// duplicates. Only the ingester (or Open, before it starts) calls it.
func (s *Store) insert(recs []logRecord) (err error) {
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
	for _, r := range recs {
		var orig int64
		err := st.find.QueryRowContext(ctx, r.m.Partner, r.m.Direction, r.m.ControlID, r.hash[:]).Scan(&orig)
		if err != nil && !errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("store: look up duplicate: %w", err)
		}
		state, dup := Queued, sql.NullInt64{}
		if orig != 0 {
			state, dup = Duplicate, sql.NullInt64{Int64: orig, Valid: true}
			s.log.Info("duplicate stored; it will not be sent", "id", r.seq, "duplicate_of", orig,
				"partner", r.m.Partner, "control_id", r.m.ControlID)
		}
		if _, err := st.insert.ExecContext(ctx, r.seq, r.m.Direction, r.m.Partner, r.m.ControlID, r.m.MessageType,
			state, dup, len(r.m.Payload), r.hash[:], r.m.Payload, r.time, r.time, r.m.MessageID, r.m.MIC,
			kindOr(r.m.Kind), r.m.InReplyTo, r.m.Recipient, r.m.ReceiptNote, r.m.AnswerTo); err != nil {
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
