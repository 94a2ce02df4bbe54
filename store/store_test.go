package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"

	"github.com/hl7mail/hl7mail/internal/corpus"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(Options{Dir: dir, Logger: slog.New(slog.NewTextHandler(tWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimSpace(p)))
	return len(p), nil
}

func msg(partner, id string, payload string) NewMessage {
	return NewMessage{Direction: Outbound, Partner: partner, ControlID: id, MessageType: "ORU^R01", Payload: []byte(payload)}
}

func TestAcceptSurvivesReopen(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	ctx := context.Background()
	payload := "MSH|^~\\&|A|B|C|D|2020||ORU^R01|1|P|2.3\rOBX|1|\rNTE|bare\rCR\r"
	a, err := s.Accept(ctx, msg("lab", "1", payload))
	if err != nil || a.ID == 0 || a.DuplicateOf != 0 {
		t.Fatalf("Accept = %+v, %v", a, err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir)
	defer s.Close()
	m, err := s.Get(ctx, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if string(m.Payload) != payload || m.State != Queued || m.ControlID != "1" || m.Partner != "lab" ||
		m.Direction != Outbound || m.Size != len(payload) || m.Received.IsZero() {
		t.Errorf("Get(%d) = %+v", a.ID, m)
	}
	if _, err := s.Get(ctx, 999); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(999) error = %v, want ErrNotFound", err)
	}
}

func TestDuplicates(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	first, _ := s.Accept(ctx, msg("lab", "7", "A"))
	tests := []struct {
		m       NewMessage
		wantDup int64
	}{
		{msg("lab", "7", "A"), first.ID}, // resend
		{msg("lab", "7", "B"), 0},        // same control ID, other payload
		{msg("clinic", "7", "A"), 0},     // other partner
		{msg("lab", "8", "A"), 0},        // other control ID
		{msg("lab", "7", "A"), first.ID}, // resent again: points at the original
		{NewMessage{Direction: Inbound, Partner: "lab", ControlID: "7", Payload: []byte("A")}, 0},
	}
	for _, tt := range tests {
		a, err := s.Accept(ctx, tt.m)
		if err != nil {
			t.Fatal(err)
		}
		if a.DuplicateOf != tt.wantDup {
			t.Errorf("Accept(%s %s %s %q).DuplicateOf = %d, want %d", tt.m.Direction, tt.m.Partner, tt.m.ControlID, tt.m.Payload, a.DuplicateOf, tt.wantDup)
		}
		m, _ := s.Get(ctx, a.ID)
		if want := map[bool]State{true: Duplicate, false: Queued}[tt.wantDup != 0]; m.State != want {
			t.Errorf("state of %d = %s, want %s", a.ID, m.State, want)
		}
	}
	list, err := s.List(ctx, Filter{Partner: "lab", State: Duplicate})
	if err != nil || len(list) != 2 {
		t.Errorf("List(lab, duplicate) = %d messages, %v; want 2", len(list), err)
	}
}

// TestGroupCommit stores the corpus from 16 goroutines at once: every message
// comes back intact, and commits carry more than one message each.
func TestGroupCommit(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	s := open(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	ids := make([]int64, len(msgs))
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(msgs); i += 16 {
				a, err := s.Accept(ctx, msg("lab", fmt.Sprint(i), string(msgs[i])))
				if err != nil {
					errs <- err
					return
				}
				ids[i] = a.ID
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i, id := range ids {
		m, err := s.Get(ctx, id)
		if err != nil || !bytes.Equal(m.Payload, msgs[i]) {
			t.Fatalf("message %d (id %d) came back as %q, %v", i, id, m.Payload, err)
		}
	}
	st := s.Stats()
	t.Logf("%d messages in %d commits", st.Messages, st.Commits)
	if st.Messages != int64(len(msgs)) || st.Commits >= st.Messages {
		t.Errorf("Stats = %+v: want %d messages sharing commits", st, len(msgs))
	}
}

// TestCommitFailure makes the database refuse one message: the batch holding
// it fails as a whole with an error, nothing of it is stored, and the store
// goes on accepting.
func TestCommitFailure(t *testing.T) {
	s := open(t, t.TempDir())
	defer s.Close()
	ctx := context.Background()
	if _, err := s.db.ExecContext(ctx, `CREATE TRIGGER fail BEFORE INSERT ON messages WHEN NEW.control_id = 'FAIL'
		BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Accept(ctx, msg("lab", "FAIL", "x")); err == nil {
		t.Fatal("Accept of refused message succeeded")
	}
	if list, _ := s.List(ctx, Filter{}); len(list) != 0 {
		t.Errorf("refused message stored: %+v", list)
	}
	if _, err := s.Accept(ctx, msg("lab", "OK", "y")); err != nil {
		t.Errorf("Accept after failure: %v", err)
	}
}

func TestClose(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	var wg sync.WaitGroup
	results := make(chan error, 200)
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Accept(ctx, msg("lab", fmt.Sprint(i), "p"))
			results <- err
		}()
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(results)
	ok := 0
	for err := range results {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, ErrClosed):
			t.Errorf("Accept during Close: %v, want nil or ErrClosed", err)
		}
	}
	// Every Accept that reported success is on disk.
	s2 := open(t, s.dir)
	defer s2.Close()
	list, _ := s2.List(ctx, Filter{})
	if len(list) != ok {
		t.Errorf("after Close %d messages stored, %d reported accepted", len(list), ok)
	}
	if _, err := s.Accept(ctx, msg("lab", "late", "p")); !errors.Is(err, ErrClosed) {
		t.Errorf("Accept after Close = %v, want ErrClosed", err)
	}
}

func BenchmarkAcceptParallel(b *testing.B) {
	msgs, err := corpus.Default()
	if err != nil {
		b.Fatal(err)
	}
	s, err := Open(Options{Dir: b.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	b.SetParallelism(8) // 16 goroutines on 2 cores
	var mu sync.Mutex
	n := 0
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			mu.Lock()
			n++
			i := n
			mu.Unlock()
			if _, err := s.Accept(ctx, msg("lab", fmt.Sprint(i), string(msgs[i%len(msgs)]))); err != nil {
				b.Error(err)
				return
			}
		}
	})
	st := s.Stats()
	b.ReportMetric(float64(st.Messages)/float64(max(st.Commits, 1)), "msgs/commit")
}

func BenchmarkAcceptSerial(b *testing.B) {
	msgs, err := corpus.Default()
	if err != nil {
		b.Fatal(err)
	}
	dir := os.Getenv("HL7MAIL_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	s, err := Open(Options{Dir: dir, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		if _, err := s.Accept(ctx, msg("lab", fmt.Sprint(i), string(msgs[i%len(msgs)]))); err != nil {
			b.Fatal(err)
		}
	}
}
