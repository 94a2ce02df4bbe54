package gateway

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/smtp"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

// TestNoPatientData sends corpus messages from the hospital to the lab and
// back, with every log record kept at debug level, a refused mail among
// them; then no log line, no page, no API answer and no metric of either
// instance contains a patient name or ID of those messages.
func TestNoPatientData(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	msgs = msgs[:40]
	phi := corpus.PatientData(msgs)
	if len(phi) < 40 {
		t.Fatalf("only %d patient names and IDs found in the corpus", len(phi))
	}

	pw := newPHIWorld(t)
	w, hospital, lab, listenLab := pw.w, pw.hospital, pw.lab, pw.listenLab
	c, err := mllp.Dial(context.Background(), listenLab)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		reply, err := c.Send(ctx, m)
		cancel()
		if a, perr := hl7.ParseAck(reply); err != nil || perr != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("surrogate answered %q, %v", reply, err)
		}
	}
	c.Close()
	// A mail that is refused: a stranger writes to the lab.
	if err := smtp.SendMail(w.SMTPAddr, nil, "someone@else.test", []string{"lab@partner.test"}, []byte("From: someone@else.test\r\nTo: lab@partner.test\r\nMessage-ID: <x@else.test>\r\n"+
		"Subject: hi\r\n\r\n"+string(msgs[0]))); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	deadline := time.Now().Add(60 * time.Second)
	for {
		acked, _ := hospital.g.Store().List(ctx, store.Filter{Direction: store.Outbound, State: store.Acknowledged})
		q, _ := lab.g.Store().QuarantineList(ctx, 0)
		if len(acked) == len(msgs) && len(hospital.router.Messages()) == len(msgs) && len(q) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %d acknowledged, %d responses at the hospital's router, %d quarantined",
				len(acked), len(hospital.router.Messages()), len(q))
		}
		time.Sleep(50 * time.Millisecond)
	}

	seen := pw.seen(t, "app.js", "charts.js", "api/partners", "api/activity", "api/reports", "metrics")
	if !strings.Contains(seen[hospital.g.DashboardURL()+"api/log"], "receipt matched") {
		t.Errorf("the hospital's log stream lacks the receipts")
	}
	for where, text := range seen {
		for _, p := range phi {
			if strings.Contains(text, p) {
				t.Errorf("%s contains patient data %q", where, p)
			}
		}
	}
	t.Logf("%d log bytes, %d pages and answers checked for %d patient names and IDs", len(seen["log"]), len(seen)-1, len(phi))
}

// phiWorld is a hospital and a lab (PGP) over an embedded mail world, every
// log record of both kept at debug level, for tests that look for patient
// data where it must never be.
type phiWorld struct {
	w             *embedded.World
	hospital, lab *instance
	listenLab     string // the hospital's surrogate for the lab
	logs          *testlog.Buffer
}

func newPHIWorld(t *testing.T) *phiWorld {
	t.Helper()
	dir := t.TempDir()
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	hPriv, _, hCert, hKey := keyFiles(t, dir, "edi@hospital.test")
	hPub := filepath.Join(dir, "edi@hospital.test.pub.asc")
	lPriv, lPub, lCert, lKey := keyFiles(t, dir, "lab@partner.test")
	pw := &phiWorld{w: w, listenLab: freeAddr(t), logs: &testlog.Buffer{}}
	logTo := func(site string) func(*Options) {
		return func(o *Options) {
			tail := dashboard.NewTail(0)
			h := slog.NewJSONHandler(pw.logs, &slog.HandlerOptions{Level: slog.LevelDebug})
			o.Logger = slog.New(tail.Handler(h, slog.LevelDebug)).With("site", site)
			o.Tail = tail
		}
	}
	pw.hospital = startInstance(t, w, dir, "hospital", "edi@hospital.test", fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: %s}\n", pw.listenLab, lPub),
		hPriv, hCert, hKey, logTo("hospital"))
	pw.lab = startInstance(t, w, dir, "lab", "lab@partner.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: %s}\n", freeAddr(t), hPub),
		lPriv, lCert, lKey, logTo("lab"))
	return pw
}

// seen returns, by where it was read, every text the two instances show:
// the log, each dashboard's page, API answers (and the extra paths) and
// log stream.
func (pw *phiWorld) seen(t *testing.T, extra ...string) map[string]string {
	t.Helper()
	seen := map[string]string{"log": pw.logs.String()}
	for _, in := range []*instance{pw.hospital, pw.lab} {
		base := in.g.DashboardURL()
		for _, path := range append([]string{"", "api/overview", "api/alerts?all=1", "api/messages?limit=5000", "api/quarantine"}, extra...) {
			resp, err := http.Get(base + path)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("GET %s%s = %d", base, path, resp.StatusCode)
			}
			seen[base+path] = string(body)
		}
		seen[base+"api/log"] = readStream(t, base+"api/log?since=0")
	}
	return seen
}

// readStream reads a Server-Sent Events stream until it has been quiet for
// half a second.
func readStream(t *testing.T, url string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	var b strings.Builder
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return b.String()
			}
			b.WriteString(l + "\n")
		case <-time.After(500 * time.Millisecond):
			cancel()
			for range lines {
			}
			return b.String()
		}
	}
}
