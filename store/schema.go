package store

import (
	"context"
	"database/sql"
	"fmt"
)

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
	// read, say), and the partner its answer goes to when another. An
	// alert told once ever is found by its key (RaiseOnceEver); the
	// stuck-message marks kept in state until now become such keys.
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
	ALTER TABLE messages ADD COLUMN answer_to TEXT NOT NULL DEFAULT '';
	CREATE INDEX alerts_key ON alerts(key) WHERE key != '';
	INSERT INTO alerts (raised, kind, partner, control_id, message_id, text, key, acked, acked_by)
		SELECT CAST(strftime('%s', value) AS INTEGER) * 1000000, 'router-stuck', '', '', '',
			'message not delivered to the router (told before this version)', 'stuck:' || substr(key, 15),
			CAST(strftime('%s', 'now') AS INTEGER) * 1000000, 'upgrade'
		FROM state WHERE key LIKE 'alerted-stuck:%';
	DELETE FROM state WHERE key LIKE 'alerted-stuck:%';`,
	// The awaited receipt of a message, found by the message: marking it
	// sent, failed or bounced updates it, and without this index each
	// such change read the whole table. Likewise a message by Message-ID
	// in either direction (ByMessageID: what a reply answers).
	`CREATE INDEX pending_message ON pending(id);
	CREATE INDEX messages_message_id ON messages(message_id);`,
	// Queued messages by partner and direction: every look for what to
	// send or deliver names both. Without the direction, a partner's
	// inbound deliverer stepped over all its queued outbound messages at
	// each pick (a burst: hundreds, read row by row).
	`DROP INDEX messages_queued;
	CREATE INDEX messages_queued ON messages(partner, direction, id) WHERE state = 'queued';`,
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
