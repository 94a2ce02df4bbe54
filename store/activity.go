package store

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// Activity is one partner's traffic over a window, step by step, from the
// store (so it survives a restart): what the dashboard's charts draw.
type Activity struct {
	Start time.Time     `json:"start"`
	Step  time.Duration `json:"step_ns"`
	// Out and In are the messages taken in each step (by when received;
	// duplicates not counted).
	Out []int `json:"out"`
	In  []int `json:"in"`
	// ReceiptP50 and ReceiptP95 are, in seconds, the median and 95th
	// percentile time from submission to the matched receipt of the mail
	// sent in each step; -1 where no receipt of that step matched.
	ReceiptP50 []float64 `json:"receipt_p50"`
	ReceiptP95 []float64 `json:"receipt_p95"`
	// QueueOut and QueueIn are the messages waiting at the end of each
	// step: to be mailed, to be delivered to the router.
	QueueOut []int `json:"queue_out"`
	QueueIn  []int `json:"queue_in"`
	// Alerts are the alerts raised in the window for this partner.
	Alerts []AlertMark `json:"alerts"`
}

// AlertMark is an alert on the charts' time axis.
type AlertMark struct {
	At   time.Time `json:"at"`
	Kind string    `json:"kind"`
}

// NewActivity is the activity of a partner without traffic, from since to
// now in steps of step (the last one ends at now).
func NewActivity(since, now time.Time, step time.Duration) *Activity {
	n := steps(since, now, step)
	a := &Activity{Start: since, Step: step, Out: make([]int, n), In: make([]int, n),
		ReceiptP50: make([]float64, n), ReceiptP95: make([]float64, n), QueueOut: make([]int, n),
		QueueIn: make([]int, n), Alerts: []AlertMark{}}
	for i := range n {
		a.ReceiptP50[i], a.ReceiptP95[i] = -1, -1
	}
	return a
}

func steps(since, now time.Time, step time.Duration) int {
	return int((now.Sub(since) + step - 1) / step)
}

// Activity returns, for each partner with traffic or alerts, its activity
// from since to now in steps of step; partner "" holds the alerts of no
// partner (a mail server down, say).
func (s *Store) Activity(ctx context.Context, since, now time.Time, step time.Duration) (map[string]*Activity, error) {
	if err := s.waitIngested(ctx); err != nil {
		return nil, err
	}
	b := NewActivityBuilder(since, now, step)
	// Messages that were taken, or waited, in the window (a message
	// still queued may have been received long before it).
	rows, err := s.db.QueryContext(ctx, `SELECT m.partner, m.direction, m.state, m.received, m.updated,
		COALESCE(p.sent, 0), COALESCE(p.updated, 0), COALESCE(p.state, '')
		FROM messages m LEFT JOIN pending p ON p.id = m.id
		WHERE m.state != 'duplicate' AND (m.updated >= ? OR m.state = 'queued')`, since.UnixMicro())
	if err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	for rows.Next() {
		var r ActivityRow
		if err := rows.Scan(&r.Partner, &r.Direction, &r.State, &r.Received, &r.Updated, &r.Sent, &r.Matched,
			&r.PendingState); err != nil {
			rows.Close()
			return nil, fmt.Errorf("store: activity: %w", err)
		}
		b.Message(r)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	alerts, err := s.db.QueryContext(ctx, `SELECT raised, kind, partner FROM alerts WHERE raised >= ? ORDER BY raised`,
		since.UnixMicro())
	if err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	defer alerts.Close()
	for alerts.Next() {
		var raised int64
		var kind, partner string
		if err := alerts.Scan(&raised, &kind, &partner); err != nil {
			return nil, fmt.Errorf("store: activity: %w", err)
		}
		b.Alert(time.UnixMicro(raised), kind, partner)
	}
	if err := alerts.Err(); err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	return b.Result(), nil
}

// ActivityRow is one message as an ActivityBuilder counts it: times are
// Unix microseconds, Sent and Matched those of its receipt awaited (0
// without one), PendingState that receipt's state.
type ActivityRow struct {
	Partner                          string
	Direction                        Direction
	State                            State
	Received, Updated, Sent, Matched int64
	PendingState                     string
}

// ActivityBuilder adds up partners' activity from a store's rows, so that
// every store draws the same charts: the messages that were taken, or
// waited, since the window's start (Message), then the alerts raised in it
// (Alert), then Result.
type ActivityBuilder struct {
	since, now         time.Time
	step               time.Duration
	n                  int
	lo, hi, stepMicros int64
	out                map[string]*Activity
	// The queues' changes, step by step, summed up in Result.
	deltaOut, deltaIn map[string][]int
	latencies         map[string]map[int][]float64
}

// NewActivityBuilder starts the activity from since to now in steps of
// step.
func NewActivityBuilder(since, now time.Time, step time.Duration) *ActivityBuilder {
	return &ActivityBuilder{since: since, now: now, step: step, n: steps(since, now, step), lo: since.UnixMicro(),
		hi: now.UnixMicro(), stepMicros: step.Microseconds(), out: map[string]*Activity{},
		deltaOut: map[string][]int{}, deltaIn: map[string][]int{}, latencies: map[string]map[int][]float64{}}
}

func (b *ActivityBuilder) get(partner string) *Activity {
	a := b.out[partner]
	if a == nil {
		a = NewActivity(b.since, b.now, b.step)
		b.out[partner] = a
	}
	return a
}

func (b *ActivityBuilder) slot(t int64) int {
	return min(int(time.UnixMicro(t).Sub(b.since)/b.step), b.n-1)
}

// endsFrom is the first step that ends at or after t: a message received
// at r and gone at l waits at the end of the steps [endsFrom(r),
// endsFrom(l)).
func (b *ActivityBuilder) endsFrom(t int64) int {
	return min(max(int((t-b.lo+b.stepMicros-1)/b.stepMicros)-1, 0), b.n)
}

// Message counts one message.
func (b *ActivityBuilder) Message(r ActivityRow) {
	a := b.get(r.Partner)
	if r.Received >= b.lo && r.Received <= b.hi {
		if r.Direction == Outbound {
			a.Out[b.slot(r.Received)]++
		} else {
			a.In[b.slot(r.Received)]++
		}
	}
	// Waiting from its receipt until it was sent (outbound) or
	// delivered, failed or expired (its last change).
	from, until := b.endsFrom(r.Received), b.n // still waiting
	switch {
	case r.State == Queued:
	case r.Direction == Outbound && r.Sent != 0:
		until = b.endsFrom(r.Sent)
	default:
		until = b.endsFrom(r.Updated)
	}
	deltas := b.deltaIn
	if r.Direction == Outbound {
		deltas = b.deltaOut
	}
	if from < until {
		d := deltas[r.Partner]
		if d == nil {
			d = make([]int, b.n+1)
			deltas[r.Partner] = d
		}
		d[from]++
		d[until]--
	}
	if r.PendingState == PendingMatched && r.Sent >= b.lo && r.Matched >= r.Sent {
		if b.latencies[r.Partner] == nil {
			b.latencies[r.Partner] = map[int][]float64{}
		}
		i := b.slot(r.Sent)
		b.latencies[r.Partner][i] = append(b.latencies[r.Partner][i], time.Duration((r.Matched-r.Sent)*1000).Seconds())
	}
}

// Alert marks an alert raised at at.
func (b *ActivityBuilder) Alert(at time.Time, kind, partner string) {
	a := b.get(partner)
	a.Alerts = append(a.Alerts, AlertMark{At: at, Kind: kind})
}

// Result is the activity of each partner with traffic or alerts.
func (b *ActivityBuilder) Result() map[string]*Activity {
	for _, q := range []struct {
		deltas map[string][]int
		queue  func(*Activity) []int
	}{{b.deltaOut, func(a *Activity) []int { return a.QueueOut }}, {b.deltaIn, func(a *Activity) []int { return a.QueueIn }}} {
		for partner, d := range q.deltas {
			queue, depth := q.queue(b.get(partner)), 0
			for i := range b.n {
				depth += d[i]
				queue[i] = depth
			}
		}
	}
	for partner, bySlot := range b.latencies {
		a := b.get(partner)
		for i, l := range bySlot {
			if i < 0 || i >= b.n {
				continue
			}
			slices.Sort(l)
			a.ReceiptP50[i], a.ReceiptP95[i] = quantile(l, 0.5), quantile(l, 0.95)
		}
	}
	return b.out
}

// quantile returns the q-quantile of sorted, by the nearest rank.
func quantile(sorted []float64, q float64) float64 {
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
