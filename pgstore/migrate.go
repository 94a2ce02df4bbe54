package pgstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

// Moving in: an embedded store (a single instance's) copied into the
// cluster's database, offline, in one transaction, and checked.

// Source is the embedded store being moved in (*store.Store).
type Source interface {
	Rows(ctx context.Context, table string, fn func(row map[string]any) error) error
	JournalDigests(ctx context.Context, file string) (map[int64][]byte, error)
}

// MigrateReport is what Migrate copied: rows by table, journal mails by
// file, and the resends of a message the embedded store kept as
// duplicates (one message in the cluster, as its duplicate check makes
// them).
type MigrateReport struct {
	Rows       map[string]int
	Journal    map[string]int
	Duplicates int
}

// ErrNotEmpty is returned by Migrate into a database that holds messages
// already: a store is moved into a new cluster, never merged.
var ErrNotEmpty = errors.New("pgstore: the database holds messages already; move a store into a new, empty one")

// conv turns a column of the embedded store into the value of the
// database's.
type conv int

const (
	same     conv = iota
	when          // Unix microseconds → a time
	whenNull      // likewise, 0 → NULL
	flag          // 0/1 → a boolean
	blob          // NULL → empty bytes
)

// columns are, by table, the columns copied and how.
var columns = map[string][]struct {
	name string
	conv conv
}{
	"messages": {{"id", same}, {"direction", same}, {"partner", same}, {"control_id", same}, {"message_type", same},
		{"sha256", same}, {"payload", same}, {"message_id", same}, {"mic", same}, {"kind", same}, {"in_reply_to", same},
		{"recipient", same}, {"receipt_note", same}, {"answer_to", same}, {"state", same}, {"received", when},
		{"attempts", same}, {"next_attempt", when}, {"last_error", same}, {"updated", when}, {"retried", whenNull},
		{"response", same}},
	"pending": {{"message_id", same}, {"id", same}, {"partner", same}, {"control_id", same}, {"mic", same}, {"sent", when},
		{"due", when}, {"state", same}, {"updated", when}, {"matched_by", same}, {"unsigned", flag}},
	"quarantine": {{"id", same}, {"partner", same}, {"sender", same}, {"message_id", same}, {"reason", same},
		{"detail", same}, {"received", when}, {"released", whenNull}, {"released_by", same}, {"release_note", same},
		{"released_as", same}, {"raw", blob}},
	"alerts": {{"id", same}, {"raised", when}, {"kind", same}, {"partner", same}, {"control_id", same},
		{"message_id", same}, {"text", same}, {"key", same}, {"acked", whenNull}, {"acked_by", same}, {"cleared", whenNull},
		{"notified", whenNull}, {"clear_notified", whenNull}},
	"state": {{"key", same}, {"value", same}},
	"reports": {{"id", same}, {"received", when}, {"type", same}, {"partner", same}, {"message", same},
		{"original_message_id", same}, {"mail_message_id", same}, {"disposition", same}, {"detail", same},
		{"outcome", same}, {"matched_by", same}, {"unsigned", flag}, {"final_delivery", flag}},
}

// noded are the tables whose rows name the node that wrote them.
var noded = map[string]bool{"messages": true, "quarantine": true, "alerts": true}

// sequences are the tables whose ids are copied: their sequences go on
// after the highest.
var sequences = []string{"messages", "quarantine", "alerts", "reports"}

func (c conv) value(v any) (any, error) {
	switch c {
	case when, whenNull:
		n, ok := v.(int64)
		if !ok {
			return nil, fmt.Errorf("a time of type %T", v)
		}
		if n == 0 && c == whenNull {
			return nil, nil
		}
		return time.UnixMicro(n), nil
	case flag:
		n, _ := v.(int64)
		return n != 0, nil
	case blob:
		if v == nil {
			return []byte{}, nil
		}
	}
	return v, nil
}

// Migrate copies src, whose journals are the mbox files in dir, into the
// database, which must hold no message yet, in one transaction, then
// checks the copy (Verify). Messages keep their ids, so that receipts,
// releases and reports still point at them. A resend the embedded store
// kept as a duplicate row is folded into its message.
func (s *Store) Migrate(ctx context.Context, src Source, dir string) (MigrateReport, error) {
	r := MigrateReport{Rows: map[string]int{}, Journal: map[string]int{}}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var n int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM messages`).Scan(&n); err != nil {
			return err
		}
		if n > 0 {
			return ErrNotEmpty
		}
		for _, table := range store.DumpTables {
			cols := columns[table]
			names := make([]string, 0, len(cols)+1)
			marks := make([]string, 0, len(cols)+1)
			for i, c := range cols {
				names = append(names, c.name)
				marks = append(marks, fmt.Sprintf("$%d", i+1))
			}
			if noded[table] {
				names = append(names, "node")
				marks = append(marks, fmt.Sprintf("$%d", len(cols)+1))
			}
			insert := `INSERT INTO ` + table + ` (` + strings.Join(names, ", ") + `) VALUES (` + strings.Join(marks, ", ") + `)`
			err := src.Rows(ctx, table, func(row map[string]any) error {
				if table == "messages" && row["state"] == string(store.Duplicate) {
					r.Duplicates++
					return nil
				}
				args := make([]any, 0, len(names))
				for _, c := range cols {
					v, err := c.conv.value(row[c.name])
					if err != nil {
						return fmt.Errorf("%s.%s: %w", table, c.name, err)
					}
					args = append(args, v)
				}
				if noded[table] {
					args = append(args, s.o.Node)
				}
				if _, err := tx.Exec(ctx, insert, args...); err != nil {
					return fmt.Errorf("%s: %w", table, err)
				}
				r.Rows[table]++
				return nil
			})
			if err != nil {
				return err
			}
		}
		for _, seq := range sequences {
			if _, err := tx.Exec(ctx, `SELECT setval(pg_get_serial_sequence($1, 'id'), coalesce((SELECT max(id) FROM `+seq+`), 0) + 1, false)`,
				seq); err != nil {
				return err
			}
		}
		for _, f := range []struct {
			file string
			d    spool.Direction
		}{{"outgoing.mbox", spool.Outbound}, {"incoming.mbox", spool.Inbound}} {
			n, err := s.migrateJournal(ctx, tx, src, dir, f.file, f.d)
			if err != nil {
				return err
			}
			r.Journal[f.file] = n
		}
		return nil
	})
	if err != nil {
		return r, fmt.Errorf("pgstore: move in: %w", err)
	}
	return r, s.Verify(ctx, r)
}

// migrateJournal copies one journal file, each mail checked against the
// digest the embedded store recorded when it was written.
func (s *Store) migrateJournal(ctx context.Context, tx pgx.Tx, src Source, dir, file string, d spool.Direction) (int, error) {
	entries, err := journal.Read(filepath.Join(dir, file))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	digests, err := src.JournalDigests(ctx, file)
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		sum := sha256.Sum256(e.Mail)
		if want, ok := digests[e.Offset]; ok && !bytes.Equal(want, sum[:]) {
			return 0, fmt.Errorf("%w: %s offset %d is not the mail written there", ErrJournalDamaged, file, e.Offset)
		}
		id := ""
		if m, err := mail.ReadMessage(bytes.NewReader(e.Mail)); err == nil {
			id = strings.TrimSpace(m.Header.Get("Message-Id"))
		}
		if _, err := tx.Exec(ctx, `INSERT INTO journal (direction, sender, at, message_id, sha256, mail, node)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`, string(d), e.From, e.Time, id, sum[:], e.Mail, s.o.Node); err != nil {
			return 0, err
		}
	}
	return len(entries), nil
}

// Verify checks a copy Migrate made: as many rows in each table and mails
// in each journal as were copied, every message's payload with its
// digest, every journal mail with its.
func (s *Store) Verify(ctx context.Context, r MigrateReport) error {
	for table, want := range r.Rows {
		var n int
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+table).Scan(&n); err != nil {
			return err
		}
		if n != want {
			return fmt.Errorf("pgstore: the copy has %d rows in %s, %d were copied", n, table, want)
		}
	}
	var bad int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM messages WHERE sha256 != sha256(payload)`).Scan(&bad); err != nil {
		return err
	}
	if bad > 0 {
		return fmt.Errorf("pgstore: %d messages of the copy do not match their digest", bad)
	}
	for file, want := range r.Journal {
		d, _ := journalDirection(file)
		var n int
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM journal WHERE direction = $1`, string(d)).Scan(&n); err != nil {
			return err
		}
		if n != want {
			return fmt.Errorf("pgstore: the copy has %d mails in the %s journal, %d were copied", n, file, want)
		}
	}
	return s.VerifyJournal(ctx)
}
