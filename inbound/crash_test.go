package inbound

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestCrashBetweenFetchAndDelivery: a mail is fetched and stored, and the
// process stops before the router got it (and before the mail left the
// inbox). After a restart the message is delivered, once; the same mail
// fetched again is recognized as a replay and not delivered again.
func TestCrashBetweenFetchAndDelivery(t *testing.T) {
	l := newLabSide(t)
	dir := t.TempDir()
	open := func() (*store.Store, *journal.Journal) {
		st, err := store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
		if err != nil {
			t.Fatal(err)
		}
		j, _ := journal.Open(filepath.Join(dir, "incoming.mbox"))
		return st, j
	}
	st, j := open()
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	mail, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	ctx := context.Background()
	res, err := (&Receiver{Opener: l.opener, Store: st, Journal: j}).Handle(ctx, mail)
	if err != nil || res.ID == 0 {
		t.Fatalf("Handle = %+v, %v", res, err)
	}
	// The process stops here: no router delivery, the mail still in the inbox.
	st.Close()
	j.Close()

	st, j = open()
	defer st.Close()
	defer j.Close()
	r := mailtest.StartRouter(t, "127.0.0.1:0")
	l.opener.Config.Router.Addr = r.Addr
	d, _ := deliver.NewDeliverer(deliver.DelivererOptions{Config: l.opener.Config, Store: st, Logger: testlog.New(t, slog.LevelInfo), Poll: 10 * time.Millisecond})
	dctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { d.Run(dctx); close(done) }()
	defer func() { cancel(); <-done }()
	mailtest.WaitFor(t, "delivery after the restart", func() bool { return len(r.Received(t)) == 1 })

	// The watcher fetches the same mail again (it had not been moved).
	again, err := (&Receiver{Opener: l.opener, Store: st, Journal: j}).Handle(ctx, mail)
	if err != nil || !again.Replay || again.ID != res.ID {
		t.Fatalf("second Handle = %+v, %v; want a replay of %d", again, err, res.ID)
	}
	d.Notify("hospital")
	time.Sleep(200 * time.Millisecond)
	if got := r.Received(t); len(got) != 1 {
		t.Errorf("router received %d messages, want exactly 1", len(got))
	} else if m, _ := r.Store.Get(ctx, got[0].ID); !bytes.Equal(m.Payload, []byte(orm)) {
		t.Errorf("router got %q", m.Payload)
	}
}

func TestSweep(t *testing.T) {
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "late", Payload: []byte("x")})
	now := time.Now()
	st.Prepare(ctx, a.ID, "<late@h.test>", &store.Pending{Partner: "lab", ControlID: "late", MIC: "m", Sent: now.Add(-2 * time.Hour), Due: now.Add(-time.Hour)})
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	got, err := outbound.Sweep(ctx, st, log, now)
	if err != nil || len(got) != 1 || !bytes.Contains(logs.Bytes(), []byte("ALERT receipt overdue")) ||
		!bytes.Contains(logs.Bytes(), []byte("control_id=late")) {
		t.Errorf("outbound.Sweep = %+v, %v; log %s", got, err, logs.String())
	}
	if again, _ := outbound.Sweep(ctx, st, log, now); len(again) != 0 {
		t.Errorf("second outbound.Sweep reported %d again", len(again))
	}
	alerts, _ := st.Alerts(ctx, false, 0)
	if len(alerts) != 1 || alerts[0].Kind != store.AlertOverdue || alerts[0].ControlID != "late" || alerts[0].MessageID != "<late@h.test>" {
		t.Errorf("alerts = %+v, want one receipt-overdue for late", alerts)
	}
}

func TestSweepStuck(t *testing.T) {
	l := newLabSide(t)
	t0 := time.Now().Add(-3 * time.Hour)
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn), Now: func() time.Time { return t0 }})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "waiting", Payload: []byte("x")})
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	got, err := deliver.SweepStuck(ctx, l.opener.Config, st, log, time.Now())
	if err != nil || len(got) != 1 || !bytes.Contains(logs.Bytes(), []byte("ALERT message not delivered to the router")) {
		t.Fatalf("deliver.SweepStuck = %+v, %v; log %s", got, err, logs.String())
	}
	if again, _ := deliver.SweepStuck(ctx, l.opener.Config, st, log, time.Now()); len(again) != 0 {
		t.Errorf("deliver.SweepStuck alerted %d again", len(again))
	}
	if alerts, _ := st.Alerts(ctx, false, 0); len(alerts) != 1 || alerts[0].Kind != store.AlertStuck || alerts[0].Partner != "hospital" {
		t.Errorf("alerts = %+v, want one router-stuck for hospital", alerts)
	}
}
