package inbound

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// site is one hl7mail instance's mailbox parts, wired as the gateway
// wires them, with a stand-in router.
type site struct {
	cfg      *config.Config
	st       *store.Store
	receiver *Receiver
	router   *mailtest.Router
	stop     func()
}

func newSite(t *testing.T, name, self, partner, partnerEmail, smtpAddr string, own, theirs *openpgp.Entity) *site {
	t.Helper()
	r := mailtest.StartRouter(t, "127.0.0.1:0")
	cfg, err := config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: k}
router: {addr: %s, ack_timeout: 2s}
smtp: {addr: %s, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: %s, listen: 127.0.0.1:9012, email: %s, security: pgp, pgp_key: k}
`, name, self, r.Addr, smtpAddr, partner, partnerEmail)))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	st, err := store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := journal.Open(filepath.Join(dir, "outgoing.mbox"))
	in, _ := journal.Open(filepath.Join(dir, "incoming.mbox"))
	keys := &security.Keyring{PGPSelf: []*openpgp.Entity{own}, PGPPartners: map[string][]*openpgp.Entity{partner: {theirs}}}
	log := testlog.New(t, slog.LevelInfo).With("site", name)
	sender, _ := outbound.NewSender(outbound.SenderOptions{Config: cfg, Store: st, Keys: keys, Journal: out, Logger: log,
		Submitter: &outbound.SMTPSubmitter{Addr: smtpAddr, TLS: "none"}, Poll: 10 * time.Millisecond})
	responder := &deliver.Responder{Config: cfg, Store: st, Logger: log, Notify: sender.Notify}
	deliverer, _ := deliver.NewDeliverer(deliver.DelivererOptions{Config: cfg, Store: st, Logger: log, Poll: 10 * time.Millisecond,
		Delivered: responder.Delivered})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { sender.Run(ctx); done <- struct{}{} }()
	go func() { deliverer.Run(ctx); done <- struct{}{} }()
	s := &site{cfg: cfg, st: st, router: r,
		receiver: &Receiver{Opener: &Opener{Config: cfg, Keys: keys}, Store: st, Journal: in, Logger: log}}
	s.stop = func() {
		cancel()
		<-done
		<-done
		out.Close()
		in.Close()
		st.Close()
	}
	t.Cleanup(func() {
		if s.stop != nil {
			s.stop()
		}
	})
	return s
}

// TestLoop: an order travels hospital → lab by mail, reaches the lab's
// router byte for byte; the router's answer and the MDN come back in one
// bundle; the hospital's pending receipt closes and the answer reaches the
// hospital's router. Exactly two mails travel.
func TestLoop(t *testing.T) {
	mailSrv := &embedded.SMTP{}
	smtpAddr, err := mailSrv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer mailSrv.Close()
	hk, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	lk, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "L", Email: "lab@partner.test"})
	hospital := newSite(t, "hospital", "edi@hospital.test", "lab", "lab@partner.test", smtpAddr, hk, lk)
	lab := newSite(t, "lab", "lab@partner.test", "hospital", "edi@hospital.test", smtpAddr, lk, hk)
	ctx := context.Background()

	order := []byte("MSH|^~\\&|OE|DR.SCHADOW|LAB|TUCKER-GENERAL|19971226175948||ORM^O01|RQ-O01-001|P|2.3|||AL\r" +
		"PID|||08157411||Doe^John||19690219|M|\rORC|NW|12345|||F|\r")
	a, err := hospital.st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "RQ-O01-001",
		MessageType: "ORM^O01", Payload: order})
	if err != nil {
		t.Fatal(err)
	}
	mailtest.WaitFor(t, "the order mail", func() bool { return mailSrv.Count() == 1 })
	if res, err := lab.receiver.Handle(ctx, mailSrv.Mails()[0].Data); err != nil || res.Quarantine != nil {
		t.Fatalf("lab Handle(order) = %+v, %v", res, err)
	}
	mailtest.WaitFor(t, "the order at the lab's router", func() bool { return len(lab.router.Received(t)) == 1 })
	got, _ := lab.router.Store.Get(ctx, lab.router.Received(t)[0].ID)
	if string(got.Payload) != string(order) {
		t.Errorf("lab router got %q", got.Payload)
	}
	mailtest.WaitFor(t, "the response mail", func() bool { return mailSrv.Count() == 2 })
	resp := mailSrv.Mails()[1]
	if resp.To[0] != "edi@hospital.test" {
		t.Errorf("response went to %v", resp.To)
	}
	res, err := hospital.receiver.Handle(ctx, resp.Data)
	if err != nil || res.Quarantine != nil || res.Receipt == nil || *res.Receipt != ReceiptMatched {
		t.Fatalf("hospital Handle(response) = %+v, %v", res, err)
	}
	sent, _ := hospital.st.Get(ctx, a.ID)
	if sent.State != store.Acknowledged {
		t.Errorf("hospital order state %s, want acknowledged", sent.State)
	}
	mailtest.WaitFor(t, "the lab's answer at the hospital's router", func() bool { return len(hospital.router.Received(t)) == 1 })
	ackMsg, _ := hospital.router.Store.Get(ctx, hospital.router.Received(t)[0].ID)
	if r, err := hl7.ParseAck(ackMsg.Payload); err != nil || r.ControlID != "RQ-O01-001" || r.Code != hl7.CommitAccept {
		t.Errorf("hospital router got %q, %v", ackMsg.Payload, err)
	}
	time.Sleep(100 * time.Millisecond)
	if n := mailSrv.Count(); n != 2 {
		t.Errorf("%d mails travelled, want 2 (no answer to the answer)", n)
	}
}
