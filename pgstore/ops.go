package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/roles"
	"github.com/hl7mail/hl7mail/store"
)

// What the operators see and do (the dashboard, /metrics, the commands):
// the same answers as the embedded store's, from the whole cluster.

// opsSchema adds what the notices to personnel record.
var opsSchema = []string{
	`ALTER TABLE alerts ADD COLUMN IF NOT EXISTS notified TIMESTAMPTZ`,
	`ALTER TABLE alerts ADD COLUMN IF NOT EXISTS clear_notified TIMESTAMPTZ`,
	`CREATE INDEX IF NOT EXISTS alerts_unnotified ON alerts(id) WHERE notified IS NULL`,
}

// micros is a TIMESTAMPTZ column as Unix microseconds, 0 for NULL: the
// embedded store's unit, which the shared builders count in.
func micros(col string) string {
	return `coalesce((extract(epoch FROM ` + col + `) * 1000000)::bigint, 0)`
}

// List returns the messages matching f, newest first, without payloads.
func (s *Store) List(ctx context.Context, f store.Filter) ([]store.Message, error) {
	where, args := f.SQL(func(n int) string { return fmt.Sprintf("$%d", n) })
	return s.queryMessages(ctx, "list", "SELECT "+messageColumns+" FROM messages"+where, args...)
}

// Search returns the newest messages whose control ID or Message-ID
// contains q, or whose partner is q (store.Store.Search).
func (s *Store) Search(ctx context.Context, q string, limit int) ([]store.Message, error) {
	if limit <= 0 {
		limit = 200
	}
	q = strings.TrimSpace(q)
	if q == "" {
		return s.queryMessages(ctx, "search", "SELECT "+messageColumns+" FROM messages ORDER BY id DESC LIMIT $1", limit)
	}
	like := "%" + strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(q) + "%"
	return s.queryMessages(ctx, "search", "SELECT "+messageColumns+` FROM messages
		WHERE control_id LIKE $1 OR message_id LIKE $1 OR partner = $2 ORDER BY id DESC LIMIT $3`, like, q, limit)
}

// Summaries returns the counts of every partner that has any, keyed by
// name, counted as the embedded store counts (store.Summaries). "Today"
// starts at since.
func (s *Store) Summaries(ctx context.Context, since time.Time) (map[string]*store.Summary, error) {
	sums := store.Summaries{}
	queries := []struct {
		part store.SummaryPart
		q    string
		args []any
	}{
		{store.SummaryToday, `SELECT partner, direction, count(*) FROM messages WHERE received >= $1 AND kind != 'bundle'
			GROUP BY partner, direction`, []any{since}},
		{store.SummaryQueued, `SELECT partner, direction, count(*) FROM messages WHERE state = 'queued'
			GROUP BY partner, direction`, nil},
		{store.SummaryFailed, `SELECT partner, state, count(*) FROM messages WHERE state IN ('failed', 'expired', 'bounced')
			GROUP BY partner, state`, nil},
		{store.SummaryReceipts, `SELECT p.partner, p.state, count(*) FROM pending p JOIN messages m ON m.id = p.id
			WHERE p.state != 'waiting' OR m.state = 'sent' GROUP BY p.partner, p.state`, nil},
		{store.SummaryQuarantined, `SELECT partner, '', count(*) FROM quarantine WHERE released IS NULL GROUP BY partner`, nil},
		{store.SummaryLast, `SELECT partner, '', ` + micros("max(updated)") + ` FROM messages GROUP BY partner`, nil},
	}
	for _, q := range queries {
		rows, err := s.pool.Query(ctx, q.q, q.args...)
		if err != nil {
			return nil, fmt.Errorf("pgstore: summary: %w", err)
		}
		var partner, key string
		var n int64
		_, err = pgx.ForEachRow(rows, []any{&partner, &key, &n}, func() error {
			sums.Add(q.part, partner, key, n)
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("pgstore: summary: %w", err)
		}
	}
	return sums, nil
}

// Counts returns the number of messages by partner, direction and state.
func (s *Store) Counts(ctx context.Context) ([]store.Count, error) {
	rows, err := s.pool.Query(ctx, `SELECT partner, direction, state, count(*), min(received) FROM messages
		GROUP BY partner, direction, state`)
	if err != nil {
		return nil, fmt.Errorf("pgstore: counts: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.Count, error) {
		var c store.Count
		var d, st string
		err := r.Scan(&c.Partner, &d, &st, &c.N, &c.Oldest)
		c.Direction, c.State = store.Direction(d), store.State(st)
		return c, err
	})
}

// Activity returns, for each partner with traffic or alerts, its activity
// from since to now in steps of step (store.Store.Activity).
func (s *Store) Activity(ctx context.Context, since, now time.Time, step time.Duration) (map[string]*store.Activity, error) {
	b := store.NewActivityBuilder(since, now, step)
	rows, err := s.pool.Query(ctx, `SELECT m.partner, m.direction, m.state, `+micros("m.received")+`, `+micros("m.updated")+`,
		`+micros("p.sent")+`, `+micros("p.updated")+`, coalesce(p.state, '')
		FROM messages m LEFT JOIN pending p ON p.id = m.id
		WHERE m.updated >= $1 OR m.state = 'queued'`, since)
	if err != nil {
		return nil, fmt.Errorf("pgstore: activity: %w", err)
	}
	var r store.ActivityRow
	var d, st string
	if _, err := pgx.ForEachRow(rows, []any{&r.Partner, &d, &st, &r.Received, &r.Updated, &r.Sent, &r.Matched, &r.PendingState},
		func() error {
			r.Direction, r.State = store.Direction(d), store.State(st)
			b.Message(r)
			return nil
		}); err != nil {
		return nil, fmt.Errorf("pgstore: activity: %w", err)
	}
	alerts, err := s.pool.Query(ctx, `SELECT raised, kind, partner FROM alerts WHERE raised >= $1 ORDER BY raised`, since)
	if err != nil {
		return nil, fmt.Errorf("pgstore: activity: %w", err)
	}
	var raised time.Time
	var kind, partner string
	if _, err := pgx.ForEachRow(alerts, []any{&raised, &kind, &partner}, func() error {
		b.Alert(raised, kind, partner)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgstore: activity: %w", err)
	}
	return b.Result(), nil
}

const alertColumns = `id, raised, kind, partner, control_id, message_id, text, coalesce(acked, 'epoch'), acked_by, key,
	coalesce(cleared, 'epoch')`

func scanAlert(row pgx.Row) (store.Alert, error) {
	var a store.Alert
	err := row.Scan(&a.ID, &a.Raised, &a.Kind, &a.Partner, &a.ControlID, &a.MessageID, &a.Text, &a.Acked, &a.AckedBy,
		&a.Key, &a.Cleared)
	if !a.Acked.After(time.Unix(0, 0)) {
		a.Acked = time.Time{}
	}
	if !a.Cleared.After(time.Unix(0, 0)) {
		a.Cleared = time.Time{}
	}
	return a, err
}

func (s *Store) alerts(ctx context.Context, q string, args ...any) ([]store.Alert, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+alertColumns+` FROM alerts `+q, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: alerts: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.Alert, error) { return scanAlert(r) })
}

// Alerts returns the open alerts (all: every alert), newest first, at
// most limit.
func (s *Store) Alerts(ctx context.Context, all bool, limit int) ([]store.Alert, error) {
	if limit <= 0 {
		limit = 1000
	}
	if all {
		return s.alerts(ctx, `ORDER BY id DESC LIMIT $1`, limit)
	}
	return s.alerts(ctx, `WHERE acked IS NULL AND cleared IS NULL ORDER BY id DESC LIMIT $1`, limit)
}

// AckAlert records that who has seen alert id.
func (s *Store) AckAlert(ctx context.Context, id int64, who string) error {
	tag, err := s.pool.Exec(ctx, `UPDATE alerts SET acked = coalesce(acked, now()),
		acked_by = CASE WHEN acked IS NULL THEN $1 ELSE acked_by END WHERE id = $2`, who, id)
	if err != nil {
		return fmt.Errorf("pgstore: ack alert: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: alert %d", store.ErrNotFound, id)
	}
	return nil
}

// OpenAlerts returns the number of alerts neither acknowledged nor cleared.
func (s *Store) OpenAlerts(ctx context.Context) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM alerts WHERE acked IS NULL AND cleared IS NULL`).Scan(&n); err != nil {
		return 0, fmt.Errorf("pgstore: open alerts: %w", err)
	}
	return n, nil
}

// PendingNotices returns the alerts not yet told to personnel, and those
// told whose clearing is not (store.Store.PendingNotices).
func (s *Store) PendingNotices(ctx context.Context, limit int) (store.Notices, error) {
	if limit <= 0 {
		limit = 500
	}
	var n store.Notices
	var err error
	if n.Raised, err = s.alerts(ctx, `WHERE notified IS NULL ORDER BY id LIMIT $1`, limit); err != nil {
		return n, err
	}
	n.Cleared, err = s.alerts(ctx, `WHERE cleared IS NOT NULL AND clear_notified IS NULL AND notified IS NOT NULL
		ORDER BY id LIMIT $1`, limit)
	return n, err
}

// MarkNotified records that n was told.
func (s *Store) MarkNotified(ctx context.Context, n store.Notices) error {
	ids := func(list []store.Alert) []int64 {
		out := make([]int64, len(list))
		for i, a := range list {
			out[i] = a.ID
		}
		return out
	}
	b := &pgx.Batch{}
	b.Queue(`UPDATE alerts SET notified = now() WHERE id = ANY($1)`, ids(n.Raised))
	b.Queue(`UPDATE alerts SET clear_notified = now() WHERE id = ANY($1)`, ids(n.Cleared))
	if err := s.pool.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("pgstore: notified: %w", err)
	}
	return nil
}

const quarantineColumns = `id, partner, sender, message_id, reason, detail, received, coalesce(released, 'epoch'),
	released_by, release_note, released_as`

// QuarantineList returns the quarantined mails, newest first, without
// their bytes.
func (s *Store) QuarantineList(ctx context.Context, limit int) ([]store.Quarantined, error) {
	if limit <= 0 {
		limit = 1000
	}
	rows, err := s.pool.Query(ctx, `SELECT `+quarantineColumns+` FROM quarantine ORDER BY id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("pgstore: quarantine list: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.Quarantined, error) { return scanQuarantined(r) })
}

func scanQuarantined(row pgx.Row, extra ...any) (store.Quarantined, error) {
	var q store.Quarantined
	err := row.Scan(append([]any{&q.ID, &q.Partner, &q.Sender, &q.MessageID, &q.Reason, &q.Detail, &q.Received, &q.Released,
		&q.ReleasedBy, &q.Note, &q.ReleasedAs}, extra...)...)
	if !q.Released.After(time.Unix(0, 0)) {
		q.Released = time.Time{}
	}
	return q, err
}

// QuarantineReasons returns the number of quarantined mails by reason.
func (s *Store) QuarantineReasons(ctx context.Context) (map[string]int, error) {
	return s.countBy(ctx, "quarantine reasons", `SELECT reason, count(*) FROM quarantine GROUP BY reason`)
}

// countBy runs query, which yields a key and a count a row, into a map.
func (s *Store) countBy(ctx context.Context, what, query string, args ...any) (map[string]int, error) {
	rows, err := s.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	out := map[string]int{}
	var key string
	var n int
	if _, err := pgx.ForEachRow(rows, []any{&key, &n}, func() error { out[key] = n; return nil }); err != nil {
		return nil, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	return out, nil
}

// Retry puts failed, expired or bounced outbound message id back in its
// queue (store.Store.Retry).
func (s *Store) Retry(ctx context.Context, id int64) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var state, dir, partner string
		err := tx.QueryRow(ctx, `SELECT state, direction, partner FROM messages WHERE id = $1 FOR UPDATE`, id).Scan(&state, &dir, &partner)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: %d", store.ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("pgstore: retry %d: %w", id, err)
		}
		if store.Direction(dir) != store.Outbound {
			return fmt.Errorf("store: message %d came in from %s; only outbound messages are retried", id, partner)
		}
		if st := store.State(state); st != store.Failed && st != store.Expired && st != store.Bounced {
			return fmt.Errorf("store: message %d is %s; only failed, expired or bounced messages are retried", id, state)
		}
		if _, err := tx.Exec(ctx, `UPDATE messages SET state = 'queued', attempts = 0, next_attempt = 'epoch',
			retried = now(), updated = now() WHERE id = $1`, id); err != nil {
			return fmt.Errorf("pgstore: retry %d: %w", id, err)
		}
		if _, err := tx.Exec(ctx, notifyIngest, ingestPayload(partner, store.Outbound)); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `DELETE FROM pending WHERE id = $1 AND state = 'cancelled'`, id)
		return err
	})
}

// RetryAll puts every failed, expired or bounced outbound message of
// partner ("": of every partner) back in its queue; it returns how many,
// by partner.
func (s *Store) RetryAll(ctx context.Context, partner string) (map[string]int, error) {
	out := map[string]int{}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `UPDATE messages SET state = 'queued', attempts = 0, next_attempt = 'epoch',
			retried = now(), updated = now() WHERE direction = 'out' AND state IN ('failed', 'expired', 'bounced')
			AND ($1 = '' OR partner = $1) RETURNING id, partner`, partner)
		if err != nil {
			return err
		}
		var ids []int64
		var id int64
		var p string
		if _, err := pgx.ForEachRow(rows, []any{&id, &p}, func() error { ids = append(ids, id); out[p]++; return nil }); err != nil {
			return err
		}
		for p := range out {
			if _, err := tx.Exec(ctx, notifyIngest, ingestPayload(p, store.Outbound)); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `DELETE FROM pending WHERE id = ANY($1) AND state = 'cancelled'`, ids)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: retry: %w", err)
	}
	return out, nil
}

// Overdue marks the receipts awaited past their due time at now as
// overdue and returns them; each is returned once, by whichever node
// sweeps first.
func (s *Store) Overdue(ctx context.Context, now time.Time) ([]store.Pending, error) {
	rows, err := s.pool.Query(ctx, `UPDATE pending SET state = 'overdue', updated = now() WHERE state = 'waiting' AND due < $1
		RETURNING `+pendingColumns, now)
	if err != nil {
		return nil, fmt.Errorf("pgstore: overdue: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.Pending, error) { return scanPending(r) })
}

// Backlog is the number of accepted messages waiting for a commit.
func (s *Store) Backlog() int64 { return int64(len(s.reqs)) }

// Flush returns at once: an accepted message is in the database already.
func (s *Store) Flush(context.Context) error { return nil }

// StateOf returns the state of message id.
func (s *Store) StateOf(ctx context.Context, id int64) (store.State, error) {
	var st string
	err := s.pool.QueryRow(ctx, `SELECT state FROM messages WHERE id = $1`, id).Scan(&st)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("%w: %d", store.ErrNotFound, id)
	}
	return store.State(st), err
}

// Cluster returns the nodes and who holds each of roles (roles.View).
func (s *Store) Cluster(ctx context.Context, names []string, lease time.Duration) ([]roles.Node, []roles.Holder, error) {
	return roles.View(ctx, s.pool, names, lease)
}

// TakenBy returns the number of messages each node took since since.
func (s *Store) TakenBy(ctx context.Context, since time.Time) (map[string]int, error) {
	return s.countBy(ctx, "by node", `SELECT node, count(*) FROM messages WHERE received >= $1 GROUP BY node`, since)
}
