package pgstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

// TestSenderOnPostgreSQL: hl7mail's own sender drains a partner's queue
// from the shared database: 200 messages accepted by two nodes reach the
// SMTP server in the order they were accepted, each journalled in the
// database and marked sent; with the server down, the queue waits with one
// alert, which clears when it is back.
func TestSenderOnPostgreSQL(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	c, err := pgxConnect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	a, b := open(t, "gw-a"), open(t, "gw-b")
	cfg, err := config.Parse("partners.yaml", []byte(`self: {name: h, email: edi@h.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: none, allow_unencrypted: true, mdn: signed}
`))
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for i := range 200 {
		id := fmt.Sprintf("P%03d", i)
		node := a
		if i%2 == 1 {
			node = b
		}
		if _, err := node.Accept(ctx, spool.Message{Direction: spool.Outbound, Partner: "lab", ControlID: id, MessageType: "ORU^R01",
			Payload: []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORU^R01|" + id + "|P|2.3\rPID|1\r")}); err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
	}
	// The SMTP server is down at first.
	srv := &embedded.SMTP{}
	addr := freeAddr(t)
	s, err := outbound.NewSender(outbound.SenderOptions{Config: cfg, Store: a, Keys: &security.Keyring{},
		Submitter: &outbound.SMTPSubmitter{Addr: addr, TLS: config.NoTLS, Timeout: 5 * time.Second},
		Journal:   a.OutgoingJournal(), Logger: testlog.New(t, slog.LevelError), Poll: 20 * time.Millisecond,
		RetryBase: 50 * time.Millisecond, RetryMax: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { s.Run(runCtx); close(done) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 30s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	openAlerts := func() []string {
		keys, err := b.OpenAlertKeys(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	wait("one alert for the server down", func() bool { return len(openAlerts()) == 1 })
	time.Sleep(300 * time.Millisecond)
	if n := len(openAlerts()); n != 1 {
		t.Errorf("%d open alerts while the server is down, want 1", n)
	}
	if _, err := srv.Serve(addr); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	wait("200 mails", func() bool { return srv.Count() == 200 })
	wait("the alert cleared", func() bool { return len(openAlerts()) == 0 })

	var got []string
	for _, m := range srv.Mails() {
		h, err := textprotoHeader(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		subj := h.Get("Subject")
		got = append(got, subj[strings.LastIndex(subj, " ")+1:])
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("mails in this order:\n%v", got)
	}
	// The last group is recorded as sent a moment after the server took it.
	var sent, journalled, awaited int
	wait("200 recorded as sent", func() bool {
		c.QueryRow(ctx, `SELECT count(*) FROM messages WHERE state = 'sent' AND message_id != ''`).Scan(&sent)
		return sent == 200
	})
	c.QueryRow(ctx, `SELECT count(*) FROM journal WHERE direction = 'out'`).Scan(&journalled)
	c.QueryRow(ctx, `SELECT count(*) FROM pending WHERE state = 'waiting'`).Scan(&awaited)
	if sent != 200 || journalled < 200 || awaited != 200 {
		t.Errorf("%d sent with a Message-ID, %d journalled, %d receipts awaited; want 200 each", sent, journalled, awaited)
	}
	if err := b.VerifyJournal(ctx); err != nil {
		t.Error(err)
	}
	if m, err := b.NextQueued(ctx, "lab", store.Outbound, time.Now()); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("queue not empty after the drain: %s, %v", m.ControlID, err)
	}
}
