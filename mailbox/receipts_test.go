package mailbox

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

func TestReconcile(t *testing.T) {
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	now := time.Now()
	mics := map[string]security.MIC{}
	for _, id := range []string{"1", "2", "3", "4"} {
		a, err := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: id, Payload: []byte(id)})
		if err != nil {
			t.Fatal(err)
		}
		mic := security.ComputeMIC([]byte("entity " + id))
		mics[id] = mic
		due := now.Add(time.Hour)
		if id == "4" {
			due = now.Add(-time.Minute)
		}
		if err := st.Prepare(ctx, a.ID, "<"+id+"@h.test>", &store.Pending{Partner: "lab", ControlID: id, MIC: mic.String(), Sent: now, Due: due}); err != nil {
			t.Fatal(err)
		}
		st.MarkSent(ctx, a.ID)
	}
	other := security.ComputeMIC([]byte("something else"))
	mdn := func(id string, mic *security.MIC, d security.Disposition) *security.MDN {
		return &security.MDN{FinalRecipient: "lab@p.test", OriginalMessageID: "<" + id + "@h.test>", Disposition: d, MIC: mic}
	}
	ok := security.Disposition{Type: security.Processed}
	m1, m3, m4 := mics["1"], mics["3"], mics["4"]
	tests := []struct {
		name    string
		partner string
		mdn     *security.MDN
		want    Receipt
	}{
		{"matching receipt", "lab", mdn("1", &m1, ok), ReceiptMatched},
		{"same receipt again", "lab", mdn("1", &m1, ok), ReceiptMatched},
		{"receipt from another partner", "clinic", mdn("2", &other, ok), ReceiptUnknown},
		{"MIC mismatch", "lab", mdn("2", &other, ok), ReceiptMICMismatch},
		{"error disposition", "lab", mdn("3", &m3, security.Disposition{Type: security.Processed, Modifier: security.ModError}), ReceiptError},
		{"unknown Message-ID", "lab", mdn("99", &m1, ok), ReceiptUnknown},
		// A gateway rewrote the Message-ID of the mail sent: the MIC
		// alone finds it, within the partner only.
		{"rewritten Message-ID, another partner", "clinic", mdn("rewritten", &m4, ok), ReceiptUnknown},
		{"rewritten Message-ID", "lab", mdn("rewritten", &m4, ok), ReceiptMatched},
		{"rewritten Message-ID, no MIC", "lab", mdn("rewritten2", nil, ok), ReceiptUnknown},
	}
	for _, tt := range tests {
		got, _, err := Reconcile(ctx, st, tt.partner, tt.mdn, false)
		if err != nil || got != tt.want {
			t.Errorf("%s: Reconcile = %s, %v; want %s", tt.name, got, err, tt.want)
		}
	}
	list, _ := st.List(ctx, store.Filter{ControlID: "1"})
	if list[0].State != store.Acknowledged {
		t.Errorf("matched message state %s, want acknowledged", list[0].State)
	}
	if p, _ := st.PendingByMessageID(ctx, "<2@h.test>"); p.State != store.PendingMismatch || p.MatchedBy != store.MatchByMessageID {
		t.Errorf("mismatched pending: %+v", p)
	}
	if p, _ := st.PendingByMessageID(ctx, "<1@h.test>"); p.MatchedBy != store.MatchByMessageID {
		t.Errorf("receipt 1 matched by %q, want %q", p.MatchedBy, store.MatchByMessageID)
	}
	if p, _ := st.PendingByMessageID(ctx, "<4@h.test>"); p.State != store.PendingMatched || p.MatchedBy != store.MatchByMIC {
		t.Errorf("receipt 4 (rewritten Message-ID): %+v; want matched by mic", p)
	}
	overdue, err := st.Overdue(ctx, now)
	if err != nil || len(overdue) != 0 {
		t.Errorf("Overdue = %+v, %v; want none (4 was matched by its MIC)", overdue, err)
	}
	if again, _ := st.Overdue(ctx, now); len(again) != 0 {
		t.Errorf("Overdue reported %d again", len(again))
	}
}
