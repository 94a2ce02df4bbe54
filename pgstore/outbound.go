package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

// What a partner's sender needs (outbound.Store), on the shared database:
// the queue in accepted order, the preparation of a group (Message-ID and
// awaited receipt), the compare-and-set state changes, retries, and the
// alerts of conditions. The semantics are the embedded store's; the types
// are its too, so that the sender runs on either.

var outboundSchema = []string{
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS attempts INT NOT NULL DEFAULT 0`,
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS next_attempt TIMESTAMPTZ NOT NULL DEFAULT 'epoch'`,
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS last_error TEXT NOT NULL DEFAULT ''`,
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS updated TIMESTAMPTZ NOT NULL DEFAULT now()`,
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS retried TIMESTAMPTZ`,
	`CREATE INDEX IF NOT EXISTS messages_queued ON messages(partner, direction, id) WHERE state = 'queued'`,
	`CREATE TABLE IF NOT EXISTS pending (
		message_id TEXT        PRIMARY KEY,
		id         BIGINT      NOT NULL REFERENCES messages(id),
		partner    TEXT        NOT NULL,
		control_id TEXT        NOT NULL,
		mic        TEXT        NOT NULL,
		sent       TIMESTAMPTZ NOT NULL,
		due        TIMESTAMPTZ NOT NULL,
		state      TEXT        NOT NULL,
		updated    TIMESTAMPTZ NOT NULL DEFAULT now()
	)`,
	`CREATE INDEX IF NOT EXISTS pending_message ON pending(id)`,
	`CREATE TABLE IF NOT EXISTS alerts (
		id         BIGSERIAL   PRIMARY KEY,
		raised     TIMESTAMPTZ NOT NULL DEFAULT now(),
		kind       TEXT        NOT NULL,
		partner    TEXT        NOT NULL DEFAULT '',
		control_id TEXT        NOT NULL DEFAULT '',
		message_id TEXT        NOT NULL DEFAULT '',
		text       TEXT        NOT NULL,
		key        TEXT        NOT NULL DEFAULT '',
		acked      TIMESTAMPTZ,
		acked_by   TEXT        NOT NULL DEFAULT '',
		cleared    TIMESTAMPTZ,
		node       TEXT        NOT NULL
	)`,
	// One open alert per condition, whichever node raised it.
	`CREATE UNIQUE INDEX IF NOT EXISTS alerts_key_open ON alerts(key) WHERE key != '' AND acked IS NULL AND cleared IS NULL`,
}

const messageColumns = `id, direction, partner, control_id, message_type, message_id, state, sha256, octet_length(payload),
	received, updated, mic, kind, in_reply_to, coalesce(retried, 'epoch'), recipient, receipt_note, answer_to`

func scanMessage(row pgx.Row, extra ...any) (store.Message, error) {
	var m store.Message
	var d, st string
	var retried time.Time
	err := row.Scan(append([]any{&m.ID, &d, &m.Partner, &m.ControlID, &m.MessageType, &m.MessageID, &st, &m.SHA256, &m.Size,
		&m.Received, &m.Updated, &m.MIC, &m.Kind, &m.InReplyTo, &retried, &m.Recipient, &m.ReceiptNote, &m.AnswerTo}, extra...)...)
	m.Direction, m.State = store.Direction(d), store.State(st)
	if retried.After(time.Unix(0, 0)) {
		m.Retried = retried
	}
	return m, err
}

// NextQueued returns the oldest queued message of partner in direction d,
// payload included, when it is due at now; else store.ErrNotFound. Later
// messages wait behind one waiting for a retry.
func (s *Store) NextQueued(ctx context.Context, partner string, d store.Direction, now time.Time) (store.Message, error) {
	var payload []byte
	var next time.Time
	m, err := scanMessage(s.pool.QueryRow(ctx, `SELECT `+messageColumns+`, payload, next_attempt FROM messages
		WHERE partner = $1 AND direction = $2 AND state = 'queued' ORDER BY id LIMIT 1`, partner, string(d)), &payload, &next)
	if errors.Is(err, pgx.ErrNoRows) || err == nil && next.After(now) {
		return store.Message{}, store.ErrNotFound
	}
	if err != nil {
		return store.Message{}, fmt.Errorf("pgstore: next queued: %w", err)
	}
	m.Payload = payload
	return m, nil
}

// QueuedAfter returns, in accepted order, up to limit queued messages of
// partner in d with an id above after, payload included, up to the first
// one not due at now (store.Store.QueuedAfter).
func (s *Store) QueuedAfter(ctx context.Context, partner string, d store.Direction, now time.Time, after int64,
	limit int) ([]store.Message, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+messageColumns+`, payload, next_attempt FROM messages
		WHERE partner = $1 AND direction = $2 AND state = 'queued' AND id > $3 ORDER BY id LIMIT $4`,
		partner, string(d), after, limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: queued: %w", err)
	}
	defer rows.Close()
	var out []store.Message
	for rows.Next() {
		var payload []byte
		var next time.Time
		m, err := scanMessage(rows, &payload, &next)
		if err != nil {
			return nil, fmt.Errorf("pgstore: queued: %w", err)
		}
		if next.After(now) {
			break
		}
		m.Payload = payload
		out = append(out, m)
	}
	return out, rows.Err()
}

// PrepareAll records the Message-IDs of a group and the receipts they
// await, in one transaction. The journal places are the journal's own
// rows here (OutgoingJournal): nothing more to record.
func (s *Store) PrepareAll(ctx context.Context, ps []store.Preparation) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, p := range ps {
			b.Queue(`UPDATE messages SET message_id = $1, updated = now() WHERE id = $2`, p.MessageID, p.ID)
			if w := p.Pending; w != nil {
				b.Queue(`INSERT INTO pending (message_id, id, partner, control_id, mic, sent, due, state)
					VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING`,
					p.MessageID, p.ID, w.Partner, w.ControlID, w.MIC, w.Sent, w.Due, store.PendingWaiting)
			}
		}
		return tx.SendBatch(ctx, b).Close()
	})
}

// MarkSentAll records that the server took the queued messages ids, in one
// transaction; one no longer queued is left as it is (store.ErrStateChanged,
// joined for each).
func (s *Store) MarkSentAll(ctx context.Context, ids []int64) error {
	var changed []error
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		changed = changed[:0]
		rows, err := tx.Query(ctx, `UPDATE messages SET state = 'sent', attempts = attempts + 1, last_error = '', updated = now()
			WHERE id = ANY($1) AND state = 'queued' RETURNING id`, ids)
		if err != nil {
			return err
		}
		marked, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return err
		}
		done := map[int64]bool{}
		for _, id := range marked {
			done[id] = true
		}
		for _, id := range ids {
			if !done[id] {
				changed = append(changed, fmt.Errorf("%w: message %d is no longer queued", store.ErrStateChanged, id))
			}
		}
		// The receipt is due from now on: an outage before the submission
		// does not count against the partner.
		_, err = tx.Exec(ctx, `UPDATE pending SET due = now() + (due - sent), sent = now(), updated = now()
			WHERE id = ANY($1) AND state = 'waiting'`, marked)
		return err
	})
	if err != nil {
		return fmt.Errorf("pgstore: mark sent: %w", err)
	}
	return errors.Join(changed...)
}

// inState turns an update of one queued message into store.ErrStateChanged
// or store.ErrNotFound when it changed nothing.
func (s *Store) inState(ctx context.Context, id int64, n int64, err error) error {
	if err != nil || n == 1 {
		return err
	}
	var st string
	if err := s.pool.QueryRow(ctx, `SELECT state FROM messages WHERE id = $1`, id).Scan(&st); errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: %d", store.ErrNotFound, id)
	}
	return fmt.Errorf("%w: message %d is %s", store.ErrStateChanged, id, st)
}

// MarkRetry records a failed attempt and when to try again.
func (s *Store) MarkRetry(ctx context.Context, id int64, reason string, next time.Time) error {
	tag, err := s.pool.Exec(ctx, `UPDATE messages SET attempts = attempts + 1, last_error = $1, next_attempt = $2, updated = now()
		WHERE id = $3 AND state = 'queued'`, reason, next, id)
	return s.inState(ctx, id, tag.RowsAffected(), err)
}

// MarkFinal ends a queued message as failed or expired, with no receipt
// awaited.
func (s *Store) MarkFinal(ctx context.Context, id int64, state store.State, reason string) error {
	if state != store.Failed && state != store.Expired {
		return fmt.Errorf("pgstore: %s is not a final state", state)
	}
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE messages SET state = $1, last_error = $2, updated = now() WHERE id = $3 AND state = 'queued'`,
			string(state), reason, id)
		if err := s.inState(ctx, id, tag.RowsAffected(), err); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE pending SET state = $1, updated = now() WHERE id = $2`, store.PendingCancelled, id)
		return err
	})
}

// Delivery returns the attempts, next attempt and last error of a message.
func (s *Store) Delivery(ctx context.Context, id int64) (attempts int, next time.Time, lastError string, err error) {
	err = s.pool.QueryRow(ctx, `SELECT attempts, next_attempt, last_error FROM messages WHERE id = $1`, id).Scan(&attempts, &next, &lastError)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, time.Time{}, "", fmt.Errorf("%w: %d", store.ErrNotFound, id)
	}
	return attempts, next, lastError, err
}

// Reschedule makes the queued messages of d waiting for a retry due at
// once, for partner or (with "") every partner.
func (s *Store) Reschedule(ctx context.Context, d store.Direction, partner string) error {
	_, err := s.pool.Exec(ctx, `UPDATE messages SET next_attempt = 'epoch' WHERE state = 'queued' AND direction = $1
		AND next_attempt > 'epoch' AND ($2 = '' OR partner = $2)`, string(d), partner)
	return err
}

// RecordJournal names the Message-ID of a mail journalled in the database
// one at a time (the receiver's; offset is its row): the rows carry their
// digests already. Entries of journal files are not kept here.
func (s *Store) RecordJournal(ctx context.Context, file string, offset int64, messageID string, _ []byte) error {
	if !strings.HasPrefix(file, "db:") || messageID == "" {
		return nil
	}
	_, err := s.pool.Exec(ctx, `UPDATE journal SET message_id = $1 WHERE id = $2 AND message_id = ''`, messageID, offset)
	return err
}

// RaiseAlert records a and returns its id.
func (s *Store) RaiseAlert(ctx context.Context, a store.Alert) (int64, error) {
	id, _, err := s.raise(ctx, a, "")
	return id, err
}

// RaiseOnce records a as the alert of condition key unless one is open
// for key already, on any node; raised tells which.
func (s *Store) RaiseOnce(ctx context.Context, key string, a store.Alert) (id int64, raised bool, err error) {
	if key == "" {
		return 0, false, errors.New("pgstore: RaiseOnce needs a key")
	}
	return s.raise(ctx, a, key)
}

func (s *Store) raise(ctx context.Context, a store.Alert, key string) (id int64, raised bool, err error) {
	err = s.pool.QueryRow(ctx, `INSERT INTO alerts (kind, partner, control_id, message_id, text, key, node)
		VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING id`,
		a.Kind, a.Partner, a.ControlID, a.MessageID, a.Text, key, s.o.Node).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		err = s.pool.QueryRow(ctx, `SELECT id FROM alerts WHERE key = $1 AND acked IS NULL AND cleared IS NULL`, key).Scan(&id)
		return id, false, err
	}
	return id, err == nil, err
}

// ClearAlert ends the open alert of condition key, if there is one.
func (s *Store) ClearAlert(ctx context.Context, key string) (bool, error) {
	tag, err := s.pool.Exec(ctx, `UPDATE alerts SET cleared = now() WHERE key = $1 AND acked IS NULL AND cleared IS NULL`, key)
	return tag.RowsAffected() > 0, err
}

// OpenAlertKeys returns the keys of the open alerts whose key starts with
// prefix.
func (s *Store) OpenAlertKeys(ctx context.Context, prefix string) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT key FROM alerts WHERE key != '' AND acked IS NULL AND cleared IS NULL
		AND starts_with(key, $1) ORDER BY id`, prefix)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// OutgoingJournal is the outgoing journal in the database, as the sender
// writes to it: a group of mails in one transaction, each "offset" the
// row's id.
func (s *Store) OutgoingJournal() *DBJournal { return &DBJournal{s: s, d: spool.Outbound} }

// DBJournal is one direction of the journal in the database.
type DBJournal struct {
	s *Store
	d spool.Direction
}

// AppendAll journals ms and returns their row ids.
func (j *DBJournal) AppendAll(ms []journal.Mail) ([]int64, error) {
	return j.s.Journal(context.Background(), j.d, ms)
}

// Append journals one mail and returns its row id.
func (j *DBJournal) Append(from string, t time.Time, mail []byte) (int64, error) {
	ids, err := j.AppendAll([]journal.Mail{{From: from, Time: t, Bytes: mail}})
	if err != nil {
		return 0, err
	}
	return ids[0], nil
}

// IncomingJournal is the incoming journal in the database, as the
// receiver writes to it.
func (s *Store) IncomingJournal() *DBJournal { return &DBJournal{s: s, d: spool.Inbound} }

// Path names the journal in records: "db:outgoing" or "db:incoming".
func (j *DBJournal) Path() string {
	if j.d == spool.Outbound {
		return "db:outgoing"
	}
	return "db:incoming"
}
