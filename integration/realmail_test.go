package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
)

// TestRealMailLoop runs two hl7mail binaries, a hospital and a lab (PGP),
// over real Postfix (SMTP) delivering by LMTP into Dovecot (IMAP), started
// by integration/mailservers.sh. Debian's mllp_send is the hospital
// router's client. Every message reaches the lab's router byte for byte,
// every answer comes back to the hospital's router, every receipt matches,
// and what lies in the lab's mailbox is encrypted: no HL7 in the file, and
// GnuPG (a tool we did not write) decrypts it with the lab's key.
func TestRealMailLoop(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	requireTool(t, "/usr/sbin/postfix")
	requireTool(t, "/usr/sbin/dovecot")
	gpg := requireTool(t, "/usr/bin/gpg")
	if os.Geteuid() != 0 {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" || os.Getenv("CI") != "" {
			t.Fatal("the mail servers need root")
		}
		t.Skip("the mail servers need root")
	}
	dir, err := os.MkdirTemp("", "hl7mail-mail") // not t.TempDir: its parent is closed to the servers' users
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755) // the servers' own users reach their files below it
	port := func() string { _, p, _ := net.SplitHostPort(freePort(t)); return p }
	smtpPort, imapPort, lmtpPort := port(), port(), port()
	out, err := exec.Command("bash", "mailservers.sh", "start", filepath.Join(dir, "servers"), smtpPort, imapPort, lmtpPort,
		"edi@hospital.test", "lab@partner.test").CombinedOutput()
	if err != nil {
		t.Fatalf("mailservers.sh start: %v\n%s", err, out)
	}
	defer exec.Command("bash", "mailservers.sh", "stop", filepath.Join(dir, "servers")).Run()

	for _, site := range []struct{ name, email string }{{"hospital", "edi@hospital.test"}, {"lab", "lab@partner.test"}} {
		if out, err := exec.Command(binary, "keygen", "-kind", "pgp", "-name", site.name, "-email", site.email,
			"-out", filepath.Join(dir, site.name)).CombinedOutput(); err != nil {
			t.Fatalf("keygen: %v\n%s", err, out)
		}
		os.WriteFile(filepath.Join(dir, site.name, "imap-password"), []byte("secret\n"), 0o600)
	}
	hospitalRouter, err := embedded.StartRouter("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hospitalRouter.Close()
	labRouter, err := embedded.StartRouter("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer labRouter.Close()
	surrogate := freePort(t)
	write := func(site, self, router, partners string) string {
		p := filepath.Join(dir, site, "partners.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: 127.0.0.1:%s, tls: none}
imap: {addr: 127.0.0.1:%s, tls: none, username: %s, password_file: imap-password, poll: 2s}
dashboard: {addr: %s}
partners:
%s`, site, self, router, smtpPort, imapPort, self, freePort(t), partners)), 0o600)
		return p
	}
	hospitalCfg := write("hospital", "edi@hospital.test", hospitalRouter.Addr, fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}\n", surrogate))
	labCfg := write("lab", "lab@partner.test", labRouter.Addr, fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n", freePort(t)))
	hospital := &instance{t: t, config: hospitalCfg, listen: map[string]string{"lab": surrogate}}
	lab := &instance{t: t, config: labCfg, listen: map[string]string{}}
	hospital.start()
	defer hospital.stop()
	lab.start()
	defer lab.stop()

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	msgs = msgs[:20]
	var framed []byte
	for _, m := range msgs {
		framed = mllp.AppendFrame(framed, m)
	}
	file := filepath.Join(dir, "orders.mllp")
	os.WriteFile(file, framed, 0o600)
	host, p, _ := net.SplitHostPort(surrogate)
	ackOut, err := exec.Command(mllpSend, "-p", p, "-f", file, host).Output()
	if err != nil {
		t.Fatalf("mllp_send: %v", err)
	}
	if n := bytes.Count(ackOut, []byte("\rMSA|CA|")); n != len(msgs) {
		t.Fatalf("mllp_send got %d CA answers, want %d:\n%q", n, len(msgs), ackOut)
	}
	deadline := time.Now().Add(90 * time.Second)
	for len(labRouter.Messages()) < len(msgs) || len(hospitalRouter.Messages()) < len(msgs) {
		if time.Now().After(deadline) {
			t.Fatalf("after 90s: %d at the lab's router, %d answers at the hospital's router, of %d\nhospital log:\n%s\nlab log:\n%s",
				len(labRouter.Messages()), len(hospitalRouter.Messages()), len(msgs), hospital.log, lab.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// mllp_send strips the final CR of each message before framing it.
	want := map[string]string{}
	for _, m := range msgs {
		h, _ := hl7.ParseHeader(m)
		want[h.ControlID] = strings.TrimSuffix(string(m), "\r")
	}
	for _, m := range labRouter.Messages() {
		h, _ := hl7.ParseHeader(m)
		if string(m) != want[h.ControlID] {
			t.Errorf("lab router got a different message for %s", h.ControlID)
		}
	}
	for _, m := range hospitalRouter.Messages() {
		if a, err := hl7.ParseAck(m); err != nil || a.Code != hl7.ApplicationAccept || want[a.ControlID] == "" {
			t.Errorf("hospital router got %q, %v", m, err)
		}
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		out, err := exec.Command(binary, "messages", "-config", hospitalCfg, "-json", "-state", "acknowledged").Output()
		var list []storedMessage
		if err == nil && json.Unmarshal(out, &list) == nil && len(list) == len(msgs) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not every receipt matched after 30s: %s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// What lies in the lab's mailbox: encrypted, and GnuPG reads it.
	var stored string
	filepath.WalkDir(filepath.Join(dir, "servers", "mail", "lab@partner.test"), func(p string, d fs.DirEntry, err error) error {
		mailFile := strings.Contains(p, "/cur/") || strings.Contains(p, "/new/")
		if err == nil && !d.IsDir() && mailFile && strings.Contains(p, "Processed") && stored == "" {
			stored = p
		}
		return nil
	})
	if stored == "" {
		t.Fatal("no mail in the lab's processed folder")
	}
	raw, _ := os.ReadFile(stored)
	if bytes.Contains(raw, []byte("MSH|")) || !bytes.Contains(raw, []byte("-----BEGIN PGP MESSAGE-----")) {
		t.Fatalf("the stored mail is not PGP-encrypted or shows HL7")
	}
	start := bytes.Index(raw, []byte("-----BEGIN PGP MESSAGE-----"))
	end := bytes.Index(raw, []byte("-----END PGP MESSAGE-----")) + len("-----END PGP MESSAGE-----")
	home, _ := os.MkdirTemp("", "gpg")
	defer os.RemoveAll(home)
	defer exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
	if out, err := exec.Command(gpg, "--homedir", home, "--batch", "--import", filepath.Join(dir, "lab", "private.asc")).CombinedOutput(); err != nil {
		t.Fatalf("gpg --import: %v\n%s", err, out)
	}
	cmd := exec.Command(gpg, "--homedir", home, "--batch", "--decrypt")
	cmd.Stdin = bytes.NewReader(bytes.ReplaceAll(raw[start:end], []byte("\r\n"), []byte("\n")))
	plain, err := cmd.Output()
	if err != nil || !bytes.Contains(plain, []byte("multipart/signed")) || !bytes.Contains(plain, []byte("application/edi-hl7")) {
		t.Errorf("gpg --decrypt of the stored mail: %v\n%.300s", err, plain)
	}
}
