package store

import (
	"context"
	"testing"
	"time"
)

// TestActivity: the messages taken, the receipt times and the queues'
// depths of the last hour, per partner, with the alerts raised; a
// duplicate is not counted.
func TestActivity(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	var ids []int64
	for _, id := range []string{"o1", "o2", "o3"} {
		a, err := s.Accept(ctx, msg("lab", id, id))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, a.ID)
	}
	s.Accept(ctx, msg("lab", "o1", "o1")) // a resend: a duplicate
	in, _ := s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "lab", ControlID: "i1", Payload: []byte("i1")})
	s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "lab", ControlID: "i2", Payload: []byte("i2")})
	sent := time.Now()
	if err := s.Prepare(ctx, ids[0], "<o1@h>", &Pending{Partner: "lab", ControlID: "o1", MIC: "m", Sent: sent, Due: sent.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkSent(ctx, ids[0]); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if _, err := s.SetReceipt(ctx, "<o1@h>", PendingMatched, MatchByMessageID, false); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDelivered(ctx, in.ID, nil); err != nil {
		t.Fatal(err)
	}
	s.RaiseAlert(ctx, Alert{Kind: AlertOverdue, Partner: "lab", Text: "receipt overdue"})
	now := time.Now()
	acts, err := s.Activity(ctx, now.Add(-time.Hour), now, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	a := acts["lab"]
	if a == nil || len(a.Out) != 12 {
		t.Fatalf("activity = %+v", acts)
	}
	sum := func(v []int) (n int) {
		for _, x := range v {
			n += x
		}
		return n
	}
	last := len(a.Out) - 1
	if sum(a.Out) != 3 || sum(a.In) != 2 || a.Out[last] != 3 {
		t.Errorf("taken: out %v, in %v; want 3 and 2, in the last step", a.Out, a.In)
	}
	if a.QueueOut[last] != 2 || a.QueueIn[last] != 1 || a.QueueOut[0] != 0 {
		t.Errorf("queues at the end: out %d, in %d (first step %d); want 2, 1, 0", a.QueueOut[last], a.QueueIn[last], a.QueueOut[0])
	}
	if p := a.ReceiptP50[last]; p < 0.01 || p > 60 || a.ReceiptP95[last] < p || a.ReceiptP50[0] != -1 {
		t.Errorf("receipt time: p50 %v, p95 %v (first step %v)", p, a.ReceiptP95[last], a.ReceiptP50[0])
	}
	if len(a.Alerts) != 1 || a.Alerts[0].Kind != AlertOverdue {
		t.Errorf("alerts %+v", a.Alerts)
	}
}
