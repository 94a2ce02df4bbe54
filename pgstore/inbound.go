package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/store"
)

// What a router's deliverer and the responder need (deliver.Store), on the
// shared database: the queue of inbound messages, delivery with the
// router's acknowledgement, the requests still to answer, stuck messages,
// alerts told once, and named values.

var inboundSchema = []string{
	`ALTER TABLE messages ADD COLUMN IF NOT EXISTS response BYTEA`,
	`CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id)`,
	`CREATE INDEX IF NOT EXISTS messages_reply ON messages(partner, in_reply_to) WHERE direction = 'out'`,
	`CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
}

func (s *Store) queryMessages(ctx context.Context, what, sql string, args ...any) ([]store.Message, error) {
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	defer rows.Close()
	var out []store.Message
	for rows.Next() {
		m, err := scanMessage(rows)
		if err != nil {
			return nil, fmt.Errorf("pgstore: %s: %w", what, err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// QueuedHeads returns up to limit queued messages of partner in d, oldest
// first, without payloads, each with when it is due.
func (s *Store) QueuedHeads(ctx context.Context, partner string, d store.Direction, limit int) ([]store.QueuedMessage, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+messageColumns+`, next_attempt FROM messages
		WHERE partner = $1 AND direction = $2 AND state = 'queued' ORDER BY id LIMIT $3`, partner, string(d), limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: queued: %w", err)
	}
	defer rows.Close()
	var out []store.QueuedMessage
	for rows.Next() {
		var q store.QueuedMessage
		var next time.Time
		if q.Message, err = scanMessage(rows, &next); err != nil {
			return nil, fmt.Errorf("pgstore: queued: %w", err)
		}
		if next.After(time.Unix(0, 0)) {
			q.Next = next
		}
		out = append(out, q)
	}
	return out, rows.Err()
}

// Get returns message id with its payload, or store.ErrNotFound.
func (s *Store) Get(ctx context.Context, id int64) (store.Message, error) {
	var payload []byte
	m, err := scanMessage(s.pool.QueryRow(ctx, `SELECT `+messageColumns+`, payload FROM messages WHERE id = $1`, id), &payload)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Message{}, fmt.Errorf("%w: %d", store.ErrNotFound, id)
	}
	m.Payload = payload
	return m, err
}

// ByMessageID returns the newest message that came or went in the mail
// with Message-ID id, or store.ErrNotFound.
func (s *Store) ByMessageID(ctx context.Context, id string) (store.Message, error) {
	list, err := s.queryMessages(ctx, "by Message-ID", `SELECT `+messageColumns+` FROM messages WHERE message_id = $1
		ORDER BY id DESC LIMIT 1`, id)
	if err != nil {
		return store.Message{}, err
	}
	if len(list) == 0 {
		return store.Message{}, fmt.Errorf("%w: Message-ID %s", store.ErrNotFound, id)
	}
	return list[0], nil
}

// Unanswered returns the partners' requests that reached the router, or
// expired before it took them, with no response queued for them, the
// router's acknowledgement as Payload (none for an expired one).
func (s *Store) Unanswered(ctx context.Context) ([]store.Message, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+messageColumns+`, coalesce(response, '') FROM messages m
		WHERE direction = 'in' AND kind = 'request' AND state IN ('delivered', 'expired') AND message_id != ''
		AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.direction = 'out'
			AND o.partner = (CASE WHEN m.answer_to != '' THEN m.answer_to ELSE m.partner END)
			AND o.in_reply_to = m.message_id)
		ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("pgstore: unanswered: %w", err)
	}
	defer rows.Close()
	var out []store.Message
	for rows.Next() {
		var ack []byte
		m, err := scanMessage(rows, &ack)
		if err != nil {
			return nil, fmt.Errorf("pgstore: unanswered: %w", err)
		}
		if m.State != store.Expired {
			m.Payload = ack
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// MarkDelivered records that the router acknowledged a queued inbound
// message, with its acknowledgement.
func (s *Store) MarkDelivered(ctx context.Context, id int64, ack []byte) error {
	tag, err := s.pool.Exec(ctx, `UPDATE messages SET state = 'delivered', attempts = attempts + 1, last_error = '',
		response = $1, updated = now() WHERE id = $2 AND state = 'queued'`, ack, id)
	return s.inState(ctx, id, tag.RowsAffected(), err)
}

// Stuck returns the queued messages of partner in d accepted before
// cutoff, oldest first.
func (s *Store) Stuck(ctx context.Context, partner string, d store.Direction, cutoff time.Time) ([]store.Message, error) {
	return s.queryMessages(ctx, "stuck", `SELECT `+messageColumns+` FROM messages WHERE partner = $1 AND direction = $2
		AND state = 'queued' AND received < $3 ORDER BY id LIMIT 100`, partner, string(d), cutoff)
}

// RaiseOnceEver records a as the alert of key unless an alert of key was
// ever recorded, by any node.
func (s *Store) RaiseOnceEver(ctx context.Context, key string, a store.Alert) (bool, error) {
	if key == "" {
		return false, errors.New("pgstore: RaiseOnceEver needs a key")
	}
	tag, err := s.pool.Exec(ctx, `INSERT INTO alerts (kind, partner, control_id, message_id, text, key, node)
		SELECT $1, $2, $3, $4, $5, $6, $7 WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE key = $6)`,
		a.Kind, a.Partner, a.ControlID, a.MessageID, a.Text, key, s.o.Node)
	return tag.RowsAffected() > 0, err
}

// Value returns the named value, or "" when it was never set.
func (s *Store) Value(ctx context.Context, key string) (string, error) {
	var v string
	err := s.pool.QueryRow(ctx, `SELECT value FROM state WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	return v, err
}

// SetValue sets the named value; "" removes it.
func (s *Store) SetValue(ctx context.Context, key, value string) error {
	if value == "" {
		_, err := s.pool.Exec(ctx, `DELETE FROM state WHERE key = $1`, key)
		return err
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO state (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value`,
		key, value)
	return err
}
