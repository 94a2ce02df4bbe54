package inbound

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/store"
)

// dsnMail is a delivery-status report as Postfix writes one for a
// RET=HDRS submission.
func dsnMail(mailID, envid, returned, rcpt, action, status string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "From: MAILER-DAEMON@mail.hospital.test (Mail Delivery System)\r\nTo: lab@partner.test\r\n"+
		"Subject: Undelivered Mail Returned to Sender\r\nMessage-Id: %s\r\nMIME-Version: 1.0\r\n"+
		"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"+
		"--B\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n"+
		"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mail.hospital.test\r\n", mailID)
	if envid != "" {
		fmt.Fprintf(&b, "Original-Envelope-Id: %s\r\n", envid)
	}
	fmt.Fprintf(&b, "\r\nFinal-Recipient: rfc822; %s\r\nAction: %s\r\nStatus: %s\r\nDiagnostic-Code: smtp; 550 %s User unknown\r\n\r\n",
		rcpt, action, status, status)
	fmt.Fprintf(&b, "--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: lab@partner.test\r\nMessage-ID: %s\r\n\r\n--B--\r\n", returned)
	return []byte(b.String())
}

// TestBounce: a mail server's report that a mail of ours bounced marks that
// message bounced with the Status, raises one alert, is recorded and never
// quarantined; found by ENVID, else by the returned Message-ID. A delay is
// only a warning; a report naming nothing of ours is quarantined as
// unknown-bounce; the same report fetched twice changes nothing more.
func TestBounce(t *testing.T) {
	l := newLabSide(t)
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	ctx := context.Background()
	sent := map[string]int64{}
	for _, id := range []string{"b1", "b2", "b3", "b4"} {
		a, err := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "hospital", ControlID: id, Payload: []byte(id)})
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Prepare(ctx, a.ID, "<"+id+"@partner.test>", &store.Pending{Partner: "hospital", ControlID: id, MIC: "x, sha-256",
			Sent: time.Now(), Due: time.Now().Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		st.MarkSent(ctx, a.ID)
		sent[id] = a.ID
	}
	check := func(name string, raw []byte, outcome string) {
		t.Helper()
		res, err := r.Handle(ctx, raw)
		if err != nil || res.Quarantine != nil || res.Bounce == nil || res.Bounce.Outcome != outcome || res.Receipt != nil {
			t.Errorf("%s: %+v (bounce %+v), %v; want outcome %s", name, res, res.Bounce, err, outcome)
		}
	}
	if _, err := st.SetReceipt(ctx, "<b4@partner.test>", store.PendingMatched, store.MatchByMessageID, false); err != nil {
		t.Fatal(err)
	}
	check("failed, for a message whose receipt came", dsnMail("<d5@mail>", "b4@partner.test", "", "edi@hospital.test", "failed", "5.1.1"),
		"bounced after acknowledged")
	check("failed, by ENVID", dsnMail("<d1@mail>", "b1@partner.test", "<other@x>", "edi@hospital.test", "failed", "5.1.1"), "bounced")
	check("again", dsnMail("<d1@mail>", "b1@partner.test", "<other@x>", "edi@hospital.test", "failed", "5.1.1"), "bounced")
	check("failed, by returned header", dsnMail("<d2@mail>", "", "<b2@partner.test>", "edi@hospital.test", "failed", "5.2.2"), "bounced")
	check("delayed", dsnMail("<d3@mail>", "b3@partner.test", "", "edi@hospital.test", "delayed", "4.4.1"), "delayed")
	res, err := r.Handle(ctx, dsnMail("<d4@mail>", "nothing@partner.test", "<nothing@x>", "edi@hospital.test", "failed", "5.1.1"))
	if err != nil || res.Quarantine == nil || res.Quarantine.Reason != ReasonUnknownBounce {
		t.Errorf("unknown bounce: %+v, %v; want quarantined as %s", res, err, ReasonUnknownBounce)
	}
	for id, want := range map[string]store.State{"b1": store.Bounced, "b2": store.Bounced, "b3": store.Sent, "b4": store.Acknowledged} {
		m, _ := st.Get(ctx, sent[id])
		if m.State != want {
			t.Errorf("%s: %s, want %s", id, m.State, want)
		}
		if want == store.Bounced {
			if _, _, lastErr, _ := st.Delivery(ctx, m.ID); !strings.Contains(lastErr, "5.") {
				t.Errorf("%s: reason %q, want the Status", id, lastErr)
			}
			if p, _ := st.PendingByMessageID(ctx, m.MessageID); p.State != store.PendingCancelled {
				t.Errorf("%s: receipt %s, want cancelled (none will come)", id, p.State)
			}
		}
	}
	alerts, _ := st.Alerts(ctx, false, 100)
	bounced := 0
	for _, a := range alerts {
		if a.Kind == store.AlertBounced {
			bounced++
			if !strings.Contains(a.Text, "5.") {
				t.Errorf("alert %q without the Status", a.Text)
			}
		}
	}
	if bounced != 2 {
		t.Errorf("%d bounce alerts, want 2 (one a message, none for the acknowledged one): %+v", bounced, alerts)
	}
	if reports, _ := st.Reports(ctx, store.ReportFilter{}); len(reports) != 4 {
		t.Errorf("%d reports, want 4 (the repeated one recorded once): %+v", len(reports), reports)
	}
	for mail, want := range map[string]string{"<d1@mail>": "envid", "<d2@mail>": "message-id"} {
		if r, _ := st.Reports(ctx, store.ReportFilter{MailMessageID: mail}); len(r) != 1 || r[0].MatchedBy != want {
			t.Errorf("report of %s: %+v, want matched by %s", mail, r, want)
		}
	}
	// A bounced message goes back into its queue with retry.
	if n, err := st.RetryAll(ctx, "hospital"); err != nil || n["hospital"] != 2 {
		t.Errorf("RetryAll = %v, %v; want the two bounced", n, err)
	}
}
