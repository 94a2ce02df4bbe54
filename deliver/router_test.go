package deliver

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

func runDeliverer(t *testing.T, cfg *config.Config, st *store.Store, delivered func(context.Context, store.Message, []byte)) func() {
	t.Helper()
	d, err := NewDeliverer(DelivererOptions{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo),
		Poll: 10 * time.Millisecond, Delivered: delivered})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	return func() { cancel(); <-done }
}

func inbound(t *testing.T, st *store.Store, id string) []byte {
	t.Helper()
	payload := []byte("MSH|^~\\&|LAB|TL|HIS|GH|20261123||ORU^R01|" + id + "|P|2.3|||AL\rPID|1||9\rOBX|1|NM|x||" + id + "\r")
	if _, err := st.Accept(context.Background(), store.NewMessage{Direction: store.Inbound, Partner: "hospital",
		ControlID: id, MessageType: "ORU^R01", Payload: payload, MessageID: "<" + id + "@h.test>"}); err != nil {
		t.Fatal(err)
	}
	return payload
}

func TestDeliverToRouter(t *testing.T) {
	r := mailtest.StartRouter(t, "127.0.0.1:0")
	cfg, st := mailtest.LabConfig(t, r.Addr)
	var mu sync.Mutex
	var acks []string
	want := map[string][]byte{}
	for i := 1; i <= 3; i++ {
		id := fmt.Sprint("in", i)
		want[id] = inbound(t, st, id)
	}
	stop := runDeliverer(t, cfg, st, func(_ context.Context, m store.Message, ack []byte) {
		a, _ := hl7.ParseAck(ack)
		mu.Lock()
		acks = append(acks, m.ControlID+":"+string(a.Code))
		mu.Unlock()
	})
	defer stop()
	mailtest.WaitFor(t, "three deliveries", func() bool { return len(r.Received(t)) == 3 })
	stop()
	for _, m := range r.Received(t) {
		full, _ := r.Store.Get(context.Background(), m.ID)
		if string(full.Payload) != string(want[m.ControlID]) {
			t.Errorf("router got %q for %s", full.Payload, m.ControlID)
		}
	}
	if fmt.Sprint(acks) != "[in1:CA in2:CA in3:CA]" {
		t.Errorf("Delivered calls = %v, want in order with CA", acks)
	}
	list, _ := st.List(context.Background(), store.Filter{Direction: store.Inbound})
	for _, m := range list {
		ack, _ := st.Response(context.Background(), m.ID)
		if a, err := hl7.ParseAck(ack); m.State != store.Delivered || err != nil || a.ControlID != m.ControlID {
			t.Errorf("message %s: state %s, stored ACK %q", m.ControlID, m.State, ack)
		}
	}
}

// TestRouterDownThenUp: while the router is down the message waits; once
// it is up the message is delivered, once.
func TestRouterDownThenUp(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	cfg, st := mailtest.LabConfig(t, addr)
	inbound(t, st, "d1")
	stop := runDeliverer(t, cfg, st, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "two failed attempts", func() bool {
		list, _ := st.List(ctx, store.Filter{})
		n, _, _, _ := st.Delivery(ctx, list[0].ID)
		return n >= 2
	})
	r := mailtest.StartRouter(t, addr)
	mailtest.WaitFor(t, "delivery once the router is up", func() bool { return len(r.Received(t)) == 1 })
	time.Sleep(50 * time.Millisecond)
	stop()
	if n := len(r.Received(t)); n != 1 {
		t.Errorf("router received %d messages, want 1", n)
	}
}

// TestRouterSilent: a router that takes the message but never answers
// within ack_timeout is not counted as delivered.
func TestRouterSilent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				buf := make([]byte, 4096)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	cfg, st := mailtest.LabConfig(t, ln.Addr().String())
	inbound(t, st, "s1")
	stop := runDeliverer(t, cfg, st, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "a timed-out attempt", func() bool {
		list, _ := st.List(ctx, store.Filter{})
		n, _, lastErr, _ := st.Delivery(ctx, list[0].ID)
		return n >= 1 && lastErr != ""
	})
	stop()
	list, _ := st.List(ctx, store.Filter{})
	if list[0].State != store.Queued {
		t.Errorf("state after a silent router: %s, want queued", list[0].State)
	}
}

// TestRecoverResponses: the process died after the router's ACK was
// recorded and before the response was queued. Recover queues it, with
// the stored ACK, once; a request already answered is left alone.
func TestRecoverResponses(t *testing.T) {
	cfg, st := mailtest.LabConfig(t, "127.0.0.1:1")
	ctx := context.Background()
	ack := []byte("MSH|^~\\&|OE|GH|LIS|TL|20261123||ACK^R01|A1|P|2.3\rMSA|AA|R1\r")
	a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "R1",
		Payload: []byte("MSH|^~\\&|LIS|TL|OE|GH|20261123||ORU^R01|R1|P|2.3|||AL\r"), MessageID: "<r1@h>", Kind: store.KindRequest})
	b, _ := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "R2",
		Payload: []byte("MSH|^~\\&|LIS|TL|OE|GH|20261123||ORU^R01|R2|P|2.3|||AL\r"), MessageID: "<r2@h>", Kind: store.KindRequest})
	for _, id := range []int64{a.ID, b.ID} {
		if err := st.MarkDelivered(ctx, id, ack); err != nil {
			t.Fatal(err)
		}
	}
	r := &Responder{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo)}
	list, _ := st.Get(ctx, b.ID)
	r.Delivered(ctx, list, ack) // R2 was answered before the crash
	if err := r.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Recover(ctx); err != nil { // a second start finds nothing left
		t.Fatal(err)
	}
	out, _ := st.List(ctx, store.Filter{Direction: store.Outbound})
	replies := map[string]int{}
	for _, m := range out {
		replies[m.InReplyTo]++
	}
	if len(out) != 2 || replies["<r1@h>"] != 1 || replies["<r2@h>"] != 1 {
		t.Fatalf("responses queued: %v, want one for each request", replies)
	}
	for _, m := range out {
		if m.InReplyTo != "<r1@h>" {
			continue
		}
		full, _ := st.Get(ctx, m.ID)
		b, err := security.ParseBundle(full.Payload)
		if err != nil || b.Response == nil {
			t.Fatalf("recovered bundle: %v", err)
		}
		resp, _, err := security.DecodeEDI(b.Response, security.Accept{})
		if err != nil || !bytes.Equal(resp, ack) || b.MDN.OriginalMessageID != "<r1@h>" {
			t.Errorf("the recovered response carries %q (%v), MDN for %s; want the router's stored ACK", resp, err, b.MDN.OriginalMessageID)
		}
	}
}

// scriptedRouter answers each message with the next code of codes (AA once
// they run out) and records every frame it got.
type scriptedRouter struct {
	Addr  string
	mu    sync.Mutex
	codes []hl7.AckCode
	got   [][]byte
}

func startScriptedRouter(t *testing.T, codes ...hl7.AckCode) *scriptedRouter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	r := &scriptedRouter{Addr: ln.Addr().String(), codes: codes}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				rd := mllp.NewReader(c, 1<<20)
				for {
					frame, err := rd.ReadFrame()
					if err != nil {
						return
					}
					h, err := hl7.ParseHeader(frame)
					if err != nil {
						return
					}
					r.mu.Lock()
					r.got = append(r.got, bytes.Clone(frame))
					code := hl7.ApplicationAccept
					if len(r.codes) > 0 {
						code, r.codes = r.codes[0], r.codes[1:]
					}
					r.mu.Unlock()
					if mllp.WriteFrame(c, hl7.BuildAck(h, hl7.Ack{Code: code, ControlID: "R1"})) != nil {
						return
					}
				}
			}()
		}
	}()
	return r
}

func (r *scriptedRouter) frames() [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]byte(nil), r.got...)
}

// TestRouterCE: CE means the router could not take responsibility: the
// same bytes are sent again until it answers AA, and the message is
// delivered once. AE is the router's answer: delivered once, and passed on.
func TestRouterCE(t *testing.T) {
	r := startScriptedRouter(t, hl7.CommitError, hl7.CommitError, hl7.ApplicationAccept, hl7.ApplicationError)
	cfg, st := mailtest.LabConfig(t, r.Addr)
	ce := inbound(t, st, "ce1")
	ae := inbound(t, st, "ae1")
	var mu sync.Mutex
	var delivered []string
	d, err := NewDeliverer(DelivererOptions{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo),
		Poll: 10 * time.Millisecond, RetryBase: time.Millisecond, RetryMax: 5 * time.Millisecond,
		Delivered: func(_ context.Context, m store.Message, ack []byte) {
			a, _ := hl7.ParseAck(ack)
			mu.Lock()
			delivered = append(delivered, m.ControlID+":"+string(a.Code))
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	mailtest.WaitFor(t, "both delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(delivered) == 2
	})
	time.Sleep(50 * time.Millisecond)
	cancel()
	<-done
	frames := r.frames()
	if len(frames) != 4 {
		t.Fatalf("router got %d frames, want 4 (ce1 three times, ae1 once)", len(frames))
	}
	for i, f := range frames[:3] {
		if !bytes.Equal(f, ce) {
			t.Errorf("frame %d = %q, want ce1's bytes", i, f)
		}
	}
	if !bytes.Equal(frames[3], ae) {
		t.Errorf("frame 3 = %q, want ae1's bytes", frames[3])
	}
	if got := fmt.Sprint(delivered); got != "[ce1:AA ae1:AE]" {
		t.Errorf("delivered %s, want [ce1:AA ae1:AE]", got)
	}
	list, _ := st.List(ctx, store.Filter{Direction: store.Inbound})
	for _, m := range list {
		n, _, _, _ := st.Delivery(context.Background(), m.ID)
		if m.State != store.Delivered {
			t.Errorf("%s: %s after %d attempts, want delivered", m.ControlID, m.State, n)
		}
	}
}

// TestInboundExpires: a partner's request the router does not take within
// the partner's expire_after is marked expired with an alert, and the
// partner gets an MDN deleted/expired (draft-ietf-ediint-hl7-02 §4.1.3)
// instead of a response; a crash before that MDN was queued is mended by
// Recover.
func TestInboundExpires(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := ln.Addr().String()
	ln.Close() // the router is down for good
	cfg, st := mailtest.LabConfig(t, down)
	cfg.Partners[0].ExpireAfter = config.Duration(time.Hour)
	ctx := context.Background()
	for _, id := range []string{"x1", "x2"} {
		if _, err := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: id,
			MessageType: "ORU^R01", Payload: []byte("MSH|^~\\&|A|B|C|D|20261123||ORU^R01|" + id + "|P|2.3\r"),
			MessageID: "<" + id + "@h.test>", Kind: store.KindRequest}); err != nil {
			t.Fatal(err)
		}
	}
	resp := &Responder{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo)}
	later := func() time.Time { return time.Now().Add(2 * time.Hour) }
	var expired []string
	var mu sync.Mutex
	d, err := NewDeliverer(DelivererOptions{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo), Now: later,
		Poll: 10 * time.Millisecond, Expired: func(ctx context.Context, m store.Message) {
			mu.Lock()
			expired = append(expired, m.ControlID)
			mu.Unlock()
			if m.ControlID == "x1" { // x2's MDN is left, as a crash would, for Recover
				resp.Expired(ctx, m)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { d.Run(dctx); close(done) }()
	mailtest.WaitFor(t, "both expired", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(expired) == 2
	})
	cancel()
	<-done
	if err := resp.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"x1", "x2"} {
		list, _ := st.List(ctx, store.Filter{Direction: store.Inbound, ControlID: id})
		if len(list) != 1 || list[0].State != store.Expired {
			t.Fatalf("%s: %+v, want expired", id, list)
		}
		answers, _ := st.List(ctx, store.Filter{Direction: store.Outbound, ControlID: "mdn-" + id})
		if len(answers) != 1 || answers[0].InReplyTo != "<"+id+"@h.test>" || answers[0].Kind != store.KindBundle {
			t.Fatalf("%s: answers %+v, want one MDN in reply to its mail", id, answers)
		}
		m, err := st.Get(ctx, answers[0].ID)
		if err != nil {
			t.Fatal(err)
		}
		mdn, err := security.ParseMDN(m.Payload)
		if err != nil || mdn.Disposition.Status() != "deleted/expired" || mdn.OriginalMessageID != "<"+id+"@h.test>" {
			t.Errorf("%s: MDN %+v, %v; want deleted/expired", id, mdn, err)
		}
	}
	alerts, _ := st.Alerts(ctx, false, 100)
	n := 0
	for _, a := range alerts {
		if a.Kind == store.AlertExpired {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d expired alerts, want 2: %+v", n, alerts)
	}
}

// TestBatchSplit: a batch from a partner with batch_split goes to the router
// as its messages, one by one; a CE in the middle is retried from that
// message on, not from the first; the router's answers make one batch
// acknowledgement, which the response carries.
func TestBatchSplit(t *testing.T) {
	r := startScriptedRouter(t, hl7.ApplicationAccept, hl7.ApplicationAccept, hl7.CommitError, hl7.ApplicationAccept, hl7.ApplicationError)
	cfg, st := mailtest.LabConfig(t, r.Addr)
	cfg.Partners[0].BatchSplit = true
	var batch []byte
	batch = append(batch, "BHS|^~\\&|LAB|TL|HIS|GH|20261201||||SB1\r"...)
	for i := 1; i <= 4; i++ {
		id := fmt.Sprint("s", i)
		batch = append(batch, "MSH|^~\\&|LAB|TL|HIS|GH|20261201||ORU^R01|"+id+"|P|2.5|||AL\rPID|1||9\r"...)
	}
	batch = append(batch, "BTS|4\r"...)
	ctx := context.Background()
	if _, err := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "SB1",
		MessageType: hl7.BatchType, Payload: batch, MessageID: "<sb1@h.test>", Kind: store.KindRequest}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var answer []byte
	d, err := NewDeliverer(DelivererOptions{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo),
		Poll: 10 * time.Millisecond, RetryBase: time.Millisecond, RetryMax: 5 * time.Millisecond,
		Delivered: func(_ context.Context, m store.Message, ack []byte) { mu.Lock(); answer = ack; mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { d.Run(dctx); close(done) }()
	mailtest.WaitFor(t, "the batch delivered", func() bool { mu.Lock(); defer mu.Unlock(); return answer != nil })
	cancel()
	<-done
	var got []string
	for _, f := range r.frames() {
		h, err := hl7.ParseHeader(f)
		if err != nil {
			t.Fatalf("the router got a frame that is not one message: %q", f)
		}
		got = append(got, h.ControlID)
	}
	if fmt.Sprint(got) != "[s1 s2 s3 s3 s4]" {
		t.Errorf("the router got %v, want [s1 s2 s3 s3 s4] (s3 again after its CE, s1 and s2 not)", got)
	}
	res, err := hl7.ParseBatchAck(answer)
	if err != nil || res.Reference != "SB1" || len(res.Acks) != 4 || res.Code() != hl7.ApplicationError || res.Acks[3].ControlID != "s4" {
		t.Errorf("answer %+v, %v; want a batch acknowledgement of four, s4's AE among them", res, err)
	}
	if v, _ := st.Value(ctx, batchKey(1)); v != "" {
		t.Errorf("the batch's progress was left behind: %q", v)
	}
	// The response: the batch acknowledgement, its AE making the MDN a
	// warning.
	list, _ := st.List(ctx, store.Filter{Direction: store.Inbound})
	m, _ := st.Get(ctx, list[0].ID)
	bundle, controlID, err := (&Responder{Config: cfg, Store: st}).bundle(m, answer)
	if err != nil || controlID != "BA1" {
		t.Fatalf("bundle: %v, control ID %q", err, controlID)
	}
	b, err := security.ParseBundle(bundle)
	if err != nil || b.MDN.Disposition.Status() != "processed/warning" {
		t.Fatalf("bundle %+v, %v; want processed/warning", b, err)
	}
	if payload, _, err := security.DecodeEDI(b.Response, security.Accept{}); err != nil || !bytes.Equal(payload, answer) {
		t.Errorf("the response carries %q, %v; want the batch acknowledgement", payload, err)
	}
}
