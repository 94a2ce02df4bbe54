package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/internal/demo"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/security"
)

// OutboundResult is how fast one partner's queue drained into an SMTP
// sink, beside how fast this machine seals for that partner's suite on
// all cores (the bound the sender could reach), over rounds: each round
// queues, drains, then seals alone. The figures are the medians of the
// rounds; the ratio's spread is its lowest and highest.
type OutboundResult struct {
	Partner, Suite string
	Messages       int
	Drain          time.Duration // median, from the partner's first mail at the sink to its last
	PerSecond      float64       // median drain rate
	SealPerSecond  float64       // median; MIME-EDI, sign and encrypt, on every core at once
	// Ratio is the median of each round's drain rate over its seal rate;
	// RatioMin and RatioMax its spread.
	Ratio, RatioMin, RatioMax float64
	Rounds                    int
	// RSSQueuedMB is the process's resident memory with the partner's
	// messages queued (the most over the rounds).
	RSSQueuedMB float64
	// Sessions is how many SMTP sessions carried a drain (the median).
	Sessions int
}

// Outbound queues n messages for a PGP partner (lab) at a hospital
// instance whose SMTP server is down, then starts an in-process SMTP sink
// there and times the drain, then seals for the lab's suite on every core
// for sealFor; rounds times; then the same for an S/MIME partner (clinic).
func Outbound(ctx context.Context, dir string, msgs [][]byte, n, rounds int, sealFor time.Duration) ([]OutboundResult, error) {
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
	var out []OutboundResult
	for _, partner := range []string{"lab", "clinic"} {
		r := OutboundResult{Partner: partner, Suite: string(cfg.Partner(partner).Security), Messages: n, Rounds: rounds}
		var drains []time.Duration
		var rates, seals, ratios []float64
		var sessions []int
		for round := range max(rounds, 1) {
			// The partner's queue fills while the SMTP server is down, then
			// drains alone: the figure is the partner's, not a share.
			batch := Unique(msgs, n, fmt.Sprintf("O%s%d%x", partner[:1], round, time.Now().UnixNano()))
			if _, err := Drive(ctx, listen[partner], 4, n, batch); err != nil {
				return nil, err
			}
			if err := g.Store().Flush(ctx); err != nil {
				return nil, err
			}
			r.RSSQueuedMB = max(r.RSSQueuedMB, rssMB())
			sink := &embedded.SMTP{Discard: true}
			if _, err := sink.Serve(smtpAddr); err != nil {
				return nil, err
			}
			sessions0 := g.SMTPSessions(partner)
			first, last, err := drained(sink, n, 30*time.Minute)
			sink.Close()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", partner, err)
			}
			sessions = append(sessions, g.SMTPSessions(partner)-sessions0)
			drain := last.Sub(first)
			rate := 0.0
			if drain > 0 {
				rate = float64(n-1) / drain.Seconds()
			}
			seal, err := sealRate(&keys.Keyring, cfg.Partner(partner), msgs, sealFor)
			if err != nil {
				return nil, err
			}
			drains, rates, seals = append(drains, drain), append(rates, rate), append(seals, seal)
			ratios = append(ratios, rate/seal)
		}
		r.Drain, r.PerSecond, r.SealPerSecond = median(drains), median(rates), median(seals)
		r.Ratio, r.RatioMin, r.RatioMax = median(ratios), slices.Min(ratios), slices.Max(ratios)
		r.Sessions = median(sessions)
		out = append(out, r)
	}
	return out, nil
}

// drained waits until sink took n mails; it returns when the first and the
// n-th came.
func drained(sink *embedded.SMTP, n int, limit time.Duration) (first, last time.Time, err error) {
	deadline := time.Now().Add(limit)
	for {
		c := sink.Count()
		now := time.Now()
		if c > 0 && first.IsZero() {
			first = now
		}
		if c >= n {
			return first, now, nil
		}
		if now.After(deadline) {
			return first, now, fmt.Errorf("the queue did not drain within %s: %d of %d", limit, c, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// sealRate is how many messages a second this machine seals for p on
// every core at once, for d.
func sealRate(keys *security.Keyring, p *config.Partner, msgs [][]byte, d time.Duration) (float64, error) {
	suite := keys.Suite(string(p.Security), p.Name, string(p.KeyTransport))
	return onEveryCore(d, func(i int) error {
		edi, err := security.EncodeEDI(msgs[i%len(msgs)], security.EDIOptions{})
		if err == nil {
			_, _, err = suite.Seal(edi, time.Now())
		}
		return err
	})
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
	fmt.Fprintf(w, "%-8s %-6s %8s %10s %10s %14s %8s %13s %9s %8s\n", "partner", "suite", "messages", "drain", "msgs/s",
		"seal msgs/s*", "ratio", "ratio spread", "sessions", "RSS MB")
	rounds := 0
	for _, r := range rs {
		fmt.Fprintf(w, "%-8s %-6s %8d %10s %10.0f %14.0f %7.2fx %13s %9d %8.0f\n", r.Partner, r.Suite, r.Messages,
			r.Drain.Round(time.Millisecond), r.PerSecond, r.SealPerSecond, r.Ratio,
			fmt.Sprintf("%.2f-%.2fx", r.RatioMin, r.RatioMax), r.Sessions, r.RSSQueuedMB)
		rounds = r.Rounds
	}
	fmt.Fprintf(w, "* sealing alone on all %d cores, right after each drain. The medians of %d rounds; the ratio is\n"+
		"each round's drain over its seal rate, the spread its lowest and highest. Each partner's queue drains\n"+
		"alone; RSS MB: the process's resident memory with that partner's messages queued.\n", runtime.GOMAXPROCS(0), rounds)
}
