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
	var mu sync.Mutex
	r := LoadResult{Messages: len(o.Messages)}
	var lat []time.Duration
	record := func(id string) {
		if o.Record != nil {
			fmt.Fprintln(o.Record, id)
		}
	}
	start := time.Now()
	var next sync.Mutex // paces new messages when Rate is set
	due := start
	pace := func() {
		if o.Rate <= 0 {
			return
		}
		next.Lock()
		wait := time.Until(due)
		due = due.Add(time.Duration(float64(time.Second) / o.Rate))
		next.Unlock()
		if wait > 0 {
			time.Sleep(wait)
		}
	}
	var wg sync.WaitGroup
	for i, addr := range o.Addrs {
		for c := 0; c < o.Conns; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var cl *mllp.Client
				defer func() {
					if cl != nil {
						cl.Close()
					}
				}()
				for m := range queues[i] {
					pace()
					h, _ := hl7.ParseHeader(m)
					deadline := time.Now().Add(o.GiveUp)
					for tries := 0; ; tries++ {
						if ctx.Err() != nil || time.Now().After(deadline) {
							mu.Lock()
							r.Failed++
							mu.Unlock()
							break
						}
						if tries > 0 {
							mu.Lock()
							r.Resent++
							mu.Unlock()
						}
						if cl == nil {
							var err error
							dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
							cl, err = mllp.Dial(dctx, addr)
							cancel()
							if err != nil {
								cl = nil
								time.Sleep(100 * time.Millisecond)
								continue
							}
							if tries > 0 {
								mu.Lock()
								r.Reconnects++
								mu.Unlock()
							}
						}
						sent := time.Now()
						sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
						reply, err := cl.Send(sctx, m)
						cancel()
						if err != nil {
							cl.Close()
							cl = nil
							continue
						}
						a, err := hl7.ParseAck(reply)
						if err != nil || a.ControlID != h.ControlID {
							cl.Close()
							cl = nil
							continue
						}
						if a.Code == hl7.CommitError || a.Code == hl7.ApplicationError {
							time.Sleep(200 * time.Millisecond) // "send it again later"
							continue
						}
						mu.Lock()
						if a.Accepted() {
							r.CA++
							lat = append(lat, time.Since(sent))
							record(h.ControlID)
						} else {
							r.CR++
						}
						mu.Unlock()
						break
					}
				}
			}()
		}
	}
	wg.Wait()
	r.Elapsed = time.Since(start)
	slices.Sort(lat)
	if len(lat) > 0 {
		r.P50 = lat[len(lat)/2]
		r.P99 = lat[min(len(lat)-1, len(lat)*99/100)]
	}
	return r, nil
}

// PrintLoad writes a load result as a table.
func PrintLoad(w io.Writer, r LoadResult) {
	fmt.Fprintf(w, "%-10s %6s %6s %6s %7s %11s %9s %10s %9s %9s\n", "messages", "CA", "CR", "failed", "resent",
		"reconnects", "elapsed", "msgs/s", "CA p50", "CA p99")
	rate := float64(r.CA) / r.Elapsed.Seconds()
	fmt.Fprintf(w, "%-10d %6d %6d %6d %7d %11d %9s %10.0f %9s %9s\n", r.Messages, r.CA, r.CR, r.Failed, r.Resent,
		r.Reconnects, r.Elapsed.Round(time.Millisecond), rate, r.P50.Round(10*time.Microsecond), r.P99.Round(10*time.Microsecond))
}
