package pgstore

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

var _ inbound.Store = (*Store)(nil)

// TestReceiverOnPostgreSQL: hl7mail's own receiver takes a partner's mail
// into the shared database on one node; the same mail fetched by the other
// node is a replay; a receipt for a mail a node sent is matched and the
// message acknowledged; a stranger's mail is quarantined and released once.
func TestReceiverOnPostgreSQL(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	cfg, err := config.Parse("partners.yaml", []byte(`self: {name: h, email: edi@h.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: none, allow_unencrypted: true, mdn: unsigned}
`))
	if err != nil {
		t.Fatal(err)
	}
	a, b := open(t, "gw-a"), open(t, "gw-b")
	receiver := func(st *Store) *inbound.Receiver {
		return &inbound.Receiver{Opener: &inbound.Opener{Config: cfg, Keys: &security.Keyring{}}, Store: st,
			Journal: st.IncomingJournal(), Logger: testlog.New(t, slog.LevelError)}
	}
	ra, rb := receiver(a), receiver(b)
	edi, err := security.EncodeEDI([]byte("MSH|^~\\&|LAB|TL|HIS|GH|20261201||ORU^R01|L1|P|2.3\rPID|1\r"), security.EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mail := append([]byte("From: lab@partner.test\r\nTo: edi@h.test\r\nMessage-ID: <m1@partner.test>\r\nSubject: HL7\r\nMIME-Version: 1.0\r\n"), edi...)
	first, err := ra.Handle(ctx, mail)
	if err != nil || first.Quarantine != nil || first.ID == 0 {
		t.Fatalf("the mail on gw-a: %+v, %v", first, err)
	}
	again, err := rb.Handle(ctx, mail)
	if err != nil || !again.Replay || again.ID != first.ID {
		t.Errorf("the same mail on gw-b: %+v, %v; want a replay of %d", again, err, first.ID)
	}
	if j, err := b.JournalByMessageID(ctx, "<m1@partner.test>"); err != nil || len(j) != 2 || j[0].Node != "gw-a" || j[1].Node != "gw-b" {
		t.Errorf("journalled: %d entries, %v", len(j), err)
	}

	// gw-a sent O1; the lab's receipt comes to gw-b.
	o, err := a.Accept(ctx, spool.Message{Direction: spool.Outbound, Partner: "lab", ControlID: "O1", MessageType: "ORM^O01",
		Payload: []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORM^O01|O1|P|2.3\r")})
	if err != nil {
		t.Fatal(err)
	}
	mic := "ZmFrZSBtaWMgZm9yIHRoZSB0ZXN0IDAxMjM0NTY3ODk=, sha-256"
	now := time.Now()
	if err := a.PrepareAll(ctx, []store.Preparation{{ID: o.ID, MessageID: "<o1@h.test>",
		Pending: &store.Pending{Partner: "lab", ControlID: "O1", MIC: mic, Sent: now, Due: now.Add(time.Hour)}}}); err != nil {
		t.Fatal(err)
	}
	if err := a.MarkSentAll(ctx, []int64{o.ID}); err != nil {
		t.Fatal(err)
	}
	receipt := "From: lab@partner.test\r\nTo: edi@h.test\r\nMessage-ID: <r1@partner.test>\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=\"R\"\r\n\r\n" +
		"--R\r\nContent-Type: text/plain\r\n\r\nProcessed.\r\n--R\r\nContent-Type: message/disposition-notification\r\n\r\n" +
		"Reporting-UA: partner.test; theirs\r\nFinal-Recipient: rfc822; lab@partner.test\r\n" +
		"Original-Message-ID: <o1@h.test>\r\nReceived-Content-MIC: " + mic + "\r\n" +
		"Disposition: automatic-action/MDN-sent-automatically; processed\r\n\r\n--R--\r\n"
	res, err := rb.Handle(ctx, []byte(receipt))
	if err != nil || res.Receipt == nil || *res.Receipt != inbound.ReceiptMatched || res.ReceiptFor != o.ID {
		t.Fatalf("the receipt on gw-b: %+v, %v", res, err)
	}
	if m, _ := a.Get(ctx, o.ID); m.State != store.Acknowledged {
		t.Errorf("O1 is %s after its receipt, want acknowledged", m.State)
	}
	if rs, err := a.Reports(ctx, store.ReportFilter{Partner: "lab"}); err != nil || len(rs) != 1 || rs[0].Message != o.ID {
		t.Errorf("reports: %+v, %v", rs, err)
	}

	// A stranger's mail: quarantined, released once.
	stranger := []byte("From: who@else.test\r\nTo: edi@h.test\r\nMessage-ID: <s1@else.test>\r\nSubject: hi\r\n\r\nhello\r\n")
	q, err := ra.Handle(ctx, stranger)
	if err != nil || q.Quarantine == nil || q.Quarantine.Reason != inbound.ReasonUnknownSender {
		t.Fatalf("a stranger's mail: %+v, %v", q, err)
	}
	var qid int64
	c, _ := pgxConnect(ctx)
	defer c.Close(ctx)
	c.QueryRow(ctx, `SELECT id FROM quarantine WHERE message_id = '<s1@else.test>'`).Scan(&qid)
	got, err := b.QuarantineGet(ctx, qid)
	if err != nil || string(got.Raw) != string(stranger) || got.Reason != string(inbound.ReasonUnknownSender) {
		t.Errorf("quarantined: %+v, %v", got, err)
	}
	if err := b.MarkReleased(ctx, qid, "nurse", "checked", 0); err != nil {
		t.Fatal(err)
	}
	if err := a.MarkReleased(ctx, qid, "nurse", "again", 0); !errors.Is(err, store.ErrReleased) {
		t.Errorf("released twice: %v", err)
	}
}
