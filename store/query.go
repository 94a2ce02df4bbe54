package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Filter selects messages for List. Zero fields match everything.
type Filter struct {
	Partner   string
	Direction Direction
	State     State
	ControlID string
	// Limit bounds the number of messages (default 1000); newest first.
	Limit int
}

const messageColumns = `id, direction, partner, control_id, message_type, message_id, state,
	duplicate_of, size, sha256, received, updated, mic, kind, in_reply_to, retried, recipient, receipt_note, answer_to`

// SQL is f as the end of a query on messages (its conditions, newest
// first, its limit) with their arguments; mark(n) is the placeholder of
// the nth argument, from 1 ("?" for SQLite, "$n" for PostgreSQL).
func (f Filter) SQL(mark func(n int) string) (string, []any) {
	var where []string
	var args []any
	for _, c := range []struct {
		col string
		val string
	}{{"partner", f.Partner}, {"direction", string(f.Direction)}, {"state", string(f.State)}, {"control_id", f.ControlID}} {
		if c.val != "" {
			args = append(args, c.val)
			where = append(where, c.col+" = "+mark(len(args)))
		}
	}
	q := ""
	if len(where) > 0 {
		q = " WHERE " + strings.Join(where, " AND ")
	}
	limit := f.Limit
	if limit <= 0 {
		limit = 1000
	}
	args = append(args, limit)
	return q + " ORDER BY id DESC LIMIT " + mark(len(args)), args
}

// List returns the messages matching f, newest first, without payloads.
// It sees every message accepted before the call.
func (s *Store) List(ctx context.Context, f Filter) ([]Message, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	where, args := f.SQL(func(int) string { return "?" })
	return s.queryMessages(ctx, "list", "SELECT "+messageColumns+" FROM messages"+where, args...)
}

// queryMessages runs a query selecting messageColumns and scans the rows.
func (s *Store) queryMessages(ctx context.Context, what, q string, args ...any) ([]Message, error) {
	return queryAll(ctx, s.q, what, scanMessage, q, args...)
}

// querier is a database or a transaction.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// queryAll runs q and reads every row with scan; errors name what.
func queryAll[T any](ctx context.Context, db querier, what string, scan func(func(...any) error) (T, error), q string,
	args ...any) ([]T, error) {
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows.Scan)
		if err != nil {
			return nil, fmt.Errorf("store: %s: %w", what, err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: %s: %w", what, err)
	}
	return out, nil
}

// Get returns the message with id, payload included.
func (s *Store) Get(ctx context.Context, id int64) (Message, error) {
	if err := s.waitID(ctx, id); err != nil {
		return Message{}, err
	}
	var payload []byte
	m, err := scanMessage(func(dest ...any) error {
		return s.q.QueryRowContext(ctx, "SELECT "+messageColumns+", payload FROM messages WHERE id = ?", id).
			Scan(append(dest, &payload)...)
	})
	if errors.Is(err, sql.ErrNoRows) {
		return Message{}, fmt.Errorf("%w: %d", ErrNotFound, id)
	}
	if err != nil {
		return Message{}, err
	}
	m.Payload = payload
	return m, nil
}

func scanMessage(scan func(dest ...any) error) (Message, error) {
	var m Message
	var dup sql.NullInt64
	var received, updated, retried int64
	err := scan(&m.ID, &m.Direction, &m.Partner, &m.ControlID, &m.MessageType, &m.MessageID, &m.State,
		&dup, &m.Size, &m.SHA256, &received, &updated, &m.MIC, &m.Kind, &m.InReplyTo, &retried, &m.Recipient, &m.ReceiptNote, &m.AnswerTo)
	if err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return m, err
		}
		return m, fmt.Errorf("store: read message: %w", err)
	}
	m.DuplicateOf = dup.Int64
	m.Received = time.UnixMicro(received)
	m.Updated = time.UnixMicro(updated)
	if retried != 0 {
		m.Retried = time.UnixMicro(retried)
	}
	return m, nil
}

// Stats returns the spool's commit statistics.
func (s *Store) Stats() CommitStats {
	if s.readOnly {
		return CommitStats{}
	}
	return s.sp.Stats()
}

// FindInbound returns the inbound message of partner that came in the mail
// with messageID, or ErrNotFound: how a replayed mail is recognized.
func (s *Store) FindInbound(ctx context.Context, partner, messageID string) (Message, error) {
	if err := s.waitInbound(ctx); err != nil {
		return Message{}, err
	}
	var id int64
	err := s.q.QueryRowContext(ctx, `SELECT id FROM messages WHERE partner = ? AND message_id = ? AND direction = 'in'
		ORDER BY id LIMIT 1`, partner, messageID).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return Message{}, fmt.Errorf("%w: inbound %s", ErrNotFound, messageID)
	}
	if err != nil {
		return Message{}, fmt.Errorf("store: find inbound: %w", err)
	}
	return s.Get(ctx, id)
}

// FindOutbound returns the outbound message mailed with messageID.
func (s *Store) FindOutbound(ctx context.Context, messageID string) (Message, error) {
	var id int64
	err := s.q.QueryRowContext(ctx, `SELECT id FROM messages WHERE message_id = ? AND direction = 'out'
		ORDER BY id LIMIT 1`, messageID).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return Message{}, fmt.Errorf("%w: outbound %s", ErrNotFound, messageID)
	}
	if err != nil {
		return Message{}, fmt.Errorf("store: find outbound: %w", err)
	}
	return s.Get(ctx, id)
}
