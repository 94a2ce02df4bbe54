package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestAlerts(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	id1, err := s.RaiseAlert(ctx, Alert{Kind: AlertOverdue, Partner: "lab", ControlID: "C1", MessageID: "<1@h>", Text: "receipt overdue"})
	if err != nil {
		t.Fatal(err)
	}
	id2, _ := s.RaiseAlert(ctx, Alert{Kind: AlertQuarantine, Partner: "clinic", Text: "bad-signature"})
	open, err := s.Alerts(ctx, false, 0)
	if err != nil || len(open) != 2 || open[0].ID != id2 || open[1].Kind != AlertOverdue || open[1].ControlID != "C1" {
		t.Fatalf("Alerts = %+v, %v", open, err)
	}
	if err := s.AckAlert(ctx, id1, "night shift"); err != nil {
		t.Fatal(err)
	}
	if err := s.AckAlert(ctx, id1, "someone else"); err != nil {
		t.Errorf("second ack: %v", err)
	}
	if err := s.AckAlert(ctx, 99, "x"); !errors.Is(err, ErrNotFound) {
		t.Errorf("ack of an unknown alert = %v", err)
	}
	open, _ = s.Alerts(ctx, false, 0)
	if len(open) != 1 || open[0].ID != id2 {
		t.Errorf("open alerts after ack = %+v", open)
	}
	all, _ := s.Alerts(ctx, true, 0)
	if len(all) != 2 || all[1].AckedBy != "night shift" || all[1].Acked.IsZero() {
		t.Errorf("all alerts = %+v", all)
	}
}

func TestQuarantineRelease(t *testing.T) {
	dir := t.TempDir()
	s := open(t, dir)
	ctx := context.Background()
	raw := []byte("From: lab@partner.test\r\n\r\nsealed")
	id, err := s.Quarantine(ctx, Quarantined{Partner: "lab", Sender: "lab@partner.test", MessageID: "<q@p>",
		Reason: "unknown-signer", Detail: "key 0x1234", Raw: raw})
	if err != nil {
		t.Fatal(err)
	}
	q, err := s.QuarantineGet(ctx, id)
	if err != nil || string(q.Raw) != string(raw) || q.Reason != "unknown-signer" || !q.Released.IsZero() {
		t.Fatalf("QuarantineGet = %+v, %v", q, err)
	}
	if _, err := s.QuarantineGet(ctx, 42); !errors.Is(err, ErrNotFound) {
		t.Errorf("QuarantineGet(42) = %v", err)
	}
	sum, _ := s.Summaries(ctx, time.Time{})
	if sum["lab"] == nil || sum["lab"].Quarantined != 1 {
		t.Errorf("summary before release = %+v", sum["lab"])
	}
	if err := s.MarkReleased(ctx, id, "j.smith", "new key confirmed by phone", 7); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkReleased(ctx, id, "j.smith", "again", 8); !errors.Is(err, ErrReleased) {
		t.Errorf("second release = %v, want ErrReleased", err)
	}
	s.Close()
	s = open(t, dir)
	defer s.Close()
	list, _ := s.QuarantineList(ctx, 0)
	if len(list) != 1 || list[0].ReleasedBy != "j.smith" || list[0].ReleasedAs != 7 || list[0].Note == "" || list[0].Released.IsZero() {
		t.Errorf("after release and reopen = %+v", list)
	}
	sum, _ = s.Summaries(ctx, time.Time{})
	if sum["lab"] != nil && sum["lab"].Quarantined != 0 {
		t.Errorf("released mail still counted: %+v", sum["lab"])
	}
}

func TestRetry(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	a, _ := s.Accept(ctx, msg("lab", "1", "A"))
	b, _ := s.Accept(ctx, msg("lab", "2", "B"))
	if err := s.Retry(ctx, a.ID); err == nil {
		t.Error("a queued message was retried")
	}
	if err := s.Retry(ctx, 99); !errors.Is(err, ErrNotFound) {
		t.Errorf("Retry(99) = %v", err)
	}
	in, _ := s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "lab", ControlID: "i1", Payload: []byte("I")})
	s.MarkFinal(ctx, in.ID, Failed, "x")
	if err := s.Retry(ctx, in.ID); err == nil || !strings.Contains(err.Error(), "only outbound") {
		t.Errorf("Retry(inbound) = %v, want a refusal", err)
	}
	if err := s.MarkFinal(ctx, a.ID, Expired, "not delivered within 120h"); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkFinal(ctx, b.ID, Failed, "550 no such user"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []int64{a.ID, b.ID} {
		if err := s.Retry(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	m, err := s.NextQueued(ctx, "lab", Outbound, time.Now())
	if err != nil || m.ID != a.ID || m.Retried.IsZero() || m.Retried.Before(m.Received) {
		t.Fatalf("after retry NextQueued = %+v, %v", m, err)
	}
}

func TestSearchAndSummaries(t *testing.T) {
	s := open(t, t.TempDir())
	ctx := context.Background()
	s.Accept(ctx, msg("lab", "CTRL100", "A"))
	s.Accept(ctx, msg("lab", "CTRL200", "B"))
	s.Accept(ctx, NewMessage{Direction: Inbound, Partner: "clinic", ControlID: "X_1", MessageType: "ADT^A01",
		Payload: []byte("C"), MessageID: "<abc@clinic.test>"})
	for _, c := range []struct {
		q    string
		want int
	}{{"", 3}, {"CTRL", 2}, {"200", 1}, {"abc@clinic", 1}, {"clinic", 1}, {"lab", 2}, {"X_", 1}, {"%", 0}, {"nothing", 0}} {
		got, err := s.Search(ctx, c.q, 0)
		if err != nil || len(got) != c.want {
			t.Errorf("Search(%q) = %d messages, %v; want %d", c.q, len(got), err, c.want)
		}
	}
	p := Pending{MessageID: "<1@h>", Partner: "lab", ControlID: "CTRL100", MIC: "m", Sent: time.Now(), Due: time.Now().Add(time.Hour)}
	if err := s.Prepare(ctx, 1, p.MessageID, &p); err != nil {
		t.Fatal(err)
	}
	s.MarkSent(ctx, 1)
	sum, err := s.Summaries(ctx, time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	lab, clinic := sum["lab"], sum["clinic"]
	if lab == nil || lab.OutToday != 2 || lab.QueuedOut != 1 || lab.AwaitingReceipt != 1 || lab.LastActivity.IsZero() {
		t.Errorf("lab = %+v", lab)
	}
	if clinic == nil || clinic.InToday != 1 || clinic.QueuedIn != 1 {
		t.Errorf("clinic = %+v", clinic)
	}
	sum, _ = s.Summaries(ctx, time.Now().Add(time.Hour))
	if sum["lab"].OutToday != 0 {
		t.Errorf("messages before the day counted: %+v", sum["lab"])
	}
}
