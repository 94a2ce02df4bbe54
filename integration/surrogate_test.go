package integration

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
)

// otherDelims rewrites a message to the delimiters !$*@% (when it uses none
// of them already), so that the test also proves the ACK keeps a message's
// own delimiters.
func otherDelims(m []byte) ([]byte, bool) {
	if bytes.ContainsAny(m, "!$*@%") {
		return m, false
	}
	return bytes.Map(func(r rune) rune {
		switch r {
		case '|':
			return '!'
		case '^':
			return '$'
		case '~':
			return '*'
		case '\\':
			return '@'
		case '&':
			return '%'
		}
		return r
	}, m), true
}

// TestMLLPSendCorpus sends all 1,013 corpus messages through a surrogate of
// the running binary with Debian's mllp_send (python3-hl7) and checks every
// acknowledgement: CA, MSA-2 equal to the request's MSH-10, MSH-3..6
// swapped, the request's delimiters kept. Then the store lists them all.
func TestMLLPSendCorpus(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	rewritten := 0
	for i := 0; i < len(msgs); i += 5 {
		var ok bool
		if msgs[i], ok = otherDelims(msgs[i]); ok {
			rewritten++
		}
	}
	if rewritten < 100 {
		t.Fatalf("only %d messages could be given other delimiters", rewritten)
	}
	in := newInstance(t, "tucker-lab")
	in.start()
	var framed []byte
	for _, m := range msgs {
		framed = mllp.AppendFrame(framed, m)
	}
	file := filepath.Join(t.TempDir(), "corpus.mllp")
	if err := os.WriteFile(file, framed, 0o600); err != nil {
		t.Fatal(err)
	}
	host, port, _ := strings.Cut(in.listen["tucker-lab"], ":")
	cmd := exec.Command(mllpSend, "-p", port, "-f", file, host)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("mllp_send: %v\n%s", err, stderr.Bytes())
	}
	// mllp_send prints each raw answer, frame bytes included, then a newline.
	rd := mllp.NewReader(bytes.NewReader(out), 0)
	for i, m := range msgs {
		ack, err := rd.ReadFrame()
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		req, _ := hl7.ParseHeader(m)
		h, err := hl7.ParseHeader(ack)
		if err != nil {
			t.Fatalf("answer %d %q: %v", i, ack, err)
		}
		f := string(h.Delims.Field)
		wantMSA := "MSA" + f + "CA" + f + req.ControlID
		if h.Delims != req.Delims || !bytes.HasPrefix(ack, m[:8]) {
			t.Errorf("answer %d: delimiters %q, request had %q", i, ack[:8], m[:8])
		}
		if !h.IsAck() || h.MessageType != "ACK" || !strings.Contains(string(ack), "\r"+wantMSA+"\r") {
			t.Errorf("answer %d = %q, want ACK with %q", i, ack, wantMSA)
		}
		if h.SendingApp != req.ReceivingApp || h.SendingFacility != req.ReceivingFacility ||
			h.ReceivingApp != req.SendingApp || h.ReceivingFacility != req.SendingFacility {
			t.Errorf("answer %d: MSH-3..6 not swapped: %q", i, ack)
		}
	}
	if _, err := rd.ReadFrame(); err != io.EOF {
		t.Errorf("more answers than messages: %v", err)
	}
	list := in.waitMessages(len(msgs), nil)
	ids := map[string]bool{}
	for _, m := range list {
		if m.State != "queued" || m.Partner != "tucker-lab" || m.Direction != "out" {
			t.Errorf("stored %+v", m)
		}
		ids[m.ControlID] = true
	}
	if len(ids) != len(msgs) {
		t.Errorf("%d distinct control IDs stored, want %d", len(ids), len(msgs))
	}
}

// TestKill9AfterCA sends the corpus over four connections and kills the
// process with SIGKILL in the middle. After a restart every message that was
// answered CA is in the store with its exact bytes, and the restarted
// instance takes messages again.
func TestKill9AfterCA(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	in := newInstance(t, "tucker-lab")
	in.start()
	addr := in.listen["tucker-lab"]

	var mu sync.Mutex
	acked := map[string][32]byte{} // control ID → payload hash, for each CA
	const conns = 4
	var wg sync.WaitGroup
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := mllp.Dial(context.Background(), addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			for i := w; i < len(msgs); i += conns {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				reply, err := c.Send(ctx, msgs[i])
				cancel()
				if err != nil {
					return // the process was killed
				}
				req, _ := hl7.ParseHeader(msgs[i])
				if !strings.Contains(string(reply), "\rMSA|CA|"+req.ControlID+"\r") {
					t.Errorf("message %s answered %q", req.ControlID, reply)
					return
				}
				mu.Lock()
				acked[req.ControlID] = sha256.Sum256(msgs[i])
				mu.Unlock()
			}
		}()
	}
	// Kill once a third of the corpus has been acknowledged.
	for {
		mu.Lock()
		n := len(acked)
		mu.Unlock()
		if n >= len(msgs)/3 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	in.kill()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(acked) == len(msgs) {
		t.Fatal("every message was acknowledged before the kill; the test proves nothing")
	}

	in.start()
	// After a restart every message got CA is in the database: Open replays
	// the spool log before the surrogates listen.
	stored := map[string][]byte{}
	for _, m := range in.messages() {
		stored[m.ControlID] = m.SHA256
	}
	lost := 0
	for id, sum := range acked {
		if got, ok := stored[id]; !ok || !bytes.Equal(got, sum[:]) {
			lost++
			t.Errorf("message %s got CA but is not in the store after kill -9", id)
		}
	}
	t.Logf("%d messages got CA before kill -9, %d stored after restart, %d lost", len(acked), len(stored), lost)

	// The restarted instance accepts again, and a resend of a message
	// stored before the kill is recognised as a duplicate.
	c, err := mllp.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var resend []byte
	for _, m := range msgs {
		h, _ := hl7.ParseHeader(m)
		if _, ok := acked[h.ControlID]; ok {
			resend = m
			break
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := c.Send(ctx, resend)
	if err != nil || !strings.Contains(string(reply), "\rMSA|CA|") {
		t.Fatalf("after restart: %q, %v", reply, err)
	}
	h, _ := hl7.ParseHeader(resend)
	in.waitMessages(len(stored)+1, func(list []storedMessage) bool {
		dups := 0
		for _, m := range list {
			if m.ControlID == h.ControlID && m.State == "duplicate" && m.DuplicateOf != 0 {
				dups++
			}
		}
		return dups == 1
	})
}

// TestSendCommand drives "hl7mail send" against the running binary: a file
// with LF line ends and two messages, and one that is not HL7.
func TestSendCommand(t *testing.T) {
	in := newInstance(t, "clinic")
	in.start()
	dir := t.TempDir()
	good := filepath.Join(dir, "two.hl7")
	os.WriteFile(good, []byte("MSH|^~\\&|HIS|GH|CL|NC|20261123||ADT^A01|s1|P|2.3|||AL\nPID|1\n\nMSH|^~\\&|HIS|GH|CL|NC|20261123||ADT^A01|s2|P|2.5|||AL\nPID|1\n"), 0o600)
	out, err := exec.Command(binary, "send", "-addr", in.listen["clinic"], good).Output()
	if err != nil {
		t.Fatalf("hl7mail send: %v\n%s", err, out)
	}
	for _, want := range []string{"# s1: CA\nMSH|^~\\&|CL|NC|HIS|GH|", "\nMSA|CA|s1\n", "# s2: CA\n", "ACK^A01^ACK", "2 sent, 2 accepted, 0 not accepted"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("hl7mail send output lacks %q:\n%s", want, out)
		}
	}
	bad := filepath.Join(dir, "bad.hl7")
	os.WriteFile(bad, []byte("MSH|^~\\&|HIS|GH|CL|NC|20261123||ADT^A01||P|2.3|||AL\n"), 0o600)
	out, err = exec.Command(binary, "send", "-addr", in.listen["clinic"], bad).Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "MSA|CR||required MSH field missing") {
		t.Errorf("hl7mail send of a message without MSH-10: %v\n%s", err, out)
	}
	in.waitMessages(2, nil)
}

// TestCheckCommand runs "hl7mail check" on a broken file: every problem is
// listed with its line, and the exit code is 1.
func TestCheckCommand(t *testing.T) {
	path := filepath.Join(t.TempDir(), "partners.yaml")
	os.WriteFile(path, []byte(`self: {name: h, email: edi@h.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: a, listen: 127.0.0.1:9012, email: a@p.test, security: pgp, pgp_key: a.asc}
  - {name: b, listen: 127.0.0.1:9012, email: a@p.test, security: none, mdn_timeout: soon}
`), 0o600)
	cmd := exec.Command(binary, "check", "-config", path)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("hl7mail check exit = %v, want 1\n%s", err, out)
	}
	for _, want := range []string{
		path + ":1: self.pgp_key: required because a partner uses security: pgp",
		path + `:7: bad duration "soon"`,
		path + ":7: partner b: partners[1].listen: port 9012 is already used by partner a",
		path + ":7: partner b: partners[1].email: a@p.test is already the address of partner a",
		path + ":7: partner b: partners[1].security: security: none would send HL7 unencrypted",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("hl7mail check output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(strings.TrimSpace(string(out)), "\n") + 1; n != 5 {
		t.Errorf("hl7mail check printed %d problems, want 5:\n%s", n, out)
	}
}
