package pgstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/store"
)

// TestMigrate moves an embedded store with messages in every state, a
// resend kept as a duplicate, receipts, quarantine, alerts, an IMAP
// position and both journals into an empty database; the copy verifies,
// and the services read what the embedded store held. A second move into
// the same database is refused.
func TestMigrate(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	dir := t.TempDir()
	src, err := store.Open(store.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var ids []int64
	for i := range 5 {
		payload := []byte(fmt.Sprintf("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORM^O01|m%d|P|2.3\rPID|1||%d\r", i, i))
		a, err := src.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: fmt.Sprintf("m%d", i),
			MessageType: "ORM^O01", Payload: payload})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, a.ID)
	}
	// The router sent m0 again: the embedded store keeps the resend as a
	// duplicate row.
	if _, err := src.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "m0",
		MessageType: "ORM^O01", Payload: []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORM^O01|m0|P|2.3\rPID|1||0\r")}); err != nil {
		t.Fatal(err)
	}
	if err := src.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := src.Prepare(ctx, ids[0], "<m0@hospital.test>", &store.Pending{Partner: "lab", ControlID: "m0",
		MIC: "mic0, sha-256", Sent: time.Now(), Due: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := src.MarkSent(ctx, ids[0]); err != nil {
		t.Fatal(err)
	}
	if err := src.MarkFinal(ctx, ids[1], store.Failed, "refused by the server"); err != nil {
		t.Fatal(err)
	}
	qid, err := src.Quarantine(ctx, store.Quarantined{Sender: "who@else.test", MessageID: "<q@else.test>", Reason: "unknown-sender",
		Raw: []byte("From: who@else.test\r\n\r\nhello\r\n")})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := src.RaiseOnce(ctx, "smtp-down", store.Alert{Kind: store.AlertLinkDown, Text: "SMTP server down"}); err != nil {
		t.Fatal(err)
	}
	if err := src.SetValue(ctx, "imap:INBOX:uidvalidity", "42"); err != nil {
		t.Fatal(err)
	}
	out, err := journal.Open(filepath.Join(dir, "outgoing.mbox"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		mail := []byte(fmt.Sprintf("From: edi@hospital.test\r\nMessage-Id: <m%d@hospital.test>\r\n\r\nsealed %d\r\n", i, i))
		if err := journal.AppendIndexed(ctx, out, src, "edi@hospital.test", time.Now(), fmt.Sprintf("<m%d@hospital.test>", i), mail); err != nil {
			t.Fatal(err)
		}
	}
	out.Close()

	pg := open(t, "gw-a")
	r, err := pg.Migrate(ctx, src, dir)
	if err != nil {
		t.Fatal(err)
	}
	if r.Rows["messages"] != 5 || r.Duplicates != 1 || r.Rows["pending"] != 1 || r.Rows["quarantine"] != 1 ||
		r.Rows["alerts"] != 1 || r.Journal["outgoing.mbox"] != 3 || r.Journal["incoming.mbox"] != 0 {
		t.Errorf("moved %+v", r)
	}
	m, err := pg.Get(ctx, ids[0])
	if err != nil || m.State != store.Sent || m.MessageID != "<m0@hospital.test>" || m.Kind != store.KindHL7 {
		t.Errorf("message %d after the move: %+v, %v", ids[0], m, err)
	}
	if m, err := pg.Get(ctx, ids[1]); err != nil || m.State != store.Failed {
		t.Errorf("failed message after the move: %s, %v", m.State, err)
	}
	if next, err := pg.NextQueued(ctx, "lab", store.Outbound, time.Now()); err != nil || next.ID != ids[2] {
		t.Errorf("next queued after the move: %d, %v; want %d", next.ID, err, ids[2])
	}
	if p, err := pg.PendingByMessageID(ctx, "<m0@hospital.test>"); err != nil || p.ID != ids[0] || p.State != store.PendingWaiting {
		t.Errorf("receipt awaited after the move: %+v, %v", p, err)
	}
	if q, err := pg.QuarantineGet(ctx, qid); err != nil || string(q.Raw) != "From: who@else.test\r\n\r\nhello\r\n" || !q.Released.IsZero() {
		t.Errorf("quarantined mail after the move: %+v, %v", q, err)
	}
	if keys, err := pg.OpenAlertKeys(ctx, "smtp"); err != nil || len(keys) != 1 {
		t.Errorf("open alerts after the move: %v, %v", keys, err)
	}
	if v, err := pg.Value(ctx, "imap:INBOX:uidvalidity"); err != nil || v != "42" {
		t.Errorf("IMAP position after the move: %q, %v", v, err)
	}
	if got, err := pg.JournalByMessageID(ctx, "<m1@hospital.test>"); err != nil || len(got) != 1 || string(got[0].Mail) != "From: edi@hospital.test\r\nMessage-Id: <m1@hospital.test>\r\n\r\nsealed 1\r\n" {
		t.Errorf("journalled mail after the move: %+v, %v", got, err)
	}
	// New messages go on after the moved ones.
	a, err := pg.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "new", MessageType: "ORM^O01",
		Payload: []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORM^O01|new|P|2.3\r")})
	if err != nil || a.ID <= ids[4] {
		t.Errorf("accepted after the move as %d, %v; want above %d", a.ID, err, ids[4])
	}
	if _, err := pg.Migrate(ctx, src, dir); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("second move: %v, want ErrNotEmpty", err)
	}
}
