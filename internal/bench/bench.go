// Package bench measures how fast a surrogate answers CA, beside a baseline
// measured in the same run: a bare MLLP server that appends each message to
// a file and fsyncs it before answering. The ratio between the two is what
// the store and the surrogate cost on top of the unavoidable fsync.
//
// It also times how fast a queue of mail drains into an SMTP sink
// (Outbound), beside sealing alone on every core.
//
// It imports, of this module, only config, gateway, hl7, internal/corpus,
// internal/demo, internal/embedded, mllp, pgstore, security, store,
// surrogate.
package bench

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// Result is one measured run.
type Result struct {
	Server     string
	Conns      int
	Messages   int
	Elapsed    time.Duration
	P50, P99   time.Duration
	PerCommit  float64 // messages per fsync
	PerSecond  float64
	Unexpected int // answers other than CA
	Round      int // which of Options.Rounds
}

// Drive sends n messages (cycling through msgs) to addr over conns
// connections, each waiting for the answer before sending the next, and
// measures every round trip.
func Drive(ctx context.Context, addr string, conns, n int, msgs [][]byte) (Result, error) {
	all, bad, elapsed, err := drive(ctx, addr, conns, n, msgs)
	if err != nil {
		return Result{}, err
	}
	return summarize(conns, all, bad, elapsed), nil
}

// summarize makes a Result of round-trip times.
func summarize(conns int, all []time.Duration, bad int, elapsed time.Duration) Result {
	all = slices.Clone(all)
	slices.Sort(all)
	return Result{Conns: conns, Messages: len(all), Elapsed: elapsed, Unexpected: bad,
		P50: percentile(all, 50), P99: percentile(all, 99), PerSecond: float64(len(all)) / elapsed.Seconds()}
}

// percentile returns the p-th percentile of sorted, which is not empty.
func percentile(sorted []time.Duration, p int) time.Duration {
	return sorted[min(len(sorted)-1, len(sorted)*p/100)]
}

// median is the middle of xs (the upper one of two).
func median[T cmp.Ordered](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// onEveryCore runs f on every core at once for d, each call with the next
// number of one count, and returns the calls a second; it stops at the
// first error.
func onEveryCore(d time.Duration, f func(i int) error) (float64, error) {
	var next, done atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(d)
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) && firstErr.Load() == nil {
				if err := f(int(next.Add(1) - 1)); err != nil {
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

// drive is Drive returning every round-trip time.
func drive(ctx context.Context, addr string, conns, n int, msgs [][]byte) ([]time.Duration, int, time.Duration, error) {
	lat := make([][]time.Duration, conns)
	bad := make([]int, conns)
	errs := make(chan error, conns)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := mllp.Dial(ctx, addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for i := w; i < n; i += conns {
				t0 := time.Now()
				reply, err := c.Send(ctx, msgs[i%len(msgs)])
				if err != nil {
					errs <- err
					return
				}
				lat[w] = append(lat[w], time.Since(t0))
				if !isCA(reply) {
					bad[w]++
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return nil, 0, 0, err
	}
	nbad := 0
	for _, b := range bad {
		nbad += b
	}
	return slices.Concat(lat...), nbad, elapsed, nil
}

func isCA(reply []byte) bool {
	r, err := hl7.ParseAck(reply)
	return err == nil && r.Code == hl7.CommitAccept
}

// Baseline is a bare MLLP server that appends each message to one file and
// fsyncs it before answering CA: the floor that any durable acknowledgement
// pays.
type Baseline struct {
	ln    net.Listener
	srv   mllp.Server
	f     *os.File
	mu    sync.Mutex
	ids   *hl7.IDGen
	syncs int
}

// StartBaseline starts a baseline server writing to a file in dir.
func StartBaseline(dir string) (*Baseline, error) {
	f, err := os.OpenFile(filepath.Join(dir, "baseline.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Close()
		return nil, err
	}
	b := &Baseline{ln: ln, f: f, ids: hl7.NewIDGen("BL", time.Now())}
	b.srv.Handler = mllp.HandlerFunc(b.serveConn)
	go b.srv.Serve(ln)
	return b, nil
}

// Addr is the listening address.
func (b *Baseline) Addr() string { return b.ln.Addr().String() }

// serveConn answers each message CA once it is appended and synced, CE
// when it could not be.
func (b *Baseline) serveConn(_ context.Context, nc net.Conn) {
	serveDurable(nc, b.ids, func(frame []byte) error {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.syncs++
		if _, err := b.f.Write(frame); err != nil {
			return err
		}
		return b.f.Sync()
	})
}

// serveDurable is a baseline's connection: each message is made durable
// by keep, then answered CA, or CE when keep failed.
func serveDurable(nc net.Conn, ids *hl7.IDGen, keep func(frame []byte) error) {
	rd := mllp.NewReader(nc, 0)
	for {
		frame, err := rd.ReadFrame()
		if err != nil {
			return
		}
		h, _ := hl7.ParseHeader(frame)
		code := hl7.CommitAccept
		if keep(frame) != nil {
			code = hl7.CommitError
		}
		if mllp.WriteFrame(nc, hl7.BuildAck(h, hl7.Ack{Code: code, ControlID: ids.Next()})) != nil {
			return
		}
	}
}

// Close stops the server.
func (b *Baseline) Close() error {
	b.srv.Close()
	b.srv.Wait()
	return b.f.Close()
}

// Surrogate is an in-process hl7mail surrogate with its own store.
type Surrogate struct {
	Store *store.Store
	srv   *surrogate.Server
	ln    net.Listener
	done  chan error
}

// StartSurrogate starts a surrogate whose store lives in dir. Its records
// are encoded as in production (JSON) and discarded.
func StartSurrogate(dir string) (*Surrogate, error) {
	log := slog.New(slog.NewJSONHandler(io.Discard, nil))
	st, err := store.Open(store.Options{Dir: dir, Logger: log})
	if err != nil {
		return nil, err
	}
	srv, err := surrogate.New(surrogate.Options{Partner: "bench", Spool: st, Logger: log, MaxConnections: 64})
	if err != nil {
		st.Close()
		return nil, err
	}
	ln, err := surrogate.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		st.Close()
		return nil, err
	}
	s := &Surrogate{Store: st, srv: srv, ln: ln, done: make(chan error, 1)}
	go func() { s.done <- srv.Serve(ln) }()
	return s, nil
}

// Addr is the listening address.
func (s *Surrogate) Addr() string { return s.ln.Addr().String() }

// Close shuts the surrogate down and closes its store.
func (s *Surrogate) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if serr := <-s.done; !errors.Is(serr, surrogate.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return errors.Join(err, s.Store.Close())
}

// Options configure Run.
type Options struct {
	Conns    []int    // connection counts to measure (default 1 and 16)
	Messages int      // messages per measured run (default 20000)
	Warmup   int      // messages sent before measuring (default 200)
	Dir      string   // scratch folder on the disk to measure (required)
	Corpus   [][]byte // messages to send (required)
	// Rounds is how many baseline/hl7mail pairs are measured at each
	// connection count (default 5): a passing disturbance of the machine
	// then shows in one pair, not in the median.
	Rounds int
}

// Run measures the baseline and hl7mail at each connection count, one after
// the other so that they share the machine fairly, and returns the results
// in pairs: baseline, hl7mail.
func Run(ctx context.Context, opts Options) ([]Result, error) {
	if len(opts.Conns) == 0 {
		opts.Conns = []int{1, 16}
	}
	if opts.Messages <= 0 {
		opts.Messages = 20000
	}
	if opts.Warmup <= 0 {
		opts.Warmup = 200
	}
	if opts.Rounds <= 0 {
		opts.Rounds = 5
	}
	var out []Result
	for i, conns := range opts.Conns {
		for round := 1; round <= opts.Rounds; round++ {
			pair, err := runPair(ctx, opts, filepath.Join(opts.Dir, fmt.Sprintf("%d-%d", i, round)), conns)
			if err != nil {
				return nil, err
			}
			for j := range pair {
				pair[j].Round = round
			}
			out = append(out, pair...)
		}
	}
	return out, nil
}

// MedianRatio returns, over the pairs of results at conns, the median of
// f(hl7mail)/f(baseline).
func MedianRatio(results []Result, conns int, f func(Result) float64) float64 {
	var ratios []float64
	for i := 1; i < len(results); i += 2 {
		if b, h := results[i-1], results[i]; h.Conns == conns && f(b) > 0 {
			ratios = append(ratios, f(h)/f(b))
		}
	}
	if len(ratios) == 0 {
		return 0
	}
	return median(ratios)
}

// Chunks is how many slices each measured run is cut into: the baseline
// and hl7mail take turns slice by slice, so that both meet the same
// weather of a shared disk. A slice at one connection lasts seconds, many
// times the store's ingest interval, so that nearly all of hl7mail's
// database work overlaps its own measured slice.
const Chunks = 5

// runPair measures the baseline and hl7mail at conns, taking turns.
func runPair(ctx context.Context, opts Options, dir string, conns int) ([]Result, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	base, err := StartBaseline(dir)
	if err != nil {
		return nil, err
	}
	defer base.Close()
	sur, err := StartSurrogate(filepath.Join(dir, "store"))
	if err != nil {
		return nil, err
	}
	defer sur.Close()
	run := time.Now().UnixNano()
	for _, addr := range []string{base.Addr(), sur.Addr()} {
		if _, err := Drive(ctx, addr, conns, opts.Warmup, Unique(opts.Corpus, opts.Warmup, fmt.Sprintf("W%x", run))); err != nil {
			return nil, err
		}
	}
	msgs := Unique(opts.Corpus, opts.Messages, fmt.Sprintf("M%x", run))
	per := max(opts.Messages/Chunks, conns)
	var lat [2][]time.Duration
	var bad [2]int
	var elapsed [2]time.Duration
	before := sur.Store.Stats()
	for off := 0; off < len(msgs); off += per {
		chunk := msgs[off:min(off+per, len(msgs))]
		for k, addr := range []string{base.Addr(), sur.Addr()} {
			l, b, e, err := drive(ctx, addr, conns, len(chunk), chunk)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", []string{"baseline", "hl7mail"}[k], err)
			}
			lat[k], bad[k], elapsed[k] = append(lat[k], l...), bad[k]+b, elapsed[k]+e
		}
		// hl7mail's database work for its slice is done before the
		// baseline's next slice, which would otherwise bear it.
		if err := sur.Store.Flush(ctx); err != nil {
			return nil, err
		}
	}
	after := sur.Store.Stats()
	b := summarize(conns, lat[0], bad[0], elapsed[0])
	b.Server, b.PerCommit = "baseline (fsync each)", 1
	h := summarize(conns, lat[1], bad[1], elapsed[1])
	h.Server = "hl7mail surrogate"
	if c := after.Commits - before.Commits; c > 0 {
		h.PerCommit = float64(after.Messages-before.Messages) / float64(c)
	}
	return []Result{b, h}, nil
}

// Unique returns n messages taken in turn from msgs, each with the control
// ID (MSH-10) prefix-i.
func Unique(msgs [][]byte, n int, prefix string) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = withControlID(msgs[i%len(msgs)], fmt.Sprintf("%s-%d", prefix, i))
	}
	return out
}

func withControlID(m []byte, id string) []byte {
	h, err := hl7.ParseHeader(m)
	if err != nil {
		return m
	}
	end := bytes.IndexByte(m, '\r')
	if end < 0 {
		end = len(m)
	}
	fs := []byte{h.Delims.Field}
	fields := bytes.Split(m[:end], fs)
	if len(fields) < 10 {
		return m
	}
	fields[9] = []byte(id)
	return append(bytes.Join(fields, fs), m[end:]...)
}

// Print writes results as a table with each hl7mail figure as a ratio to
// the baseline measured just before it, and the targets.
func Print(w io.Writer, results []Result) {
	fmt.Fprintf(w, "%-22s %5s %7s %9s %9s %9s %10s %10s %11s\n",
		"server", "conns", "msgs", "msgs/s", "p50", "p99", "p99/base", "rate/base", "msgs/fsync")
	var base Result
	for _, r := range results {
		p99r, rater := "", ""
		if !strings.HasPrefix(r.Server, "baseline") && base.Conns == r.Conns {
			p99r = fmt.Sprintf("%.2fx", float64(r.P99)/float64(base.P99))
			rater = fmt.Sprintf("%.2fx", r.PerSecond/base.PerSecond)
		} else {
			base = r
		}
		fmt.Fprintf(w, "%-22s %5d %7d %9.0f %9s %9s %10s %10s %11.1f\n", r.Server, r.Conns, r.Messages, r.PerSecond,
			r.P50.Round(time.Microsecond), r.P99.Round(time.Microsecond), p99r, rater, r.PerCommit)
		if r.Unexpected > 0 {
			fmt.Fprintf(w, "  warning: %d answers were not CA\n", r.Unexpected)
		}
	}
}
