package integration

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/bench"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
)

// TestKillMidDrain: 400 messages wait at the hospital while the SMTP
// server is down; it comes back, and the hospital is killed with SIGKILL
// in the middle of the drain, with mails sealed ahead and a group on the
// session. After the restart every message reaches the SMTP server, the
// first copy of each in the order the messages were accepted; a mail is
// submitted again only if it was in the group the kill cut short (at most
// 32), and the lab's router gets each message once, in order.
func TestKillMidDrain(t *testing.T) {
	f := newFaultWorld(t, nil)
	if err := f.w.StopSMTP(); err != nil {
		t.Fatal(err)
	}
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	const n = 400
	batch := bench.Unique(msgs, n, fmt.Sprintf("K%x", time.Now().UnixNano()))
	ctx := context.Background()
	c, err := mllp.Dial(ctx, f.toLab)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, m := range batch {
		ack, err := c.Send(ctx, m)
		if a, perr := hl7.ParseAck(ack); err != nil || perr != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("CA expected: %q, %v, %v", ack, err, perr)
		}
		h, _ := hl7.ParseHeader(m)
		want = append(want, h.ControlID)
	}
	c.Close()

	toLab := func() (ids []int, again int) {
		seen := map[string]bool{}
		re := regexp.MustCompile(`^<hl7mail\.(\d+)\.`)
		for _, m := range f.w.Taken() {
			if m.To != "lab@partner.test" {
				continue
			}
			if seen[m.MessageID] {
				again++
				continue
			}
			seen[m.MessageID] = true
			if sm := re.FindStringSubmatch(m.MessageID); sm != nil {
				id, _ := strconv.Atoi(sm[1])
				ids = append(ids, id)
			}
		}
		return ids, again
	}
	if err := f.w.StartSMTP(); err != nil {
		t.Fatal(err)
	}
	wait := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out after %s waiting for %s\nhospital log:\n%s", d, what, f.hospital.log)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	wait("the drain under way", 60*time.Second, func() bool { ids, _ := toLab(); return len(ids) >= 120 })
	f.hospital.kill()
	before, _ := toLab()
	f.hospital.start()
	wait("every mail at the server", 90*time.Second, func() bool { ids, _ := toLab(); return len(ids) == n })
	ids, again := toLab()
	t.Logf("killed after %d of %d mails; %d submitted again after the restart", len(before), n, again)
	for i := 1; i < len(ids); i++ {
		if ids[i] <= ids[i-1] {
			t.Fatalf("mail of message %d came before that of message %d:\n%v", ids[i], ids[i-1], ids)
		}
	}
	if again > 32 {
		t.Errorf("%d mails submitted again after one kill, more than the group in flight (32)", again)
	}
	wait("every message at the lab's router", 90*time.Second, func() bool {
		got, _ := f.labRouter.Arrivals()
		return len(got) >= n
	})
	time.Sleep(500 * time.Millisecond) // let a second delivery show
	got, _ := f.labRouter.Arrivals()
	var order []string
	for _, m := range got {
		h, _ := hl7.ParseHeader(m)
		order = append(order, h.ControlID)
	}
	if fmt.Sprint(order) != fmt.Sprint(want) {
		t.Errorf("the lab's router got %d messages in this order:\n%v\nwant the %d in the order accepted", len(order), order, n)
	}
}

// TestBenchRealMail: "hl7mail bench -what e2e -real" runs the loop over
// the embedded mail servers and then over a real Postfix and Dovecot it
// starts on loopback, and prints both tables; every round trip is made in
// both.
func TestBenchRealMail(t *testing.T) {
	requireMailServers(t)
	cmd := exec.Command(binary, "bench", "-what", "e2e", "-real", "-burst", "40", "-latency", "6", "-crypto-for", "300ms")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bench -real: %v\n%s", err, out)
	}
	text := string(out)
	t.Log("\n" + text)
	if !strings.Contains(text, "real Postfix and Dovecot") ||
		len(regexp.MustCompile(`(?m)^throughput: 40 messages sent at once, all round trips done in \S+: \d+ msgs/s`).FindAllString(text, -1)) != 2 {
		t.Errorf("want a burst of 40 over each mail system in:\n%s", text)
	}
	if strings.Count(text, "target: median under 1s: met") != 2 {
		t.Errorf("a median leg over 1s:\n%s", text)
	}
	if n := len(regexp.MustCompile(`(?m)^  the crypto of a round trip alone \(two seals, two opens\), on all \d+ cores: \d+ round trips/s; the burst is [0-9.]+x of it$`).FindAllString(text, -1)); n != 2 {
		t.Errorf("%d crypto bounds, want one for each mail system:\n%s", n, text)
	}
}
