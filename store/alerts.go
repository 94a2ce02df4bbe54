package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Alert is something an operator must look at (draft-ietf-ediint-hl7-02
// §6.4): a receipt overdue or not matching, a message failed or expired, a
// mail quarantined, a key about to expire, a mail server or a partner's
// key that holds a queue.
type Alert struct {
	ID        int64     `json:"id"`
	Raised    time.Time `json:"raised"`
	Kind      string    `json:"kind"`
	Partner   string    `json:"partner,omitempty"`
	ControlID string    `json:"control_id,omitempty"`
	MessageID string    `json:"message_id,omitempty"`
	Text      string    `json:"text"`
	Acked     time.Time `json:"acked,omitzero"`
	AckedBy   string    `json:"acked_by,omitempty"`
	// Key names the condition an alert of a condition is about (RaiseOnce);
	// empty for an alert about one event.
	Key string `json:"key,omitempty"`
	// Cleared is when the condition ended by itself (ClearAlert): the
	// alert is no longer open, and stays in the history.
	Cleared time.Time `json:"cleared,omitzero"`
}

// Open reports whether the alert is still listed as open.
func (a Alert) Open() bool { return a.Acked.IsZero() && a.Cleared.IsZero() }

// Alert kinds.
const (
	AlertOverdue  = "receipt-overdue"
	AlertMismatch = "receipt-mismatch"
	// AlertReceiptError: a receipt says the message was not processed
	// (processed/error, failed, deleted, denied).
	AlertReceiptError = "receipt-error"
	// AlertBounced: a mail server reported that a mail of ours could not
	// be delivered (a DSN with Action: failed).
	AlertBounced    = "bounced"
	AlertExpired    = "expired"
	AlertFailed     = "failed"
	AlertQuarantine = "quarantined"
	AlertStuck      = "router-stuck"
	AlertKey        = "key-expiry"
	AlertOrder      = "out-of-order" // a sequence gap or a missing request, waited for in vain
	// AlertLinkDown: a mail server cannot be used (unreachable, refuses
	// the login, the session); the queues wait. Cleared when it works.
	AlertLinkDown = "link-down"
	// AlertHeld: one partner's queue waits for something only an operator
	// can mend (its key, its TLS requirement). Cleared when it moves.
	AlertHeld = "partner-held"
)

const alertColumns = `id, raised, kind, partner, control_id, message_id, text, acked, acked_by, key, cleared`

func scanAlert(scan func(...any) error) (Alert, error) {
	var a Alert
	var raised, acked, cleared int64
	err := scan(&a.ID, &raised, &a.Kind, &a.Partner, &a.ControlID, &a.MessageID, &a.Text, &acked, &a.AckedBy,
		&a.Key, &cleared)
	a.Raised = time.UnixMicro(raised)
	if acked != 0 {
		a.Acked = time.UnixMicro(acked)
	}
	if cleared != 0 {
		a.Cleared = time.UnixMicro(cleared)
	}
	return a, err
}

// RaiseAlert records a (synced before it returns) and returns its id.
func (s *Store) RaiseAlert(ctx context.Context, a Alert) (int64, error) {
	id, _, err := s.raise(ctx, a, "")
	return id, err
}

// RaiseOnce records a as the alert of the condition key, unless one is
// open for key already; raised tells which. The condition's alert stays
// open until ClearAlert(key) or an operator acknowledges it.
func (s *Store) RaiseOnce(ctx context.Context, key string, a Alert) (id int64, raised bool, err error) {
	if key == "" {
		return 0, false, errors.New("store: RaiseOnce needs a key")
	}
	return s.raise(ctx, a, key)
}

// RaiseOnceEver records a as the alert of key unless an alert of key was
// ever recorded, open or not: for an event told once (a message stuck at
// the router, one delivered out of order), also across restarts. raised
// tells whether it was recorded now.
func (s *Store) RaiseOnceEver(ctx context.Context, key string, a Alert) (raised bool, err error) {
	if key == "" {
		return false, errors.New("store: RaiseOnceEver needs a key")
	}
	err = s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO alerts (raised, kind, partner, control_id, message_id, text, key)
			SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE key = ?)`,
			now, a.Kind, a.Partner, a.ControlID, a.MessageID, a.Text, key, key)
		if err != nil {
			return fmt.Errorf("store: alert: %w", err)
		}
		n, _ := res.RowsAffected()
		raised = n > 0
		return nil
	})
	return raised, err
}

func (s *Store) raise(ctx context.Context, a Alert, key string) (id int64, raised bool, err error) {
	err = s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO alerts (raised, kind, partner, control_id, message_id, text, key)
			VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`, now, a.Kind, a.Partner, a.ControlID, a.MessageID, a.Text, key)
		if err != nil {
			return fmt.Errorf("store: alert: %w", err)
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return tx.QueryRowContext(ctx, `SELECT id FROM alerts WHERE key = ? AND acked = 0 AND cleared = 0`, key).Scan(&id)
		}
		raised = true
		id, err = res.LastInsertId()
		return err
	})
	return id, raised, err
}

// ClearAlert ends the open alert of condition key, if there is one: it is
// no longer listed as open and is kept in the history. It reports whether
// one was cleared.
func (s *Store) ClearAlert(ctx context.Context, key string) (bool, error) {
	var cleared bool
	err := s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `UPDATE alerts SET cleared = ? WHERE key = ? AND acked = 0 AND cleared = 0`, now, key)
		if err != nil {
			return fmt.Errorf("store: clear alert: %w", err)
		}
		n, _ := res.RowsAffected()
		cleared = n > 0
		return nil
	})
	return cleared, err
}

// OpenAlertKeys returns the keys of the open alerts of conditions whose key
// starts with prefix: what a component that starts again may clear.
func (s *Store) OpenAlertKeys(ctx context.Context, prefix string) ([]string, error) {
	return queryAll(ctx, s.db, "alert keys", func(scan func(...any) error) (string, error) {
		var k string
		return k, scan(&k)
	}, `SELECT key FROM alerts WHERE key != '' AND acked = 0 AND cleared = 0 AND substr(key, 1, ?) = ?`,
		len(prefix), prefix)
}

// Alerts lists alerts, newest first: open ones only unless all is set.
func (s *Store) Alerts(ctx context.Context, all bool, limit int) ([]Alert, error) {
	if limit <= 0 {
		limit = 1000
	}
	q := `SELECT ` + alertColumns + ` FROM alerts`
	if !all {
		q += ` WHERE acked = 0 AND cleared = 0`
	}
	return queryAll(ctx, s.db, "alerts", scanAlert, q+` ORDER BY id DESC LIMIT ?`, limit)
}

// AckAlert marks alert id acknowledged by who. Acknowledging twice is not
// an error; an unknown id is ErrNotFound.
func (s *Store) AckAlert(ctx context.Context, id int64, who string) error {
	return s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		var acked int64
		err := tx.QueryRowContext(ctx, `SELECT acked FROM alerts WHERE id = ?`, id).Scan(&acked)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: alert %d", ErrNotFound, id)
		}
		if err != nil || acked != 0 {
			return err
		}
		_, err = tx.ExecContext(ctx, `UPDATE alerts SET acked = ?, acked_by = ? WHERE id = ?`, now, who, id)
		return err
	})
}

// OpenAlerts returns the number of open alerts (neither acknowledged nor
// cleared).
func (s *Store) OpenAlerts(ctx context.Context) (int, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM alerts WHERE acked = 0 AND cleared = 0`).Scan(&n); err != nil {
		return 0, fmt.Errorf("store: open alerts: %w", err)
	}
	return n, nil
}

// Notices are what personnel have not been told yet: alerts raised and not
// notified, and alerts cleared whose clearing was not notified (of those
// only the ones whose raising was notified). Oldest first.
type Notices struct {
	Raised  []Alert
	Cleared []Alert
}

// PendingNotices returns the notices not yet sent.
func (s *Store) PendingNotices(ctx context.Context, limit int) (Notices, error) {
	if limit <= 0 {
		limit = 500
	}
	var n Notices
	var err error
	if n.Raised, err = queryAll(ctx, s.db, "notices", scanAlert, `SELECT `+alertColumns+` FROM alerts
		WHERE notified = 0 ORDER BY id LIMIT ?`, limit); err != nil {
		return n, err
	}
	n.Cleared, err = queryAll(ctx, s.db, "notices", scanAlert, `SELECT `+alertColumns+` FROM alerts
		WHERE cleared != 0 AND clear_notified = 0 AND notified != 0 ORDER BY id LIMIT ?`, limit)
	return n, err
}

// MarkNotified records that the notices of n were sent.
func (s *Store) MarkNotified(ctx context.Context, n Notices) error {
	mark := func(tx *sql.Tx, now int64, col string, list []Alert) error {
		if len(list) == 0 {
			return nil
		}
		ids := make([]any, 0, len(list)+1)
		ids = append(ids, now)
		for _, a := range list {
			ids = append(ids, a.ID)
		}
		_, err := tx.ExecContext(ctx, `UPDATE alerts SET `+col+` = ? WHERE id IN (?`+
			strings.Repeat(", ?", len(list)-1)+`)`, ids...)
		return err
	}
	return s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		if err := mark(tx, now, "notified", n.Raised); err != nil {
			return fmt.Errorf("store: notified: %w", err)
		}
		if err := mark(tx, now, "clear_notified", n.Cleared); err != nil {
			return fmt.Errorf("store: notified: %w", err)
		}
		return nil
	})
}
