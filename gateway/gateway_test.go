package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestRouterToMail sends HL7 to the lab's surrogate of a running gateway:
// each message is answered CA, mailed to the lab signed and encrypted, and
// journalled; the lab's key opens it to the exact bytes sent.
func TestRouterToMail(t *testing.T) {
	dir := t.TempDir()
	self, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	priv, _ := security.ArmorPGPPrivate(self, nil)
	pub, _ := security.ArmorPGPPublic(lab)
	os.WriteFile(filepath.Join(dir, "self.asc"), priv, 0o600)
	os.WriteFile(filepath.Join(dir, "lab.asc"), pub, 0o600)
	smtpSrv := &embedded.SMTP{}
	smtpAddr, err := smtpSrv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer smtpSrv.Close()
	listen := freeAddr(t)
	path := filepath.Join(dir, "partners.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: h, email: edi@hospital.test, pgp_key: self.asc}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: %s, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: lab.asc}
`, smtpAddr, listen)), 0o600)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(cfg, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	g, err := Start(context.Background(), Options{Config: cfg, Keys: keys, Logger: testlog.New(t, slog.LevelWarn), RetryBase: time.Millisecond, NoDashboard: true})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			g.Shutdown(context.Background())
		}
	}()

	c, err := mllp.Dial(context.Background(), listen)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sent := map[string]string{}
	for i := 1; i <= 3; i++ {
		msg := fmt.Sprintf("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|o%d|P|2.3|||AL\rPID|1||%d\rORC|NW|%d\r", i, i, i)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		reply, err := c.Send(ctx, []byte(msg))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if a, err := hl7.ParseAck(reply); err != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("ACK %q, %v", reply, err)
		}
		sent[fmt.Sprintf("o%d", i)] = msg
	}
	deadline := time.Now().Add(20 * time.Second)
	for smtpSrv.Count() < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("%d mails after 20s, want 3", smtpSrv.Count())
		}
		time.Sleep(10 * time.Millisecond)
	}
	keysLab := security.PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{self}}
	for _, m := range smtpSrv.Mails() {
		o, err := security.PGPOpen(m.Data, keysLab, self, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		payload, _, _ := security.DecodeEDI(o.Entity, security.Accept{})
		h, _ := hl7.ParseHeader(payload)
		if string(payload) != sent[h.ControlID] || m.To[0] != "lab@partner.test" {
			t.Errorf("mail to %v carries %q", m.To, payload)
		}
	}
	if err := g.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopped = true
	entries, err := journal.Read(filepath.Join(cfg.StoreDir(), OutgoingJournal))
	if err != nil || len(entries) != 3 || !strings.Contains(string(entries[0].Mail), "Disposition-Notification-To: edi@hospital.test") {
		t.Errorf("outgoing journal: %d entries, %v", len(entries), err)
	}
}
