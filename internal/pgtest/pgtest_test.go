package pgtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestStartStop: a cluster starts on a loopback port, answers psql as
// hl7mail, and is gone, folder and port, after Stop.
func TestStartStop(t *testing.T) {
	s, err := Start()
	if err != nil {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") == "" {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	bin, _ := Bin()
	out, err := exec.Command(filepath.Join(bin, "psql"), s.DSN, "-Atc", "SHOW synchronous_commit; SHOW fsync; SHOW listen_addresses").CombinedOutput()
	if err != nil || strings.Fields(string(out))[0] != "on" || strings.Fields(string(out))[1] != "on" ||
		strings.Fields(string(out))[2] != "127.0.0.1" {
		t.Errorf("psql: %v\n%s", err, out)
	}
	dir := s.dir
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if !WaitGone(s.Port, 5*time.Second) {
		t.Error("still listening after Stop")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("folder %s left: %v", dir, err)
	}
}
