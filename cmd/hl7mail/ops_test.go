package main

import (
	"bytes"
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
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

func pgpKey(t *testing.T, email string) *openpgp.Entity {
	t.Helper()
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: email, Email: email})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func writePublic(t *testing.T, path string, e *openpgp.Entity) {
	t.Helper()
	pub, _ := security.ArmorPGPPublic(e)
	if err := os.WriteFile(path, pub, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestReleaseStopped: with the instance stopped, "hl7mail release" opens
// the quarantined mail with the keys configured now. Signed with the
// partner's new key, the mail stays quarantined until that key is in the
// configuration; then it is stored for the router, and the release is
// recorded with who and why.
func TestReleaseStopped(t *testing.T) {
	dir := t.TempDir()
	lab, oldKey, newKey := pgpKey(t, "lab@partner.test"), pgpKey(t, "edi@hospital.test"), pgpKey(t, "edi@hospital.test")
	priv, _ := security.ArmorPGPPrivate(lab, nil)
	os.WriteFile(filepath.Join(dir, "lab.asc"), priv, 0o600)
	writePublic(t, filepath.Join(dir, "hospital.asc"), oldKey)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dash := ln.Addr().String()
	ln.Close() // nothing answers there: the instance is stopped
	cfgPath := filepath.Join(dir, "partners.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`self: {name: lab, email: lab@partner.test, pgp_key: lab.asc}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
dashboard: {addr: %s}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@hospital.test, security: pgp, pgp_key: hospital.asc}
`, dash)), 0o600)

	// The hospital signs with a key the lab does not know yet.
	orm := "MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|REL-1|P|2.3|||AL\rPID|1||123\r"
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	signed, _, err := security.PGPSign(edi, newKey, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := security.PGPEncrypt(signed, []*openpgp.Entity{lab}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	raw := append([]byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: <rel1@hospital.test>\r\nSubject: HL7\r\n"), sealed...)
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := gateway.LoadKeys(cfg, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(store.Options{Dir: cfg.StoreDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	j, _ := journal.Open(filepath.Join(cfg.StoreDir(), gateway.IncomingJournal))
	r := &inbound.Receiver{Opener: &inbound.Opener{Config: cfg, Keys: &keys.Keyring}, Store: st, Journal: j,
		Logger: testlog.New(t, slog.LevelInfo)}
	res, err := r.Handle(context.Background(), raw)
	j.Close()
	st.Close()
	if err != nil || res.Quarantine == nil || res.Quarantine.Reason != inbound.ReasonUnknownSigner {
		t.Fatalf("Handle = %+v, %v", res, err)
	}

	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := run(args, &out, &errOut)
		return code, out.String(), errOut.String()
	}
	if code, _, errOut := run("release", "-config", cfgPath, "-by", "j.smith", "1"); code != 2 || !strings.Contains(errOut, "-note") {
		t.Errorf("release without -note: %d %s", code, errOut)
	}
	code, _, errOut := run("release", "-config", cfgPath, "-by", "j.smith", "-note", "checked", "1")
	if code != 1 || !strings.Contains(errOut, "unknown-signer") {
		t.Errorf("release before the new key is configured: %d %s", code, errOut)
	}
	writePublic(t, filepath.Join(dir, "hospital.asc"), newKey)
	code, out, errOut := run("release", "-config", cfgPath, "-by", "j.smith", "-note", "new key confirmed by phone", "1")
	if code != 0 || !strings.Contains(out, "quarantined mail 1 released as message 1") {
		t.Fatalf("release: %d %s %s", code, out, errOut)
	}
	if code, out, _ := run("messages", "-config", cfgPath); code != 0 || !strings.Contains(out, "REL-1") || !strings.Contains(out, "queued") {
		t.Errorf("messages after release: %d\n%s", code, out)
	}
	if code, out, _ := run("alerts", "-config", cfgPath); code != 0 || !strings.Contains(out, "quarantined (unknown-signer)") {
		t.Errorf("alerts: %d\n%s", code, out)
	}
	if code, _, errOut := run("release", "-config", cfgPath, "-by", "j.smith", "-note", "again", "1"); code != 1 || !strings.Contains(errOut, "released by j.smith") {
		t.Errorf("second release: %d %s", code, errOut)
	}
}

// TestReceiveStopped: "hl7mail receive" with no instance running stores
// the mail itself (exit 0); the same mail again is a replay, quarantined
// (exit 0); a mail beyond any limit is bounced (65); a configuration that
// cannot be read leaves the mail with the MTA (75).
func TestReceiveStopped(t *testing.T) {
	dir := t.TempDir()
	lab, hospital := pgpKey(t, "lab@partner.test"), pgpKey(t, "edi@hospital.test")
	priv, _ := security.ArmorPGPPrivate(lab, nil)
	os.WriteFile(filepath.Join(dir, "lab.asc"), priv, 0o600)
	writePublic(t, filepath.Join(dir, "hospital.asc"), hospital)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dash := ln.Addr().String()
	ln.Close()
	cfgPath := filepath.Join(dir, "partners.yaml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`self: {name: lab, email: lab@partner.test, pgp_key: lab.asc}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {max_mail_size: 100000}
dashboard: {addr: %s}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@hospital.test, security: pgp, pgp_key: hospital.asc}
`, dash)), 0o600)
	orm := "MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|PIPE-1|P|2.3|||AL\rPID|1||123\r"
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	signed, _, _ := security.PGPSign(edi, hospital, time.Now())
	sealed, _ := security.PGPEncrypt(signed, []*openpgp.Entity{lab}, time.Now())
	raw := append([]byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: <pipe1@hospital.test>\r\nSubject: HL7\r\n"), sealed...)

	receive := func(cfg string, mail []byte) (int, string) {
		var out, errOut bytes.Buffer
		code := runReceive([]string{"-config", cfg, "-to", "lab@partner.test"}, bytes.NewReader(mail), &out, &errOut)
		return code, out.String() + errOut.String()
	}
	if code, out := receive(cfgPath, raw); code != exOK || !strings.Contains(out, "stored as message 1") {
		t.Fatalf("receive: %d %s", code, out)
	}
	if code, out := receive(cfgPath, raw); code != exOK || !strings.Contains(out, "quarantined: replay") {
		t.Errorf("receive of the same mail: %d %s", code, out)
	}
	if code, out := receive(cfgPath, bytes.Repeat([]byte("x"), 400001)); code != exDataErr {
		t.Errorf("receive of an enormous mail: %d %s", code, out)
	}
	if code, out := receive(filepath.Join(dir, "missing.yaml"), raw); code != exTempFail {
		t.Errorf("receive with no configuration: %d %s", code, out)
	}
	var out bytes.Buffer
	if code := run([]string{"messages", "-config", cfgPath}, &out, &out); code != 0 || !strings.Contains(out.String(), "PIPE-1") {
		t.Errorf("messages after receive: %d\n%s", code, out.String())
	}
}
