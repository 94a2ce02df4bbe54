package surrogate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

func testLogger(t *testing.T) *slog.Logger {
	return testlog.New(t, slog.LevelWarn)
}

// start runs a surrogate on 127.0.0.1:0 and checks at the end that no panic
// was recovered.
func start(t *testing.T, opts Options) (*Server, string) {
	t.Helper()
	if opts.Partner == "" {
		opts.Partner = "lab"
	}
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if n := s.Panics(); n != 0 && !t.Failed() && !strings.Contains(t.Name(), "Panic") {
			t.Errorf("%d panics recovered", n)
		}
	})
	return s, ln.Addr().String()
}

func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func dial(t *testing.T, addr string) *mllp.Client {
	t.Helper()
	c, err := mllp.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// msa sends msg and returns what the acknowledgement says.
func msa(t *testing.T, c *mllp.Client, msg string) hl7.AckResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := c.Send(ctx, []byte(msg))
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	return ackOf(t, reply)
}

func ackOf(t *testing.T, reply []byte) hl7.AckResult {
	t.Helper()
	r, err := hl7.ParseAck(reply)
	if err != nil || !r.Header.IsAck() {
		t.Fatalf("reply %q is not an ACK: %v", reply, err)
	}
	return r
}

func oru(id, msh15 string) string {
	return "MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORU^R01|" + id + "|P|2.3|||" + msh15 + "\rPID|1||123\rOBX|1|NM|x||1\r"
}

func TestCorpus(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	st := openStore(t)
	_, addr := start(t, Options{Spool: st})
	const conns = 4
	var wg sync.WaitGroup
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dial(t, addr)
			for i := w; i < len(msgs); i += conns {
				req, _ := hl7.ParseHeader(msgs[i])
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				reply, err := c.Send(ctx, msgs[i])
				cancel()
				if err != nil {
					t.Errorf("message %d: %v", i, err)
					return
				}
				a := ackOf(t, reply)
				if a.Code != hl7.CommitAccept || a.ControlID != req.ControlID || a.Header.SendingApp != req.ReceivingApp || a.Header.ReceivingApp != req.SendingApp {
					t.Errorf("message %d: ACK %q", i, reply)
				}
			}
		}()
	}
	wg.Wait()
	list, err := st.List(context.Background(), store.Filter{Limit: 5000})
	if err != nil || len(list) != len(msgs) {
		t.Fatalf("stored %d messages (%v), want %d", len(list), err, len(msgs))
	}
	byID := map[string][]byte{}
	for _, m := range msgs {
		h, _ := hl7.ParseHeader(m)
		byID[h.ControlID] = m
	}
	for _, m := range list {
		full, _ := st.Get(context.Background(), m.ID)
		if !bytes.Equal(full.Payload, byID[m.ControlID]) || m.State != store.Queued || m.Partner != "lab" {
			t.Fatalf("stored message %d differs from corpus message with control ID %s", m.ID, m.ControlID)
		}
	}
}

func TestRejects(t *testing.T) {
	st := openStore(t)
	var hits []string
	var mu sync.Mutex
	_, addr := start(t, Options{Spool: st, MaxMessageSize: 200, LimitHit: func(l string) {
		mu.Lock()
		hits = append(hits, l)
		mu.Unlock()
	}})
	c := dial(t, addr)
	tests := []struct {
		name, msg      string
		code, id, text string
	}{
		{"not HL7", "hello world", "CR", "", "not an HL7 v2 message"},
		{"no control ID", "MSH|^~\\&|A|B|C|D|2020||ORU^R01||P|2.3|||AL\r", "CR", "", "MSH-10"},
		{"bad delimiters", "MSH|^^~\\|A\r", "CR", "", "delimiters"},
		{"too large", oru("big", "AL") + strings.Repeat("OBX|2|TX|||"+strings.Repeat("x", 50)+"\r", 5), "CR", "big", "exceeds the limit of 200"},
		{"after rejects, still served", oru("ok", "AL"), "CA", "ok", ""},
	}
	for _, tt := range tests {
		a := msa(t, c, tt.msg)
		if string(a.Code) != tt.code || a.ControlID != tt.id || (a.Text != "") != (tt.text != "") || !strings.Contains(a.Text, tt.text) {
			t.Errorf("%s: ACK = %+v, want %s|%s|...%s", tt.name, a, tt.code, tt.id, tt.text)
		}
	}
	list, _ := st.List(context.Background(), store.Filter{})
	if len(list) != 1 || list[0].ControlID != "ok" {
		t.Errorf("stored %+v, want only the accepted message", list)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(hits) != 1 || hits[0] != LimitMessageSize {
		t.Errorf("limits hit: %v, want one %s", hits, LimitMessageSize)
	}
}

// TestMissingEndBlock: a frame cut short by the start of the next one is
// rejected and the next one is served.
func TestMissingEndBlock(t *testing.T) {
	_, addr := start(t, Options{Spool: openStore(t)})
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.Write([]byte("\x0b" + oru("cut", "AL") + "\x0b" + oru("whole", "AL") + "\x1c\r"))
	rd := mllp.NewReader(nc, 0)
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for _, want := range []string{"MSA|CR|cut|frame has no end block", "MSA|CA|whole"} {
		reply, err := rd.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(reply), "\r"+want) {
			t.Errorf("reply %q, want %q", reply, want)
		}
	}
}

type failingSpool struct{ err error }

func (f failingSpool) Accept(context.Context, store.NewMessage) (store.Accepted, error) {
	return store.Accepted{}, f.err
}

func TestStoreFailureAnswersCE(t *testing.T) {
	_, addr := start(t, Options{Spool: failingSpool{errors.New("store: commit: database or disk is full (13)")}})
	c := dial(t, addr)
	a := msa(t, c, oru("d1", "AL"))
	if a.Code != hl7.CommitError || a.ControlID != "d1" || !strings.Contains(a.Text, "send it again") || strings.Contains(a.Text, "disk") {
		t.Errorf("ACK = %+v, want CE with a generic reason", a)
	}
	// v2.5: the reason goes in an ERR segment.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, _ := c.Send(ctx, []byte("MSH|^~\\&|A|B|C|D|2020||ADT^A01^ADT_A01|d2|P|2.5|||AL\r"))
	if !strings.Contains(string(reply), "\rMSA|CE|d2\rERR|||207^") {
		t.Errorf("v2.5 CE = %q", reply)
	}
}

// TestAckPolicy checks MSH-15 and original mode: a message that wants no
// answer gets none, the next one is answered.
func TestAckPolicy(t *testing.T) {
	st := openStore(t)
	_, addr := start(t, Options{Spool: st})
	c := dial(t, addr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, m := range []string{oru("ne", "NE"), oru("er", "ER"),
		"MSH|^~\\&|LAB|TL|HIS|GH|2020||ACK^R01|a1|P|2.3\rMSA|AA|x\r"} {
		if err := c.Write(ctx, []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	if a := msa(t, c, oru("su", "SU")); a.Code != "CA" || a.ControlID != "su" {
		t.Errorf("after unanswered messages, MSA = %+v, want CA for su", a)
	}
	if a := msa(t, c, oru("orig", "")); a.Code != "CA" || a.ControlID != "orig" {
		t.Errorf("original mode MSA = %+v, want CA (an accept ACK whatever the mode)", a)
	}
	list, _ := st.List(ctx, store.Filter{})
	if len(list) != 5 {
		t.Errorf("stored %d messages, want 5 (answered or not, all are kept)", len(list))
	}
}

func TestDuplicate(t *testing.T) {
	st := openStore(t)
	_, addr := start(t, Options{Spool: st})
	c := dial(t, addr)
	for i := 0; i < 2; i++ {
		if a := msa(t, c, oru("dup", "AL")); a.Code != hl7.CommitAccept {
			t.Errorf("send %d: ACK = %+v, want CA", i, a)
		}
	}
	list, _ := st.List(context.Background(), store.Filter{})
	if len(list) != 2 || list[0].State != store.Duplicate || list[0].DuplicateOf != list[1].ID {
		t.Errorf("stored %+v, want the resend marked duplicate of the first", list)
	}
}

func TestConnectionLimit(t *testing.T) {
	hit := make(chan string, 1)
	_, addr := start(t, Options{Spool: openStore(t), MaxConnections: 1, LimitHit: func(l string) { hit <- l }})
	first := dial(t, addr)
	msa(t, first, oru("1", "AL"))
	second, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := second.Read(make([]byte, 1)); n != 0 || err == nil || isTimeout(err) {
		t.Errorf("second connection read = %d, %v; want closed", n, err)
	}
	if a := msa(t, first, oru("2", "AL")); a.Code != hl7.CommitAccept {
		t.Errorf("first connection after refusal: %+v", a)
	}
	if l := <-hit; l != LimitConnections {
		t.Errorf("limit hit %q, want %q", l, LimitConnections)
	}
}

func TestIdleTimeout(t *testing.T) {
	s, addr := start(t, Options{Spool: openStore(t), IdleTimeout: 50 * time.Millisecond})
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := nc.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("idle connection read = %v, want closed by server", err)
	}
	for s.Connections() != 0 {
		time.Sleep(time.Millisecond)
	}
}

// blockingSpool holds each Accept until released.
type blockingSpool struct {
	entered chan struct{}
	release chan struct{}
	inner   Spool
}

func (b *blockingSpool) Accept(ctx context.Context, m store.NewMessage) (store.Accepted, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.inner.Accept(ctx, m)
}

// TestShutdown: a message being committed when Shutdown starts is finished
// and answered CA; idle connections are closed; Serve returns.
func TestShutdown(t *testing.T) {
	st := openStore(t)
	spool := &blockingSpool{entered: make(chan struct{}, 1), release: make(chan struct{}), inner: st}
	s, addr := start(t, Options{Spool: spool})
	busy, idle := dial(t, addr), dial(t, addr)
	_ = idle
	replies := make(chan []byte, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		r, err := busy.Send(ctx, []byte(oru("inflight", "AL")))
		if err != nil {
			t.Error(err)
		}
		replies <- bytes.Clone(r)
	}()
	<-spool.entered
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- s.Shutdown(ctx)
	}()
	// Shutdown waits for the in-flight commit.
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v before the in-flight message was answered", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(spool.release)
	if a := ackOf(t, <-replies); a.Code != hl7.CommitAccept || a.ControlID != "inflight" {
		t.Errorf("in-flight message answered %+v, want CA", a)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown = %v", err)
	}
	if n := s.Connections(); n != 0 {
		t.Errorf("%d connections open after Shutdown", n)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("listener still accepts after Shutdown")
	}
	list, _ := st.List(context.Background(), store.Filter{})
	if len(list) != 1 {
		t.Errorf("stored %d messages, want 1", len(list))
	}
}

type panickingSpool struct{}

func (panickingSpool) Accept(context.Context, store.NewMessage) (store.Accepted, error) {
	panic("spool exploded")
}

func TestPanicRecovered(t *testing.T) {
	s, addr := start(t, Options{Spool: panickingSpool{}, Logger: slog.New(slog.DiscardHandler)})
	c := dial(t, addr)
	if a := msa(t, c, oru("p1", "AL")); a.Code != "CE" || a.ControlID != "p1" {
		t.Errorf("after panic MSA = %+v, want CE", a)
	}
	if s.Panics() != 1 {
		t.Errorf("Panics() = %d, want 1", s.Panics())
	}
	// The server goes on accepting.
	c2 := dial(t, addr)
	msa(t, c2, oru("p2", "AL"))
	if s.Panics() != 2 {
		t.Errorf("Panics() = %d, want 2", s.Panics())
	}
}

// TestOneAnswerPerFrame: a stray 0x0B inside a message (a pasted manual
// line break) leaves the frame whole: one answer, and the message stored
// as sent; the next message gets its own.
func TestOneAnswerPerFrame(t *testing.T) {
	st := openStore(t)
	_, addr := start(t, Options{Spool: st})
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	stray := oru("vt", "AL") + "NTE|1||first line\x0bsecond line\r"
	nc.Write([]byte("\x0b" + stray + "\x1c\r" + "\x0b" + oru("next", "AL") + "\x1c\r"))
	rd := mllp.NewReader(nc, 0)
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	for _, want := range []string{"MSA|CA|vt", "MSA|CA|next"} {
		reply, err := rd.ReadFrame()
		if err != nil || !strings.Contains(string(reply), "\r"+want) {
			t.Fatalf("reply %q, %v; want %q", reply, err, want)
		}
	}
	nc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if reply, err := rd.ReadFrame(); err == nil {
		t.Errorf("a third answer %q to two frames", reply)
	}
	list, _ := st.List(context.Background(), store.Filter{})
	m, _ := st.Get(context.Background(), list[len(list)-1].ID)
	if len(list) != 2 || string(m.Payload) != stray {
		t.Errorf("stored %d messages, the first %q; want 2, the first as sent", len(list), m.Payload)
	}
}

// TestLongControlID: an MSH-10 over 199 characters is refused with CR, and
// the answer echoes no more than 199 of them.
func TestLongControlID(t *testing.T) {
	st := openStore(t)
	_, addr := start(t, Options{Spool: st})
	c := dial(t, addr)
	long := strings.Repeat("9", 60000)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := c.Send(ctx, []byte(oru(long, "AL")))
	if err != nil {
		t.Fatal(err)
	}
	a := ackOf(t, reply)
	if a.Code != hl7.CommitReject || len(a.ControlID) != hl7.MaxControlID || len(reply) > 2000 || !strings.Contains(a.Text, "MSH-10") {
		t.Errorf("ACK of %d bytes: %s, control ID of %d, %q; want CR with 199 and a short answer", len(reply), a.Code, len(a.ControlID), a.Text)
	}
	if list, _ := st.List(context.Background(), store.Filter{}); len(list) != 0 {
		t.Errorf("stored %d messages, want none", len(list))
	}
}

// TestFirstFrameTimeout: connections that send nothing are closed after
// FirstFrameTimeout, however long IdleTimeout is, and a host holds at most
// MaxConnectionsPerHost of the connections.
func TestFirstFrameTimeout(t *testing.T) {
	var mu sync.Mutex
	var hits []string
	s, addr := start(t, Options{Spool: openStore(t), IdleTimeout: time.Hour, FirstFrameTimeout: 100 * time.Millisecond,
		MaxConnections: 4, MaxConnectionsPerHost: 2, LimitHit: func(l string) { mu.Lock(); hits = append(hits, l); mu.Unlock() }})
	var silent []net.Conn
	for range 3 {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		silent = append(silent, nc)
	}
	// The third from the same host is refused at once.
	silent[2].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent[2].Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("third connection from one host: read %v, want closed", err)
	}
	start := time.Now()
	for _, nc := range silent[:2] {
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := nc.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Errorf("silent connection: read %v, want closed by the server", err)
		}
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("silent connections closed after %s, want about 100ms", d)
	}
	for s.Connections() != 0 {
		time.Sleep(time.Millisecond)
	}
	// A connection that sent a message is not held to the first-frame bound.
	c := dial(t, addr)
	msa(t, c, oru("f1", "AL"))
	time.Sleep(300 * time.Millisecond)
	if a := msa(t, c, oru("f2", "AL")); a.Code != hl7.CommitAccept {
		t.Errorf("after a pause: %+v", a)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(hits) != 1 || hits[0] != LimitConnectionsPerHost {
		t.Errorf("limits hit %v, want one %s", hits, LimitConnectionsPerHost)
	}
}

// batch20 is a batch of twenty messages, the last two in original mode.
func batch20(id string) []byte {
	var b strings.Builder
	b.WriteString("FHS|^~\\&|HIS|GH|LAB|TL|20261201\rBHS|^~\\&|HIS|GH|LAB|TL|20261201||||" + id + "\r")
	for i := 1; i <= 20; i++ {
		msh15 := "AL"
		if i > 18 {
			msh15 = ""
		}
		b.WriteString(oru(fmt.Sprintf("%s-%d", id, i), msh15))
	}
	b.WriteString("BTS|20\rFTS|1\r")
	return []byte(b.String())
}

// TestBatch: an HL7 batch is one frame, stored as one message and answered
// as batch_ack says: one ACK naming the batch, or a batch acknowledgement
// with an ACK for each message; a batch that is not well formed is refused
// whole.
func TestBatch(t *testing.T) {
	for _, each := range []bool{false, true} {
		st := openStore(t)
		_, addr := start(t, Options{Spool: st, BatchAckEach: each})
		c := dial(t, addr)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		reply, err := c.Send(ctx, batch20("B1"))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if !each {
			if a := ackOf(t, reply); a.Code != hl7.CommitAccept || a.ControlID != "B1" {
				t.Errorf("batch_ack batch: %s for %s, want CA for the batch B1", a.Code, a.ControlID)
			}
		} else {
			r, err := hl7.ParseBatchAck(reply)
			if err != nil || r.Reference != "B1" || len(r.Acks) != 20 || !r.Accepted() || r.Acks[19].ControlID != "B1-20" {
				t.Errorf("batch_ack each: %+v, %v; want a batch acknowledgement of 20 CAs for B1", r, err)
			}
		}
		list, _ := st.List(context.Background(), store.Filter{})
		if len(list) != 1 || list[0].ControlID != "B1" || list[0].MessageType != hl7.BatchType {
			t.Errorf("stored %+v, want the batch as one message", list)
		} else if m, _ := st.Get(context.Background(), list[0].ID); !bytes.Equal(m.Payload, batch20("B1")) {
			t.Errorf("the batch was not stored as it came")
		}
		bad := bytes.Replace(batch20("B2"), []byte("BTS|20"), []byte("BTS|21"), 1)
		ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
		reply, err = c.Send(ctx, bad)
		cancel()
		if a := ackOf(t, reply); err != nil || a.Code != hl7.CommitReject || !strings.Contains(string(reply), "BTS-1 says 21") {
			t.Errorf("a batch with a wrong count: %q, %v; want CR saying why", reply, err)
		}
	}
}

// stuckSpool never finishes an Accept until its context ends: a store
// stalled.
type stuckSpool struct{ entered chan struct{} }

func (s stuckSpool) Accept(ctx context.Context, m store.NewMessage) (store.Accepted, error) {
	s.entered <- struct{}{}
	<-ctx.Done()
	return store.Accepted{}, ctx.Err()
}

// TestShutdownCutsWaits: when Shutdown's bound runs out, a commit still
// waiting on the store is ended at once (the connections' waits hang off
// the server's base context, which Close cancels), not after the whole
// commit timeout.
func TestShutdownCutsWaits(t *testing.T) {
	spool := stuckSpool{entered: make(chan struct{}, 1)}
	s, addr := start(t, Options{Spool: spool, CommitTimeout: time.Minute})
	c := dial(t, addr)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c.Send(ctx, []byte(oru("stuck", "AL")))
	}()
	<-spool.entered
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want the deadline's error", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %s with a 100ms bound and a commit stalled for a minute", d)
	}
}
