package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestQueuedAfter: the run after an id, in order, ends at the first
// message waiting for a retry; PrepareAll records a group's Message-IDs,
// receipts and journal places in one go; MarkSentAll marks the queued ones
// and names the one whose state changed meanwhile.
func TestQueuedAfter(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	var ids []int64
	for i := range 6 {
		m, err := s.Accept(ctx, NewMessage{Direction: Outbound, Partner: "lab", ControlID: fmt.Sprint("q", i),
			MessageType: "ORU^R01", Payload: []byte(fmt.Sprint("MSH|^~\\&|A|B|C|D|||ORU^R01|q", i, "|P|2.3\r"))})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	now := time.Now()
	if err := s.MarkRetry(ctx, ids[3], "451", now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	run, err := s.QueuedAfter(ctx, "lab", Outbound, now, ids[0], 10)
	if err != nil || len(run) != 2 || run[0].ID != ids[1] || run[1].ID != ids[2] || len(run[0].Payload) == 0 {
		t.Fatalf("run after the first: %d messages, %v; want the second and third, with payloads", len(run), err)
	}
	if run, _ := s.QueuedAfter(ctx, "lab", Outbound, now, ids[0], 1); len(run) != 1 {
		t.Errorf("limit 1: %d messages", len(run))
	}
	var preps []Preparation
	for i, id := range ids[:3] {
		preps = append(preps, Preparation{ID: id, MessageID: fmt.Sprintf("<m%d@h>", i), JournalFile: "outgoing.mbox",
			JournalOffset: int64(100 * i), Sum: []byte{byte(i)},
			Pending: &Pending{Partner: "lab", ControlID: fmt.Sprint("q", i), MIC: "mic", Sent: now, Due: now.Add(time.Hour)}})
	}
	if err := s.PrepareAll(ctx, preps); err != nil {
		t.Fatal(err)
	}
	digests, _ := s.JournalDigests(ctx, "outgoing.mbox")
	if len(digests) != 3 || digests[200][0] != 2 {
		t.Errorf("journal index %v", digests)
	}
	if p, err := s.PendingByMessageID(ctx, "<m1@h>"); err != nil || p.State != PendingWaiting || p.ControlID != "q1" {
		t.Errorf("pending of the second: %+v, %v", p, err)
	}
	if err := s.MarkFinal(ctx, ids[1], Failed, "operator"); err != nil {
		t.Fatal(err)
	}
	err = s.MarkSentAll(ctx, ids[:3])
	if !errors.Is(err, ErrStateChanged) {
		t.Errorf("MarkSentAll with a failed message: %v, want ErrStateChanged", err)
	}
	for i, want := range []State{Sent, Failed, Sent} {
		if st, _ := s.StateOf(ctx, ids[i]); st != want {
			t.Errorf("message %d: %s, want %s", i, st, want)
		}
	}
}

// TestUpdateGroupCommit: state changes made at once share commits; one that
// fails (its message is not queued) undoes only itself.
func TestUpdateGroupCommit(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	var ids []int64
	for i := range 40 {
		m, err := s.Accept(ctx, NewMessage{Direction: Outbound, Partner: "lab", ControlID: fmt.Sprint("g", i),
			MessageType: "ORU^R01", Payload: []byte(fmt.Sprint("MSH|^~\\&|A|B|C|D|||ORU^R01|g", i, "|P|2.3\r"))})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := s.MarkFinal(ctx, ids[7], Failed, "before"); err != nil {
		t.Fatal(err)
	}
	errs := make([]error, len(ids))
	commits := s.commits.Load()
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.MarkSent(ctx, id)
		}()
	}
	wg.Wait()
	if n := s.commits.Load() - commits; n >= int64(len(ids)) {
		t.Errorf("%d changes made at once took %d commits: none shared", len(ids), n)
	}
	for i, id := range ids {
		st, _ := s.StateOf(ctx, id)
		switch {
		case i == 7 && (!errors.Is(errs[i], ErrStateChanged) || st != Failed):
			t.Errorf("the failed message: %v, %s", errs[i], st)
		case i != 7 && (errs[i] != nil || st != Sent):
			t.Errorf("message %d: %v, %s; want sent", i, errs[i], st)
		}
	}
}

// TestReadThenWriteWhileIngesting: a change that reads before it writes
// (SetReceipt) while the ingester writes a flood of messages is never
// refused as "database is locked": the updater's transactions take the
// write lock when they begin, waiting for it.
func TestReadThenWriteWhileIngesting(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	m, err := s.Accept(ctx, NewMessage{Direction: Outbound, Partner: "lab", ControlID: "r0", MessageType: "ORU^R01",
		Payload: []byte("MSH|^~\\&|A|B|C|D|||ORU^R01|r0|P|2.3\r")})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := s.Prepare(ctx, m.ID, "<r0@h>", &Pending{Partner: "lab", ControlID: "r0", MIC: "x", Sent: now, Due: now.Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "lab", ControlID: fmt.Sprint("f", w, "-", i),
					MessageType: "ORU^R01", Payload: []byte(fmt.Sprint("MSH|^~\\&|A|B|C|D|||ORU^R01|f", w, "-", i, "|P|2.3\r"))})
				time.Sleep(time.Millisecond) // a busy router's pace, not a flood
			}
		}()
	}
	for i := range 200 {
		if _, err := s.SetReceipt(ctx, "<r0@h>", PendingMismatch, "mic", false); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("SetReceipt %d while ingesting: %v", i, err)
		}
	}
	close(stop)
	wg.Wait()
}
