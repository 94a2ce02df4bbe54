package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Operations: refused mail, alerts and the per-partner summary the
// dashboard and the operator commands show.

// Quarantined is a mail that was refused, and why. Raw is filled only by
// QuarantineGet.
type Quarantined struct {
	ID         int64     `json:"id"`
	Partner    string    `json:"partner"` // empty for unknown senders
	Sender     string    `json:"sender"`
	MessageID  string    `json:"message_id"`
	Reason     string    `json:"reason"`
	Detail     string    `json:"detail"`
	Received   time.Time `json:"received"`
	Released   time.Time `json:"released,omitzero"`
	ReleasedBy string    `json:"released_by,omitempty"`
	Note       string    `json:"release_note,omitempty"`
	ReleasedAs int64     `json:"released_as,omitempty"` // the stored message
	Raw        []byte    `json:"-"`
}

// ErrReleased is returned when a quarantined mail was released before.
var ErrReleased = errors.New("store: already released")

// Quarantine records a refused mail, its bytes kept for a later release
// (synced before it returns).
func (s *Store) Quarantine(ctx context.Context, q Quarantined) (int64, error) {
	var id int64
	err := s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO quarantine (partner, sender, message_id, reason, detail, received, raw)
			VALUES (?, ?, ?, ?, ?, ?, ?)`, q.Partner, q.Sender, q.MessageID, q.Reason, q.Detail, now, q.Raw)
		if err != nil {
			return fmt.Errorf("store: quarantine: %w", err)
		}
		id, err = res.LastInsertId()
		return err
	})
	return id, err
}

const quarantineColumns = `id, partner, sender, message_id, reason, detail, received, released, released_by,
	release_note, released_as`

func scanQuarantined(scan func(dest ...any) error, extra ...any) (Quarantined, error) {
	var q Quarantined
	var received, released int64
	dest := append([]any{&q.ID, &q.Partner, &q.Sender, &q.MessageID, &q.Reason, &q.Detail, &received, &released,
		&q.ReleasedBy, &q.Note, &q.ReleasedAs}, extra...)
	if err := scan(dest...); err != nil {
		return q, err
	}
	q.Received = time.UnixMicro(received)
	if released != 0 {
		q.Released = time.UnixMicro(released)
	}
	return q, nil
}

// QuarantineList lists refused mail, newest first.
func (s *Store) QuarantineList(ctx context.Context, limit int) ([]Quarantined, error) {
	if limit <= 0 {
		limit = 1000
	}
	return queryAll(ctx, s.db, "quarantine list", func(scan func(...any) error) (Quarantined, error) {
		return scanQuarantined(scan)
	}, `SELECT `+quarantineColumns+` FROM quarantine ORDER BY id DESC LIMIT ?`, limit)
}

// QuarantineGet returns one refused mail with its bytes, or ErrNotFound.
func (s *Store) QuarantineGet(ctx context.Context, id int64) (Quarantined, error) {
	var raw []byte
	q, err := scanQuarantined(func(dest ...any) error {
		return s.db.QueryRowContext(ctx, `SELECT `+quarantineColumns+`, raw FROM quarantine WHERE id = ?`, id).Scan(dest...)
	}, &raw)
	if errors.Is(err, sql.ErrNoRows) {
		return q, fmt.Errorf("%w: quarantined mail %d", ErrNotFound, id)
	}
	if err != nil {
		return q, fmt.Errorf("store: quarantined mail %d: %w", id, err)
	}
	q.Raw = raw
	return q, nil
}

// MarkReleased records that a person released quarantined mail id, and the
// message it was stored as; ErrReleased when it was released before.
func (s *Store) MarkReleased(ctx context.Context, id int64, by, note string, as int64) error {
	return s.update(ctx, as, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `UPDATE quarantine SET released = ?, released_by = ?, release_note = ?,
			released_as = ? WHERE id = ? AND released = 0`, now, by, note, as, id)
		if err != nil {
			return fmt.Errorf("store: release %d: %w", id, err)
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return fmt.Errorf("%w: quarantined mail %d", ErrReleased, id)
		}
		return nil
	})
}

// Retry puts a failed, expired or bounced outbound message back in its partner's
// queue; its next attempt is at once and expire_after counts again from
// now (Message.Retried), so that it is not expired straight away. The Message-ID is kept: a partner
// that did receive it recognizes the resend.
func (s *Store) Retry(ctx context.Context, id int64) error {
	return s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		var state, dir, partner string
		err := tx.QueryRowContext(ctx, `SELECT state, direction, partner FROM messages WHERE id = ?`, id).Scan(&state, &dir, &partner)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: %d", ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("store: retry %d: %w", id, err)
		}
		if Direction(dir) != Outbound {
			return fmt.Errorf("store: message %d came in from %s; only outbound messages are retried", id, partner)
		}
		if State(state) != Failed && State(state) != Expired && State(state) != Bounced {
			return fmt.Errorf("store: message %d is %s; only failed, expired or bounced messages are retried", id, state)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE messages SET state = 'queued', attempts = 0, next_attempt = 0,
			retried = ?, updated = ? WHERE id = ?`, now, now, id); err != nil {
			return fmt.Errorf("store: retry %d: %w", id, err)
		}
		_, err = tx.ExecContext(ctx, `DELETE FROM pending WHERE id = ? AND state = 'cancelled'`, id)
		return err
	})
}

// RetryAll puts every failed, expired or bounced outbound message of partner (of
// every partner when partner is "") back in its queue, as Retry does one:
// they leave in the order they were accepted. It returns the partners
// whose queues changed, with how many each.
func (s *Store) RetryAll(ctx context.Context, partner string) (map[string]int, error) {
	out := map[string]int{}
	err := s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		rows, err := tx.QueryContext(ctx, `UPDATE messages SET state = 'queued', attempts = 0, next_attempt = 0,
			retried = ?, updated = ? WHERE direction = 'out' AND state IN ('failed', 'expired', 'bounced') AND (? = '' OR partner = ?)
			RETURNING id, partner`, now, now, partner, partner)
		if err != nil {
			return fmt.Errorf("store: retry: %w", err)
		}
		var ids []int64
		for rows.Next() {
			var id int64
			var p string
			if err := rows.Scan(&id, &p); err != nil {
				rows.Close()
				return fmt.Errorf("store: retry: %w", err)
			}
			ids = append(ids, id)
			out[p]++
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("store: retry: %w", err)
		}
		for _, id := range ids {
			if _, err := tx.ExecContext(ctx, `DELETE FROM pending WHERE id = ? AND state = 'cancelled'`, id); err != nil {
				return fmt.Errorf("store: retry: %w", err)
			}
		}
		return nil
	})
	return out, err
}

// Reschedule makes the queued messages of direction d that wait for a
// retry due at once: for partner, or every partner when partner is "".
// What held them was mended (a mail server back, a new configuration).
func (s *Store) Reschedule(ctx context.Context, d Direction, partner string) error {
	return s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		_, err := tx.ExecContext(ctx, `UPDATE messages SET next_attempt = 0 WHERE state = 'queued' AND `+directionIs(d)+`
			AND next_attempt > 0 AND (? = '' OR partner = ?)`, partner, partner)
		if err != nil {
			return fmt.Errorf("store: reschedule: %w", err)
		}
		return nil
	})
}

// Search returns messages whose control ID or Message-ID contains q, or
// whose partner is q, newest first, without payloads. An empty q lists the
// newest.
func (s *Store) Search(ctx context.Context, q string, limit int) ([]Message, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	if limit <= 0 {
		limit = 200
	}
	q = strings.TrimSpace(q)
	if q == "" {
		return s.queryMessages(ctx, "search", "SELECT "+messageColumns+" FROM messages ORDER BY id DESC LIMIT ?", limit)
	}
	like := "%" + strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(q) + "%"
	return s.queryMessages(ctx, "search", "SELECT "+messageColumns+` FROM messages
		WHERE control_id LIKE ? ESCAPE '\' OR message_id LIKE ? ESCAPE '\' OR partner = ?
		ORDER BY id DESC LIMIT ?`, like, like, q, limit)
}

// Summary is one partner's counts.
type Summary struct {
	Partner          string    `json:"partner"`
	InToday          int       `json:"in_today"`
	OutToday         int       `json:"out_today"`
	QueuedOut        int       `json:"queued_out"`
	QueuedIn         int       `json:"queued_in"` // waiting for the router
	AwaitingReceipt  int       `json:"awaiting_receipt"`
	Overdue          int       `json:"overdue"`
	Failed           int       `json:"failed"` // failed, expired or bounced
	Quarantined      int       `json:"quarantined"`
	LastActivity     time.Time `json:"last_activity,omitzero"`
	ReceiptsMatched  int       `json:"receipts_matched"`
	ReceiptsMismatch int       `json:"receipts_mismatch"`
}

// Summaries returns the counts of every partner that has any, keyed by
// name. "Today" starts at since.
func (s *Store) Summaries(ctx context.Context, since time.Time) (map[string]*Summary, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	sums := Summaries{}
	queries := []struct {
		part SummaryPart
		q    string
		args []any
	}{
		{SummaryToday, `SELECT partner, direction, count(*) FROM messages WHERE received >= ? AND kind != 'bundle'
			GROUP BY partner, direction`, []any{since.UnixMicro()}},
		{SummaryQueued, `SELECT partner, direction, count(*) FROM messages WHERE state = 'queued' GROUP BY partner, direction`, nil},
		{SummaryFailed, `SELECT partner, state, count(*) FROM messages WHERE state IN ('failed', 'expired', 'bounced')
			GROUP BY partner, state`, nil},
		{SummaryReceipts, `SELECT p.partner, p.state, count(*) FROM pending p JOIN messages m ON m.id = p.id
			WHERE p.state != 'waiting' OR m.state = 'sent' GROUP BY p.partner, p.state`, nil},
		{SummaryQuarantined, `SELECT partner, '', count(*) FROM quarantine WHERE released = 0 GROUP BY partner`, nil},
		{SummaryLast, `SELECT partner, '', max(updated) FROM messages GROUP BY partner`, nil},
	}
	for _, q := range queries {
		rows, err := s.db.QueryContext(ctx, q.q, q.args...)
		if err != nil {
			return nil, fmt.Errorf("store: summary: %w", err)
		}
		for rows.Next() {
			var partner, key string
			var n int64
			if err := rows.Scan(&partner, &key, &n); err != nil {
				rows.Close()
				return nil, fmt.Errorf("store: summary: %w", err)
			}
			sums.Add(q.part, partner, key, n)
		}
		if err := rows.Close(); err != nil {
			return nil, err
		}
	}
	return sums, nil
}

// Summaries are partners' counts being added up, by name; a store's query
// for each SummaryPart gives rows of partner, key and number, and Add
// counts each, so that every store counts alike.
type Summaries map[string]*Summary

// SummaryPart says what the rows given to Summaries.Add count.
type SummaryPart int

const (
	SummaryToday       SummaryPart = iota // key: direction; n: messages received since the start of the day
	SummaryQueued                         // key: direction; n: messages queued
	SummaryFailed                         // key: state; n: messages failed, expired or bounced
	SummaryReceipts                       // key: pending state; n: receipts awaited or come
	SummaryQuarantined                    // n: mails quarantined and not released
	SummaryLast                           // n: the last change, in Unix microseconds
)

// Add counts one row of part.
func (sums Summaries) Add(part SummaryPart, partner, key string, n int64) {
	s := sums[partner]
	if s == nil {
		s = &Summary{Partner: partner}
		sums[partner] = s
	}
	switch part {
	case SummaryToday:
		if Direction(key) == Inbound {
			s.InToday += int(n)
		} else {
			s.OutToday += int(n)
		}
	case SummaryQueued:
		if Direction(key) == Inbound {
			s.QueuedIn += int(n)
		} else {
			s.QueuedOut += int(n)
		}
	case SummaryFailed:
		s.Failed += int(n)
	case SummaryReceipts:
		switch key {
		case PendingWaiting:
			s.AwaitingReceipt += int(n)
		case PendingOverdue:
			s.Overdue += int(n)
		case PendingMatched, PendingError:
			s.ReceiptsMatched += int(n)
		case PendingMismatch:
			s.ReceiptsMismatch += int(n)
		}
	case SummaryQuarantined:
		s.Quarantined += int(n)
	case SummaryLast:
		s.LastActivity = time.UnixMicro(n)
	}
}

// Count is how many messages of a partner, in a direction, are in a state.
type Count struct {
	Partner   string
	Direction Direction
	State     State
	N         int
	Oldest    time.Time // when the oldest of them was received
}

// Counts returns the number of messages by partner, direction and state
// (response bundles and receipts included: they are mail too).
func (s *Store) Counts(ctx context.Context) ([]Count, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	return queryAll(ctx, s.db, "counts", func(scan func(...any) error) (Count, error) {
		var c Count
		var oldest int64
		err := scan(&c.Partner, &c.Direction, &c.State, &c.N, &oldest)
		c.Oldest = time.UnixMicro(oldest)
		return c, err
	}, `SELECT partner, direction, state, count(*), MIN(received) FROM messages GROUP BY partner, direction, state`)
}

// QuarantineReasons returns how many mails were refused, by reason.
func (s *Store) QuarantineReasons(ctx context.Context) (map[string]int, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT reason, count(*) FROM quarantine GROUP BY reason`)
	if err != nil {
		return nil, fmt.Errorf("store: quarantine reasons: %w", err)
	}
	defer rows.Close()
	out := map[string]int{}
	for rows.Next() {
		var r string
		var n int
		if err := rows.Scan(&r, &n); err != nil {
			return nil, fmt.Errorf("store: quarantine reasons: %w", err)
		}
		out[r] = n
	}
	return out, rows.Err()
}

// RecordJournal records that the mail with messageID and SHA-256 digest sum
// was written to journal file (a name such as "outgoing.mbox") at offset
// (synced before it returns).
func (s *Store) RecordJournal(ctx context.Context, file string, offset int64, messageID string, sum []byte) error {
	return s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		return recordJournal(ctx, tx, file, offset, messageID, sum)
	})
}

const insertJournalEntry = `INSERT OR REPLACE INTO journal_entries (file, offset, message_id, sha256) VALUES (?, ?, ?, ?)`

func recordJournal(ctx context.Context, tx *sql.Tx, file string, offset int64, messageID string, sum []byte) error {
	_, err := tx.ExecContext(ctx, insertJournalEntry, file, offset, messageID, sum)
	if err != nil {
		return fmt.Errorf("store: record journal entry: %w", err)
	}
	return nil
}

// JournalDigests returns the digests recorded for journal file, by offset.
func (s *Store) JournalDigests(ctx context.Context, file string) (map[int64][]byte, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT offset, sha256 FROM journal_entries WHERE file = ?`, file)
	if err != nil {
		return nil, fmt.Errorf("store: journal digests: %w", err)
	}
	defer rows.Close()
	out := map[int64][]byte{}
	for rows.Next() {
		var off int64
		var sum []byte
		if err := rows.Scan(&off, &sum); err != nil {
			return nil, fmt.Errorf("store: journal digests: %w", err)
		}
		out[off] = sum
	}
	return out, rows.Err()
}

// QueuedMessage is a queued message and when it may be tried.
type QueuedMessage struct {
	Message
	Next time.Time
}

// QueuedHeads returns up to limit queued messages of partner in direction
// d, oldest first, without their payloads: what the deliverer orders. Like
// NextQueued, it reads the database as it is.
func (s *Store) QueuedHeads(ctx context.Context, partner string, d Direction, limit int) ([]QueuedMessage, error) {
	rows, err := s.q.QueryContext(ctx, "SELECT "+messageColumns+`, next_attempt FROM messages
		WHERE partner = ? AND `+directionIs(d)+` AND state = 'queued' ORDER BY id LIMIT ?`, partner, limit)
	if err != nil {
		return nil, fmt.Errorf("store: queued list: %w", err)
	}
	defer rows.Close()
	var out []QueuedMessage
	for rows.Next() {
		var q QueuedMessage
		var next int64
		q.Message, err = scanMessage(func(dest ...any) error { return rows.Scan(append(dest, &next)...) })
		if err != nil {
			return nil, err
		}
		q.Next = time.UnixMicro(next)
		out = append(out, q)
	}
	return out, rows.Err()
}

// ByMessageID returns the newest stored message that came or went in the
// mail with Message-ID id, or ErrNotFound. It sees every inbound message
// accepted so far; an outbound message has a Message-ID only once it is
// in the database.
func (s *Store) ByMessageID(ctx context.Context, id string) (Message, error) {
	if err := s.waitInbound(ctx); err != nil {
		return Message{}, err
	}
	list, err := s.queryMessages(ctx, "by Message-ID", "SELECT "+messageColumns+` FROM messages WHERE message_id = ?
		ORDER BY id DESC LIMIT 1`, id)
	if err != nil {
		return Message{}, err
	}
	if len(list) == 0 {
		return Message{}, fmt.Errorf("%w: Message-ID %s", ErrNotFound, id)
	}
	return list[0], nil
}

// Unanswered returns the partners' requests that reached the router, or
// expired before it took them, but have no response queued for them, with
// the router's acknowledgement as Payload (none for an expired one): what
// a crash between the two left behind.
func (s *Store) Unanswered(ctx context.Context) ([]Message, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	list, err := s.queryMessages(ctx, "unanswered", "SELECT "+messageColumns+` FROM messages m
		WHERE direction = 'in' AND kind = 'request' AND state IN ('delivered', 'expired') AND message_id != ''
		AND NOT EXISTS (SELECT 1 FROM messages o WHERE o.direction = 'out'
			AND o.partner = (CASE WHEN m.answer_to != '' THEN m.answer_to ELSE m.partner END)
			AND o.in_reply_to = m.message_id)
		ORDER BY id`)
	if err != nil {
		return nil, err
	}
	for i := range list {
		if list[i].State == Expired {
			list[i].Payload = nil
			continue
		}
		if list[i].Payload, err = s.Response(ctx, list[i].ID); err != nil {
			return nil, err
		}
	}
	return list, nil
}
