package main

import (
	"bytes"
	"regexp"
	"testing"
)

// TestBenchOutbound runs the outbound bench on a small queue: each
// partner's queue drains completely into the sink on one SMTP session,
// and the table has a row for each with its drain rate and the seal rate
// beside it. (How fast is the bench's business, not the test's.)
func TestBenchOutbound(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"bench", "-what", "outbound", "-queue", "30", "-seal-for", "200ms", "-outbound-rounds", "2"}, &out, &errOut); code != 0 {
		t.Fatalf("bench -what outbound = %d\n%s%s", code, out.String(), errOut.String())
	}
	// partner, suite, messages, drain, msgs/s, seal msgs/s, ratio, its
	// spread over the rounds, sessions (a drain of 30 fits on one), RSS;
	// then the targets.
	for _, row := range []string{`(?m)^lab\s+pgp\s+30\s+\S+\s+\d+\s+\d+\s+[0-9.]+x\s+[0-9.]+-[0-9.]+x\s+1\s+\d+$`,
		`(?m)^clinic\s+smime\s+30\s+\S+\s+\d+\s+\d+\s+[0-9.]+x\s+[0-9.]+-[0-9.]+x\s+1\s+\d+$`,
		`(?m)^\* sealing alone on all \d+ cores, right after each drain\. The medians of 2 rounds`,
		`(?m)^target: lab \(PGP\) at least 1,000 msgs/s and 0\.3x the seal rate: (met|NOT met)$`,
		`(?m)^target: clinic \(S/MIME\) at least 0\.8x the seal rate: (met|NOT met)$`} {
		if !regexp.MustCompile(row).MatchString(out.String()) {
			t.Errorf("no row matching %s in:\n%s", row, out.String())
		}
	}
}
