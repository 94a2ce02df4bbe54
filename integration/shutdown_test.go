package integration

import (
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
)

// TestShutdownBound: "serve -shutdown-timeout 5s" while a submission hangs
// on an SMTP server that took the connection and never answers exits
// within 6 s (stop taking work, finish within the bound, then cut short),
// cleanly, and the message is still queued for the next start.
func TestShutdownBound(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			defer c.Close() // held open, silent, until the test ends
		}
	}()
	in := newInstance(t, "tucker-lab")
	in.useSMTP(ln.Addr().String())
	in.serveArgs = []string{"-shutdown-timeout", "5s"}
	// The race detector's binary waits a second at exit for late reports
	// (atexit_sleep_ms): not the product's time.
	in.env = []string{"GORACE=atexit_sleep_ms=0"}
	in.start()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	if code := sendOne(t, in.listen["tucker-lab"], msgs[0]); code != hl7.CommitAccept {
		t.Fatalf("answer %s, want CA", code)
	}
	deadline := time.Now().Add(20 * time.Second)
	for accepted.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the sender never connected to the SMTP server\n%s", in.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // the session waits for the greeting
	start := time.Now()
	in.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-in.exited:
		took := time.Since(start)
		t.Logf("serve stopped %s after SIGINT", took.Round(10*time.Millisecond))
		if err != nil {
			t.Errorf("serve exit: %v\n%s", err, in.log)
		}
		if took > 6*time.Second {
			t.Errorf("serve took %s to stop with -shutdown-timeout 5s, want at most 6s\n%s", took, in.log)
		}
	case <-time.After(30 * time.Second):
		in.cmd.Process.Kill()
		t.Fatalf("serve did not stop within 30s of SIGINT with -shutdown-timeout 5s\n%s", in.log)
	}
	in.cmd = nil
	if !strings.Contains(in.log.String(), "submission cut short by the shutdown") {
		t.Errorf("the log does not say the submission was cut short:\n%s", in.log)
	}
	if list := in.messages(); len(list) != 1 || list[0].State != "queued" {
		t.Errorf("after the shutdown: %+v, want the message still queued", list)
	}
}
