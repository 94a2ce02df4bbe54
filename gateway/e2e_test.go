package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// instance is one running hl7mail with its stand-in router.
type instance struct {
	cfg    *config.Config
	g      *Gateway
	router *embedded.Router
}

// keyFiles writes a PGP key pair and an S/MIME key pair for email into dir
// and returns their file names.
func keyFiles(t *testing.T, dir, email string) (pgpPriv, pgpPub, cert, key string) {
	t.Helper()
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: email, Email: email})
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := security.ArmorPGPPrivate(e, nil)
	pub, _ := security.ArmorPGPPublic(e)
	k, c, err := security.GenerateCert(security.CertOptions{Name: email, Email: email, RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := security.PEMKey(k)
	base := filepath.Join(dir, email)
	for name, data := range map[string][]byte{".priv.asc": priv, ".pub.asc": pub, ".crt": security.PEMCert(c), ".key": kp} {
		if err := os.WriteFile(base+name, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return base + ".priv.asc", base + ".pub.asc", base + ".crt", base + ".key"
}

func startInstance(t *testing.T, w *embedded.World, dir, name, self, partners string, keyPriv, cert, key string, opts ...func(*Options)) *instance {
	t.Helper()
	r, err := embedded.StartRouter("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	os.WriteFile(filepath.Join(dir, name+".pw"), []byte("secret\n"), 0o600)
	path := filepath.Join(dir, name+".yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: %s, smime_cert: %s, smime_key: %s}
store: %s-store
router: {addr: %s, ack_timeout: 5s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none, username: %s, password_file: %s.pw, poll: 1s}
dashboard: {addr: %s}
partners:
%s`, name, self, keyPriv, cert, key, name, r.Addr, w.SMTPAddr, w.IMAPAddr, self, name, freeAddr(t), partners)), 0o600)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(cfg, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Config: cfg, Keys: keys, RetryBase: 10 * time.Millisecond,
		Logger: testlog.New(t, slog.LevelInfo).With("site", name)}
	for _, f := range opts {
		f(&o)
	}
	g, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{cfg: cfg, g: g, router: r}
	t.Cleanup(func() {
		if in.g != nil {
			in.g.Shutdown(context.Background())
		}
	})
	return in
}

// TestTwoWays runs a hospital and two partners over an in-process mail
// system: the lab on PGP, the clinic on S/MIME. An order sent to each
// surrogate reaches the partner's router byte for byte; the partner's
// application ACK comes back in a bundle with the MDN, reaches the
// hospital's router, and the receipt closes the pending row; the journals
// hold every mail.
func TestTwoWays(t *testing.T) {
	dir := t.TempDir()
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test", "edi@clinic.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	hPriv, _, hCert, hKey := keyFiles(t, dir, "edi@hospital.test")
	hPub := filepath.Join(dir, "edi@hospital.test.pub.asc")
	lPriv, lPub, lCert, lKey := keyFiles(t, dir, "lab@partner.test")
	cPriv, _, cCert, cKey := keyFiles(t, dir, "edi@clinic.test")

	listenLab, listenClinic := freeAddr(t), freeAddr(t)
	hospital := startInstance(t, w, dir, "hospital", "edi@hospital.test", fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: %s}\n"+
			"  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: %s}\n",
		listenLab, lPub, listenClinic, cCert), hPriv, hCert, hKey)
	lab := startInstance(t, w, dir, "lab", "lab@partner.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: %s}\n", freeAddr(t), hPub),
		lPriv, lCert, lKey)
	clinic := startInstance(t, w, dir, "clinic", "edi@clinic.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: smime, smime_cert: %s}\n", freeAddr(t), hCert),
		cPriv, cCert, cKey)

	orders := map[string][]byte{
		listenLab:    []byte("MSH|^~\\&|OE|DR.SCHADOW|LAB|TUCKER-GENERAL|19971226175948||ORM^O01|RQ-1|P|2.3|||AL\rPID|||08157411||Doe^John\rORC|NW|12345\r"),
		listenClinic: []byte("MSH|^~\\&|HIS|GH|CLIN|NS|20261123||ORU^R01|RU-2|P|2.5|||AL\rPID|1||77\rOBX|1|NM|x||5\r"),
	}
	for addr, msg := range orders {
		c, err := mllp.Dial(context.Background(), addr)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		reply, err := c.Send(ctx, msg)
		cancel()
		c.Close()
		if a, perr := hl7.ParseAck(reply); err != nil || perr != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("surrogate %s answered %q, %v", addr, reply, err)
		}
	}
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitUntil("the order at the lab's router", func() bool { return len(lab.router.Messages()) == 1 })
	waitUntil("the result at the clinic's router", func() bool { return len(clinic.router.Messages()) == 1 })
	if got := lab.router.Messages()[0]; string(got) != string(orders[listenLab]) {
		t.Errorf("lab router got %q", got)
	}
	if got := clinic.router.Messages()[0]; string(got) != string(orders[listenClinic]) {
		t.Errorf("clinic router got %q", got)
	}
	waitUntil("both answers at the hospital's router", func() bool { return len(hospital.router.Messages()) == 2 })
	for _, m := range hospital.router.Messages() {
		a, err := hl7.ParseAck(m)
		if err != nil || a.Code != hl7.ApplicationAccept || (a.ControlID != "RQ-1" && a.ControlID != "RU-2") {
			t.Errorf("hospital router got %q, %v", m, err)
		}
	}
	ctx := context.Background()
	waitUntil("both orders acknowledged by receipt", func() bool {
		list, _ := hospital.g.Store().List(ctx, store.Filter{Direction: store.Outbound, State: store.Acknowledged})
		return len(list) == 2
	})
	time.Sleep(300 * time.Millisecond)
	if n := w.Delivered(); n != 4 {
		t.Errorf("%d mails travelled, want 4 (two orders, two responses)", n)
	}
	for _, in := range []*instance{hospital, lab, clinic} {
		in.g.Shutdown(ctx)
		in.g = nil
	}
	// Each mail one side journalled as sent, the other journalled as
	// received, byte for byte.
	read := func(in *instance, name string) map[string]bool {
		entries, err := journal.Read(filepath.Join(in.cfg.StoreDir(), name))
		if err != nil {
			t.Fatal(err)
		}
		set := map[string]bool{}
		for _, e := range entries {
			set[string(e.Mail)] = true
		}
		return set
	}
	hOut, hIn := read(hospital, OutgoingJournal), read(hospital, IncomingJournal)
	pOut, pIn := read(lab, OutgoingJournal), read(lab, IncomingJournal)
	for m := range read(clinic, OutgoingJournal) {
		pOut[m] = true
	}
	for m := range read(clinic, IncomingJournal) {
		pIn[m] = true
	}
	if len(hOut) != 2 || len(hIn) != 2 {
		t.Errorf("hospital journals: %d sent, %d received; want 2 and 2", len(hOut), len(hIn))
	}
	for m := range hOut {
		if !pIn[m] {
			t.Errorf("a mail the hospital sent is not in a partner's incoming journal as sent")
		}
	}
	for m := range hIn {
		if !pOut[m] {
			t.Errorf("a mail the hospital received is not in a partner's outgoing journal as received")
		}
	}
}
