package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/mllp"
)

// pyRouter is a router made of python3-hl7's asyncio MLLP server
// (integration/router.py): it keeps what it receives and answers AA.
type pyRouter struct {
	addr string
	dir  string
}

// codes, when given, are the answers to the first messages (router.py's
// CODES), AA after them.
func startPyRouter(t *testing.T, python, dir string, codes ...string) *pyRouter {
	t.Helper()
	return startPyRouterEnv(t, python, dir, nil, codes...)
}

// startPyRouterEnv is startPyRouter with env added to router.py's
// environment (ROUTER_TLS_CERT, ROUTER_TLS_KEY, ROUTER_TLS_CA).
func startPyRouterEnv(t *testing.T, python, dir string, env []string, codes ...string) *pyRouter {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	r := &pyRouter{addr: freePort(t), dir: dir}
	_, port, _ := net.SplitHostPort(r.addr)
	args := []string{"router.py", port, dir}
	if len(codes) > 0 {
		args = append(args, strings.Join(codes, ","))
	}
	cmd := exec.Command(python, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	stdout, _ := cmd.StdoutPipe()
	log := &lockedBuffer{}
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		ready <- sc.Scan() && sc.Text() == "listening"
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("router.py did not start:\n%s", log)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("router.py did not start within 20s:\n%s", log)
	}
	return r
}

// messages returns what the router received, in order.
func (r *pyRouter) messages() [][]byte {
	names, _ := filepath.Glob(filepath.Join(r.dir, "*.hl7"))
	sort.Strings(names)
	var out [][]byte
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err == nil {
			out = append(out, b)
		}
	}
	return out
}

// storedMail returns the first mail file in the processed folder of
// account's Maildir.
func storedMail(t *testing.T, dir, account string) []byte {
	t.Helper()
	var stored string
	filepath.WalkDir(filepath.Join(dir, "servers", "mail", account), func(p string, d fs.DirEntry, err error) error {
		mailFile := strings.Contains(p, "/cur/") || strings.Contains(p, "/new/")
		if err == nil && !d.IsDir() && mailFile && strings.Contains(p, "Processed") && stored == "" {
			stored = p
		}
		return nil
	})
	if stored == "" {
		t.Fatalf("no mail in the processed folder of %s", account)
	}
	raw, _ := os.ReadFile(stored)
	if bytes.Contains(raw, []byte("MSH|")) {
		t.Fatalf("the mail stored for %s shows HL7", account)
	}
	return raw
}

// TestRealMailLoop runs three hl7mail binaries over real Postfix (SMTP)
// delivering by LMTP into Dovecot (IMAP), started by
// integration/mailservers.sh: a hospital, a lab on PGP/MIME and a clinic on
// S/MIME. Debian's mllp_send is the hospital router's client; every router
// is python3-hl7's asyncio MLLP server (router.py), which answers AA.
// Every message reaches its partner's router byte for byte, every answer
// comes back to the hospital's router, every receipt matches, each side's
// "messages" listing and journals agree with the other's, and what lies in
// the partners' mailboxes is encrypted: GnuPG and OpenSSL, tools we did not
// write, decrypt and verify it.
func TestRealMailLoop(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	requireMailServers(t)
	gpg := requireTool(t, "/usr/bin/gpg")
	openssl := requireTool(t, "/usr/bin/openssl")
	python := requireTool(t, "/usr/bin/python3")
	dir := sharedDir(t, "hl7mail-mail")
	ms := startMailServers(t, dir, nil, "edi@hospital.test", "lab@partner.test", "edi@clinic.test")
	smtpPort, imapPort := ms.smtp, ms.imap

	type site struct {
		name, email string
		router      *pyRouter
		in          *instance
	}
	hospital := &site{name: "hospital", email: "edi@hospital.test"}
	lab := &site{name: "lab", email: "lab@partner.test"}
	clinic := &site{name: "clinic", email: "edi@clinic.test"}
	for _, s := range []*site{hospital, lab, clinic} {
		siteKeys(t, dir, s.name, s.email, "pgp", "smime")
		s.router = startPyRouter(t, python, filepath.Join(dir, s.name, "router"))
	}
	toLab, toClinic := freePort(t), freePort(t)
	write := func(s *site, partners string, listen map[string]string) {
		p := filepath.Join(dir, s.name, "partners.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc, smime_cert: cert.pem, smime_key: key.pem}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: 127.0.0.1:%s, tls: none}
imap: {addr: 127.0.0.1:%s, tls: none, username: %s, password_file: imap-password, poll: 2s}
dashboard: {addr: %s}
partners:
%s`, s.name, s.email, s.router.addr, smtpPort, imapPort, s.email, freePort(t), partners)), 0o600)
		s.in = &instance{t: t, dir: filepath.Join(dir, s.name), config: p, listen: listen}
	}
	write(hospital, fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}\n"+
			"  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: ../clinic/cert.pem}\n",
		toLab, toClinic), map[string]string{"lab": toLab, "clinic": toClinic})
	write(lab, fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n",
		freePort(t)), map[string]string{})
	write(clinic, fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: smime, smime_cert: ../hospital/cert.pem}\n",
		freePort(t)), map[string]string{})
	for _, s := range []*site{hospital, lab, clinic} {
		s.in.start()
		defer s.in.stop()
	}

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	batches := map[*site][][]byte{lab: msgs[:20], clinic: msgs[20:30]}
	want := map[string]string{} // control ID → the message as mllp_send frames it
	for s, batch := range batches {
		var framed []byte
		for _, m := range batch {
			framed = mllp.AppendFrame(framed, m)
			h, _ := hl7.ParseHeader(m)
			// mllp_send strips the final CR of each message before framing it.
			want[h.ControlID] = strings.TrimSuffix(string(m), "\r")
		}
		file := filepath.Join(dir, s.name+".mllp")
		os.WriteFile(file, framed, 0o600)
		host, p, _ := net.SplitHostPort(hospital.in.listen[s.name])
		ackOut, err := exec.Command(mllpSend, "-p", p, "-f", file, host).Output()
		if err != nil {
			t.Fatalf("mllp_send: %v", err)
		}
		if n := bytes.Count(ackOut, []byte("\rMSA|CA|")); n != len(batch) {
			t.Fatalf("mllp_send to the %s's surrogate got %d CA answers, want %d:\n%q", s.name, n, len(batch), ackOut)
		}
	}
	total := len(batches[lab]) + len(batches[clinic])
	deadline := time.Now().Add(120 * time.Second)
	for len(lab.router.messages()) < len(batches[lab]) || len(clinic.router.messages()) < len(batches[clinic]) ||
		len(hospital.router.messages()) < total {
		if time.Now().After(deadline) {
			t.Fatalf("after 120s: %d at the lab's router, %d at the clinic's, %d answers at the hospital's router, of %d\n"+
				"hospital log:\n%s\nlab log:\n%s\nclinic log:\n%s", len(lab.router.messages()), len(clinic.router.messages()),
				len(hospital.router.messages()), total, hospital.in.log, lab.in.log, clinic.in.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, s := range []*site{lab, clinic} {
		for _, m := range s.router.messages() {
			h, err := hl7.ParseHeader(m)
			if err != nil || string(m) != want[h.ControlID] {
				t.Errorf("the %s's router got a different message for %v", s.name, h)
			}
		}
		if n := len(s.router.messages()); n != len(batches[s]) {
			t.Errorf("the %s's router got %d messages, want %d (delivered twice?)", s.name, n, len(batches[s]))
		}
	}
	answered := map[string]bool{}
	for _, m := range hospital.router.messages() {
		a, err := hl7.ParseAck(m)
		if err != nil || a.Code != hl7.ApplicationAccept || want[a.ControlID] == "" || answered[a.ControlID] {
			t.Errorf("hospital router got %q, %v", m, err)
			continue
		}
		answered[a.ControlID] = true
	}

	// Both sides' listings: the hospital's orders acknowledged by receipt
	// and the answers delivered; each partner's orders delivered and
	// answered.
	listing := func(s *site) []storedMessage {
		out, err := exec.Command(binary, "messages", "-config", s.in.config, "-json", "-limit", "1000").Output()
		var list []storedMessage
		if err != nil || json.Unmarshal(out, &list) != nil {
			t.Fatalf("%s messages: %v\n%s", s.name, err, out)
		}
		return list
	}
	count := func(list []storedMessage, dir, state string) int {
		n := 0
		for _, m := range list {
			if m.Direction == dir && m.State == state {
				n++
			}
		}
		return n
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		l := listing(hospital)
		if count(l, "out", "acknowledged") == total && count(l, "in", "delivered") == total && len(l) == 2*total {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hospital listing after 30s: %d acknowledged out, %d delivered in, %d in all; want %d, %d, %d",
				count(l, "out", "acknowledged"), count(l, "in", "delivered"), len(l), total, total, 2*total)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, s := range []*site{lab, clinic} {
		l := listing(s)
		n := len(batches[s])
		if count(l, "in", "delivered") != n || count(l, "out", "sent")+count(l, "out", "acknowledged") != n || len(l) != 2*n {
			t.Errorf("%s listing: %d delivered in, %d answers out, %d in all; want %d each", s.name,
				count(l, "in", "delivered"), count(l, "out", "sent")+count(l, "out", "acknowledged"), len(l), n)
		}
	}

	// The journals: every mail the hospital sent is in a partner's incoming
	// journal, every mail it received in a partner's outgoing journal (the
	// servers add trace headers: the Message-IDs are compared).
	ids := func(s *site, name string) map[string]bool {
		entries, err := journal.Read(filepath.Join(s.in.dir, "var", name))
		if err != nil {
			t.Fatalf("%s %s: %v", s.name, name, err)
		}
		set := map[string]bool{}
		for _, e := range entries {
			set[messageID(e.Mail)] = true
		}
		return set
	}
	hOut, hIn := ids(hospital, "outgoing.mbox"), ids(hospital, "incoming.mbox")
	pIn, pOut := map[string]bool{}, map[string]bool{}
	for _, s := range []*site{lab, clinic} {
		for id := range ids(s, "incoming.mbox") {
			pIn[id] = true
		}
		for id := range ids(s, "outgoing.mbox") {
			pOut[id] = true
		}
	}
	if len(hOut) != total || len(hIn) != total || len(pIn) != total || len(pOut) != total {
		t.Errorf("journals: hospital %d sent, %d received; partners %d received, %d sent; want %d each",
			len(hOut), len(hIn), len(pIn), len(pOut), total)
	}
	for id := range hOut {
		if !pIn[id] {
			t.Errorf("%s: in the hospital's outgoing journal, not in a partner's incoming one", id)
		}
	}
	for id := range hIn {
		if !pOut[id] {
			t.Errorf("%s: in the hospital's incoming journal, not in a partner's outgoing one", id)
		}
	}

	for _, s := range []*site{hospital, lab, clinic} {
		out, err := exec.Command(binary, "journal", "verify", "-config", s.in.config).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Every journal entry verifies") {
			t.Errorf("journal verify at the %s: %v\n%s", s.name, err, out)
		}
	}

	// What lies in the lab's mailbox: PGP/MIME that GnuPG decrypts.
	raw := storedMail(t, dir, "lab@partner.test")
	start := bytes.Index(raw, []byte("-----BEGIN PGP MESSAGE-----"))
	end := bytes.Index(raw, []byte("-----END PGP MESSAGE-----")) + len("-----END PGP MESSAGE-----")
	if start < 0 || end < start {
		t.Fatalf("the lab's stored mail is not PGP-encrypted")
	}
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

	// What lies in the clinic's mailbox: S/MIME that OpenSSL decrypts with
	// the clinic's key and whose signature it verifies with the hospital's
	// certificate.
	raw = storedMail(t, dir, "edi@clinic.test")
	mailFile := filepath.Join(dir, "clinic-mail.eml")
	os.WriteFile(mailFile, raw, 0o600)
	signed, err := exec.Command(openssl, "cms", "-decrypt", "-in", mailFile, "-recip", filepath.Join(dir, "clinic", "cert.pem"),
		"-inkey", filepath.Join(dir, "clinic", "key.pem")).Output()
	if err != nil || !bytes.Contains(signed, []byte("multipart/signed")) {
		t.Fatalf("openssl cms -decrypt of the clinic's mail: %v\n%.300s", err, signed)
	}
	signedFile := filepath.Join(dir, "clinic-signed.eml")
	os.WriteFile(signedFile, signed, 0o600)
	content, err := exec.Command(openssl, "cms", "-verify", "-in", signedFile, "-CAfile", filepath.Join(dir, "hospital", "cert.pem"),
		"-purpose", "any").Output()
	if err != nil || !bytes.Contains(content, []byte("application/edi-hl7")) {
		t.Errorf("openssl cms -verify of the clinic's mail: %v\n%.300s", err, content)
	}
}

// messageID returns the Message-ID header of a raw mail.
func messageID(raw []byte) string {
	for _, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimRight(line, "\r")
		if line == "" {
			break
		}
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(k, "Message-Id") {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
