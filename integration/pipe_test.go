package integration

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
)

// TestPipeMode: the ward has no IMAP account. Real Postfix delivers its
// mail through an alias that pipes each mail to the built binary, run as
// nobody, the user the ward's instance runs as: "hl7mail receive" hands it
// to the running instance over its control socket, which delivers it to
// the ward's router and answers the hospital by mail. With the ward's
// instance stopped, receive stores the mail itself, for the next start.
// Run as another user (root's instance), receive may not reach the control
// socket nor open the store, and exits 75: Postfix keeps the mail.
func TestPipeMode(t *testing.T) {
	requireMailServers(t)
	python := requireTool(t, "/usr/bin/python3")
	dir, err := os.MkdirTemp("", "hl7mail-pipe")
	if err != nil {
		t.Fatal(err)
	}
	// Removed after the mail servers in it have stopped (cleanups run
	// last registered first): a folder removed first leaves them running.
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	// The binary where nobody may run it.
	bin := filepath.Join(dir, "hl7mail")
	src, _ := os.Open(binary)
	dst, _ := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	io.Copy(dst, src)
	src.Close()
	dst.Close()

	ward := filepath.Join(dir, "ward")
	hosp := filepath.Join(dir, "hospital")
	for _, s := range []struct{ name, email, out string }{{"ward", "ward@pipe.test", ward}, {"hospital", "edi@hospital.test", hosp}} {
		if out, err := exec.Command(binary, "keygen", "-kind", "pgp", "-name", s.name, "-email", s.email, "-out", s.out).CombinedOutput(); err != nil {
			t.Fatalf("keygen: %v\n%s", err, out)
		}
		os.Chmod(s.out, 0o755)
	}
	os.WriteFile(filepath.Join(hosp, "imap-password"), []byte("secret\n"), 0o600)
	aliases := filepath.Join(dir, "aliases")
	os.WriteFile(aliases, []byte(fmt.Sprintf("ward: \"|%s receive -config %s/partners.yaml\"\n", bin, ward)), 0o644)

	ms := startMailServers(t, dir, []string{"PIPE_DOMAIN=pipe.test", "PIPE_ALIASES=" + aliases}, "edi@hospital.test")
	smtpPort, imapPort, servers := ms.smtp, ms.imap, ms.dir

	wardRouter := startPyRouter(t, python, filepath.Join(dir, "ward-router"))
	hospRouter := startPyRouter(t, python, filepath.Join(dir, "hospital-router"))
	toWard := freePort(t)
	wardCfg := filepath.Join(ward, "partners.yaml")
	wardDash := freePort(t)
	os.WriteFile(wardCfg, []byte(fmt.Sprintf(`# no imap: mail comes in through the Postfix alias
self: {name: ward, email: ward@pipe.test, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: 127.0.0.1:%s, tls: none, retry: 1s}
dashboard: {addr: %s}
partners:
  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}
`, wardRouter.addr, smtpPort, wardDash, freePort(t))), 0o644)
	hospCfg := filepath.Join(hosp, "partners.yaml")
	os.WriteFile(hospCfg, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: 127.0.0.1:%s, tls: none, retry: 1s}
imap: {addr: 127.0.0.1:%s, tls: none, username: edi@hospital.test, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
  - {name: ward, listen: %s, email: ward@pipe.test, security: pgp, pgp_key: ../ward/public.asc}
`, hospRouter.addr, smtpPort, imapPort, freePort(t), toWard)), 0o600)
	// The ward's instance runs as nobody, as Postfix runs the alias's
	// command: its files are nobody's.
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(nobody.Uid)
	gid, _ := strconv.Atoi(nobody.Gid)
	filepath.Walk(ward, func(p string, _ os.FileInfo, _ error) error { return os.Lchown(p, uid, gid) })
	wardIn := &instance{t: t, dir: ward, config: wardCfg, listen: map[string]string{}, dash: wardDash,
		as: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, exe: bin}
	hospIn := &instance{t: t, dir: hosp, config: hospCfg, listen: map[string]string{"ward": toWard}}
	wardIn.start()
	defer wardIn.stop()
	wardIn.waitReady("")
	hospIn.start()
	defer hospIn.stop()

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not after 90s\nward:\n%s\nhospital:\n%s\npostfix:\n%s", what, wardIn.log, hospIn.log, postfixLog(servers))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	for _, m := range msgs[:5] {
		if code := sendOne(t, toWard, m); code != hl7.CommitAccept {
			t.Fatalf("surrogate answered %s", code)
		}
	}
	wait("five orders at the ward's router", func() bool { return len(wardRouter.messages()) == 5 })
	wait("five answers at the hospital's router", func() bool { return len(hospRouter.messages()) == 5 })
	wait("five receipts matched", func() bool {
		n := 0
		for _, m := range hospIn.messages() {
			if m.Direction == "out" && m.State == "acknowledged" {
				n++
			}
		}
		return n == 5
	})

	// The ward's instance is down: receive, run as the ward's user, stores
	// the mail itself; it reaches the router at the next start.
	wardIn.stop()
	if code := sendOne(t, toWard, msgs[5]); code != hl7.CommitAccept {
		t.Fatalf("surrogate answered %s", code)
	}
	wait("the pipe storing the mail with the ward stopped", func() bool {
		return strings.Count(postfixLog(servers), "status=sent (delivered to command") == 6
	})
	wardIn.start()
	wardIn.waitReady("")
	wait("the sixth order at the ward's router", func() bool { return len(wardRouter.messages()) == 6 })
	wait("six answers at the hospital's router", func() bool { return len(hospRouter.messages()) == 6 })

	// Another user (daemon) may not reach the ward's control socket:
	// nothing is decided, exit 75, and the MTA would keep the mail.
	other, err := user.Lookup("daemon")
	if err != nil {
		t.Fatal(err)
	}
	ouid, _ := strconv.Atoi(other.Uid)
	ogid, _ := strconv.Atoi(other.Gid)
	cmd := exec.Command(bin, "receive", "-config", wardCfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ouid), Gid: uint32(ogid)}}
	cmd.Stdin = strings.NewReader("From: edi@hospital.test\r\nTo: ward@pipe.test\r\nSubject: x\r\n\r\nx\r\n")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 75 || !strings.Contains(string(out), "control socket") {
		t.Errorf("receive as another user: %v, want exit 75 naming the control socket\n%s", err, out)
	}
	if n := len(wardRouter.messages()); n != 6 {
		t.Errorf("the ward's router got %d messages, want 6", n)
	}
}

func postfixLog(servers string) string {
	b, _ := os.ReadFile(filepath.Join(servers, "postfix", "log"))
	return string(b)
}
