package integration

import (
	"os/exec"
	"regexp"
	"testing"
)

// TestDemo runs "hl7mail demo -once" as make demo does: it exits 0 and its
// summary shows every message through the whole loop.
func TestDemo(t *testing.T) {
	out, err := exec.Command(binary, "demo", "-once", "-n", "10").CombinedOutput()
	if err != nil {
		t.Fatalf("hl7mail demo -once: %v\n%s", err, out)
	}
	re := regexp.MustCompile(`summary: 11 sent, 11 answered CA, 11 at the partners' routers \(11 byte-identical\), 11 responses back at the hospital's router, 11 receipts matched`)
	if !re.Match(out) {
		t.Errorf("demo summary missing or incomplete:\n%s", out)
	}
	if !regexp.MustCompile(`dashboards: hospital http://127\.0\.0\.1:\d+/  lab http://127\.0\.0\.1:\d+/  clinic http://127\.0\.0\.1:\d+/`).Match(out) {
		t.Errorf("demo does not print the dashboards' addresses:\n%s", out)
	}
	for _, want := range []string{"mail received and verified", "signer=CN=hospital", "response and MDN bundled", "receipt matched for RQ-O01-001"} {
		if !regexp.MustCompile(regexp.QuoteMeta(want)).Match(out) {
			t.Errorf("demo trace lacks %q", want)
		}
	}
}
