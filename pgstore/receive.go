package pgstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/store"
)

// What the receiver needs (inbound.Store), on the shared database: replays
// recognized by Message-ID whichever node fetched the first copy, the
// receipts awaited and the reports that came, bounces, quarantine and its
// release.

var receiveSchema = []string{
	`ALTER TABLE pending ADD COLUMN IF NOT EXISTS matched_by TEXT NOT NULL DEFAULT ''`,
	`ALTER TABLE pending ADD COLUMN IF NOT EXISTS unsigned BOOLEAN NOT NULL DEFAULT false`,
	`CREATE INDEX IF NOT EXISTS pending_mic ON pending(partner, mic)`,
	`CREATE TABLE IF NOT EXISTS quarantine (
		id          BIGSERIAL   PRIMARY KEY,
		partner     TEXT        NOT NULL DEFAULT '',
		sender      TEXT        NOT NULL,
		message_id  TEXT        NOT NULL DEFAULT '',
		reason      TEXT        NOT NULL,
		detail      TEXT        NOT NULL DEFAULT '',
		received    TIMESTAMPTZ NOT NULL DEFAULT now(),
		released    TIMESTAMPTZ,
		released_by TEXT        NOT NULL DEFAULT '',
		release_note TEXT       NOT NULL DEFAULT '',
		released_as BIGINT      NOT NULL DEFAULT 0,
		raw         BYTEA       NOT NULL,
		node        TEXT        NOT NULL
	)`,
	`CREATE TABLE IF NOT EXISTS reports (
		id                  BIGSERIAL   PRIMARY KEY,
		received            TIMESTAMPTZ NOT NULL DEFAULT now(),
		type                TEXT        NOT NULL,
		partner             TEXT        NOT NULL DEFAULT '',
		message             BIGINT      NOT NULL DEFAULT 0,
		original_message_id TEXT        NOT NULL DEFAULT '',
		mail_message_id     TEXT        NOT NULL DEFAULT '',
		disposition         TEXT        NOT NULL DEFAULT '',
		detail              TEXT        NOT NULL DEFAULT '',
		outcome             TEXT        NOT NULL DEFAULT '',
		matched_by          TEXT        NOT NULL DEFAULT '',
		unsigned            BOOLEAN     NOT NULL DEFAULT false,
		final_delivery      BOOLEAN     NOT NULL DEFAULT false
	)`,
}

// find returns the message the query's first id names, or store.ErrNotFound
// naming what.
func (s *Store) find(ctx context.Context, what, sql string, args ...any) (store.Message, error) {
	var id int64
	err := s.pool.QueryRow(ctx, sql, args...).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Message{}, fmt.Errorf("%w: %s", store.ErrNotFound, what)
	}
	if err != nil {
		return store.Message{}, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	return s.Get(ctx, id)
}

// FindInbound returns partner's inbound message that came in the mail with
// messageID: a replay, whichever node took the first copy.
func (s *Store) FindInbound(ctx context.Context, partner, messageID string) (store.Message, error) {
	return s.find(ctx, "inbound "+messageID, `SELECT id FROM messages WHERE partner = $1 AND message_id = $2 AND direction = 'in'
		ORDER BY id LIMIT 1`, partner, messageID)
}

// FindOutbound returns the outbound message mailed with messageID.
func (s *Store) FindOutbound(ctx context.Context, messageID string) (store.Message, error) {
	return s.find(ctx, "outbound "+messageID, `SELECT id FROM messages WHERE message_id = $1 AND direction = 'out'
		ORDER BY id LIMIT 1`, messageID)
}

// FindResponse returns the response sent to partner for the mail with
// Message-ID inReplyTo.
func (s *Store) FindResponse(ctx context.Context, partner, inReplyTo string) (store.Message, error) {
	return s.find(ctx, "response to "+inReplyTo, `SELECT id FROM messages WHERE partner = $1 AND direction = 'out'
		AND kind = 'bundle' AND in_reply_to = $2 ORDER BY id DESC LIMIT 1`, partner, inReplyTo)
}

// MarkBounced records that sent message id bounced; a message whose
// receipt came already is left as it is. It reports whether it changed.
func (s *Store) MarkBounced(ctx context.Context, id int64, reason string) (bool, error) {
	changed := false
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE messages SET state = $1, last_error = $2, updated = now() WHERE id = $3 AND state = $4`,
			string(store.Bounced), reason, id, string(store.Sent))
		if err != nil || tag.RowsAffected() == 0 {
			return err
		}
		changed = true
		_, err = tx.Exec(ctx, `UPDATE pending SET state = $1, updated = now() WHERE id = $2`, store.PendingCancelled, id)
		return err
	})
	return changed, err
}

// Requeue puts a response that was sent (or acknowledged) back in the
// queue, to be sent again with the same Message-ID.
func (s *Store) Requeue(ctx context.Context, id int64) error {
	tag, err := s.pool.Exec(ctx, `UPDATE messages SET state = 'queued', next_attempt = 'epoch', updated = now()
		WHERE id = $1 AND kind = 'bundle' AND state IN ('sent', 'acknowledged')`, id)
	return s.inState(ctx, id, tag.RowsAffected(), err)
}

// Quarantine records refused mail and returns its id.
func (s *Store) Quarantine(ctx context.Context, q store.Quarantined) (int64, error) {
	var id int64
	err := s.pool.QueryRow(ctx, `INSERT INTO quarantine (partner, sender, message_id, reason, detail, raw, node)
		VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`, q.Partner, q.Sender, q.MessageID, q.Reason, q.Detail, q.Raw, s.o.Node).Scan(&id)
	if err != nil {
		return 0, fmt.Errorf("pgstore: quarantine: %w", err)
	}
	return id, nil
}

// QuarantineGet returns one refused mail with its bytes.
func (s *Store) QuarantineGet(ctx context.Context, id int64) (store.Quarantined, error) {
	var q store.Quarantined
	var released *time.Time
	err := s.pool.QueryRow(ctx, `SELECT id, partner, sender, message_id, reason, detail, received, released, released_by,
		release_note, released_as, raw FROM quarantine WHERE id = $1`, id).Scan(&q.ID, &q.Partner, &q.Sender, &q.MessageID,
		&q.Reason, &q.Detail, &q.Received, &released, &q.ReleasedBy, &q.Note, &q.ReleasedAs, &q.Raw)
	if errors.Is(err, pgx.ErrNoRows) {
		return q, fmt.Errorf("%w: quarantined mail %d", store.ErrNotFound, id)
	}
	if released != nil {
		q.Released = *released
	}
	return q, err
}

// MarkReleased records that a person released quarantined mail id as
// message as; store.ErrReleased when it was released before.
func (s *Store) MarkReleased(ctx context.Context, id int64, by, note string, as int64) error {
	tag, err := s.pool.Exec(ctx, `UPDATE quarantine SET released = now(), released_by = $1, release_note = $2, released_as = $3
		WHERE id = $4 AND released IS NULL`, by, note, as, id)
	if err != nil {
		return fmt.Errorf("pgstore: release %d: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: quarantined mail %d", store.ErrReleased, id)
	}
	return nil
}

const pendingColumns = `message_id, id, partner, control_id, mic, sent, due, state, matched_by, unsigned`

func scanPending(row pgx.Row) (store.Pending, error) {
	var p store.Pending
	err := row.Scan(&p.MessageID, &p.ID, &p.Partner, &p.ControlID, &p.MIC, &p.Sent, &p.Due, &p.State, &p.MatchedBy, &p.Unsigned)
	return p, err
}

// PendingByMessageID returns the receipt awaited for a Message-ID.
func (s *Store) PendingByMessageID(ctx context.Context, messageID string) (store.Pending, error) {
	p, err := scanPending(s.pool.QueryRow(ctx, `SELECT `+pendingColumns+` FROM pending WHERE message_id = $1`, messageID))
	if errors.Is(err, pgx.ErrNoRows) {
		return p, fmt.Errorf("%w: Message-ID %s", store.ErrNotFound, messageID)
	}
	return p, err
}

// PendingByMIC returns partner's receipts still awaited for mail whose MIC
// is mic, oldest first.
func (s *Store) PendingByMIC(ctx context.Context, partner, mic string) ([]store.Pending, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+pendingColumns+` FROM pending WHERE partner = $1 AND mic = $2
		AND state IN ('waiting', 'overdue') ORDER BY sent, id`, partner, mic)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.Pending, error) { return scanPending(r) })
}

// SetReceipt records what a returned receipt established for the pending
// message messageID (store.Store.SetReceipt): a matched receipt makes the
// message acknowledged; one for a receipt matched already changes nothing.
func (s *Store) SetReceipt(ctx context.Context, messageID, state, rule string, unsigned bool) (store.Pending, error) {
	var p store.Pending
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		p, err = scanPending(tx.QueryRow(ctx, `SELECT `+pendingColumns+` FROM pending WHERE message_id = $1 FOR UPDATE`, messageID))
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: Message-ID %s", store.ErrNotFound, messageID)
		}
		if err != nil || p.State == store.PendingMatched {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE pending SET state = $1, matched_by = $2, unsigned = $3, updated = now() WHERE message_id = $4`,
			state, rule, unsigned, messageID); err != nil {
			return err
		}
		p.State, p.MatchedBy, p.Unsigned = state, rule, unsigned
		if state == store.PendingMatched {
			_, err = tx.Exec(ctx, `UPDATE messages SET state = 'acknowledged', updated = now() WHERE id = $1`, p.ID)
		}
		return err
	})
	return p, err
}

// AddReport records a report and returns its id.
func (s *Store) AddReport(ctx context.Context, r store.Report) (int64, error) {
	var id int64
	err := s.pool.QueryRow(ctx, `INSERT INTO reports (type, partner, message, original_message_id, mail_message_id, disposition,
		detail, outcome, matched_by, unsigned, final_delivery) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id`,
		r.Type, r.Partner, r.Message, r.OriginalMessageID, r.MailMessageID, r.Disposition, r.Detail, r.Outcome, r.MatchedBy,
		r.Unsigned, r.FinalDelivery).Scan(&id)
	return id, err
}

// Reports lists reports, newest first; zero fields of f select all.
func (s *Store) Reports(ctx context.Context, f store.ReportFilter) ([]store.Report, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	rows, err := s.pool.Query(ctx, `SELECT id, received, type, partner, message, original_message_id, mail_message_id, disposition,
		detail, outcome, matched_by, unsigned, final_delivery FROM reports
		WHERE ($1 = '' OR partner = $1) AND ($2 = 0 OR message = $2) AND ($3 = '' OR mail_message_id = $3)
		ORDER BY id DESC LIMIT $4`, f.Partner, f.Message, f.MailMessageID, f.Limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (store.Report, error) {
		var r store.Report
		err := row.Scan(&r.ID, &r.Received, &r.Type, &r.Partner, &r.Message, &r.OriginalMessageID, &r.MailMessageID,
			&r.Disposition, &r.Detail, &r.Outcome, &r.MatchedBy, &r.Unsigned, &r.FinalDelivery)
		return r, err
	})
}
