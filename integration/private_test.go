package integration

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
)

// asNobody runs a command as the unprivileged user nobody and returns its
// output and whether it succeeded.
func asNobody(t *testing.T, name string, args ...string) (string, bool) {
	t.Helper()
	if os.Geteuid() != 0 {
		unavailable(t, "running a command as nobody needs root")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cmd := exec.Command(name, args...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

// TestPrivateStore: the store holds PHI, so its folder is 0700 and its
// files 0600, and the user nobody reads none of them (not the database,
// its WAL, the spool log or the journals), even where the folders above it
// are open. A store folder others can read is refused by check and serve
// with the chmod that mends it, and so is a symbolic link planted in it.
func TestPrivateStore(t *testing.T) {
	top, err := os.MkdirTemp("", "hl7mail-private")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(top)
	os.Chmod(top, 0o755) // nobody may walk to the store: only the store's own modes stop it
	in := newInstanceAt(t, top, "tucker-lab")
	in.start()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	if code := sendOne(t, in.listen["tucker-lab"], msgs[11]); code != hl7.CommitAccept {
		t.Fatalf("surrogate answered %s", code)
	}
	in.waitMessages(1, nil)
	store := filepath.Join(top, "var")
	entries, _ := os.ReadDir(store)
	var files []string
	for _, e := range entries {
		p := filepath.Join(store, e.Name())
		fi, _ := os.Lstat(p)
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %04o, want %04o", e.Name(), fi.Mode().Perm(), want)
		}
		if !fi.IsDir() {
			files = append(files, p)
		}
	}
	for _, want := range []string{"hl7mail.db", "hl7mail.db-wal", "hl7mail.db-shm", "outgoing.mbox", "incoming.mbox"} {
		if _, err := os.Stat(filepath.Join(store, want)); err != nil {
			t.Errorf("no %s in the store", want)
		}
	}
	if out, ok := asNobody(t, "/bin/ls", store); ok {
		t.Errorf("nobody lists the store:\n%s", out)
	}
	// Even with the folder opened to walk through, the files stay closed.
	os.Chmod(store, 0o711)
	for _, f := range files {
		if out, ok := asNobody(t, "/bin/cat", f); ok || bytes.Contains([]byte(out), []byte("MSH|")) {
			t.Errorf("nobody reads %s", f)
		}
	}
	in.stop()
	// The folder as it is now (0711): refused, with the mend.
	out, code := in.run("check", "-offline", "-config", in.config)
	if code == 0 || !strings.Contains(out, "chmod 700 "+store) {
		t.Errorf("check of a store others can enter: %d\n%s", code, out)
	}
	if out, code := in.run("serve", "-config", in.config); code == 0 || !strings.Contains(out, "chmod 700 "+store) {
		t.Errorf("serve of a store others can enter: %d\n%s", code, out)
	}
	os.Chmod(store, 0o700)
	// A planted link in the store is refused, and nothing is written through it.
	target := filepath.Join(t.TempDir(), "root-owned")
	os.WriteFile(target, []byte("untouched\n"), 0o600)
	journal := filepath.Join(store, "incoming.mbox")
	os.Rename(journal, journal+".moved")
	os.Symlink(target, journal)
	if out, code := in.run("serve", "-config", in.config); code == 0 || !strings.Contains(out, "symbolic link") {
		t.Errorf("serve with a link in the store: %d\n%s", code, out)
	}
	if b, _ := os.ReadFile(target); string(b) != "untouched\n" {
		t.Errorf("the link's target was written: %q", b)
	}
	os.Remove(journal)
	os.Rename(journal+".moved", journal)
	// Mended, it starts; stopped at once, while it still starts, it
	// finishes the start and stops cleanly.
	in.start()
	in.stop()
}

// TestReceiveLargeMail: a 120 MB mail through "hl7mail receive" (pipe
// mode) is streamed, not held: the command's peak RSS (its VmHWM, read
// while it runs) stays under 100 MB,
// the running instance quarantines it as oversize by its header, journals
// that header, answers the partner's receipt request with "denied", and the
// mail is neither delivered nor journalled whole.
func TestReceiveLargeMail(t *testing.T) {
	in := newInstance(t, "tucker-lab")
	in.start()
	defer in.stop()
	in.waitReady("")
	const size = 120 << 20
	head := "From: tucker-lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: <big@partner.test>\r\nSubject: HL7\r\n" +
		"Disposition-Notification-To: tucker-lab@partner.test\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: application/edi-hl7\r\nContent-Transfer-Encoding: base64\r\n\r\n"
	cmd := exec.Command(binary, "receive", "-config", in.config)
	stdin, _ := cmd.StdinPipe()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer stdin.Close()
		stdin.Write([]byte(head))
		line := []byte(strings.Repeat("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo", 3)[:76] + "\r\n")
		block := bytes.Repeat(line, 64<<10/len(line))
		for n := len(head); n < size; n += len(block) {
			if _, err := stdin.Write(block); err != nil {
				return
			}
		}
	}()
	// The command's own peak (VmHWM) is read while it runs: the rusage of
	// a child counts the test process's memory it was cloned from.
	var hwm atomic.Int64 // KiB
	exited, sampled := make(chan struct{}), make(chan struct{})
	pid := cmd.Process.Pid
	go func() {
		defer close(sampled)
		for {
			if kb := vmHWM(pid); kb > 0 {
				hwm.Store(kb)
			}
			select {
			case <-exited:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	err := cmd.Wait()
	close(exited)
	<-sampled
	if err != nil || !strings.Contains(out.String(), "quarantined: oversize") {
		t.Fatalf("hl7mail receive of 120 MB: %v\n%s", err, out.String())
	}
	rss := hwm.Load()
	if rss == 0 {
		t.Fatal("the command's peak RSS was never read")
	}
	t.Logf("hl7mail receive of a 120 MB mail: peak RSS %d MiB", rss>>10)
	if rss > 100<<10 {
		t.Errorf("hl7mail receive of a 120 MB mail peaked at %d MiB RSS, want under 100 MiB", rss>>10)
	}
	if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", in.cmd.Process.Pid)); err == nil {
		for _, l := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(l, "VmHWM:") {
				t.Logf("the instance's peak RSS: %s", strings.TrimSpace(strings.TrimPrefix(l, "VmHWM:")))
			}
		}
	}
	found := false
	for _, a := range in.alerts(false) {
		found = found || a.Kind == "quarantined" && strings.Contains(a.Text, "oversize")
	}
	if !found {
		t.Errorf("no quarantine alert for the oversize mail: %+v", in.alerts(false))
	}
	journal, err := os.ReadFile(filepath.Join(in.dir, "var", "incoming.mbox"))
	if err != nil || len(journal) > 1<<20 || !bytes.Contains(journal, []byte("Message-ID: <big@partner.test>")) {
		t.Errorf("incoming.mbox holds %d bytes (%v); want the oversize mail's header, not the whole mail", len(journal), err)
	}
	list := in.messages()
	if len(list) != 1 || list[0].Direction != "out" || list[0].ControlID != "mdn-big@partner.test" {
		t.Errorf("stored %+v; want only the denied receipt for the partner, nothing delivered", list)
	}
}

// TestControlSocket: the operator commands reach the running instance over
// the control socket in the store (mode 0600), which nobody else may open;
// over HTTP no change is made without the token, on loopback too.
func TestControlSocket(t *testing.T) {
	python := requireTool(t, "/usr/bin/python3")
	in := newInstance(t, "tucker-lab")
	in.start()
	defer in.stop()
	in.waitReady("")
	sock := filepath.Join(in.dir, "var", "hl7mail.sock")
	fi, err := os.Lstat(sock)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket %v, mode %v; want a socket of mode 0600", err, fi.Mode())
	}
	if out, code := in.run("status", "-config", in.config); code != 0 || !strings.Contains(out, "running") {
		t.Errorf("status over the control socket: %d\n%s", code, out)
	}
	if out, code := in.run("retry", "-config", in.config, "-all"); code != 0 || !strings.Contains(out, "0 messages queued again") {
		t.Errorf("retry -all over the control socket: %d\n%s", code, out)
	}
	os.Chmod(in.dir, 0o755) // nobody may walk to the store; the store and the socket stop it
	if out, ok := asNobody(t, python, "-c", "import socket; socket.socket(socket.AF_UNIX).connect('"+sock+"')"); ok {
		t.Errorf("nobody connected to the control socket: %s", out)
	}
	for _, path := range []string{"/api/retry", "/api/reload", "/api/alerts/1/ack"} {
		resp, err := http.Post("http://"+in.dash+path, "application/json", strings.NewReader(`{"partner":"","by":"x"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("POST %s over HTTP without the token = %d, want 401", path, resp.StatusCode)
		}
	}
	resp, err := http.Get("http://" + in.dash + "/api/overview")
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("GET /api/overview on loopback = %v, %v; want 200 (the page reads without the token)", resp, err)
	} else {
		resp.Body.Close()
	}
}

// vmHWM returns the peak resident memory (KiB) of process pid so far, 0
// when it cannot be read.
func vmHWM(pid int) int64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb
		}
	}
	return 0
}
