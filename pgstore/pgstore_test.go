package pgstore

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/internal/pgtest"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/spool"
)

var server *pgtest.Server

// TestMain starts one throwaway PostgreSQL for the package's tests.
func TestMain(m *testing.M) {
	s, err := pgtest.Start()
	if err != nil {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" {
			fmt.Fprintln(os.Stderr, "pgstore:", err)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "pgstore: skipped:", err)
		os.Exit(0)
	}
	server = s
	code := m.Run()
	s.Stop()
	os.Exit(code)
}

// fresh empties the database for a test.
func fresh(t *testing.T) {
	t.Helper()
	c, err := pgx.Connect(context.Background(), server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(context.Background(), "DROP TABLE IF EXISTS messages, pending, alerts, journal, quarantine, reports, state CASCADE"); err != nil {
		t.Fatal(err)
	}
}

func open(t *testing.T, node string) *Store {
	t.Helper()
	s, err := Open(context.Background(), Options{DSN: server.DSN, Node: node})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func msg(partner, id string) spool.Message {
	return spool.Message{Direction: spool.Outbound, Partner: partner, ControlID: id, MessageType: "ORU^R01",
		Payload: []byte("MSH|^~\\&|A|B|C|D|20260101||ORU^R01|" + id + "|P|2.3\r")}
}

// TestAcceptConcurrent: 16 connections accepting at once get distinct ids,
// all committed, in fewer transactions than messages.
func TestAcceptConcurrent(t *testing.T) {
	fresh(t)
	s := open(t, "gw-a")
	var wg sync.WaitGroup
	ids := make(chan int64, 16*50)
	for c := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				a, err := s.Accept(context.Background(), msg("lab", fmt.Sprintf("C%d-%d", c, i)))
				if err != nil {
					t.Error(err)
					return
				}
				ids <- a.ID
			}
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[int64]bool{}
	for id := range ids {
		if seen[id] {
			t.Fatalf("id %d given twice", id)
		}
		seen[id] = true
	}
	var n int
	s.pool.QueryRow(context.Background(), "SELECT count(*) FROM messages WHERE node = 'gw-a'").Scan(&n)
	st := s.Stats()
	if len(seen) != 800 || n != 800 || st.Messages != 800 || st.Commits >= 800 {
		t.Errorf("%d ids, %d rows, stats %+v: want 800 each in fewer commits", len(seen), n, st)
	}
	t.Logf("800 messages in %d commits", st.Commits)
}

// TestAcceptOnce: a message sent again, to the same node or to another
// (a router that failed over), is the message accepted before; another
// payload under the same control ID is a message of its own.
func TestAcceptOnce(t *testing.T) {
	fresh(t)
	a, b := open(t, "gw-a"), open(t, "gw-b")
	first, err := a.Accept(context.Background(), msg("lab", "X1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Store{a, b} {
		again, err := s.Accept(context.Background(), msg("lab", "X1"))
		if err != nil || again.ID != first.ID {
			t.Errorf("sent again: id %d, %v; want %d", again.ID, err, first.ID)
		}
	}
	other := msg("lab", "X1")
	other.Payload = append(other.Payload, "PID|1\r"...)
	if o, err := b.Accept(context.Background(), other); err != nil || o.ID == first.ID {
		t.Errorf("another payload: id %d, %v", o.ID, err)
	}
	// Both nodes at once, the same messages: one each.
	var wg sync.WaitGroup
	got := make([][]int64, 2)
	for i, s := range []*Store{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 100 {
				r, err := s.Accept(context.Background(), msg("clinic", fmt.Sprintf("R%d", j)))
				if err != nil {
					t.Error(err)
					return
				}
				got[i] = append(got[i], r.ID)
			}
		}()
	}
	wg.Wait()
	for j := range 100 {
		if got[0][j] != got[1][j] {
			t.Fatalf("message R%d: ids %d and %d on the two nodes", j, got[0][j], got[1][j])
		}
	}
}

// TestRefusesAsyncCommit: a database that acknowledges commits before they
// are flushed is refused: a CA'd message could be lost.
func TestRefusesAsyncCommit(t *testing.T) {
	c, err := pgx.Connect(context.Background(), server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	c.Exec(context.Background(), "ALTER DATABASE hl7mail SET synchronous_commit = off")
	defer c.Exec(context.Background(), "ALTER DATABASE hl7mail RESET synchronous_commit")
	if s, err := Open(context.Background(), Options{DSN: server.DSN, Node: "gw-a"}); err == nil || !strings.Contains(err.Error(), "synchronous_commit off") {
		if s != nil {
			s.Close()
		}
		t.Errorf("Open with synchronous_commit off: %v", err)
	}
}

// TestBatchIsOneTransaction checks what commit relies on: the statements
// of one pgx batch run as one implicit transaction, so that a failure
// stores none of them.
func TestBatchIsOneTransaction(t *testing.T) {
	ctx := context.Background()
	c, err := pgx.Connect(ctx, server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	c.Exec(ctx, "CREATE TABLE IF NOT EXISTS batch_t (n INT)")
	b := &pgx.Batch{}
	b.Queue("INSERT INTO batch_t VALUES (1)")
	b.Queue("SELECT 1/0")
	b.Queue("INSERT INTO batch_t VALUES (2)")
	if err := c.SendBatch(ctx, b).Close(); err == nil {
		t.Fatal("a batch with a failing statement succeeded")
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM batch_t").Scan(&n); err != nil || n != 0 {
		t.Errorf("%d rows stored by a failed batch (%v), want 0", n, err)
	}
}

// TestJournal: mails journalled by two nodes, both ways, come back by
// Message-ID, export to mbox files the journal package reads back byte for
// byte (a "From " line inside and a missing final newline included), and a
// mail altered in the database is found by VerifyJournal and refused by
// the export.
func TestJournal(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	c, _ := pgx.Connect(ctx, server.DSN)
	defer c.Close(ctx)
	a, b := open(t, "gw-a"), open(t, "gw-b")
	at := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	out := []journal.Mail{
		{From: "edi@h.test", Time: at, MessageID: "<1@h.test>", Bytes: []byte("Subject: one\r\n\r\nFrom here on\r\nbody\r\n")},
		{From: "edi@h.test", Time: at.Add(time.Second), MessageID: "<2@h.test>", Bytes: []byte("Subject: two\r\n\r\nno final newline")},
	}
	in := []journal.Mail{{From: "lab@l.test", Time: at.Add(2 * time.Second), MessageID: "<r1@l.test>", Bytes: []byte("Subject: receipt\r\n\r\nok\r\n")}}
	if _, err := a.Journal(ctx, spool.Outbound, out); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Journal(ctx, spool.Inbound, in); err != nil {
		t.Fatal(err)
	}
	got, err := a.JournalByMessageID(ctx, "<r1@l.test>")
	if err != nil || len(got) != 1 || got[0].Node != "gw-b" || got[0].Direction != spool.Inbound || !bytes.Equal(got[0].Mail, in[0].Bytes) {
		t.Fatalf("by Message-ID, from the other node: %+v, %v", got, err)
	}
	if err := a.VerifyJournal(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := b.ExportJournal(ctx, dir); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string][]journal.Mail{"outgoing.mbox": out, "incoming.mbox": in} {
		entries, err := journal.Read(filepath.Join(dir, name))
		if err != nil || len(entries) != len(want) {
			t.Fatalf("%s: %d entries, %v", name, len(entries), err)
		}
		for i, e := range entries {
			if !bytes.Equal(e.Mail, want[i].Bytes) || e.From != want[i].From || !e.Time.Equal(want[i].Time) {
				t.Errorf("%s entry %d: %q from %s at %s", name, i, e.Mail, e.From, e.Time)
			}
		}
	}
	if err := b.ExportJournal(ctx, dir); err == nil {
		t.Error("export over files already there")
	}
	c.Exec(ctx, `UPDATE journal SET mail = 'altered' WHERE message_id = '<2@h.test>'`)
	if err := a.VerifyJournal(ctx); !errors.Is(err, ErrJournalDamaged) {
		t.Errorf("VerifyJournal after an alteration: %v", err)
	}
	if err := a.ExportJournal(ctx, t.TempDir()); !errors.Is(err, ErrJournalDamaged) {
		t.Errorf("export of an altered journal: %v", err)
	}
}

func pgxConnect(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, server.DSN) }

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// textprotoHeader reads a mail's header.
func textprotoHeader(mail []byte) (textproto.Header, error) {
	return textproto.ReadHeader(bufio.NewReader(bytes.NewReader(mail)))
}
