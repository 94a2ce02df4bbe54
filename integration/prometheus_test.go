package integration

import (
	"os/exec"
	"strings"
	"testing"
)

// TestPrometheusRules: Prometheus's own promtool accepts the alerting
// rules shipped in deploy/prometheus, and their unit tests pass: the rules
// fire on the series of an hl7mail in trouble.
func TestPrometheusRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		unavailable(t, "promtool (Debian's prometheus package)")
	}
	for _, args := range [][]string{
		{"check", "rules", "hl7mail-rules.yml"},
		{"test", "rules", "hl7mail-rules_test.yml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "../deploy/prometheus"
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "SUCCESS") {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
