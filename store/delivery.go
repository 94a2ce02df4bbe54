package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Delivery state changes. Each is one transaction on the updater
// connection (synchronous=FULL): durable when the method returns.

// Pending is a receipt hl7mail waits for (draft-ietf-ediint-hl7-02 §6.4).
type Pending struct {
	MessageID string    `json:"message_id"`
	ID        int64     `json:"id"`
	Partner   string    `json:"partner"`
	ControlID string    `json:"control_id"`
	MIC       string    `json:"mic"` // as written in an MDN: "<base64>, sha-256"
	Sent      time.Time `json:"sent"`
	Due       time.Time `json:"due"`
	State     string    `json:"state"` // waiting, matched, mismatch, overdue, cancelled
	// MatchedBy is the rule that matched the receipt: MatchByMessageID or
	// MatchByMIC; empty while none came.
	MatchedBy string `json:"matched_by,omitempty"`
	// Unsigned is set when the receipt came unsigned (from a partner with
	// mdn: unsigned): weaker evidence than a signed one.
	Unsigned bool `json:"unsigned,omitempty"`
}

// Receipt matching rules (draft-ietf-ediint-hl7-02 §6.2, figure 8).
const (
	MatchByMessageID = "message-id" // Original-Message-ID names the mail sent
	MatchByMIC       = "mic"        // the Received-Content-MIC alone, within the partner
)

const pendingColumns = `message_id, id, partner, control_id, mic, sent, due, state, matched_by, unsigned`

func scanPending(scan func(dest ...any) error) (Pending, error) {
	var p Pending
	var sent, due int64
	err := scan(&p.MessageID, &p.ID, &p.Partner, &p.ControlID, &p.MIC, &sent, &due, &p.State, &p.MatchedBy, &p.Unsigned)
	p.Sent, p.Due = time.UnixMicro(sent), time.UnixMicro(due)
	return p, err
}

// PendingByMIC returns partner's receipts still awaited (waiting or
// overdue) for mail whose MIC is mic, oldest first: how a receipt is
// matched when a gateway rewrote the Message-ID it names.
func (s *Store) PendingByMIC(ctx context.Context, partner, mic string) ([]Pending, error) {
	return queryAll(ctx, s.db, "pending by MIC", scanPending, `SELECT `+pendingColumns+` FROM pending
		WHERE partner = ? AND mic = ? AND state IN ('waiting', 'overdue') ORDER BY sent, id`, partner, mic)
}

// Pending states.
const (
	PendingWaiting  = "waiting"
	PendingMatched  = "matched"
	PendingMismatch = "mismatch"
	PendingOverdue  = "overdue"
	// PendingCancelled: the message failed or expired; no receipt is due.
	PendingCancelled = "cancelled"
	// PendingError: the receipt matched but reports an error disposition.
	PendingError = "error"
)

// update runs f in a synced transaction on the updater connection. id is
// the message the change is about (0 for none): accepted a moment ago, it
// may still be on its way into the database, and is waited for.
//
// Changes made at the same time share a transaction and its sync (group
// commit): whoever gets the connection commits every change waiting, each
// in a savepoint of its own, so that one change's failure undoes only it.
// update returns once its change is synced.
func (s *Store) update(ctx context.Context, id int64, f func(tx *sql.Tx, now int64) error) error {
	if s.readOnly {
		return ErrReadOnly
	}
	if err := s.waitID(ctx, id); err != nil {
		return err
	}
	req := &change{ctx: ctx, f: f, done: make(chan error, 1)}
	s.waitMu.Lock()
	s.waiting = append(s.waiting, req)
	s.waitMu.Unlock()
	s.updMu.Lock()
	s.waitMu.Lock()
	batch := s.waiting
	s.waiting = nil
	s.waitMu.Unlock()
	if len(batch) > 0 {
		s.commit(batch)
	}
	s.updMu.Unlock()
	return <-req.done // answered by this commit or by the one before it
}

// change is one caller's state change waiting for its commit.
type change struct {
	ctx  context.Context
	f    func(tx *sql.Tx, now int64) error
	done chan error
}

// commit runs batch in one transaction and answers each change.
func (s *Store) commit(batch []*change) {
	s.commits.Add(1)
	answer := func(err error) {
		for _, c := range batch {
			c.done <- err
		}
	}
	// Not the callers' contexts: one caller's end must not undo the others.
	tx, err := s.updater.BeginTx(context.Background(), nil)
	if err != nil {
		answer(fmt.Errorf("store: begin: %w", err))
		return
	}
	now := s.now().UnixMicro()
	if len(batch) == 1 {
		if err := batch[0].f(tx, now); err != nil {
			tx.Rollback()
			answer(err)
			return
		}
		if err := tx.Commit(); err != nil {
			answer(fmt.Errorf("store: commit: %w", err))
			return
		}
		answer(nil)
		return
	}
	errs := make([]error, len(batch))
	for i, c := range batch {
		if err := c.ctx.Err(); err != nil {
			errs[i] = err
			continue
		}
		if _, err := tx.Exec("SAVEPOINT change"); err != nil {
			tx.Rollback()
			answer(fmt.Errorf("store: savepoint: %w", err))
			return
		}
		if errs[i] = c.f(tx, now); errs[i] != nil {
			if _, err := tx.Exec("ROLLBACK TO change"); err != nil {
				tx.Rollback()
				answer(fmt.Errorf("store: rollback to savepoint: %w", err))
				return
			}
		}
		if _, err := tx.Exec("RELEASE change"); err != nil {
			tx.Rollback()
			answer(fmt.Errorf("store: release savepoint: %w", err))
			return
		}
	}
	if err := tx.Commit(); err != nil {
		answer(fmt.Errorf("store: commit: %w", err))
		return
	}
	for i, c := range batch {
		c.done <- errs[i]
	}
}

// ErrStateChanged is returned by a state change whose message is no longer
// in the state the change starts from: another worker, a waiting router
// connection or an operator changed it meanwhile. Nothing was changed.
var ErrStateChanged = errors.New("store: the message's state changed meanwhile")

// inState returns a check that an update of message id made with
// "WHERE id = ? AND state = from" changed one row: else ErrNotFound, or
// ErrStateChanged with the state the message is in.
func inState(ctx context.Context, tx *sql.Tx, id int64, from State) func(sql.Result, error) error {
	return func(res sql.Result, err error) error {
		if err != nil {
			return fmt.Errorf("store: update %d: %w", id, err)
		}
		if n, _ := res.RowsAffected(); n == 1 {
			return nil
		}
		var now State
		if err := tx.QueryRowContext(ctx, `SELECT state FROM messages WHERE id = ?`, id).Scan(&now); err != nil {
			return fmt.Errorf("%w: %d", ErrNotFound, id)
		}
		return fmt.Errorf("%w: message %d is %s, not %s", ErrStateChanged, id, now, from)
	}
}

// StateOf returns the state message id is in now.
func (s *Store) StateOf(ctx context.Context, id int64) (State, error) {
	if err := s.waitID(ctx, id); err != nil {
		return "", err
	}
	var st State
	err := s.q.QueryRowContext(ctx, `SELECT state FROM messages WHERE id = ?`, id).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("%w: %d", ErrNotFound, id)
	}
	return st, err
}

// expectOne returns a check that an update of message id changed one row.
func expectOne(id int64) func(sql.Result, error) error {
	return func(res sql.Result, err error) error {
		if err != nil {
			return fmt.Errorf("store: update %d: %w", id, err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return fmt.Errorf("%w: %d", ErrNotFound, id)
		}
		return nil
	}
}

// NextQueued returns the oldest queued message of partner in direction d
// that is due at now, payload included, or ErrNotFound. Messages leave in
// the order they were accepted: a message waiting for a retry holds back
// those after it. It reads the database as it is: a message accepted a
// moment ago appears once ingested, which OnIngest announces.
func (s *Store) NextQueued(ctx context.Context, partner string, d Direction, now time.Time) (Message, error) {
	var id, next int64
	err := s.q.QueryRowContext(ctx, `SELECT id, next_attempt FROM messages WHERE partner = ? AND state = 'queued'
		AND `+directionIs(d)+` ORDER BY id LIMIT 1`, partner).Scan(&id, &next)
	if errors.Is(err, sql.ErrNoRows) || err == nil && next > now.UnixMicro() {
		return Message{}, ErrNotFound
	}
	if err != nil {
		return Message{}, fmt.Errorf("store: next queued: %w", err)
	}
	return s.Get(ctx, id)
}

// QueuedAfter returns, in the order they were accepted, up to limit queued
// messages of partner in direction d with an id above after, payload
// included, that follow one another without a message waiting for a retry
// between them: the run a sender may work on ahead of the one it submits.
// It stops at the first message not due at now.
func (s *Store) QueuedAfter(ctx context.Context, partner string, d Direction, now time.Time, after int64,
	limit int) ([]Message, error) {
	rows, err := s.q.QueryContext(ctx, "SELECT "+messageColumns+`, payload, next_attempt FROM messages
		WHERE partner = ? AND state = 'queued' AND `+directionIs(d)+` AND id > ? ORDER BY id LIMIT ?`, partner, after, limit)
	if err != nil {
		return nil, fmt.Errorf("store: queued: %w", err)
	}
	defer rows.Close()
	var out []Message
	for rows.Next() {
		var payload []byte
		var next int64
		m, err := scanMessage(func(dest ...any) error { return rows.Scan(append(dest, &payload, &next)...) })
		if err != nil {
			return nil, err
		}
		if next > now.UnixMicro() {
			break
		}
		m.Payload = payload
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: queued: %w", err)
	}
	return out, nil
}

// Prepare records, before the first attempt, the Message-ID every attempt
// of the message uses and, when a receipt is expected (p not nil), the
// receipt it awaits (state waiting). Calling it again for a later attempt
// changes nothing.
func (s *Store) Prepare(ctx context.Context, id int64, messageID string, p *Pending) error {
	return s.PrepareAll(ctx, []Preparation{{ID: id, MessageID: messageID, Pending: p}})
}

// Preparation is what Prepare records of one message, and, when
// JournalFile is set, where its mail was journalled (as RecordJournal).
type Preparation struct {
	ID        int64
	MessageID string
	Pending   *Pending
	// JournalFile ("outgoing.mbox"), JournalOffset and Sum (SHA-256) place
	// the journalled mail.
	JournalFile   string
	JournalOffset int64
	Sum           []byte
}

// PrepareAll records the preparations of mails submitted together in one
// synced transaction: one sync for the group, not one a mail.
func (s *Store) PrepareAll(ctx context.Context, ps []Preparation) error {
	if len(ps) == 0 {
		return nil
	}
	return s.update(ctx, ps[len(ps)-1].ID, func(tx *sql.Tx, now int64) error {
		// Each statement is parsed once for the group.
		setID, err := tx.PrepareContext(ctx, `UPDATE messages SET message_id = ?, updated = ? WHERE id = ?`)
		if err != nil {
			return fmt.Errorf("store: prepare: %w", err)
		}
		defer setID.Close()
		index, err := tx.PrepareContext(ctx, insertJournalEntry)
		if err != nil {
			return fmt.Errorf("store: prepare: %w", err)
		}
		defer index.Close()
		await, err := tx.PrepareContext(ctx, `INSERT OR IGNORE INTO pending (message_id, id, partner, control_id, mic, sent,
			due, state, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`)
		if err != nil {
			return fmt.Errorf("store: prepare: %w", err)
		}
		defer await.Close()
		for _, pr := range ps {
			if err := expectOne(pr.ID)(setID.ExecContext(ctx, pr.MessageID, now, pr.ID)); err != nil {
				return err
			}
			if pr.JournalFile != "" {
				if _, err := index.ExecContext(ctx, pr.JournalFile, pr.JournalOffset, pr.MessageID, pr.Sum); err != nil {
					return fmt.Errorf("store: record journal entry: %w", err)
				}
			}
			if p := pr.Pending; p != nil {
				if _, err := await.ExecContext(ctx, pr.MessageID, pr.ID, p.Partner, p.ControlID, p.MIC, p.Sent.UnixMicro(),
					p.Due.UnixMicro(), PendingWaiting, now); err != nil {
					return fmt.Errorf("store: pending: %w", err)
				}
			}
		}
		return nil
	})
}

// MarkSent records that the SMTP server took the queued message. The
// receipt it awaits is due from now on: the time of an outage before this
// submission is not counted against the partner.
func (s *Store) MarkSent(ctx context.Context, id int64) error {
	return s.MarkSentAll(ctx, []int64{id})
}

// MarkSentAll records, in one synced transaction, that the SMTP server
// took the queued messages ids. A message no longer queued is left as it
// is (ErrStateChanged, joined for each); the others are marked.
func (s *Store) MarkSentAll(ctx context.Context, ids []int64) error {
	if len(ids) == 0 {
		return nil
	}
	var changed []error
	err := s.update(ctx, slices.Max(ids), func(tx *sql.Tx, now int64) error {
		changed = changed[:0]
		mark, err := tx.PrepareContext(ctx, `UPDATE messages SET state = 'sent', attempts = attempts + 1, last_error = '',
			updated = ? WHERE id = ? AND state = 'queued'`)
		if err != nil {
			return fmt.Errorf("store: prepare: %w", err)
		}
		defer mark.Close()
		due, err := tx.PrepareContext(ctx, `UPDATE pending SET due = ? + (due - sent), sent = ?, updated = ?
			WHERE id = ? AND state = 'waiting'`)
		if err != nil {
			return fmt.Errorf("store: prepare: %w", err)
		}
		defer due.Close()
		for _, id := range ids {
			err := inState(ctx, tx, id, Queued)(mark.ExecContext(ctx, now, id))
			if errors.Is(err, ErrStateChanged) || errors.Is(err, ErrNotFound) {
				changed = append(changed, err)
				continue
			}
			if err != nil {
				return err
			}
			if _, err := due.ExecContext(ctx, now, now, now, id); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return errors.Join(changed...)
}

// MarkRetry records a failed attempt of a queued message and when to try
// again.
func (s *Store) MarkRetry(ctx context.Context, id int64, reason string, next time.Time) error {
	return s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		return inState(ctx, tx, id, Queued)(tx.ExecContext(ctx, `UPDATE messages SET attempts = attempts + 1, last_error = ?,
			next_attempt = ?, updated = ? WHERE id = ? AND state = 'queued'`, reason, next.UnixMicro(), now, id))
	})
}

// MarkBounced records that the mail of sent message id bounced (a DSN
// with Action: failed): it becomes Bounced with the reason, and no receipt
// is awaited. A message whose receipt came already is left as it is; it
// reports whether the message changed.
func (s *Store) MarkBounced(ctx context.Context, id int64, reason string) (bool, error) {
	changed := false
	err := s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `UPDATE messages SET state = ?, last_error = ?, updated = ? WHERE id = ? AND state = ?`,
			Bounced, reason, now, id, Sent)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil
		}
		changed = true
		_, err = tx.ExecContext(ctx, `UPDATE pending SET state = ?, updated = ? WHERE id = ?`, PendingCancelled, now, id)
		return err
	})
	return changed, err
}

// MarkFinal ends a queued message's delivery as Failed or Expired with a
// reason.
func (s *Store) MarkFinal(ctx context.Context, id int64, state State, reason string) error {
	if state != Failed && state != Expired {
		return fmt.Errorf("store: %s is not a final state", state)
	}
	return s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		if err := inState(ctx, tx, id, Queued)(tx.ExecContext(ctx, `UPDATE messages SET state = ?, last_error = ?, updated = ?
			WHERE id = ? AND state = 'queued'`, state, reason, now, id)); err != nil {
			return err
		}
		// No receipt will come for what was never delivered.
		_, err := tx.ExecContext(ctx, `UPDATE pending SET state = ?, updated = ? WHERE id = ?`, PendingCancelled, now, id)
		return err
	})
}

// Delivery returns the attempts, next attempt and last error of a message.
func (s *Store) Delivery(ctx context.Context, id int64) (attempts int, next time.Time, lastError string, err error) {
	if err := s.waitID(ctx, id); err != nil {
		return 0, time.Time{}, "", err
	}
	var n int64
	err = s.q.QueryRowContext(ctx, `SELECT attempts, next_attempt, last_error FROM messages WHERE id = ?`, id).
		Scan(&attempts, &n, &lastError)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, time.Time{}, "", fmt.Errorf("%w: %d", ErrNotFound, id)
	}
	return attempts, time.UnixMicro(n), lastError, err
}

// PendingByMessageID returns the pending receipt for a Message-ID.
func (s *Store) PendingByMessageID(ctx context.Context, messageID string) (Pending, error) {
	p, err := scanPending(s.q.QueryRowContext(ctx, `SELECT `+pendingColumns+` FROM pending WHERE message_id = ?`, messageID).Scan)
	if errors.Is(err, sql.ErrNoRows) {
		return p, fmt.Errorf("%w: Message-ID %s", ErrNotFound, messageID)
	}
	if err != nil {
		return p, fmt.Errorf("store: pending: %w", err)
	}
	return p, nil
}

// SetReceipt records what a returned receipt established for the pending
// message messageID: PendingMatched (the message becomes Acknowledged),
// PendingMismatch or PendingError, and the rule that matched it. A receipt
// for a receipt already matched changes nothing and reports the earlier
// state.
func (s *Store) SetReceipt(ctx context.Context, messageID, state, rule string, unsigned bool) (Pending, error) {
	var p Pending
	err := s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		var err error
		p, err = scanPending(tx.QueryRowContext(ctx, `SELECT `+pendingColumns+` FROM pending WHERE message_id = ?`, messageID).Scan)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: Message-ID %s", ErrNotFound, messageID)
		}
		if err != nil {
			return err
		}
		if p.State == PendingMatched {
			return nil
		}
		if _, err := tx.ExecContext(ctx, `UPDATE pending SET state = ?, matched_by = ?, unsigned = ?, updated = ? WHERE message_id = ?`,
			state, rule, unsigned, now, messageID); err != nil {
			return err
		}
		p.State, p.MatchedBy, p.Unsigned = state, rule, unsigned
		if state == PendingMatched {
			_, err = tx.ExecContext(ctx, `UPDATE messages SET state = 'acknowledged', updated = ? WHERE id = ?`, now, p.ID)
		}
		return err
	})
	return p, err
}

// Overdue marks every waiting receipt due before now as overdue and
// returns them (each is reported once).
func (s *Store) Overdue(ctx context.Context, now time.Time) ([]Pending, error) {
	var out []Pending
	err := s.update(ctx, 0, func(tx *sql.Tx, nowMicro int64) error {
		var err error
		out, err = queryAll(ctx, tx, "overdue", scanPending, `SELECT `+pendingColumns+` FROM pending
			WHERE state = 'waiting' AND due < ?`, now.UnixMicro())
		if err != nil {
			return err
		}
		for i := range out {
			out[i].State = PendingOverdue
		}
		_, err = tx.ExecContext(ctx, `UPDATE pending SET state = 'overdue', updated = ? WHERE state = 'waiting' AND due < ?`,
			nowMicro, now.UnixMicro())
		return err
	})
	return out, err
}

// MarkDelivered records that the router acknowledged a queued inbound
// message, with its acknowledgement.
func (s *Store) MarkDelivered(ctx context.Context, id int64, ack []byte) error {
	return s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		return inState(ctx, tx, id, Queued)(tx.ExecContext(ctx, `UPDATE messages SET state = 'delivered', attempts = attempts + 1,
			last_error = '', response = ?, updated = ? WHERE id = ? AND state = 'queued'`, ack, now, id))
	})
}

// Response returns the router's acknowledgement of a delivered message.
func (s *Store) Response(ctx context.Context, id int64) ([]byte, error) {
	var b []byte
	err := s.db.QueryRowContext(ctx, `SELECT response FROM messages WHERE id = ?`, id).Scan(&b)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("%w: %d", ErrNotFound, id)
	}
	return b, err
}

// Value returns the named value, or "" when it was never set.
func (s *Store) Value(ctx context.Context, key string) (string, error) {
	var v string
	err := s.q.QueryRowContext(ctx, `SELECT value FROM state WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	return v, err
}

// SetValue sets the named value (synced before it returns); "" removes it.
func (s *Store) SetValue(ctx context.Context, key, value string) error {
	return s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		if value == "" { // what Value answers for a key it lacks
			_, err := tx.ExecContext(ctx, `DELETE FROM state WHERE key = ?`, key)
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO state (key, value) VALUES (?, ?)
			ON CONFLICT(key) DO UPDATE SET value = excluded.value`, key, value)
		return err
	})
}

// FindResponse returns the response sent to partner for the mail with
// Message-ID inReplyTo, or ErrNotFound.
func (s *Store) FindResponse(ctx context.Context, partner, inReplyTo string) (Message, error) {
	if err := s.waitIngested(ctx); err != nil {
		return Message{}, err
	}
	var id int64
	err := s.db.QueryRowContext(ctx, `SELECT id FROM messages WHERE partner = ? AND direction = 'out' AND kind = 'bundle'
		AND in_reply_to = ? ORDER BY id DESC LIMIT 1`, partner, inReplyTo).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return Message{}, fmt.Errorf("%w: response to %s", ErrNotFound, inReplyTo)
	}
	if err != nil {
		return Message{}, err
	}
	return s.Get(ctx, id)
}

// Requeue puts a response that was sent (or acknowledged) back in the
// queue, to be sent again with the same Message-ID.
func (s *Store) Requeue(ctx context.Context, id int64) error {
	return s.update(ctx, id, func(tx *sql.Tx, now int64) error {
		return inState(ctx, tx, id, Sent)(tx.ExecContext(ctx, `UPDATE messages SET state = 'queued', next_attempt = 0, updated = ?
			WHERE id = ? AND kind = 'bundle' AND state IN ('sent', 'acknowledged')`, now, id))
	})
}

// Stuck returns the queued messages of partner in direction d accepted
// before cutoff, oldest first: messages that have not moved for too long.
func (s *Store) Stuck(ctx context.Context, partner string, d Direction, cutoff time.Time) ([]Message, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	return s.queryMessages(ctx, "stuck", "SELECT "+messageColumns+` FROM messages WHERE partner = ? AND `+directionIs(d)+`
		AND state = 'queued' AND received < ? ORDER BY id LIMIT 100`, partner, cutoff.UnixMicro())
}
