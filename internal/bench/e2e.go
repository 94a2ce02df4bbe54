package bench

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/demo"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
)

// E2EResult is the end-to-end run: latency, measured with one message in
// flight at a time, from the hospital router's send to the partner
// router's receipt (out) and from there to the response reaching the
// hospital router (back); and the rate sustained when the whole corpus is
// sent at once.
type E2EResult struct {
	LatencyMessages              int
	Out50, Out95, Back50, Back95 time.Duration
	BurstMessages                int
	BurstElapsed                 time.Duration
	PerSecond                    float64
	// BurstCPU is the processor time the process (all three sites) used
	// during the burst: with BurstElapsed, how busy the cores were.
	BurstCPU time.Duration
	// CryptoPerSecond is the bound the crypto sets: round trips a second
	// when every core does nothing but a round trip's sealing and opening
	// (cryptoBound), measured in the same run with the sites' keys.
	CryptoPerSecond float64
}

// processCPU is the processor time this process used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// E2E runs the demo's three sites in dir over the embedded mail servers
// (IMAP with IDLE), alternating between the lab (PGP) and the clinic
// (S/MIME): first latency messages one at a time, then msgs all at once.
func E2E(ctx context.Context, dir string, msgs [][]byte, latency int, timeout time.Duration) (E2EResult, error) {
	return E2EOn(ctx, dir, msgs, latency, len(msgs), timeout, 5*time.Second, nil)
}

// E2EOn is E2E with burst messages in the burst, over the mail system ms
// when it is not nil (a real Postfix and Dovecot) instead of the embedded
// one.
func E2EOn(ctx context.Context, dir string, msgs [][]byte, latency, burst int, timeout, cryptoFor time.Duration,
	ms *demo.MailSystem) (E2EResult, error) {
	var env *demo.Env
	var err error
	if ms != nil {
		env, err = demo.StartOn(ctx, dir, nil, *ms)
	} else {
		env, err = demo.Start(ctx, dir, nil)
	}
	if err != nil {
		return E2EResult{}, err
	}
	defer env.Close()
	var res E2EResult
	conns := map[string]*mllp.Client{}
	for _, p := range []string{"lab", "clinic"} {
		c, err := mllp.Dial(ctx, env.Surrogate[p])
		if err != nil {
			return res, err
		}
		defer c.Close()
		conns[p] = c
	}
	send := func(partner string, m []byte) error {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		_, err := conns[partner].Send(sctx, m)
		return err
	}
	waitResponses := func(n int) error {
		deadline := time.Now().Add(timeout)
		for len(env.Hospital.Router.Messages()) < n {
			if time.Now().After(deadline) {
				return fmt.Errorf("%d of %d responses after %s", len(env.Hospital.Router.Messages()), n, timeout)
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}

	// Latency: one at a time.
	lat := Unique(msgs, min(latency, len(msgs)), fmt.Sprintf("L%x", time.Now().UnixNano()))
	sent := map[string]time.Time{}
	for i, m := range lat {
		h, _ := hl7.ParseHeader(m)
		sent[h.ControlID] = time.Now()
		if err := send([]string{"lab", "clinic"}[i%2], m); err != nil {
			return res, err
		}
		if err := waitResponses(i + 1); err != nil {
			return res, err
		}
	}
	out, back, _ := legs(env, sent)
	if len(out) != len(lat) {
		return res, fmt.Errorf("%d of %d messages made the round trip", len(out), len(lat))
	}
	res.LatencyMessages = len(out)
	res.Out50, res.Out95 = percentile(out, 50), percentile(out, 95)
	res.Back50, res.Back95 = percentile(back, 50), percentile(back, 95)

	// Throughput: everything at once, one connection per partner.
	batch := Unique(msgs, burst, fmt.Sprintf("B%x", time.Now().UnixNano()))
	before := len(env.Hospital.Router.Messages())
	start := time.Now()
	cpu0 := processCPU()
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for pi, partner := range []string{"lab", "clinic"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := pi; i < len(batch); i += 2 {
				if err := send(partner, batch[i]); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return res, err
	}
	if err := waitResponses(before + len(batch)); err != nil {
		return res, err
	}
	res.BurstMessages, res.BurstElapsed = len(batch), time.Since(start)
	res.BurstCPU = processCPU() - cpu0
	res.PerSecond = float64(len(batch)) / res.BurstElapsed.Seconds()
	if res.CryptoPerSecond, err = cryptoBound(env, msgs, cryptoFor); err != nil {
		return res, err
	}
	return res, nil
}

// cryptoBound is how many round trips a second the crypto alone allows on
// every core: for the lab (PGP) and the clinic (S/MIME) in turn, as the
// burst alternates, the hospital seals a message, the partner opens it and
// seals its answer (here the same message: a bundle of response and MDN is
// of the same order), and the hospital opens that. Each seal signs and
// encrypts, each open decrypts and verifies, with the sites' own keys.
func cryptoBound(env *demo.Env, msgs [][]byte, d time.Duration) (float64, error) {
	type leg struct{ out, back security.Suite }
	var legs []leg
	for _, p := range []*demo.Site{env.Lab, env.Clinic} {
		out, err := env.Hospital.Gateway.Suite(p.Name())
		if err != nil {
			return 0, err
		}
		back, err := p.Gateway.Suite("hospital")
		if err != nil {
			return 0, err
		}
		legs = append(legs, leg{out, back})
	}
	roundTrip := func(l leg, m []byte) error {
		now := time.Now()
		for _, s := range [][2]security.Suite{{l.out, l.back}, {l.back, l.out}} {
			edi, err := security.EncodeEDI(m, security.EDIOptions{})
			if err != nil {
				return err
			}
			sealed, _, err := s[0].Seal(edi, now)
			if err != nil {
				return err
			}
			if _, err := s[1].Open(sealed, now); err != nil {
				return err
			}
		}
		return nil
	}
	// The round trips are numbered in turn, so that the lab and the clinic
	// get as many each, however long each takes.
	n, err := onEveryCore(d, func(i int) error { return roundTrip(legs[i%2], msgs[i%len(msgs)]) })
	if err != nil {
		return 0, fmt.Errorf("crypto bound: %w", err)
	}
	return n, nil
}

// legs pairs, for the messages in sent, the send time with the arrival at
// a partner's router and the arrival of the response at the hospital's.
func legs(env *demo.Env, sent map[string]time.Time) (out, back []time.Duration, last time.Time) {
	atPartner := map[string]time.Time{}
	for _, r := range []*demo.Site{env.Lab, env.Clinic} {
		ms, ats := r.Router.Arrivals()
		for i, m := range ms {
			if h, err := hl7.ParseHeader(m); err == nil {
				atPartner[h.ControlID] = ats[i]
			}
		}
	}
	ms, ats := env.Hospital.Router.Arrivals()
	for i, m := range ms {
		a, err := hl7.ParseAck(m)
		if err != nil {
			continue
		}
		p, ok1 := atPartner[a.ControlID]
		s, ok2 := sent[a.ControlID]
		if !ok1 || !ok2 {
			continue
		}
		out = append(out, p.Sub(s))
		back = append(back, ats[i].Sub(p))
		if ats[i].After(last) {
			last = ats[i]
		}
	}
	slices.Sort(out)
	slices.Sort(back)
	return out, back, last
}

// PrintE2E writes the end-to-end result.
func PrintE2E(w io.Writer, r E2EResult) {
	fmt.Fprintf(w, "latency, one message in flight at a time (%d messages):\n", r.LatencyMessages)
	fmt.Fprintf(w, "  %-44s %9s %9s\n", "leg", "median", "p95")
	fmt.Fprintf(w, "  %-44s %9s %9s\n", "hospital router → partner router (by mail)", r.Out50.Round(time.Millisecond), r.Out95.Round(time.Millisecond))
	fmt.Fprintf(w, "  %-44s %9s %9s\n", "partner router → hospital router (response)", r.Back50.Round(time.Millisecond), r.Back95.Round(time.Millisecond))
	fmt.Fprintf(w, "throughput: %d messages sent at once, all round trips done in %s: %.0f msgs/s sustained\n",
		r.BurstMessages, r.BurstElapsed.Round(time.Millisecond), r.PerSecond)
	if r.BurstElapsed > 0 && r.BurstMessages > 0 {
		fmt.Fprintf(w, "  processor time during the burst: %s, %.2f of the %d cores busy, %.1f ms a round trip (the three sites in one process)\n",
			r.BurstCPU.Round(10*time.Millisecond), r.BurstCPU.Seconds()/r.BurstElapsed.Seconds(), runtime.NumCPU(),
			r.BurstCPU.Seconds()*1000/float64(r.BurstMessages))
	}
	if r.CryptoPerSecond > 0 {
		fmt.Fprintf(w, "  the crypto of a round trip alone (two seals, two opens), on all %d cores: %.0f round trips/s; the burst is %.2fx of it\n",
			runtime.GOMAXPROCS(0), r.CryptoPerSecond, r.PerSecond/r.CryptoPerSecond)
	}
}
