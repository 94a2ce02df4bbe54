package inbound

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
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
	for _, id := range []string{"1", "2", "3", "4", "5", "6", "7", "8"} {
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
	m1, m3, m4, m8 := mics["1"], mics["3"], mics["4"], mics["8"]
	dispatched := security.Disposition{Type: security.Dispatched}
	final := mdn("1", nil, dispatched)
	final.FinalDelivery = true
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
		// §4.1.3 tables 4 and 5: a processed message can be dispatched
		// later (Direct says so with X-DIRECT-FINAL-DESTINATION-DELIVERY);
		// failures need no MIC to count.
		{"dispatched after processed", "lab", final, ReceiptDispatched},
		{"failed", "lab", mdn("5", nil, security.Disposition{Type: security.Failed}), ReceiptError},
		{"denied", "lab", mdn("6", nil, security.Disposition{Type: security.Denied}), ReceiptError},
		{"deleted/expired", "lab", mdn("7", nil, security.Disposition{Type: security.Deleted, Modifier: security.ModExpired}), ReceiptError},
		{"processed/warning", "lab", mdn("8", &m8, security.Disposition{Type: security.Processed, Modifier: security.ModWarning}), ReceiptMatched},
		{"dispatched with another MIC", "lab", mdn("8", &other, dispatched), ReceiptMICMismatch},
	}
	for i, tt := range tests {
		got, _, err := Reconcile(ctx, st, tt.partner, tt.mdn, false, fmt.Sprintf("<r%d@p.test>", i))
		if err != nil || got != tt.want {
			t.Errorf("%s: Reconcile = %s, %v; want %s", tt.name, got, err, tt.want)
		}
	}
	// The same receipt mail again (fetched twice) is recorded once.
	if got, _, err := Reconcile(ctx, st, "lab", final, false, "<r0@p.test>"); err != nil || got != ReceiptRepeated {
		t.Errorf("repeated receipt mail: %s, %v; want repeated", got, err)
	}
	all, err := st.Reports(ctx, store.ReportFilter{Limit: 1000})
	if err != nil || len(all) != len(tests) {
		t.Fatalf("Reports = %d, %v; want one for each of %d receipts", len(all), err, len(tests))
	}
	one, _ := st.List(ctx, store.Filter{ControlID: "1"})
	reports, _ := st.Reports(ctx, store.ReportFilter{Message: one[0].ID})
	if len(reports) != 3 || reports[0].Disposition != "dispatched" || !reports[0].FinalDelivery || reports[0].Outcome != "dispatched" ||
		reports[2].Disposition != "processed" || reports[2].Outcome != "matched" || reports[2].MatchedBy != store.MatchByMessageID {
		t.Errorf("reports of message 1 (processed twice, then dispatched): %+v", reports)
	}
	for _, r := range all {
		if r.OriginalMessageID == "<99@h.test>" && (r.Message != 0 || r.Outcome != "unknown" || r.MailMessageID == "") {
			t.Errorf("unmatched receipt recorded as %+v; want no message, outcome unknown, its mail's Message-ID", r)
		}
	}
	if p, _ := st.PendingByMessageID(ctx, "<5@h.test>"); p.State != store.PendingError {
		t.Errorf("failed receipt left pending %+v; want state error", p)
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

// TestHonourOptions: the receipt follows the request's
// Disposition-Notification-Options (RFC 4130 §7.3): the first requested MIC
// algorithm computed; a protocol or algorithms required that this gateway
// cannot give refuse the mail with a failed MDN; options that cannot be read
// get the usual receipt with a warning.
func TestHonourOptions(t *testing.T) {
	entity := []byte("Content-Type: application/edi-hl7\r\n\r\nMSH|...\r\n")
	pgp := &config.Partner{Name: "lab", Security: "pgp"}
	for _, c := range []struct {
		name    string
		req     security.MDNRequest
		refused Reason
		hash    crypto.Hash
		note    bool
	}{
		{"no options", security.MDNRequest{To: "a@b"}, "", crypto.SHA256, false},
		{"sha-512 first", security.MDNRequest{Protocol: "pgp-signature", MICAlgs: []string{"sha-512", "sha-256"}}, "", crypto.SHA512, false},
		{"sha1 from an old partner", security.MDNRequest{Protocol: "pgp-signature", MICAlgs: []string{"sha1"}}, "", crypto.SHA1, false},
		{"md5 only, optional", security.MDNRequest{Protocol: "pgp-signature", MICAlgs: []string{"md5"}}, "", crypto.SHA256, false},
		{"md5 only, required", security.MDNRequest{Protocol: "pgp-signature", MICAlgs: []string{"md5"}, MICRequired: true}, ReasonMICRefused, 0, false},
		{"S/MIME required of a PGP partner", security.MDNRequest{Protocol: "pkcs7-signature", Required: true}, ReasonReceiptRefused, 0, false},
		{"S/MIME optional of a PGP partner", security.MDNRequest{Protocol: "pkcs7-signature"}, "", crypto.SHA256, false},
		{"unreadable", security.MDNRequest{Unreadable: true}, "", crypto.SHA256, true},
	} {
		req := c.req
		in := &Incoming{MDNRequest: &req, MIC: security.ComputeMIC(entity)}
		err := honour(pgp, in, entity)
		var q *QuarantineError
		if c.refused != "" {
			want := map[Reason]string{ReasonReceiptRefused: "unsupported format", ReasonMICRefused: "unsupported MIC-algorithms"}[c.refused]
			if !errors.As(err, &q) || q.Reason != c.refused {
				t.Errorf("%s: %v, want refused as %s", c.name, err, c.refused)
			} else if d, text, ok := q.Reason.Disposition(); !ok || d.Type != security.Failed || text != want {
				t.Errorf("%s: receipt %v %q %v, want failed (%s)", c.name, d, text, ok, want)
			}
			continue
		}
		if err != nil || in.MIC.Hash != c.hash || !in.MIC.Equal(security.MICWith(entity, c.hash)) || (in.ReceiptNote != "") != c.note {
			t.Errorf("%s: %v, MIC %s, note %q", c.name, err, in.MIC, in.ReceiptNote)
		}
	}
}
