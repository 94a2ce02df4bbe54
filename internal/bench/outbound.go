package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/internal/demo"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/security"
)

// OutboundResult is how fast one partner's queue drained into an SMTP
// sink, beside how fast this machine seals for that partner's suite on
// all cores (the bound the sender could reach).
type OutboundResult struct {
	Partner, Suite string
	Messages       int
	Drain          time.Duration // from the partner's first mail at the sink to its last
	PerSecond      float64
	SealPerSecond  float64 // MIME-EDI, sign and encrypt, on every core at once
	// RSSQueuedMB is the process's resident memory with every message
	// queued (the same figure for both partners: one process).
	RSSQueuedMB float64
}

// Outbound queues n messages for a PGP partner (lab) and n for an S/MIME
// partner (clinic) at a hospital instance whose SMTP server is down, then
// starts an in-process SMTP sink there and times each partner's drain;
// then it seals for each suite on every core for sealFor.
func Outbound(ctx context.Context, dir string, msgs [][]byte, n int, sealFor time.Duration) ([]OutboundResult, error) {
	for _, s := range []struct{ name, email string }{{"hospital", "edi@hospital.test"}, {"lab", "lab@partner.test"},
		{"clinic", "edi@clinic.test"}} {
		if err := demo.WriteKeys(filepath.Join(dir, s.name), s.name, s.email); err != nil {
			return nil, err
		}
	}
	ports := demo.Ports{}
	smtpAddr := ports.Free()
	listen := map[string]string{}
	for _, p := range []string{"lab", "clinic", "router", "dashboard"} {
		listen[p] = ports.Free()
	}
	path := filepath.Join(dir, "hospital", "partners.yaml")
	cfgText := fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: private.asc, smime_cert: cert.pem, smime_key: key.pem}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}
  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: ../clinic/cert.pem}
`, listen["router"], smtpAddr, listen["dashboard"], listen["lab"], listen["clinic"])
	if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
		return nil, err
	}
	cfg, keys, err := gateway.Load(path, time.Now())
	if err != nil {
		return nil, err
	}
	g, err := gateway.Start(ctx, gateway.Options{Config: cfg, Keys: keys, RetryBase: 50 * time.Millisecond, NoDashboard: true,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return nil, err
	}
	defer g.Shutdown(context.Background())
	for _, p := range []string{"lab", "clinic"} {
		batch := Unique(msgs, n, fmt.Sprintf("O%s%x", p[:1], time.Now().UnixNano()))
		if _, err := Drive(ctx, listen[p], 4, n, batch); err != nil {
			return nil, err
		}
	}
	if err := g.Store().Flush(ctx); err != nil {
		return nil, err
	}
	rss := rssMB()
	sink := &embedded.SMTP{}
	if _, err := sink.Serve(smtpAddr); err != nil {
		return nil, err
	}
	defer sink.Close()
	first, last := map[string]time.Time{}, map[string]time.Time{}
	deadline := time.Now().Add(30 * time.Minute)
	for {
		counts := map[string]int{}
		for _, m := range sink.Mails() {
			counts[m.To[0]]++
		}
		now := time.Now()
		for _, to := range []string{"lab@partner.test", "edi@clinic.test"} {
			if counts[to] > 0 && first[to].IsZero() {
				first[to] = now
			}
			if counts[to] >= n && last[to].IsZero() {
				last[to] = now
			}
		}
		if len(last) == 2 {
			break
		}
		if now.After(deadline) {
			return nil, fmt.Errorf("the queues did not drain within 30 minutes: %v of %d", counts, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var out []OutboundResult
	for _, p := range []struct{ partner, to string }{{"lab", "lab@partner.test"}, {"clinic", "edi@clinic.test"}} {
		pc := cfg.Partner(p.partner)
		r := OutboundResult{Partner: p.partner, Suite: string(pc.Security), Messages: n, Drain: last[p.to].Sub(first[p.to]),
			RSSQueuedMB: rss}
		if r.Drain > 0 {
			r.PerSecond = float64(n-1) / r.Drain.Seconds()
		}
		if r.SealPerSecond, err = sealRate(&keys.Keyring, pc, msgs, sealFor); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// sealRate is how many messages a second this machine seals for p on
// every core at once, for d.
func sealRate(keys *security.Keyring, p *config.Partner, msgs [][]byte, d time.Duration) (float64, error) {
	suite := keys.Suite(string(p.Security), p.Name, string(p.KeyTransport))
	var done atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Pointer[error]
	stop := time.Now().Add(d)
	start := time.Now()
	for w := range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; time.Now().Before(stop); i += runtime.GOMAXPROCS(0) {
				edi, err := security.EncodeEDI(msgs[i%len(msgs)], security.EDIOptions{})
				if err == nil {
					_, _, err = suite.Seal(edi, time.Now())
				}
				if err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return 0, *e
	}
	return float64(done.Load()) / time.Since(start).Seconds(), nil
}

// rssMB is this process's resident memory in MB (/proc/self/status).
func rssMB() float64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// PrintOutbound writes the drain table.
func PrintOutbound(w io.Writer, rs []OutboundResult) {
	fmt.Fprintf(w, "%-8s %-6s %8s %10s %12s %14s %8s\n", "partner", "suite", "messages", "drain", "msgs/s", "seal msgs/s*", "ratio")
	for _, r := range rs {
		ratio := 0.0
		if r.SealPerSecond > 0 {
			ratio = r.PerSecond / r.SealPerSecond
		}
		fmt.Fprintf(w, "%-8s %-6s %8d %10s %12.0f %14.0f %7.2fx\n", r.Partner, r.Suite, r.Messages,
			r.Drain.Round(time.Millisecond), r.PerSecond, r.SealPerSecond, ratio)
	}
	if len(rs) > 0 {
		fmt.Fprintf(w, "* sealing alone on all %d cores, in the same run. Memory with all %d messages queued: %.0f MB RSS.\n",
			runtime.GOMAXPROCS(0), 2*rs[0].Messages, rs[0].RSSQueuedMB)
	}
}
