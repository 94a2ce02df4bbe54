package bench

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
)

// LoadOptions configure Load.
type LoadOptions struct {
	// Addrs are the surrogates; message i goes to Addrs[i%len(Addrs)].
	Addrs []string
	// Conns is the number of connections to each address (default 2).
	Conns int
	// Messages are sent once each (see Unique), in order per connection.
	Messages [][]byte
	// Record, when set, receives the control ID of each message that got
	// CA, one per line, as it arrives.
	Record io.Writer
	// GiveUp is how long one message is tried, through reconnects and CE
	// answers, before it is counted as failed (default 2m).
	GiveUp time.Duration
	// Rate paces the sending at this many new messages per second in all
	// (0: as fast as the answers come).
	Rate float64
	// Failover makes a connection that breaks, or cannot be made, go on at
	// the next address, as a router with a failover list does (the nodes
	// of a cluster); without it, it waits for its own address.
	Failover bool
}

// LoadResult is what a load run did.
type LoadResult struct {
	Messages   int
	CA         int           // accepted: hl7mail took responsibility
	CR         int           // rejected for good
	Failed     int           // no CA within GiveUp
	Resent     int           // sent again after a broken connection, a timeout or CE
	Reconnects int           // connections made again after one broke
	Elapsed    time.Duration // first send to last answer
	P50, P99   time.Duration // from the send that got CA to the CA
}

// Load sends every message as a router does: over Conns connections to
// each surrogate, one at a time per connection, and when a connection
// breaks or an answer does not come, or comes as CE, it connects again
// and sends the same message again, until CA or CR, or GiveUp. It is the
// load the fault tests run while they kill and stop things.
func Load(ctx context.Context, o LoadOptions) (LoadResult, error) {
	if len(o.Addrs) == 0 {
		return LoadResult{}, fmt.Errorf("bench: no address to load")
	}
	if o.Conns <= 0 {
		o.Conns = 2
	}
	if o.GiveUp == 0 {
		o.GiveUp = 2 * time.Minute
	}
	queues := make([]chan []byte, len(o.Addrs))
	for i := range queues {
		queues[i] = make(chan []byte, len(o.Messages))
	}
	for i, m := range o.Messages {
		queues[i%len(o.Addrs)] <- m
	}
	for _, q := range queues {
		close(q)
	}
	l := &loader{o: o, r: LoadResult{Messages: len(o.Messages)}, due: time.Now()}
	start := time.Now()
	var wg sync.WaitGroup
	for i := range o.Addrs {
		for c := 0; c < o.Conns; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				l.conn(ctx, i, queues[i])
			}()
		}
	}
	wg.Wait()
	l.r.Elapsed = time.Since(start)
	slices.Sort(l.lat)
	if len(l.lat) > 0 {
		l.r.P50, l.r.P99 = percentile(l.lat, 50), percentile(l.lat, 99)
	}
	return l.r, nil
}

// loader is the state one Load run shares between its connections.
type loader struct {
	o   LoadOptions
	mu  sync.Mutex // guards r and lat
	r   LoadResult
	lat []time.Duration

	paceMu sync.Mutex // guards due
	due    time.Time  // when the next new message may go (Rate)
}

func (l *loader) count(f func(r *LoadResult)) {
	l.mu.Lock()
	f(&l.r)
	l.mu.Unlock()
}

// pace waits for the next new message's turn when Rate is set.
func (l *loader) pace() {
	if l.o.Rate <= 0 {
		return
	}
	l.paceMu.Lock()
	wait := time.Until(l.due)
	l.due = l.due.Add(time.Duration(float64(time.Second) / l.o.Rate))
	l.paceMu.Unlock()
	if wait > 0 {
		time.Sleep(wait)
	}
}

// conn sends the messages of queue over one connection to address at,
// one after the other.
func (l *loader) conn(ctx context.Context, at int, queue <-chan []byte) {
	var cl *mllp.Client
	for m := range queue {
		l.pace()
		cl = l.send(ctx, &at, cl, m)
	}
	if cl != nil {
		cl.Close()
	}
}

// send sends m over cl (connecting to address *at when nil) until it is
// answered CA or CR, or GiveUp passes; it returns the connection to go on
// with.
func (l *loader) send(ctx context.Context, at *int, cl *mllp.Client, m []byte) *mllp.Client {
	next := func() {
		if l.o.Failover {
			*at = (*at + 1) % len(l.o.Addrs)
		}
	}
	h, _ := hl7.ParseHeader(m)
	deadline := time.Now().Add(l.o.GiveUp)
	for tries := 0; ; tries++ {
		if ctx.Err() != nil || time.Now().After(deadline) {
			l.count(func(r *LoadResult) { r.Failed++ })
			return cl
		}
		if tries > 0 {
			l.count(func(r *LoadResult) { r.Resent++ })
		}
		if cl == nil {
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			c, err := mllp.Dial(dctx, l.o.Addrs[*at])
			cancel()
			if err != nil {
				next()
				time.Sleep(100 * time.Millisecond)
				continue
			}
			cl = c
			if tries > 0 {
				l.count(func(r *LoadResult) { r.Reconnects++ })
			}
		}
		sent := time.Now()
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		reply, err := cl.Send(sctx, m)
		cancel()
		a, perr := hl7.ParseAck(reply)
		if err != nil || perr != nil || a.ControlID != h.ControlID {
			cl.Close()
			cl = nil
			next()
			continue
		}
		if a.Code == hl7.CommitError || a.Code == hl7.ApplicationError {
			time.Sleep(200 * time.Millisecond) // "send it again later"
			continue
		}
		l.mu.Lock()
		if a.Accepted() {
			l.r.CA++
			l.lat = append(l.lat, time.Since(sent))
			if l.o.Record != nil {
				fmt.Fprintln(l.o.Record, h.ControlID)
			}
		} else {
			l.r.CR++
		}
		l.mu.Unlock()
		return cl
	}
}

// PrintLoad writes a load result as a table.
func PrintLoad(w io.Writer, r LoadResult) {
	fmt.Fprintf(w, "%-10s %6s %6s %6s %7s %11s %9s %10s %9s %9s\n", "messages", "CA", "CR", "failed", "resent",
		"reconnects", "elapsed", "msgs/s", "CA p50", "CA p99")
	rate := float64(r.CA) / r.Elapsed.Seconds()
	fmt.Fprintf(w, "%-10d %6d %6d %6d %7d %11d %9s %10.0f %9s %9s\n", r.Messages, r.CA, r.CR, r.Failed, r.Resent,
		r.Reconnects, r.Elapsed.Round(time.Millisecond), rate, r.P50.Round(10*time.Microsecond), r.P99.Round(10*time.Microsecond))
}
