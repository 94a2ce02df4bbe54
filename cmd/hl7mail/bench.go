package main

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/internal/bench"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/demo"
	"github.com/hl7mail/hl7mail/internal/pgtest"
)

func runBench(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "load" {
		return runBenchLoad(args[1:], stdout, stderr)
	}
	fs := newFlags("bench", "[flags] | load [flags]", `
Measures, on the HL7 sample corpus, beside baselines measured in the same run:
  crypto: messages/s sealed (MIME-EDI, sign, encrypt) and opened (decrypt,
          verify) with PGP and S/MIME, against the bare primitives;
  ack:    how fast a surrogate answers CA, latency (p50, p99) and messages/s
          at each connection count, against a bare MLLP server that fsyncs
          each message before answering. The store lives in a scratch folder
          on the disk being measured;
  e2e:    the demo's three sites, hospital to lab (PGP) and clinic
          (S/MIME) and back: latency one message at a time, then the rate
          of a burst; over the embedded mail servers, and with -real also
          over a real Postfix and Dovecot (root, from the source tree);
          beside it, the round trips a second the crypto alone allows;
  outbound: -queue messages for a PGP and an S/MIME partner queued while
          the SMTP server is down, then drained into an in-process SMTP
          sink, per partner, against sealing alone on every core right
          after, over -outbound-rounds rounds.
"hl7mail bench load -h" tells of the load command.`, stderr)
	what := fs.String("what", "all", "ack (CA round trip), crypto (sign/encrypt and decrypt/verify), e2e (the whole loop over embedded mail servers), outbound (a queue's drain), or all")
	queue := fs.Int("queue", 10000, "outbound: messages queued for each partner")
	sealFor := fs.Duration("seal-for", 5*time.Second, "outbound: how long to measure sealing on every core after each drain")
	outRounds := fs.Int("outbound-rounds", 3, "outbound: drains of each partner's queue (the targets use the median)")
	realMail := fs.Bool("real", false, "e2e: also over a real Postfix and Dovecot started on loopback (root, from the source tree)")
	burst := fs.Int("burst", 0, "e2e: messages sent at once (default: the whole corpus)")
	latency := fs.Int("latency", 100, "e2e: messages sent one at a time for the latency")
	cryptoFor := fs.Duration("crypto-for", 5*time.Second, "e2e: how long to measure a round trip's crypto alone on every core (the bound)")
	connsFlag := fs.String("conns", "1,16", "comma-separated connection counts")
	n := fs.Int("n", 20000, "messages per measured run (long enough to include checkpoints)")
	rounds := fs.Int("rounds", 5, "baseline/hl7mail pairs at each connection count (the targets use the median)")
	dir := fs.String("dir", "", "scratch `folder` (default: a new temporary folder)")
	corpusPath := fs.String("corpus", "", "HL7 messages `file` (default: the shared test corpus)")
	cluster := fs.String("cluster", "", "ack: also the CA path of a cluster on the PostgreSQL at this `DSN` (\"local\": a throwaway one started here)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile of the whole run to `file` (go tool pprof reads it)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench: -cpuprofile:", err)
			return 1
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	var conns []int
	for _, c := range strings.Split(*connsFlag, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || v < 1 {
			fmt.Fprintf(stderr, "hl7mail bench: bad -conns %q\n", *connsFlag)
			return 2
		}
		conns = append(conns, v)
	}
	msgs, err := loadCorpus(*corpusPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail bench:", err)
		return 1
	}
	scratch := *dir
	if scratch == "" {
		if scratch, err = os.MkdirTemp("", "hl7mail-bench"); err != nil {
			fmt.Fprintln(stderr, "hl7mail bench:", err)
			return 1
		}
		defer os.RemoveAll(scratch)
	}
	if *what == "e2e" || *what == "all" {
		n := *burst
		if n <= 0 {
			n = len(msgs)
		}
		systems := []string{"embedded SMTP and IMAP (IDLE)"}
		if *realMail {
			systems = append(systems, "real Postfix and Dovecot (IMAP IDLE), on loopback")
		}
		for i, system := range systems {
			fmt.Fprintf(stdout, "End to end: hospital → lab (PGP) / clinic (S/MIME) → hospital, %s, %d CPUs\n\n", system, runtime.NumCPU())
			e2eDir, err := os.MkdirTemp(scratch, "e2e")
			if err != nil {
				fmt.Fprintln(stderr, "hl7mail bench:", err)
				return 1
			}
			var ms *demo.MailSystem
			if i == 1 {
				m, stop, err := bench.RealMail()
				if err != nil {
					fmt.Fprintln(stderr, "hl7mail bench:", err)
					return 1
				}
				defer stop()
				ms = &m
			}
			r, err := bench.E2EOn(context.Background(), e2eDir, msgs, *latency, n, 10*time.Minute, *cryptoFor, ms)
			if err != nil {
				fmt.Fprintln(stderr, "hl7mail bench:", err)
				return 1
			}
			bench.PrintE2E(stdout, r)
			fmt.Fprintf(stdout, "target: median under 1s: %s\n", verdict(r.Out50 < time.Second && r.Back50 < time.Second))
			fmt.Fprintf(stdout, "target: median per leg under 25 ms: %s\n", verdict(r.Out50 < 25*time.Millisecond && r.Back50 < 25*time.Millisecond))
			fmt.Fprintf(stdout, "target: burst at least 104 round trips/s (twice the 52 before the outbound pipeline): %s\n\n",
				verdict(r.PerSecond >= 104))
		}
		if *what == "e2e" {
			return 0
		}
	}
	if *what == "outbound" || *what == "all" {
		fmt.Fprintf(stdout, "Outbound: %d messages for each partner, queued while SMTP was down, then drained into an in-process sink, %d CPUs\n\n",
			*queue, runtime.NumCPU())
		outDir, err := os.MkdirTemp(scratch, "outbound")
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench:", err)
			return 1
		}
		rs, err := bench.Outbound(context.Background(), outDir, msgs, *queue, *outRounds, *sealFor)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench:", err)
			return 1
		}
		bench.PrintOutbound(stdout, rs)
		for _, r := range rs {
			switch r.Suite {
			case "pgp":
				fmt.Fprintf(stdout, "target: %s (PGP) at least 1,000 msgs/s and 0.3x the seal rate: %s\n", r.Partner,
					verdict(r.PerSecond >= 1000 && r.Ratio >= 0.3))
			case "smime":
				fmt.Fprintf(stdout, "target: %s (S/MIME) at least 0.8x the seal rate: %s\n", r.Partner, verdict(r.Ratio >= 0.8))
			}
			fmt.Fprintf(stdout, "target: %s: under 100 MB with %d queued: %s\n", r.Partner, r.Messages, verdict(r.RSSQueuedMB < 100))
		}
		fmt.Fprintln(stdout)
		if *what == "outbound" {
			return 0
		}
	}
	if *what == "crypto" || *what == "all" {
		fmt.Fprintf(stdout, "Sealing and opening all %d corpus messages, %d CPUs\n\n", len(msgs), runtime.NumCPU())
		rs, err := bench.Crypto(msgs)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench:", err)
			return 1
		}
		bench.PrintCrypto(stdout, rs)
		fmt.Fprintln(stdout)
		if *what == "crypto" {
			return 0
		}
	}
	fmt.Fprintf(stdout, "CA latency and throughput: %d messages per run from %d corpus messages, %d CPUs, store in %s\n\n",
		*n, len(msgs), runtime.NumCPU(), scratch)
	results, err := bench.Run(context.Background(), bench.Options{Conns: conns, Messages: *n, Dir: scratch, Corpus: msgs, Rounds: *rounds})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail bench:", err)
		return 1
	}
	bench.Print(stdout, results)
	fmt.Fprintln(stdout, "\ntargets: p99 at 1 connection within 1.5x the baseline; at least 5,000 msgs/s at 16 connections")
	fmt.Fprintln(stdout, "(the median over the rounds, each hl7mail run against the baseline run just before it)")
	for _, c := range conns {
		switch c {
		case 1:
			r := bench.MedianRatio(results, 1, func(r bench.Result) float64 { return float64(r.P99) })
			fmt.Fprintf(stdout, "  p99 at 1 connection: %.2fx the baseline: %s\n", r, verdict(r <= 1.5))
		case 16:
			var rates []float64
			for _, r := range results {
				if r.Conns == 16 && r.Server == "hl7mail surrogate" {
					rates = append(rates, r.PerSecond)
				}
			}
			slices.Sort(rates)
			if len(rates) > 0 {
				rate := rates[len(rates)/2]
				fmt.Fprintf(stdout, "  rate at 16 connections: %.0f msgs/s (%.2fx the baseline): %s\n", rate,
					bench.MedianRatio(results, 16, func(r bench.Result) float64 { return r.PerSecond }), verdict(rate >= 5000))
			}
		}
	}
	if *cluster != "" {
		return benchCluster(*cluster, conns, *n, *rounds, msgs, stdout, stderr)
	}
	return 0
}

// benchCluster measures the CA path on PostgreSQL (bench.RunCluster).
func benchCluster(dsn string, conns []int, n, rounds int, msgs [][]byte, stdout, stderr io.Writer) int {
	where := "a throwaway PostgreSQL on loopback (fsync and synchronous_commit on)"
	if dsn == "local" {
		pg, err := pgtest.Start()
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench: -cluster local:", err)
			return 1
		}
		defer pg.Stop()
		dsn = pg.DSN
	} else if u, err := url.Parse(dsn); err == nil {
		where = "the PostgreSQL at " + u.Host // never the password
	}
	fmt.Fprintf(stdout, "\nCA on a cluster: %d messages per run, %s, %d CPUs\n\n", n, where, runtime.NumCPU())
	results, err := bench.RunCluster(context.Background(), dsn, bench.Options{Conns: conns, Messages: n, Corpus: msgs, Rounds: rounds})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail bench: cluster:", err)
		return 1
	}
	bench.Print(stdout, results)
	fmt.Fprintf(stdout, "\ntargets: p99 at 1 connection within 1.5x the baseline; %d connections on each of %d nodes at least 3x\n",
		16, bench.ClusterNodes)
	fmt.Fprintln(stdout, "the baseline's rate with as many connections in all (the median over the rounds)")
	for _, c := range conns {
		switch c {
		case 1:
			r := bench.MedianRatio(results, 1, func(r bench.Result) float64 { return float64(r.P99) })
			fmt.Fprintf(stdout, "  p99 at 1 connection: %.2fx the baseline: %s\n", r, verdict(r <= 1.5))
		case 16:
			r := bench.MedianRatio(results, 16*bench.ClusterNodes, func(r bench.Result) float64 { return r.PerSecond })
			fmt.Fprintf(stdout, "  rate, 16 connections on each of %d nodes: %.2fx the baseline: %s\n", bench.ClusterNodes, r, verdict(r >= 3))
		}
	}
	return 0
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func runBenchLoad(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("bench load", "-addr HOST:PORT[,HOST:PORT...] [flags]", `
Sends the HL7 sample corpus, each message with a control ID of its own
(PREFIX-n), over several connections to one or more running surrogates, as
a router does: one message at a time per connection; when a connection
breaks, an answer does not come, or it is CE, it connects again and sends
the same message again, until CA or CR. Prints a table; -record writes the
control ID of every message that got CA, one per line, as it arrives (what
the fault tests compare with what reached the far router).`, stderr)
	addrs := fs.String("addr", "", "surrogate addresses, comma-separated (required)")
	conns := fs.Int("conns", 2, "connections to each address")
	n := fs.Int("n", 1013, "messages to send")
	prefix := fs.String("prefix", "", "control ID prefix (default: L and the time)")
	recordPath := fs.String("record", "", "append each CA'd control ID to `file`")
	giveUp := fs.Duration("give-up", 2*time.Minute, "how long to keep trying one message")
	rate := fs.Float64("rate", 0, "new messages per second in all (0: as fast as the answers come)")
	corpusPath := fs.String("corpus", "", "HL7 messages `file` (default: the shared test corpus)")
	failover := fs.Bool("failover", false, "a connection that breaks goes on at the next address (a router's failover list)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *addrs == "" {
		fmt.Fprintln(stderr, "hl7mail bench load: -addr is required")
		return 2
	}
	msgs, err := loadCorpus(*corpusPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail bench load:", err)
		return 1
	}
	if *prefix == "" {
		*prefix = fmt.Sprintf("L%x", time.Now().UnixMilli())
	}
	o := bench.LoadOptions{Conns: *conns, Messages: bench.Unique(msgs, *n, *prefix), GiveUp: *giveUp, Rate: *rate, Failover: *failover}
	for _, a := range strings.Split(*addrs, ",") {
		o.Addrs = append(o.Addrs, strings.TrimSpace(a))
	}
	if *recordPath != "" {
		f, err := os.OpenFile(*recordPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail bench load:", err)
			return 1
		}
		defer f.Close()
		o.Record = f
	}
	r, err := bench.Load(context.Background(), o)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail bench load:", err)
		return 1
	}
	bench.PrintLoad(stdout, r)
	if r.Failed > 0 {
		return 1
	}
	return 0
}

// loadCorpus reads the HL7 messages of path, or the shared test corpus.
func loadCorpus(path string) ([][]byte, error) {
	if path != "" {
		return corpus.Load(path)
	}
	return corpus.Default()
}
