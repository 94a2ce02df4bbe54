package deliver

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/store"
)

func numbered(id string, seq int) []byte {
	return []byte(fmt.Sprintf("MSH|^~\\&|LIS|TL|OE|GH|20261123||ORU^R01|%s|P|2.3|%d||AL\rPID|1\r", id, seq))
}

// arrivals returns the control IDs a router got, in order.
func arrivals(r *embedded.Router) []string {
	var out []string
	for _, m := range r.Messages() {
		if h, err := hl7.ParseHeader(m); err == nil {
			out = append(out, h.ControlID)
		}
	}
	return out
}

func waitArrivals(t *testing.T, r *embedded.Router, n int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(r.Messages()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("router got %v, want %d messages", arrivals(r), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	return arrivals(r)
}

// TestSequenceOrder: numbered messages (MSH-13) that arrived 1, 3, 2 reach
// the router 1, 2, 3; a gap (4 never comes) holds 5 for order_wait, then
// 5 goes with an alert.
func TestSequenceOrder(t *testing.T) {
	r, err := embedded.StartRouter("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cfg, st := mailtest.LabConfig(t, r.Addr)
	cfg.Partners[0].OrderWait = config.Duration(400 * time.Millisecond)
	ctx := context.Background()
	for i, seq := range []int{1, 3, 2} {
		st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: fmt.Sprint("S", seq),
			Payload: numbered(fmt.Sprint("S", seq), seq), MessageID: fmt.Sprintf("<s%d@h>", i), Kind: store.KindRequest})
	}
	stop := runDeliverer(t, cfg, st, nil)
	defer stop()
	if got := waitArrivals(t, r, 3); strings.Join(got, ",") != "S1,S2,S3" {
		t.Fatalf("router got %v, want S1,S2,S3", got)
	}
	start := time.Now()
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "S5",
		Payload: numbered("S5", 5), MessageID: "<s5@h>", Kind: store.KindRequest})
	got := waitArrivals(t, r, 4)
	if got[3] != "S5" || time.Since(start) < 400*time.Millisecond {
		t.Errorf("router got %v after %s; want S5 after order_wait", got, time.Since(start))
	}
	alerts, _ := st.Alerts(ctx, false, 0)
	if len(alerts) != 1 || alerts[0].Kind != store.AlertOrder || !strings.Contains(alerts[0].Text, "message 4 never came") {
		t.Errorf("alerts = %+v", alerts)
	}
}

// TestReplyOrder: a message that answers another (In-Reply-To) and came
// first waits for it; one whose request never comes goes after order_wait
// with an alert, and the partner's other messages do not wait meanwhile.
func TestReplyOrder(t *testing.T) {
	r, err := embedded.StartRouter("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cfg, st := mailtest.LabConfig(t, r.Addr)
	cfg.Partners[0].OrderWait = config.Duration(2 * time.Second) // long beside a loaded machine's delays
	ctx := context.Background()
	msg := func(id string) []byte {
		return []byte("MSH|^~\\&|LIS|TL|OE|GH|20261123||ORU^R01|" + id + "|P|2.3|||AL\rPID|1\r")
	}
	stop := runDeliverer(t, cfg, st, nil)
	defer stop()
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "B", Payload: msg("B"),
		MessageID: "<b@h>", InReplyTo: "<a@h>", Kind: store.KindRequest})
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "X", Payload: msg("X"),
		MessageID: "<x@h>", InReplyTo: "<never@h>", Kind: store.KindRequest})
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "C", Payload: msg("C"),
		MessageID: "<c@h>", Kind: store.KindRequest})
	if got := waitArrivals(t, r, 1); strings.Join(got, ",") != "C" {
		t.Fatalf("router got %v; want only C while B and X wait", got)
	}
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "A", Payload: msg("A"),
		MessageID: "<a@h>", Kind: store.KindRequest})
	if got := waitArrivals(t, r, 3); strings.Join(got[:3], ",") != "C,A,B" {
		t.Fatalf("router got %v; want C, A, B", got)
	}
	if got := waitArrivals(t, r, 4); got[3] != "X" {
		t.Fatalf("router got %v; want X last, after order_wait", got)
	}
	alerts, _ := st.Alerts(ctx, false, 0)
	if len(alerts) != 1 || alerts[0].ControlID != "X" || !strings.Contains(alerts[0].Text, "<never@h>") {
		t.Errorf("alerts = %+v", alerts)
	}
}
