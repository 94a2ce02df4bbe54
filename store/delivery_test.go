package store

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/testlog"
)

func TestDeliveryStates(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	ctx := context.Background()
	now := time.Now()
	announced := make(chan string, 10)
	s.OnIngest(func(partner string, d Direction) { announced <- partner + "/" + string(d) })
	a, _ := s.Accept(ctx, msg("lab", "1", "A"))
	b, _ := s.Accept(ctx, msg("lab", "2", "B"))
	c, _ := s.Accept(ctx, msg("clinic", "3", "C"))
	// The queues read the database: they learn from OnIngest when the
	// messages are in, each partner and direction once per ingest.
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	told := map[string]int{}
	for len(told) < 2 {
		select {
		case k := <-announced:
			told[k]++
		case <-time.After(10 * time.Second):
			t.Fatalf("OnIngest told of %v, want lab/out and clinic/out", told)
		}
	}
	if told["lab/out"] == 0 || told["clinic/out"] == 0 || told["lab/out"] > 2 {
		t.Errorf("OnIngest told of %v", told)
	}

	if m, err := s.NextQueued(ctx, "lab", Outbound, now); err != nil || m.ID != a.ID || string(m.Payload) != "A" {
		t.Fatalf("NextQueued(lab) = %+v, %v; want %d", m, err, a.ID)
	}
	// A retry later holds back the partner's queue, in order.
	if err := s.MarkRetry(ctx, a.ID, "451 try later", now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.NextQueued(ctx, "lab", Outbound, now); !errors.Is(err, ErrNotFound) {
		t.Errorf("NextQueued during a retry wait = %v, want ErrNotFound", err)
	}
	if m, err := s.NextQueued(ctx, "lab", Outbound, now.Add(2*time.Minute)); err != nil || m.ID != a.ID {
		t.Errorf("NextQueued after the wait = %+v, %v", m, err)
	}
	if m, err := s.NextQueued(ctx, "clinic", Outbound, now); err != nil || m.ID != c.ID {
		t.Errorf("other partners go on: %+v, %v", m, err)
	}
	p := Pending{MessageID: "<1@hospital.test>", Partner: "lab", ControlID: "1", MIC: "abc=, sha-256", Sent: now, Due: now.Add(time.Hour)}
	for i := 0; i < 2; i++ { // a second attempt prepares again: no change
		if err := s.Prepare(ctx, a.ID, p.MessageID, &p); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.MarkSent(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	pb := Pending{MessageID: "<2@hospital.test>", Partner: "lab", ControlID: "2", MIC: "x", Sent: now, Due: now}
	if err := s.Prepare(ctx, b.ID, pb.MessageID, &pb); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.NextQueued(ctx, "lab", Outbound, now); m.ID != b.ID {
		t.Errorf("after sending a, NextQueued = %d, want %d", m.ID, b.ID)
	}
	if err := s.MarkFinal(ctx, b.ID, Failed, "550 no such user"); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkFinal(ctx, b.ID, Queued, "x"); err == nil {
		t.Error("MarkFinal(queued) accepted")
	}
	if err := s.MarkRetry(ctx, 999, "x", now); !errors.Is(err, ErrNotFound) {
		t.Errorf("MarkRetry(999) = %v", err)
	}
	s.Close()

	// All of it survives a reopen.
	s, err := Open(Options{Dir: dir, Logger: testlog.New(t, slog.LevelInfo)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ma, _ := s.Get(ctx, a.ID)
	mb, _ := s.Get(ctx, b.ID)
	if ma.State != Sent || ma.MessageID != "<1@hospital.test>" || mb.State != Failed {
		t.Errorf("after reopen: a %s %s, b %s", ma.State, ma.MessageID, mb.State)
	}
	attempts, _, lastErr, _ := s.Delivery(ctx, b.ID)
	if attempts != 0 || lastErr != "550 no such user" {
		t.Errorf("Delivery(b) = %d %q", attempts, lastErr)
	}
	attempts, _, _, _ = s.Delivery(ctx, a.ID)
	if attempts != 2 {
		t.Errorf("Delivery(a) attempts = %d, want 2 (one retry, one send)", attempts)
	}
	if pb, _ := s.PendingByMessageID(ctx, "<2@hospital.test>"); pb.State != PendingCancelled {
		t.Errorf("pending of the failed message: %s, want cancelled", pb.State)
	}
	got, err := s.PendingByMessageID(ctx, "<1@hospital.test>")
	// The receipt is due mdn_timeout after the submission that went
	// through, not after the first attempt.
	if err != nil || got.ID != a.ID || got.State != PendingWaiting || got.MIC != p.MIC ||
		got.Due.Sub(got.Sent) != p.Due.Sub(p.Sent).Truncate(time.Microsecond) || got.Sent.Before(p.Sent.Truncate(time.Microsecond)) {
		t.Errorf("PendingByMessageID = %+v, %v; want due %s after the submission", got, err, p.Due.Sub(p.Sent))
	}
}

// TestWorkOnOneMessageDoesNotWaitForLater: a state change of a message in
// the database goes ahead while messages accepted after it are not in yet,
// so that the sender never waits for the ingester's pace; a change of a
// message not yet in waits for it.
func TestWorkOnOneMessageDoesNotWaitForLater(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	a, _ := s.Accept(ctx, msg("lab", "1", "A"))
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	s.pauseIngest.Store(true)
	b, err := s.Accept(ctx, msg("lab", "2", "B"))
	if err != nil {
		t.Fatal(err)
	}
	if n := s.Backlog(); n != 1 {
		t.Errorf("Backlog with one message held out of the database = %d, want 1", n)
	}
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.MarkSent(short, a.ID); err != nil {
		t.Fatalf("MarkSent of a message in the database, with a later one not in: %v", err)
	}
	if m, err := s.Get(short, a.ID); err != nil || m.State != Sent {
		t.Fatalf("Get = %+v, %v", m, err)
	}
	if _, err := s.NextQueued(short, "lab", Outbound, time.Now()); !errors.Is(err, ErrNotFound) {
		t.Errorf("NextQueued before b is in the database = %v, want ErrNotFound", err)
	}
	tiny, cancel2 := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel2()
	if err := s.MarkSent(tiny, b.ID); err == nil {
		t.Error("MarkSent of a message not in the database yet did not wait for it")
	}
	s.pauseIngest.Store(false)
	if err := s.MarkSent(ctx, b.ID); err != nil {
		t.Fatalf("MarkSent once b is in: %v", err)
	}
	if n := s.Backlog(); n != 0 {
		t.Errorf("Backlog once every message is in = %d", n)
	}
}

// TestCompareAndSet: a state change starts from the state it expects; from
// any other it changes nothing and says ErrStateChanged with the state the
// message is in, and for a message that does not exist ErrNotFound.
func TestCompareAndSet(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	a, err := s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "lab", ControlID: "c1", Payload: []byte("MSH|c1")})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDelivered(ctx, a.ID, []byte("ACK")); err != nil {
		t.Fatal(err)
	}
	for name, change := range map[string]func() error{
		"delivered again": func() error { return s.MarkDelivered(ctx, a.ID, nil) },
		"sent":            func() error { return s.MarkSent(ctx, a.ID) },
		"retried":         func() error { return s.MarkRetry(ctx, a.ID, "x", time.Now()) },
		"failed":          func() error { return s.MarkFinal(ctx, a.ID, Failed, "x") },
	} {
		err := change()
		if !errors.Is(err, ErrStateChanged) || !strings.Contains(err.Error(), "is delivered") {
			t.Errorf("%s: %v, want ErrStateChanged naming the state", name, err)
		}
	}
	if m, _ := s.Get(ctx, a.ID); m.State != Delivered {
		t.Errorf("state after refused changes = %s", m.State)
	}
	if st, err := s.StateOf(ctx, a.ID); err != nil || st != Delivered {
		t.Errorf("StateOf = %s, %v", st, err)
	}
	if err := s.MarkDelivered(ctx, 999, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("a message that does not exist: %v, want ErrNotFound", err)
	}
}
