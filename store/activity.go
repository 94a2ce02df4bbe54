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
	n := steps(since, now, step)
	out := map[string]*Activity{}
	get := func(partner string) *Activity {
		a := out[partner]
		if a == nil {
			a = NewActivity(since, now, step)
			out[partner] = a
		}
		return a
	}
	slot := func(t int64) int { return min(int(time.UnixMicro(t).Sub(since)/step), n-1) }
	lo, hi, stepMicros := since.UnixMicro(), now.UnixMicro(), step.Microseconds()
	// endsFrom is the first step that ends at or after t: a message
	// received at r and gone at l waits at the end of the steps
	// [endsFrom(r), endsFrom(l)).
	endsFrom := func(t int64) int { return min(max(int((t-lo+stepMicros-1)/stepMicros)-1, 0), n) }
	// The queues' changes, step by step, summed up below.
	deltaOut, deltaIn := map[string][]int{}, map[string][]int{}
	// Messages that were taken, or waited, in the window (a message
	// received in it changed in it too: updated >= received). A message
	// leaves its queue when it is submitted (the receipt's sent time, or
	// its last change when none is awaited), delivered, failed or expired.
	rows, err := s.db.QueryContext(ctx, `SELECT m.partner, m.direction, m.state, m.received, m.updated,
		COALESCE(p.sent, 0), COALESCE(p.updated, 0), COALESCE(p.state, '')
		FROM messages m LEFT JOIN pending p ON p.id = m.id
		WHERE m.state != 'duplicate' AND (m.updated >= ? OR m.state = 'queued')`, lo)
	if err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	latencies := map[string]map[int][]float64{}
	for rows.Next() {
		var partner string
		var dir Direction
		var state State
		var received, updated, sent, matched int64
		var pstate string
		if err := rows.Scan(&partner, &dir, &state, &received, &updated, &sent, &matched, &pstate); err != nil {
			rows.Close()
			return nil, fmt.Errorf("store: activity: %w", err)
		}
		a := get(partner)
		if received >= lo && received <= hi {
			if dir == Outbound {
				a.Out[slot(received)]++
			} else {
				a.In[slot(received)]++
			}
		}
		from, until := endsFrom(received), n // still waiting
		switch {
		case state == Queued:
		case dir == Outbound && sent != 0:
			until = endsFrom(sent)
		default:
			until = endsFrom(updated)
		}
		deltas := deltaIn
		if dir == Outbound {
			deltas = deltaOut
		}
		if from < until {
			d := deltas[partner]
			if d == nil {
				d = make([]int, n+1)
				deltas[partner] = d
			}
			d[from]++
			d[until]--
		}
		if pstate == PendingMatched && sent >= lo && matched >= sent {
			if latencies[partner] == nil {
				latencies[partner] = map[int][]float64{}
			}
			latencies[partner][slot(sent)] = append(latencies[partner][slot(sent)], time.Duration((matched-sent)*1000).Seconds())
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("store: activity: %w", err)
	}
	for _, q := range []struct {
		deltas map[string][]int
		queue  func(*Activity) []int
	}{{deltaOut, func(a *Activity) []int { return a.QueueOut }}, {deltaIn, func(a *Activity) []int { return a.QueueIn }}} {
		for partner, d := range q.deltas {
			queue, depth := q.queue(get(partner)), 0
			for i := range n {
				depth += d[i]
				queue[i] = depth
			}
		}
	}
	for partner, bySlot := range latencies {
		a := get(partner)
		for i, l := range bySlot {
			if i < 0 || i >= n {
				continue
			}
			slices.Sort(l)
			a.ReceiptP50[i], a.ReceiptP95[i] = quantile(l, 0.5), quantile(l, 0.95)
		}
	}
	alerts, err := s.db.QueryContext(ctx, `SELECT raised, kind, partner FROM alerts WHERE raised >= ? ORDER BY raised`, lo)
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
		a := get(partner)
		a.Alerts = append(a.Alerts, AlertMark{At: time.UnixMicro(raised), Kind: kind})
	}
	return out, alerts.Err()
}

// quantile returns the q-quantile of sorted, by the nearest rank.
func quantile(sorted []float64, q float64) float64 {
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
