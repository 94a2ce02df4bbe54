package pgstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/spool"
)

// The evidence journals live in the database, so that a receipt matches
// whichever node fetched it and any node can show the evidence: each mail
// as exact bytes with their SHA-256, the envelope sender, the time, the
// Message-ID and the node that sent or fetched it.

var journalSchema = []string{
	`CREATE TABLE IF NOT EXISTS journal (
		id         BIGSERIAL PRIMARY KEY,
		direction  TEXT        NOT NULL,
		sender     TEXT        NOT NULL,
		at         TIMESTAMPTZ NOT NULL,
		message_id TEXT        NOT NULL DEFAULT '',
		sha256     BYTEA       NOT NULL,
		mail       BYTEA       NOT NULL,
		node       TEXT        NOT NULL
	)`,
	`CREATE INDEX IF NOT EXISTS journal_message_id ON journal(message_id)`,
}

// JournalMail is one journalled mail.
type JournalMail struct {
	ID        int64
	Direction spool.Direction // out: sent; in: received
	From      string          // the envelope sender
	Time      time.Time
	MessageID string
	Mail      []byte
	Node      string
}

// Journal appends mails of direction d, each with its digest, in one
// transaction, and returns their ids once committed.
func (s *Store) Journal(ctx context.Context, d spool.Direction, ms []journal.Mail) ([]int64, error) {
	ids := make([]int64, len(ms))
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		b := &pgx.Batch{}
		for _, m := range ms {
			sum := sha256.Sum256(m.Bytes)
			b.Queue(`INSERT INTO journal (direction, sender, at, message_id, sha256, mail, node)
				VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`, string(d), m.From, m.Time, m.MessageID, sum[:], m.Bytes, s.o.Node)
		}
		br := tx.SendBatch(ctx, b)
		for i := range ms {
			if err := br.QueryRow().Scan(&ids[i]); err != nil {
				br.Close()
				return err
			}
		}
		return br.Close()
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: journal: %w", err)
	}
	return ids, nil
}

// JournalByMessageID returns the journalled mails with Message-ID id, in
// the order they were journalled.
func (s *Store) JournalByMessageID(ctx context.Context, id string) ([]JournalMail, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, direction, sender, at, message_id, mail, node FROM journal
		WHERE message_id = $1 ORDER BY id`, id)
	if err != nil {
		return nil, fmt.Errorf("pgstore: journal: %w", err)
	}
	return pgx.CollectRows(rows, scanJournal)
}

func scanJournal(row pgx.CollectableRow) (JournalMail, error) {
	var m JournalMail
	var d string
	err := row.Scan(&m.ID, &d, &m.From, &m.Time, &m.MessageID, &m.Mail, &m.Node)
	m.Direction = spool.Direction(d)
	return m, err
}

// ErrJournalDamaged means a journalled mail's bytes no longer match the
// digest recorded with them.
var ErrJournalDamaged = errors.New("pgstore: journalled mail does not match its digest")

// VerifyJournal checks every journalled mail against its digest and
// returns the ids of those that do not match (wrapped in
// ErrJournalDamaged), or nil.
func (s *Store) VerifyJournal(ctx context.Context) error {
	rows, err := s.pool.Query(ctx, `SELECT id, sha256, mail FROM journal ORDER BY id`)
	if err != nil {
		return fmt.Errorf("pgstore: journal: %w", err)
	}
	defer rows.Close()
	var bad []int64
	for rows.Next() {
		var id int64
		var sum, mail []byte
		if err := rows.Scan(&id, &sum, &mail); err != nil {
			return fmt.Errorf("pgstore: journal: %w", err)
		}
		if got := sha256.Sum256(mail); !bytes.Equal(got[:], sum) {
			bad = append(bad, id)
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("pgstore: journal: %w", err)
	}
	if len(bad) > 0 {
		return fmt.Errorf("%w: %d of them, ids %v", ErrJournalDamaged, len(bad), bad[:min(len(bad), 20)])
	}
	return nil
}

// ExportJournal writes the journals to dir as outgoing.mbox and
// incoming.mbox, the files a single node keeps (the journal package's
// format: any mail program opens them), each mail checked against its
// digest first. dir must not hold them already.
func (s *Store) ExportJournal(ctx context.Context, dir string) error {
	for _, f := range []struct {
		d    spool.Direction
		name string
	}{{spool.Outbound, "outgoing.mbox"}, {spool.Inbound, "incoming.mbox"}} {
		path := filepath.Join(dir, f.name)
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("pgstore: export: %s exists", path)
		}
		j, err := journal.Open(path)
		if err != nil {
			return err
		}
		err = s.exportOne(ctx, j, f.d)
		if cerr := j.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// exportOne appends direction d's mails to j, a page at a time.
func (s *Store) exportOne(ctx context.Context, j *journal.Journal, d spool.Direction) error {
	var after int64
	for {
		rows, err := s.pool.Query(ctx, `SELECT id, sender, at, sha256, mail FROM journal WHERE direction = $1 AND id > $2
			ORDER BY id LIMIT 500`, string(d), after)
		if err != nil {
			return fmt.Errorf("pgstore: export: %w", err)
		}
		var page []journal.Mail
		for rows.Next() {
			var m journal.Mail
			var sum []byte
			if err := rows.Scan(&after, &m.From, &m.Time, &sum, &m.Bytes); err != nil {
				rows.Close()
				return fmt.Errorf("pgstore: export: %w", err)
			}
			if got := sha256.Sum256(m.Bytes); !bytes.Equal(got[:], sum) {
				rows.Close()
				return fmt.Errorf("%w: id %d", ErrJournalDamaged, after)
			}
			page = append(page, m)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("pgstore: export: %w", err)
		}
		if len(page) == 0 {
			return nil
		}
		if _, err := j.AppendAll(page); err != nil {
			return err
		}
	}
}

// journalDirection is the direction of the journal a single node keeps in
// file (outgoing.mbox, incoming.mbox).
func journalDirection(file string) (spool.Direction, error) {
	switch file {
	case "outgoing.mbox":
		return spool.Outbound, nil
	case "incoming.mbox":
		return spool.Inbound, nil
	}
	return "", fmt.Errorf("pgstore: no journal %q", file)
}

// JournalEntries returns the mails of the journal a single node keeps in
// file, oldest first, each placed by its row.
func (s *Store) JournalEntries(ctx context.Context, file string) ([]journal.Entry, error) {
	d, err := journalDirection(file)
	if err != nil {
		return nil, err
	}
	rows, err := s.pool.Query(ctx, `SELECT id, sender, at, mail FROM journal WHERE direction = $1 ORDER BY id`, string(d))
	if err != nil {
		return nil, fmt.Errorf("pgstore: journal: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (journal.Entry, error) {
		var e journal.Entry
		return e, r.Scan(&e.Offset, &e.From, &e.Time, &e.Mail)
	})
}

// JournalDigests returns the SHA-256 recorded with each mail of the
// journal a single node keeps in file, by row.
func (s *Store) JournalDigests(ctx context.Context, file string) (map[int64][]byte, error) {
	d, err := journalDirection(file)
	if err != nil {
		return nil, err
	}
	rows, err := s.pool.Query(ctx, `SELECT id, sha256 FROM journal WHERE direction = $1`, string(d))
	if err != nil {
		return nil, fmt.Errorf("pgstore: journal digests: %w", err)
	}
	out := map[int64][]byte{}
	var id int64
	var sum []byte
	_, err = pgx.ForEachRow(rows, []any{&id, &sum}, func() error { out[id] = slices.Clone(sum); return nil })
	return out, err
}
