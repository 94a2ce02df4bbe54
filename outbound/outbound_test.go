package outbound

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/emersion/go-message/textproto"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// newSMTP starts a test SMTP server on addr.
func newSMTP(t *testing.T, addr string) (*embedded.SMTP, string) {
	t.Helper()
	srv := &embedded.SMTP{}
	a, err := srv.Serve(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, a
}

// fixture is a hospital instance's sending side with a PGP and an S/MIME
// partner.
type fixture struct {
	cfg      *config.Config
	st       *store.Store
	journal  string
	sealer   *security.Keyring
	labKey   *openpgp.Entity
	clinic   security.SMIMEKeys
	hospital *openpgp.Entity
	hospCert *x509.Certificate
}

func newFixture(t *testing.T, now func() time.Time) *fixture {
	t.Helper()
	f := &fixture{}
	var err error
	f.cfg, err = config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(`self: {name: General Hospital, email: edi@hospital.test, pgp_key: k, smime_cert: c, smime_key: k}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: pgp, pgp_key: x, mdn_timeout: 1h, expire_after: 100h}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: smime, smime_cert: x, mdn: unsigned}
`))
	if err != nil {
		t.Fatal(err)
	}
	gen := func(name, email string) *openpgp.Entity {
		e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: name, Email: email})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	f.hospital, f.labKey = gen("H", "edi@hospital.test"), gen("Lab", "lab@partner.test")
	hkey, hcert, err := security.GenerateCert(security.CertOptions{Name: "H", Email: "edi@hospital.test", RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	ckey, ccert, err := security.GenerateCert(security.CertOptions{Name: "Clinic", Email: "edi@clinic.test", RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	f.hospCert = hcert
	f.clinic = security.SMIMEKeys{Self: []security.SMIMEIdentity{{Cert: ccert, Key: ckey}}, Partners: []*x509.Certificate{hcert}}
	f.sealer = &security.Keyring{PGPSelf: []*openpgp.Entity{f.hospital}, SMIMESelf: []security.SMIMEIdentity{{Cert: hcert, Key: hkey}},
		PGPPartners: map[string][]*openpgp.Entity{"lab": {f.labKey}}, SMIMEPartners: map[string][]*x509.Certificate{"clinic": {ccert}}}
	dir := t.TempDir()
	f.st, err = store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn), Now: now})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.st.Close() })
	f.journal = filepath.Join(dir, "outgoing.mbox")
	return f
}

// run starts a Sender submitting to addr and returns its stop function.
func (f *fixture) run(t *testing.T, addr string, now func() time.Time) (*Sender, func()) {
	t.Helper()
	return f.start(t, SenderOptions{Submitter: &SMTPSubmitter{Addr: addr, TLS: "none", Timeout: 10 * time.Second}, Now: now})
}

// runSubmitter starts a Sender submitting through sub, following link.
func (f *fixture) runSubmitter(t *testing.T, sub Submitter, l *link.Link) (*Sender, func()) {
	t.Helper()
	return f.start(t, SenderOptions{Submitter: sub, Link: l, RetryBase: time.Millisecond, RetryMax: 20 * time.Millisecond})
}

// start starts a Sender with o, completed with the fixture's parts.
func (f *fixture) start(t *testing.T, o SenderOptions) (*Sender, func()) {
	t.Helper()
	j, err := journal.Open(f.journal)
	if err != nil {
		t.Fatal(err)
	}
	o.Config, o.Store, o.Keys, o.Journal = f.cfg, f.st, f.sealer, j
	o.Logger, o.Poll = testlog.New(t, slog.LevelInfo), 10*time.Millisecond
	s, err := NewSender(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	return s, func() { cancel(); <-done; j.Close() }
}

func (f *fixture) accept(t *testing.T, partner, id string) []byte {
	t.Helper()
	payload := []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORU^R01|" + id + "|P|2.3|||AL\rPID|1||123\rOBX|1|NM|x||" + id + "\r")
	if _, err := f.st.Accept(context.Background(), store.NewMessage{Direction: store.Outbound, Partner: partner,
		ControlID: id, MessageType: "ORU^R01", Payload: payload}); err != nil {
		t.Fatal(err)
	}
	return payload
}

func header(t *testing.T, m []byte) textproto.Header {
	t.Helper()
	h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(m)))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestSendBothSuites(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	want := map[string][]byte{}
	for i := 1; i <= 3; i++ {
		want[fmt.Sprint(i)] = f.accept(t, "lab", fmt.Sprint(i))
	}
	for i := 4; i <= 5; i++ {
		want[fmt.Sprint(i)] = f.accept(t, "clinic", fmt.Sprint(i))
	}
	_, stop := f.run(t, addr, nil)
	defer stop()
	mailtest.WaitFor(t, "five mails", func() bool { return srv.Count() == 5 })
	stop()

	ctx := context.Background()
	journalled, err := journal.Read(f.journal)
	if err != nil || len(journalled) != 5 {
		t.Fatalf("journal: %d entries, %v", len(journalled), err)
	}
	byMessageID := map[string][]byte{}
	for _, e := range journalled {
		h := header(t, e.Mail)
		byMessageID[h.Get("Message-Id")] = e.Mail
	}
	lastLab := 0
	for i, m := range srv.Mails() {
		h := header(t, m.Data)
		if m.From != "edi@hospital.test" || h.Get("Message-Id") == "" || !strings.HasPrefix(h.Get("Subject"), "HL7 ORU^R01 ") {
			t.Errorf("mail %d: from %s, header %v", i, m.From, h.Map())
		}
		if j := byMessageID[h.Get("Message-Id")]; !bytes.Equal(j, m.Data) {
			n := 0
			for n < len(j) && n < len(m.Data) && j[n] == m.Data[n] {
				n++
			}
			t.Errorf("mail %d: journal entry (%d bytes) differs from what the server received (%d bytes) at %d: %q vs %q",
				i, len(j), len(m.Data), n, j[max(0, n-20):min(len(j), n+20)], m.Data[max(0, n-20):min(len(m.Data), n+20)])
		}
		var o *security.Opened
		switch m.To[0] {
		case "lab@partner.test":
			o, err = security.PGPOpen(m.Data, security.PGPKeys{Self: openpgp.EntityList{f.labKey}, Partners: openpgp.EntityList{f.hospital}}, f.hospital, time.Now())
			if req := security.ParseMDNRequest(h); req == nil || req.To != "edi@hospital.test" || req.Protocol != "pgp-signature" {
				t.Errorf("mail %d: MDN request %+v, %v", i, req, err)
			}
		case "edi@clinic.test":
			o, err = security.SMIMEOpen(m.Data, f.clinic, f.hospCert, time.Now())
			if req := security.ParseMDNRequest(h); req == nil || req.Protocol != "" {
				t.Errorf("mail %d: unsigned MDN request %+v", i, req)
			}
		}
		if err != nil {
			t.Fatalf("mail %d to %v: open: %v", i, m.To, err)
		}
		payload, _, err := security.DecodeEDI(o.Entity, security.Accept{})
		if err != nil {
			t.Fatal(err)
		}
		id := strings.TrimPrefix(h.Get("Subject"), "HL7 ORU^R01 ")
		if !bytes.Equal(payload, want[id]) {
			t.Errorf("mail %d: payload %q, want %q", i, payload, want[id])
		}
		if m.To[0] == "lab@partner.test" {
			n := 0
			fmt.Sscan(id, &n)
			if n < lastLab {
				t.Errorf("lab mails out of order: %d after %d", n, lastLab)
			}
			lastLab = n
		}
		p, err := f.st.PendingByMessageID(ctx, h.Get("Message-Id"))
		if err != nil || p.MIC != o.MIC.String() || p.State != store.PendingWaiting || p.ControlID != id {
			t.Errorf("mail %d: pending %+v, %v; opened MIC %s", i, p, err, o.MIC)
		}
	}
	list, _ := f.st.List(ctx, store.Filter{})
	for _, m := range list {
		if m.State != store.Sent || m.MessageID == "" {
			t.Errorf("message %s: state %s, Message-ID %q", m.ControlID, m.State, m.MessageID)
		}
	}
}

func TestSendRetriesThen451(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	srv.FailTemporarily(2)
	f.accept(t, "lab", "r1")
	_, stop := f.run(t, addr, nil)
	defer stop()
	mailtest.WaitFor(t, "the mail after two 451 replies", func() bool { return srv.Count() == 1 })
	stop()
	list, _ := f.st.List(context.Background(), store.Filter{})
	attempts, _, lastErr, _ := f.st.Delivery(context.Background(), list[0].ID)
	if list[0].State != store.Sent || attempts != 3 || lastErr != "" {
		t.Errorf("after retries: %s, %d attempts, %q", list[0].State, attempts, lastErr)
	}
	entries, _ := journal.Read(f.journal)
	ids := map[string]bool{}
	for _, e := range entries {
		h := header(t, e.Mail)
		ids[h.Get("Message-Id")] = true
	}
	if len(entries) != 3 || len(ids) != 1 {
		t.Errorf("journal: %d attempts with %d Message-IDs, want 3 with one", len(entries), len(ids))
	}
}

func TestSend550Fails(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	srv.FailPermanently()
	f.accept(t, "lab", "p1")
	f.accept(t, "lab", "p2")
	_, stop := f.run(t, addr, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "both messages failed", func() bool {
		list, _ := f.st.List(ctx, store.Filter{State: store.Failed})
		return len(list) == 2
	})
	stop()
	list, _ := f.st.List(ctx, store.Filter{})
	_, _, lastErr, _ := f.st.Delivery(ctx, list[0].ID)
	p, _ := f.st.PendingByMessageID(ctx, list[0].MessageID)
	if !strings.Contains(lastErr, "550") || !strings.Contains(lastErr, "no such user") || p.State != store.PendingCancelled {
		t.Errorf("failed message: last error %q, pending %s", lastErr, p.State)
	}
}

// TestSendRequireTLS: a partner with require_tls, an SMTP server reached
// without TLS: the partner's queue waits with one alert, nothing is sent
// and nothing fails; the other partner's mail goes on.
func TestSendRequireTLS(t *testing.T) {
	f := newFixture(t, nil)
	f.cfg.Partners[0].RequireTLS = true
	srv, addr := newSMTP(t, "127.0.0.1:0")
	f.accept(t, "lab", "t1")
	f.accept(t, "lab", "t1b")
	f.accept(t, "clinic", "t2")
	_, stop := f.run(t, addr, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "the lab's message tried three times and the clinic's sent", func() bool {
		queued, _ := f.st.List(ctx, store.Filter{State: store.Queued})
		sent, _ := f.st.List(ctx, store.Filter{State: store.Sent})
		if len(queued) != 2 || len(sent) != 1 {
			return false
		}
		n, _, _, _ := f.st.Delivery(ctx, queued[len(queued)-1].ID)
		return n >= 3
	})
	stop()
	if got := srv.Mails(); len(got) != 1 || got[0].To[0] != "edi@clinic.test" {
		t.Errorf("server got %+v; want only the clinic's mail", got)
	}
	if failed, _ := f.st.List(ctx, store.Filter{State: store.Failed}); len(failed) != 0 {
		t.Errorf("%d messages failed, want none: the partner's queue waits", len(failed))
	}
	alerts, _ := f.st.Alerts(ctx, false, 0)
	if len(alerts) != 1 || alerts[0].Partner != "lab" || alerts[0].Kind != store.AlertHeld ||
		!strings.Contains(alerts[0].Text, "require_tls") {
		t.Errorf("alerts = %+v, want one partner-held alert for the lab naming require_tls", alerts)
	}
}

// swapSubmitter lets a test mend the submission while the sender runs.
type swapSubmitter struct {
	mu sync.Mutex
	s  Submitter
}

func (w *swapSubmitter) set(s Submitter) { w.mu.Lock(); w.s = s; w.mu.Unlock() }
func (w *swapSubmitter) Submit(ctx context.Context, from string, to []string, m []byte, o SubmitOptions) error {
	w.mu.Lock()
	s := w.s
	w.mu.Unlock()
	return s.Submit(ctx, from, to, m, o)
}

// TestSendSessionFaultsDefer: errors at the greeting, AUTH and MAIL FROM
// are about the session: no message fails, one alert is open for the
// outage, and once mended every message leaves in order and the alert is
// cleared (kept in the history).
func TestSendSessionFaultsDefer(t *testing.T) {
	right := map[string]string{"edi@hospital.test": "s3cret"}
	for _, tt := range []struct {
		name  string
		users map[string]string // the server's accounts (nil: no AUTH offered)
		pass  string            // the password the sender has, "" for none
		fix   string            // the password once mended
		stage string            // RefuseSessions
		words string            // in the alert: the server's words
	}{
		{name: "wrong password", users: right, pass: "guess", fix: "s3cret", words: "535"},
		{name: "no AUTH offered", pass: "s3cret", fix: "", words: "503"},
		{name: "greeting 554", stage: "greeting", words: "554"},
		{name: "MAIL FROM 553", stage: "mail", words: "553"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, nil)
			srv := &embedded.SMTP{Users: tt.users}
			addr, err := srv.Serve("127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer srv.Close()
			srv.RefuseSessions(tt.stage)
			user := ""
			if tt.pass != "" {
				user = "edi@hospital.test"
			}
			sub := &swapSubmitter{s: &SMTPSubmitter{Addr: addr, TLS: "none", Username: user, Password: tt.pass}}
			for i := range 6 {
				f.accept(t, []string{"lab", "clinic"}[i%2], fmt.Sprintf("s%d", i))
			}
			lk := &link.Link{}
			_, stop := f.runSubmitter(t, sub, lk)
			defer stop()
			ctx := context.Background()
			mailtest.WaitFor(t, "each queue's first message tried three times", func() bool {
				list, _ := f.st.List(ctx, store.Filter{State: store.Queued})
				tried := 0
				for _, m := range list {
					if n, _, _, _ := f.st.Delivery(ctx, m.ID); n >= 3 {
						tried++
					}
				}
				return tried == 2
			})
			if failed, _ := f.st.List(ctx, store.Filter{State: store.Failed}); len(failed) != 0 || srv.Count() != 0 {
				t.Fatalf("%d failed, %d mails; want none of either", len(failed), srv.Count())
			}
			alerts, _ := f.st.Alerts(ctx, false, 0)
			if len(alerts) != 1 || alerts[0].Kind != store.AlertLinkDown || !strings.Contains(alerts[0].Text, tt.words) {
				t.Fatalf("open alerts = %+v, want one link-down alert with the server's %s", alerts, tt.words)
			}
			if st := lk.Status(); st.State != link.Down {
				t.Errorf("link %s, want down", st.State)
			}
			// Mended: the right password, or none where AUTH is not offered,
			// or the server accepts again.
			srv.Recover()
			fixUser := ""
			if tt.fix != "" {
				fixUser = "edi@hospital.test"
			}
			sub.set(&SMTPSubmitter{Addr: addr, TLS: "none", Username: fixUser, Password: tt.fix})
			mailtest.WaitFor(t, "all six mails", func() bool { return srv.Count() == 6 })
			stop()
			var order []string
			for _, m := range srv.Mails() {
				h := header(t, m.Data)
				order = append(order, strings.TrimPrefix(h.Get("Subject"), "HL7 ORU^R01 "))
			}
			for _, p := range []string{"lab", "clinic"} {
				var seq []string
				for _, id := range order {
					n := int(id[1] - '0')
					if []string{"lab", "clinic"}[n%2] == p {
						seq = append(seq, id)
					}
				}
				want := map[string]string{"lab": "s0 s2 s4", "clinic": "s1 s3 s5"}[p]
				if got := strings.Join(seq, " "); got != want {
					t.Errorf("%s's mails arrived as %s, want %s", p, got, want)
				}
			}
			if open, _ := f.st.Alerts(ctx, false, 0); len(open) != 0 {
				t.Errorf("open alerts after the fix: %+v, want none", open)
			}
			all, _ := f.st.Alerts(ctx, true, 0)
			if len(all) != 1 || all[0].Cleared.IsZero() || !all[0].Acked.IsZero() {
				t.Errorf("alert history %+v, want the outage's alert, cleared by itself", all)
			}
			if st := lk.Status(); st.State != link.Up {
				t.Errorf("link %s, want up", st.State)
			}
		})
	}
}

func TestSendExpires(t *testing.T) {
	t0 := time.Now().Add(-200 * time.Hour)
	f := newFixture(t, func() time.Time { return t0 })
	f.accept(t, "lab", "old")
	srv, addr := newSMTP(t, "127.0.0.1:0")
	_, stop := f.run(t, addr, nil)
	defer stop()
	mailtest.WaitFor(t, "the old message expired", func() bool {
		list, _ := f.st.List(context.Background(), store.Filter{State: store.Expired})
		return len(list) == 1
	})
	stop()
	if srv.Count() != 0 {
		t.Errorf("an expired message was sent")
	}
}

// TestSendServerDownThenUp: with no SMTP server the message waits; once the
// server is there it is delivered, once.
func TestSendServerDownThenUp(t *testing.T) {
	f := newFixture(t, nil)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	f.accept(t, "lab", "d1")
	_, stop := f.run(t, addr, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "two failed attempts", func() bool {
		list, _ := f.st.List(ctx, store.Filter{})
		n, _, _, _ := f.st.Delivery(ctx, list[0].ID)
		return n >= 2
	})
	srv, _ := newSMTP(t, addr)
	mailtest.WaitFor(t, "delivery after the server came up", func() bool { return srv.Count() == 1 })
	time.Sleep(50 * time.Millisecond)
	stop()
	if srv.Count() != 1 {
		t.Errorf("%d mails, want exactly 1", srv.Count())
	}
}
