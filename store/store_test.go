package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/spool"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(Options{Dir: dir, Logger: testlog.New(t, slog.LevelInfo)})
	if err != nil {
		t.Fatal(err)
	}
	return s
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
	if err != nil || a.ID == 0 {
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
		m, _ := s.Get(ctx, a.ID)
		if m.DuplicateOf != tt.wantDup {
			t.Errorf("Accept(%s %s %s %q): DuplicateOf = %d, want %d", tt.m.Direction, tt.m.Partner, tt.m.ControlID, tt.m.Payload, m.DuplicateOf, tt.wantDup)
		}
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

// TestReplay accepts messages that never reach the database (as when the
// process dies right after the sync) and checks that Open replays them,
// duplicates marked, in order.
func TestReplay(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	ctx := context.Background()
	first, _ := s.Accept(ctx, msg("lab", "1", "A"))
	if _, err := s.List(ctx, Filter{}); err != nil { // first is in the database
		t.Fatal(err)
	}
	s.pauseIngest.Store(true)
	var ids []int64
	for _, m := range []NewMessage{msg("lab", "2", "B"), msg("lab", "1", "A"), msg("clinic", "3", "C")} {
		a, err := s.Accept(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, a.ID)
	}
	s.Close()
	// The log is emptied only once all of it is in the database: it still
	// holds the first message too, which replay skips.
	if n := logRecords(t, dir); n != 4 {
		t.Fatalf("spool log holds %d records after Close with ingest paused, want 4", n)
	}
	s = open(t, dir)
	defer func() { s.Close() }()
	list, err := s.List(ctx, Filter{})
	if err != nil || len(list) != 4 {
		t.Fatalf("after replay List = %d messages, %v; want 4", len(list), err)
	}
	got := map[int64]Message{}
	for _, m := range list {
		got[m.ID] = m
	}
	if m := got[ids[1]]; m.State != Duplicate || m.DuplicateOf != first.ID {
		t.Errorf("replayed resend = %+v, want duplicate of %d", m, first.ID)
	}
	if m, _ := s.Get(ctx, ids[2]); string(m.Payload) != "C" || m.Partner != "clinic" || m.State != Queued {
		t.Errorf("replayed message = %+v", m)
	}
	// New ids continue after the replayed ones.
	a, _ := s.Accept(ctx, msg("lab", "4", "D"))
	if a.ID != ids[2]+1 {
		t.Errorf("next id = %d, want %d", a.ID, ids[2]+1)
	}
	// Opening again replays nothing twice.
	s.Close()
	s = open(t, dir)
	if list, _ := s.List(ctx, Filter{}); len(list) != 5 {
		t.Errorf("after a second Open: %d messages, want 5", len(list))
	}
}

// logRecords counts the records in a closed store's spool log.
func logRecords(t *testing.T, dir string) int {
	t.Helper()
	sp, recs, err := spool.Open(spool.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	sp.Close()
	return len(recs)
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

// TestSegments fills small log segments: while the database is synced,
// writing cycles through the two segments; while it is not (ingest paused),
// new segments are added and nothing is written over; every message is
// there after a reopen.
func TestSegments(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(Options{Dir: dir, Logger: slog.New(slog.DiscardHandler), segmentSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	payload := strings.Repeat("p", 300)
	n := 0
	accept := func(count int) {
		for i := 0; i < count; i++ {
			n++
			if _, err := s.Accept(ctx, msg("lab", fmt.Sprint(n), payload)); err != nil {
				t.Fatal(err)
			}
			if n%5 == 0 { // ingested and synced now and then
				s.List(ctx, Filter{Limit: 1})
				s.checkpoint("PASSIVE")
			}
		}
	}
	accept(100) // 100 × ~350 bytes: about nine segments' worth
	if segs := segmentFiles(t, dir); segs > 3 {
		t.Errorf("%d segment files with the database kept in sync, want at most 3", segs)
	}
	s.pauseIngest.Store(true)
	for i := 0; i < 40; i++ {
		n++
		if _, err := s.Accept(ctx, msg("lab", fmt.Sprint(n), payload)); err != nil {
			t.Fatal(err)
		}
	}
	if segs := segmentFiles(t, dir); segs < 4 {
		t.Errorf("%d segment files while nothing is synced, want new ones added", segs)
	}
	s.Close()
	s, err = Open(Options{Dir: dir, Logger: slog.New(slog.DiscardHandler), segmentSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	list, err := s.List(ctx, Filter{Limit: 1000})
	if err != nil || len(list) != n {
		t.Fatalf("after reopen %d messages, %v; want %d", len(list), err, n)
	}
}

func segmentFiles(t *testing.T, dir string) int {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "spool-*.log"))
	if err != nil {
		t.Fatal(err)
	}
	return len(m)
}

// TestLock: a second writer is refused; a read-only view works beside the
// writer and sees what it accepted.
func TestLock(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	defer s.Close()
	if _, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		t.Errorf("second Open = %v, want ErrLocked", err)
	}
	ctx := context.Background()
	s.Accept(ctx, msg("lab", "1", "A"))
	s.List(ctx, Filter{}) // in the database now
	ro, err := OpenReadOnly(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if list, err := ro.List(ctx, Filter{}); err != nil || len(list) != 1 {
		t.Errorf("read-only List = %d, %v; want 1", len(list), err)
	}
	if _, err := ro.Accept(ctx, msg("lab", "2", "B")); !errors.Is(err, ErrReadOnly) {
		t.Errorf("read-only Accept = %v, want ErrReadOnly", err)
	}
}

// TestRaiseOnceEver: an alert told once ever is recorded the first time
// only: not again while open, nor once acknowledged, nor after a restart.
func TestRaiseOnceEver(t *testing.T) {
	dir := t.TempDir()
	st, err := Open(Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	a := Alert{Kind: AlertStuck, Partner: "lab", Text: "message not delivered to the router"}
	for i, want := range []bool{true, false} {
		if raised, err := st.RaiseOnceEver(ctx, "stuck:1", a); err != nil || raised != want {
			t.Errorf("RaiseOnceEver #%d = %v, %v; want %v", i+1, raised, err, want)
		}
	}
	list, _ := st.Alerts(ctx, false, 10)
	if len(list) != 1 || list[0].Key != "stuck:1" {
		t.Fatalf("alerts %+v, want the one", list)
	}
	if err := st.AckAlert(ctx, list[0].ID, "ops"); err != nil {
		t.Fatal(err)
	}
	if raised, _ := st.RaiseOnceEver(ctx, "stuck:1", a); raised {
		t.Error("raised again once acknowledged")
	}
	if raised, _ := st.RaiseOnceEver(ctx, "stuck:2", a); !raised {
		t.Error("another message's alert not raised")
	}
	st.Close()
	st, err = Open(Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if raised, _ := st.RaiseOnceEver(ctx, "stuck:2", a); raised {
		t.Error("raised again after a restart")
	}
}

// TestStuckMarksUpgrade: the marks of stuck messages told before alerts
// had keys become acknowledged alerts with those keys, so that the upgrade
// tells none of them again.
func TestStuckMarksUpgrade(t *testing.T) {
	st, err := Open(Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	if err := st.SetValue(ctx, "alerted-stuck:7", "2026-11-30T10:00:00Z"); err != nil {
		t.Fatal(err)
	}
	// The statements of migration 14 that carry the marks over.
	var stmts []string
	for _, q := range strings.Split(schema[13], ";") {
		if strings.Contains(q, "alerted-stuck") {
			stmts = append(stmts, q)
		}
	}
	if len(stmts) != 2 {
		t.Fatalf("migration 14 has %d statements about the marks, want 2", len(stmts))
	}
	for _, q := range stmts {
		if _, err := st.updater.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if v, _ := st.Value(ctx, "alerted-stuck:7"); v != "" {
		t.Errorf("the mark is left: %q", v)
	}
	if raised, _ := st.RaiseOnceEver(ctx, "stuck:7", Alert{Kind: AlertStuck, Text: "x"}); raised {
		t.Error("message 7 told again after the upgrade")
	}
	all, _ := st.Alerts(ctx, true, 10)
	if len(all) != 1 || all[0].Key != "stuck:7" || all[0].AckedBy != "upgrade" || all[0].Raised.Year() != 2026 {
		t.Errorf("alerts %+v, want the acknowledged alert of message 7", all)
	}
}
