package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/mllp"
)

// TestReloadUnderLoad: while "hl7mail bench load" sends to one partner's
// surrogate of a running binary, a partner is added and another removed
// (SIGHUP, then "hl7mail reload"): the load sees no connection drop and no
// message it has to send again, every CA'd message is stored, the added
// partner's surrogate answers and the removed one's is gone. A broken
// file is refused by "hl7mail reload" with its problem, and the running
// configuration keeps working.
func TestReloadUnderLoad(t *testing.T) {
	in := newInstance(t, "busy", "gone")
	in.start()
	defer in.stop()
	record := filepath.Join(in.dir, "ca.txt")
	load := exec.Command(binary, "bench", "load", "-addr", in.listen["busy"], "-conns", "4", "-n", "600", "-rate", "150",
		"-record", record, "-prefix", "R")
	out := &lockedBuffer{}
	load.Stdout, load.Stderr = out, out
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- load.Wait() }()
	time.Sleep(time.Second)

	// SIGHUP: "gone" removed, "added" added.
	added := freePort(t)
	in.edit("  - {name: gone", fmt.Sprintf("  - {name: added, listen: %s, email: added@partner.test, security: none, allow_unencrypted: true}\n  - {name: gone", added))
	data, _ := os.ReadFile(in.config)
	var kept []string
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, "name: gone") {
			kept = append(kept, line)
		}
	}
	os.WriteFile(in.config, []byte(strings.Join(kept, "\n")), 0o600)
	in.reload()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(in.log.String(), `"msg":"configuration reloaded"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no reload after SIGHUP:\n%s", in.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c, err := mllp.Dial(t.Context(), added)
	if err != nil {
		t.Fatalf("the added partner's surrogate: %v", err)
	}
	c.Close()
	if c, err := mllp.Dial(t.Context(), in.listen["gone"]); err == nil {
		c.Close()
		t.Errorf("the removed partner's surrogate still answers")
	}
	// hl7mail reload with the same file: applied again; with a broken one:
	// refused, with its problem, and the running configuration stays.
	if msg, code := in.run("reload", "-config", in.config); code != 0 || !strings.Contains(msg, "configuration reloaded") {
		t.Errorf("hl7mail reload: exit %d\n%s", code, msg)
	}
	in.edit("name: added", "name: add ed")
	msg, code := in.run("reload", "-config", in.config)
	if code != 1 || !strings.Contains(msg, "partners[1].name") || !strings.Contains(msg, "refused") {
		t.Errorf("hl7mail reload of a broken file: exit %d\n%s", code, msg)
	}
	in.edit("name: add ed", "name: added")

	if err := <-done; err != nil {
		t.Fatalf("bench load: %v\n%s", err, out)
	}
	// messages CA CR failed resent reconnects ...
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	f := strings.Fields(lines[len(lines)-1])
	if len(f) < 6 || f[1] != "600" || f[3] != "0" || f[4] != "0" || f[5] != "0" {
		t.Errorf("bench load during the reloads: want 600 CA, none failed, resent or reconnected:\n%s", out)
	}
	ids, _ := os.ReadFile(record)
	stored := map[string]bool{}
	for _, m := range in.waitMessages(600, nil) {
		stored[m.ControlID] = true
	}
	for _, id := range strings.Fields(string(ids)) {
		if !stored[id] {
			t.Errorf("%s got CA and is not stored", id)
		}
	}
	if strings.Count(in.log.String(), `"msg":"configuration reloaded"`) != 2 {
		t.Errorf("want two reloads applied, one refused:\n%s", in.log)
	}
}
