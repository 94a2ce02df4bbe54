// Package integration runs the built hl7mail binary against real outside
// parts: Debian's python3-hl7 (mllp_send) as a foreign MLLP peer, and kill -9
// of the running process. The packages come from integration/deps.sh, which
// "make test" runs first; with HL7MAIL_REQUIRE_REAL=1 (set by "make test"
// and in CI) a missing package fails the test instead of skipping it.
package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
)

// binary is the hl7mail binary built once for all tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hl7mail-integration")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "hl7mail")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/hl7mail")
	build.Stdout, build.Stderr = os.Stdout, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build hl7mail:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireTool returns the path of an outside program, or skips the test
// when it is missing (fails instead when HL7MAIL_REQUIRE_REAL or CI is set).
func requireTool(t *testing.T, path string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		unavailable(t, path+" is missing: run integration/deps.sh (make test does)")
	}
	return path
}

// requireMailServers checks for Postfix and Dovecot, and for root, which
// they need.
func requireMailServers(t *testing.T) {
	t.Helper()
	requireTool(t, "/usr/sbin/postfix")
	requireTool(t, "/usr/sbin/dovecot")
	if os.Geteuid() != 0 {
		unavailable(t, "the mail servers need root")
	}
}

// unavailable fails the test when the real parts are required (make test
// sets HL7MAIL_REQUIRE_REAL; CI), else skips it.
func unavailable(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" || os.Getenv("CI") != "" {
		t.Fatal(why)
	}
	t.Skip(why)
}

// freePort returns a loopback address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// instance is one hl7mail configuration and, while it runs, its process.
type instance struct {
	t       *testing.T
	dir     string
	config  string
	listen  map[string]string // partner → surrogate address
	dash    string            // dashboard address
	cmd     *exec.Cmd
	log     *lockedBuffer
	exited  chan error
	started int
	// as, when set, runs serve as that user (pipe mode: the user the MTA
	// runs "hl7mail receive" as).
	as  *syscall.Credential
	exe string // the binary serve runs from, when not binary (one that user may run)
	// serveArgs are more flags for serve (-shutdown-timeout, say), env
	// more variables of its environment.
	serveArgs, env []string
}

// newInstance writes a configuration with the given partners (unencrypted,
// loopback only: these tests exercise the surrogate side).
func newInstance(t *testing.T, partners ...string) *instance {
	t.Helper()
	return newInstanceAt(t, t.TempDir(), partners...)
}

// newInstanceAt is newInstance in folder dir.
func newInstanceAt(t *testing.T, dir string, partners ...string) *instance {
	t.Helper()
	in := &instance{t: t, dir: dir, config: filepath.Join(dir, "partners.yaml"), listen: map[string]string{}, dash: freePort(t)}
	var b strings.Builder
	fmt.Fprintf(&b, `self: {name: test-hospital, email: edi@hospital.test}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none}
dashboard: {addr: %s}
partners:
`, freePort(t), freePort(t), freePort(t), in.dash)
	for _, p := range partners {
		addr := freePort(t)
		in.listen[p] = addr
		fmt.Fprintf(&b, "  - {name: %s, listen: %s, email: %s@partner.test, security: none, allow_unencrypted: true}\n", p, addr, p)
	}
	if err := os.WriteFile(in.config, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(in.stop)
	return in
}

// edit replaces old with new in the configuration file.
func (in *instance) edit(old, new string) {
	in.t.Helper()
	data, err := os.ReadFile(in.config)
	if err != nil {
		in.t.Fatal(err)
	}
	if !bytes.Contains(data, []byte(old)) {
		in.t.Fatalf("configuration has no %q", old)
	}
	if err := os.WriteFile(in.config, bytes.Replace(data, []byte(old), []byte(new), 1), 0o600); err != nil {
		in.t.Fatal(err)
	}
}

// useSMTP points the configuration's smtp section at addr (no TLS: a
// server on loopback).
func (in *instance) useSMTP(addr string) {
	in.t.Helper()
	data, err := os.ReadFile(in.config)
	if err != nil {
		in.t.Fatal(err)
	}
	old := string(data)[strings.Index(string(data), "smtp: {addr: "):]
	in.edit(old[:strings.Index(old, "}")+1], "smtp: {addr: "+addr+", tls: none}")
}

// run runs an hl7mail command and returns its output and exit code.
func (in *instance) run(args ...string) (string, int) {
	in.t.Helper()
	out, err := exec.Command(binary, args...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	}
	in.t.Fatalf("hl7mail %v: %v", args, err)
	return "", -1
}

// start runs "hl7mail serve" and waits until every surrogate accepts.
func (in *instance) start() {
	t := in.t
	t.Helper()
	in.started++
	in.log = &lockedBuffer{}
	exe := binary
	if in.exe != "" {
		exe = in.exe
	}
	in.cmd = exec.Command(exe, append([]string{"serve", "-config", in.config, "-log-format", "json"}, in.serveArgs...)...)
	if in.env != nil {
		in.cmd.Env = append(os.Environ(), in.env...)
	}
	if in.as != nil {
		in.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: in.as}
	}
	in.cmd.Stdout, in.cmd.Stderr = in.log, in.log
	if err := in.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	in.exited = make(chan error, 1)
	go func() { in.exited <- in.cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for _, addr := range in.listen {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case err := <-in.exited:
				t.Fatalf("hl7mail serve exited: %v\n%s", err, in.log)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("surrogate %s not listening after 30s\n%s", addr, in.log)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// kill ends the process with SIGKILL: no shutdown, no flush.
func (in *instance) kill() {
	in.cmd.Process.Kill()
	<-in.exited
	in.cmd = nil
}

// stop ends the process with SIGTERM and checks it shut down cleanly and
// logged no panic.
func (in *instance) stop() {
	if in.cmd == nil {
		return
	}
	in.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-in.exited:
		if err != nil {
			in.t.Errorf("hl7mail serve exit: %v\n%s", err, in.log)
		}
	case <-time.After(30 * time.Second):
		in.cmd.Process.Kill()
		in.t.Errorf("hl7mail serve did not stop within 30s")
	}
	if strings.Contains(in.log.String(), "panic") {
		in.t.Errorf("panic logged:\n%s", in.log)
	}
	in.cmd = nil
}

// storedMessage is one entry of "hl7mail messages -json".
type storedMessage struct {
	ID          int64  `json:"id"`
	Direction   string `json:"direction"`
	Partner     string `json:"partner"`
	ControlID   string `json:"control_id"`
	State       string `json:"state"`
	DuplicateOf int64  `json:"duplicate_of"`
	SHA256      []byte `json:"sha256"`
}

// messages runs "hl7mail messages -json".
func (in *instance) messages() []storedMessage {
	in.t.Helper()
	out, err := exec.Command(binary, "messages", "-config", in.config, "-json", "-limit", "100000").Output()
	if err != nil {
		in.t.Fatalf("hl7mail messages: %v", err)
	}
	var list []storedMessage
	if err := json.Unmarshal(out, &list); err != nil {
		in.t.Fatalf("hl7mail messages -json: %v\n%s", err, out)
	}
	return list
}

// waitMessages polls "hl7mail messages" until it lists want messages (the
// read-only view trails the running instance by a fraction of a second)
// and returns them; it fails after 20 seconds.
func (in *instance) waitMessages(want int, ok func([]storedMessage) bool) []storedMessage {
	in.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		list := in.messages()
		if len(list) == want && (ok == nil || ok(list)) {
			return list
		}
		if time.Now().After(deadline) {
			in.t.Fatalf("hl7mail messages lists %d messages after 20s, want %d", len(list), want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lockedBuffer collects a process's output.
type lockedBuffer = testlog.Buffer

// siteKeys runs "hl7mail keygen" for each kind (pgp, smime) into dir/name
// and writes the IMAP password file ("secret") the mail servers expect.
func siteKeys(t *testing.T, dir, name, email string, kinds ...string) {
	t.Helper()
	for _, kind := range kinds {
		if out, err := exec.Command(binary, "keygen", "-kind", kind, "-name", name, "-email", email,
			"-out", filepath.Join(dir, name)).CombinedOutput(); err != nil {
			t.Fatalf("keygen -kind %s %s: %v\n%s", kind, email, err, out)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, name, "imap-password"), []byte("secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// sharedDir makes a temporary folder that the mail servers' own users can
// reach (t.TempDir's parent is closed to them), removed at the end.
func sharedDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	return dir
}

// startSMTP runs an embedded SMTP server on loopback until the test ends
// and returns it with its address.
func startSMTP(t *testing.T) (*embedded.SMTP, string) {
	t.Helper()
	srv := &embedded.SMTP{}
	addr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, addr
}

// worldSite writes the configuration of a site on the embedded mail
// servers of w, in dir/name (its keys made there by siteKeys), whose router
// is router and whose partners are the partners lines, and returns its
// instance (not started).
func worldSite(t *testing.T, w *embedded.World, dir, name, email, router, partners string, listen map[string]string) *instance {
	t.Helper()
	p := filepath.Join(dir, name, "partners.yaml")
	if err := os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: %s, tls: none, retry: 300ms}
imap: {addr: %s, tls: none, username: %s, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
%s`, name, email, router, w.SMTPAddr, w.IMAPAddr, email, freePort(t), partners)), 0o600); err != nil {
		t.Fatal(err)
	}
	in := &instance{t: t, dir: filepath.Join(dir, name), config: p, listen: listen}
	t.Cleanup(in.stop)
	return in
}

// mailServers are real Postfix and Dovecot started by mailservers.sh.
type mailServers struct {
	dir              string // their folder (dir/servers)
	smtp, imap, lmtp string // their loopback ports
}

// startMailServers starts Postfix and Dovecot in dir/servers with an
// account for each address, and stops them at the end; env adds
// mailservers.sh's options (SUBMISSION_PORT, PIPE_DOMAIN, ...).
func startMailServers(t *testing.T, dir string, env []string, accounts ...string) mailServers {
	t.Helper()
	port := func() string { _, p, _ := net.SplitHostPort(freePort(t)); return p }
	m := mailServers{dir: filepath.Join(dir, "servers"), smtp: port(), imap: port(), lmtp: port()}
	start := exec.Command("bash", append([]string{"mailservers.sh", "start", m.dir, m.smtp, m.imap, m.lmtp}, accounts...)...)
	start.Env = append(os.Environ(), env...)
	if out, err := start.CombinedOutput(); err != nil {
		t.Fatalf("mailservers.sh start: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("bash", "mailservers.sh", "stop", m.dir).Run() })
	return m
}
