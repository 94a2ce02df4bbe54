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
)

// TestRoutingByRecipient: the hospital has two internal applications with
// addresses and routers of their own (draft-ietf-ediint-hl7-02 §6.3): a lab
// system at lab@edi.hospital and an ADT system at adt@edi.hospital, each
// with its own IMAP account. The lab company talks to the first, the ADT
// partner to the second. Mail leaves from the address the partner talks
// to, and what comes in goes to the router of the address it was sent to.
func TestRoutingByRecipient(t *testing.T) {
	dir := t.TempDir()
	w, err := embedded.NewWorld("edi@hospital.test", "lab@edi.hospital", "adt@edi.hospital", "labco@partner.test", "adtco@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// One key for the hospital, with a user ID for each of its addresses.
	hkey, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "hospital", Email: "edi@hospital.test",
		AlsoEmails: []string{"lab@edi.hospital", "adt@edi.hospital"}})
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := security.ArmorPGPPrivate(hkey, nil)
	pub, _ := security.ArmorPGPPublic(hkey)
	os.WriteFile(filepath.Join(dir, "hospital.priv.asc"), priv, 0o600)
	os.WriteFile(filepath.Join(dir, "hospital.pub.asc"), pub, 0o600)
	os.WriteFile(filepath.Join(dir, "pw"), []byte("secret\n"), 0o600)
	lcPriv, lcPub, lcCert, lcKey := keyFiles(t, dir, "labco@partner.test")
	acPriv, acPub, acCert, acKey := keyFiles(t, dir, "adtco@partner.test")

	routers := map[string]*embedded.Router{}
	for _, name := range []string{"default", "lab", "adt"} {
		r, err := embedded.StartRouter("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		routers[name] = r
	}
	toLabco, toAdtco := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "hospital.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: hospital.priv.asc}
store: hospital-store
router: {addr: %s, ack_timeout: 5s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none, username: edi@hospital.test, password_file: pw, poll: 1s}
dashboard: {addr: %s}
local:
  - {address: lab@edi.hospital, router: %s, imap: {addr: %s, tls: none, username: lab@edi.hospital, password_file: pw, poll: 1s}}
  - {address: adt@edi.hospital, router: %s, imap: {addr: %s, tls: none, username: adt@edi.hospital, password_file: pw, poll: 1s}}
partners:
  - {name: labco, listen: %s, email: labco@partner.test, security: pgp, pgp_key: %s, local: lab@edi.hospital}
  - {name: adtco, listen: %s, email: adtco@partner.test, security: pgp, pgp_key: %s, local: adt@edi.hospital}
`, routers["default"].Addr, w.SMTPAddr, w.IMAPAddr, freeAddr(t), routers["lab"].Addr, w.IMAPAddr, routers["adt"].Addr, w.IMAPAddr,
		toLabco, lcPub, toAdtco, acPub)), 0o600)
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.CheckFiles(); err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(cfg, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	hospital, err := Start(context.Background(), Options{Config: cfg, Keys: keys, RetryBase: 10 * time.Millisecond,
		Logger: testlog.New(t, slog.LevelInfo).With("site", "hospital")})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			hospital.Shutdown(context.Background())
		}
	}()
	hpub := filepath.Join(dir, "hospital.pub.asc")
	toHospitalFromLabco := freeAddr(t)
	labco := startInstance(t, w, dir, "labco", "labco@partner.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: lab@edi.hospital, security: pgp, pgp_key: %s}\n", toHospitalFromLabco, hpub),
		lcPriv, lcCert, lcKey)
	adtco := startInstance(t, w, dir, "adtco", "adtco@partner.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: adt@edi.hospital, security: pgp, pgp_key: %s}\n", freeAddr(t), hpub),
		acPriv, acCert, acKey)

	send := func(addr, msg string) {
		t.Helper()
		c, err := mllp.Dial(context.Background(), addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		reply, err := c.Send(ctx, []byte(msg))
		if a, perr := hl7.ParseAck(reply); err != nil || perr != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("ACK %q, %v", reply, err)
		}
	}
	send(toLabco, "MSH|^~\\&|OE|GH|LAB|LC|20261123||ORM^O01|RT-LAB-1|P|2.3|||AL\rPID|1\rORC|NW|1\r")
	send(toAdtco, "MSH|^~\\&|ADT|GH|ADT|AC|20261123||ADT^A01|RT-ADT-1|P|2.3|||AL\rPID|1\r")
	// And the lab company writes first: to lab@edi.hospital.
	send(toHospitalFromLabco, "MSH|^~\\&|LIS|LC|OE|GH|20261123||ORU^R01|RT-ORU-1|P|2.3|||AL\rPID|1\rOBX|1|NM|x||5\r")

	deadline := time.Now().Add(30 * time.Second)
	for len(routers["lab"].Received()) < 2 || len(routers["adt"].Received()) < 1 || len(labco.router.Messages()) < 2 ||
		len(adtco.router.Messages()) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("after 30s: lab router %v, adt router %v, default router %v", routers["lab"].Received(), routers["adt"].Received(), routers["default"].Received())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if got := routers["lab"].Received(); len(got) != 2 || !got["answer to RT-LAB-1"] || !got["RT-ORU-1"] {
		t.Errorf("the lab system's router got %v; want the answer to RT-LAB-1 and RT-ORU-1", got)
	}
	if got := routers["adt"].Received(); len(got) != 1 || !got["answer to RT-ADT-1"] {
		t.Errorf("the ADT system's router got %v; want the answer to RT-ADT-1", got)
	}
	if got := routers["default"].Received(); len(got) != 0 {
		t.Errorf("the default router got %v; want nothing", got)
	}
	// The lab company's router: the order, and the hospital's answer to its ORU.
	if n, m := len(labco.router.Messages()), len(adtco.router.Messages()); n != 2 || m != 1 {
		t.Errorf("the partners' routers got %d and %d messages, want 2 and 1", n, m)
	}
	for _, partner := range []string{"labco", "adtco"} {
		if st := hospital.IMAPStatusFor(partner); st.State != "up" {
			t.Errorf("IMAP state shown for %s: %+v; want its local account up", partner, st)
		}
	}
	hospital.Shutdown(context.Background())
	stopped = true
	entries, err := journal.Read(filepath.Join(cfg.StoreDir(), OutgoingJournal))
	if err != nil {
		t.Fatal(err)
	}
	from := map[string]int{}
	for _, e := range entries {
		from[e.From]++
	}
	if from["lab@edi.hospital"] < 2 || from["adt@edi.hospital"] != 1 || from["edi@hospital.test"] != 0 {
		t.Errorf("outgoing mail by sender: %v; want the order and the receipt from lab@edi.hospital, the ADT from adt@edi.hospital", from)
	}
}
