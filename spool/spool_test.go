package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func openStarted(t *testing.T, o Options) *Spool {
	t.Helper()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	o.Logger = slog.New(slog.DiscardHandler)
	s, recs, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 0 {
		t.Fatalf("a new spool holds %d records", len(recs))
	}
	s.Start(0)
	t.Cleanup(func() { s.Close() })
	return s
}

// failNextAppend makes the next append fail with err, as a full disk
// would.
func (s *Spool) failNextAppend(err error) {
	s.commitMu.Lock()
	s.log.failNext = err
	s.commitMu.Unlock()
}

func msg(id string) Message {
	return Message{Direction: Outbound, Partner: "lab", ControlID: id, MessageType: "ORU^R01", Payload: []byte("MSH|" + id)}
}

// TestCommitFailure makes the log write fail, as on a full disk: the batch
// fails with an error, nothing of it is left for the database, and the
// spool goes on accepting.
func TestCommitFailure(t *testing.T) {
	s := openStarted(t, Options{})
	ctx := context.Background()
	s.failNextAppend(errors.New("no space left on device"))
	if _, err := s.Accept(ctx, msg("FAIL")); err == nil || !strings.Contains(err.Error(), "no space left") {
		t.Fatalf("Accept on a full disk = %v, want the write error", err)
	}
	ok, err := s.Accept(ctx, msg("OK"))
	if err != nil {
		t.Fatalf("Accept after failure: %v", err)
	}
	recs := s.Take(10)
	if len(recs) != 1 || recs[0].Msg.ControlID != "OK" || recs[0].ID != ok.ID || ok.ID != 1 {
		t.Errorf("committed %+v, want only the message accepted after the failure, as id 1", recs)
	}
}

// TestNeverWaitsForTheDatabase: with nobody taking what was committed (a
// database that stalls), Accept goes on answering until the backlog rule
// says no, with ErrBacklog; once the database has taken some, Accept goes
// on. Every record waits for Take, in order.
func TestNeverWaitsForTheDatabase(t *testing.T) {
	s := openStarted(t, Options{MaxBacklog: 3000})
	ctx := context.Background()
	for i := range 3000 {
		if _, err := s.Accept(ctx, msg(fmt.Sprint(i))); err != nil {
			t.Fatalf("Accept %d with the database stalled: %v", i, err)
		}
	}
	if _, err := s.Accept(ctx, msg("over")); !errors.Is(err, ErrBacklog) {
		t.Fatalf("Accept past the backlog = %v, want ErrBacklog", err)
	}
	if s.Backlog() != 3000 {
		t.Errorf("Backlog = %d, want 3000", s.Backlog())
	}
	recs := s.Take(5000)
	if len(recs) != 3000 || recs[0].ID != 1 || recs[2999].ID != 3000 {
		t.Fatalf("Take = %d records", len(recs))
	}
	s.Ingested(1000)
	if _, err := s.Accept(ctx, msg("after")); err != nil {
		t.Errorf("Accept once the database took some: %v", err)
	}
	select {
	case <-s.Ready():
	default:
		t.Error("a committed record is not signalled")
	}
	if got := s.Take(10); len(got) != 1 || got[0].ID != 3001 {
		t.Errorf("Take after = %+v", got)
	}
}

// TestLock: a second Open of the same folder is refused while the first
// holds it, and succeeds, with the records, once it is closed.
func TestLock(t *testing.T) {
	dir := t.TempDir()
	s := openStarted(t, Options{Dir: dir})
	if _, err := s.Accept(context.Background(), msg("1")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	s.Close()
	s2, recs, err := Open(Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if len(recs) != 1 || recs[0].Msg.ControlID != "1" {
		t.Errorf("records after reopen = %+v", recs)
	}
	if _, err := s.Accept(context.Background(), msg("late")); !errors.Is(err, ErrClosed) {
		t.Errorf("Accept after Close = %v, want ErrClosed", err)
	}
}

// TestOldRecordFormat: records written by earlier versions (direction 'o'
// or 'i' and seven strings, 'O' or 'I' and eight) still decode after an
// upgrade, and the present form ('N', direction, count) round-trips with
// every field.
func TestOldRecordFormat(t *testing.T) {
	m := Message{Direction: Inbound, Partner: "lab", ControlID: "c1", MessageType: "ORU^R01",
		MessageID: "<m@x>", MIC: "mic", Kind: "request", Recipient: "adt@edi.hospital", ReceiptNote: "options unreadable",
		Payload: []byte("MSH|...")}
	hash := [32]byte{1, 2, 3}
	// older writes the record as a version that kept n strings did.
	older := func(dir byte, n int) []byte {
		b := binary.LittleEndian.AppendUint64(nil, 7)
		b = binary.LittleEndian.AppendUint64(b, 99)
		b = append(b, dir)
		for _, s := range m.strings()[:n] {
			b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
			b = append(b, s...)
		}
		b = append(b, hash[:]...)
		return append(b, m.Payload...)
	}
	for _, c := range []struct {
		dir             byte
		n               int
		recipient, note string
	}{{'i', 7, "", ""}, {'I', 8, m.Recipient, ""}} {
		got, err := decodeRecord(older(c.dir, c.n))
		if err != nil || got.ID != 7 || got.Msg.Direction != Inbound || got.Msg.Partner != "lab" || got.Msg.Kind != "request" ||
			string(got.Msg.Payload) != "MSH|..." || got.Msg.Recipient != c.recipient || got.Msg.ReceiptNote != c.note || got.Hash != hash {
			t.Errorf("decodeRecord(%q form) = %+v, %v", c.dir, got, err)
		}
	}
	r := Record{ID: 7, Time: 99, Msg: m, Hash: hash}
	got, err := decodeRecord(r.appendTo(nil)[logHeader:])
	if err != nil || got.Msg.Recipient != m.Recipient || got.Msg.ReceiptNote != m.ReceiptNote || got.Msg.Direction != Inbound ||
		string(got.Msg.Payload) != "MSH|..." {
		t.Errorf("decodeRecord(present form) = %+v, %v", got, err)
	}
	// A later version's record with a string more is read past it.
	later := r.appendTo(nil)[logHeader:]
	at := len(later) - len(m.Payload) - 32
	later = append(append(append([]byte(nil), later[:at]...), 3, 0, 'x', 'y', 'z'), later[at:]...)
	later[18]++
	if got, err := decodeRecord(later); err != nil || got.Msg.ReceiptNote != m.ReceiptNote || got.Hash != hash {
		t.Errorf("decodeRecord(later form) = %+v, %v", got, err)
	}
}

// TestTornTail cuts and corrupts the end of the log, as a crash in the
// middle of a write leaves it: complete records are returned by Open, the
// torn one is dropped, and the spool works on after them.
func TestTornTail(t *testing.T) {
	for _, tc := range []struct {
		name string
		tear func(b []byte, end int) // end: where the records end
		want int
	}{
		{"cut in the last record", func(b []byte, end int) { clear(b[end-5 : end]) }, 2},
		{"flipped byte in the last record", func(b []byte, end int) { b[end-3] ^= 0xff }, 2},
		{"nothing torn", func(b []byte, end int) {}, 3},
		{"garbage header after the records", func(b []byte, end int) { copy(b[end:], []byte{0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4}) }, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStarted(t, Options{Dir: dir})
			for i := 0; i < 3; i++ {
				if _, err := s.Accept(context.Background(), msg(strings.Repeat("x", 50)+fmt.Sprint(i))); err != nil {
					t.Fatal(err)
				}
			}
			s.Close()
			path := filepath.Join(dir, "spool-0.log")
			seg, _, end64, err := openSegment(path)
			if err != nil {
				t.Fatal(err)
			}
			end := int(end64)
			seg.f.Close()
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			tc.tear(b, end)
			os.WriteFile(path, b, 0o600)
			s, recs, err := Open(Options{Dir: dir, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if len(recs) != tc.want || recs[len(recs)-1].ID != int64(tc.want) {
				t.Fatalf("after a torn tail: %d records; want %d", len(recs), tc.want)
			}
			s.Start(recs[len(recs)-1].ID)
			a, err := s.Accept(context.Background(), msg("after"))
			if err != nil || a.ID != int64(tc.want+1) {
				t.Errorf("Accept after the torn tail = %+v, %v; want id %d", a, err, tc.want+1)
			}
		})
	}
}
