package pgstore

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/spool"
	"github.com/hl7mail/hl7mail/store"
)

// The shared store serves the services as the embedded one does.
var (
	_ outbound.Store = (*Store)(nil)
	_ deliver.Store  = (*Store)(nil)
)

// TestDelivererOnPostgreSQL: hl7mail's own deliverer hands the inbound
// messages two nodes took to the router in the order they came, records
// each delivered with the router's acknowledgement, and lists them as
// requests still to answer until a response is queued for them.
func TestDelivererOnPostgreSQL(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	router := mailtest.StartRouter(t, "127.0.0.1:0")
	cfg, err := config.Parse("partners.yaml", []byte(fmt.Sprintf(`self: {name: lab, email: lab@partner.test}
router: {addr: %s}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@h.test, security: none, allow_unencrypted: true}
`, router.Addr)))
	if err != nil {
		t.Fatal(err)
	}
	a, b := open(t, "gw-a"), open(t, "gw-b")
	var want []string
	for i := range 50 {
		id := fmt.Sprintf("I%03d", i)
		node := []*Store{a, b}[i%2]
		if _, err := node.Accept(ctx, spool.Message{Direction: spool.Inbound, Partner: "hospital", ControlID: id, MessageType: "ORM^O01",
			Kind: store.KindRequest, MessageID: "<" + id + "@h.test>",
			Payload: []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORM^O01|" + id + "|P|2.3\rPID|1\r")}); err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
	}
	var mu sync.Mutex
	var delivered []string
	d, err := deliver.NewDeliverer(deliver.DelivererOptions{Config: cfg, Store: b, Logger: testlog.New(t, slog.LevelError),
		Poll: 10 * time.Millisecond, Delivered: func(_ context.Context, m store.Message, ack []byte) {
			mu.Lock()
			defer mu.Unlock()
			if len(ack) > 0 {
				delivered = append(delivered, m.ControlID)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { d.Run(runCtx); close(done) }()
	mailtest.WaitFor(t, "50 delivered", func() bool { mu.Lock(); defer mu.Unlock(); return len(delivered) == 50 })
	cancel()
	<-done
	if strings.Join(delivered, " ") != strings.Join(want, " ") {
		t.Errorf("delivered in this order:\n%v", delivered)
	}
	var got []string
	list := router.Received(t)
	for i := len(list) - 1; i >= 0; i-- { // newest first
		got = append(got, list[i].ControlID)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the router received, in this order:\n%v", got)
	}
	un, err := a.Unanswered(ctx)
	if err != nil || len(un) != 50 || len(un[0].Payload) == 0 {
		t.Fatalf("unanswered: %d, %v", len(un), err)
	}
	// A response queued for the first: it is no longer unanswered.
	if _, err := a.Accept(ctx, spool.Message{Direction: spool.Outbound, Partner: "hospital", ControlID: "R1", MessageType: "ACK",
		Kind: store.KindBundle, InReplyTo: "<I000@h.test>", Payload: []byte("MSH|^~\\&|LAB|TL|HIS|GH|20261201||ACK|R1|P|2.3\r")}); err != nil {
		t.Fatal(err)
	}
	if un, _ := b.Unanswered(ctx); len(un) != 49 || un[0].ControlID != "I001" {
		t.Errorf("after a response: %d unanswered, the first %s", len(un), un[0].ControlID)
	}
	if m, err := a.ByMessageID(ctx, "<I007@h.test>"); err != nil || m.ControlID != "I007" || m.State != store.Delivered {
		t.Errorf("by Message-ID: %s %s, %v", m.ControlID, m.State, err)
	}
}
