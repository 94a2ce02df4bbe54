package inbound

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

func TestReceiver(t *testing.T) {
	l := newLabSide(t)
	r, jpath := l.receiver(t)
	st, j := r.Store.(*store.Store), r.Journal.(*journal.Journal)
	ctx := context.Background()

	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	good, mic := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	res, err := r.Handle(ctx, good)
	if err != nil || res.Quarantine != nil || res.ID == 0 {
		t.Fatalf("Handle(good) = %+v, %v", res, err)
	}
	m, _ := st.Get(ctx, res.ID)
	if m.Direction != store.Inbound || m.Partner != "hospital" || string(m.Payload) != orm || m.MessageID != "<m1@x.test>" ||
		m.MIC != mic.String() || m.ControlID != "q1" || m.State != store.Queued {
		t.Errorf("stored inbound = %+v", m)
	}

	// The same mail again is a replay: refused, pointing at the first.
	again, err := r.Handle(ctx, good)
	if err != nil || !again.Replay || again.Quarantine == nil || again.Quarantine.Reason != ReasonReplay || again.ID != res.ID {
		t.Errorf("Handle(replay) = %+v, %v", again, err)
	}
	if list, _ := st.List(ctx, store.Filter{Direction: store.Inbound}); len(list) != 1 {
		t.Errorf("%d inbound messages after a replay, want 1", len(list))
	}

	// Refused mail is recorded with its reason.
	forged, _ := l.mailFrom(t, "edi@hospital.test", l.clinic, edi, false)
	stranger, _ := l.mailFrom(t, "who@else.test", strangerKey(t), edi, false)
	for _, raw := range [][]byte{forged, stranger} {
		if res, err := r.Handle(ctx, raw); err != nil || res.Quarantine == nil {
			t.Errorf("Handle(bad) = %+v, %v", res, err)
		}
	}
	qs, _ := st.QuarantineList(ctx, 10)
	want := map[string]string{"replay": "hospital", "wrong-signer": "hospital", "unknown-sender": ""}
	if len(qs) != 3 {
		t.Fatalf("quarantine records = %+v", qs)
	}
	for _, q := range qs {
		if p, ok := want[q.Reason]; !ok || p != q.Partner {
			t.Errorf("quarantine record %+v", q)
		}
		// The whole mail is kept, for a person to look at and release.
		if full, err := st.QuarantineGet(ctx, q.ID); err != nil || !bytes.Contains(full.Raw, []byte(q.MessageID)) {
			t.Errorf("quarantined mail %d kept as %d bytes, %v", q.ID, len(full.Raw), err)
		}
	}
	if alerts, _ := st.Alerts(ctx, false, 0); len(alerts) != 3 || alerts[0].Kind != store.AlertQuarantine {
		t.Errorf("alerts = %+v, want one per quarantined mail", alerts)
	}

	// A bundle whose MDN answers a message we sent.
	a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "hospital", ControlID: "o1", Payload: []byte("x")})
	sentMIC := security.ComputeMIC([]byte("what we signed"))
	st.Prepare(ctx, a.ID, "<out1@partner.test>", &store.Pending{Partner: "hospital", ControlID: "o1", MIC: sentMIC.String(),
		Sent: time.Now(), Due: time.Now().Add(time.Hour)})
	mdn, _ := (&security.MDN{FinalRecipient: "edi@hospital.test", OriginalMessageID: "<out1@partner.test>",
		Disposition: security.Disposition{Type: security.Processed}, MIC: &sentMIC}).Entity()
	ack, _ := security.EncodeEDI([]byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ACK^O01|a9|P|2.3\rMSA|AA|o1\r"), security.EDIOptions{})
	bundle, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, security.BuildBundle(ack, mdn), false)
	bundle = bytes.Replace(bundle, []byte("<m1@x.test>"), []byte("<b1@x.test>"), 1)
	res, err = r.Handle(ctx, bundle)
	if err != nil || res.Receipt == nil || *res.Receipt != ReceiptMatched || res.ID == 0 {
		t.Fatalf("Handle(bundle) = %+v, %v", res, err)
	}
	if ack, _ := st.Get(ctx, res.ID); ack.ControlID != "a9" || ack.Direction != store.Inbound {
		t.Errorf("bundle response stored as %+v", ack)
	}

	j.Close()
	entries, err := journal.Read(jpath)
	if err != nil || len(entries) != 5 || !bytes.Equal(entries[0].Mail, good) {
		t.Errorf("incoming journal: %d entries, %v", len(entries), err)
	}
	// With the journal gone, nothing is decided.
	if res, err := r.Handle(ctx, good); err == nil {
		t.Errorf("Handle with a closed journal = %+v, want an error", res)
	}
}

// TestReceiverAnswers: a known partner that asked for a receipt learns why
// its mail was refused; a stranger does not; a request sent again gets the
// response already sent, again.
func TestReceiverAnswers(t *testing.T) {
	l := newLabSide(t)
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	woken := 0
	r.Notify = func(string) { woken++ }
	ctx := context.Background()
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})

	forged, _ := l.mailFrom(t, "edi@hospital.test", l.clinic, edi, false)
	stranger, _ := l.mailFrom(t, "who@else.test", strangerKey(t), edi, false)
	for _, raw := range [][]byte{forged, stranger} {
		if _, err := r.Handle(ctx, raw); err != nil {
			t.Fatal(err)
		}
	}
	out, _ := st.List(ctx, store.Filter{Direction: store.Outbound})
	if len(out) != 1 || out[0].Partner != "hospital" || out[0].Kind != store.KindBundle || out[0].InReplyTo != "<m1@x.test>" || woken != 1 {
		t.Fatalf("queued receipts = %+v (woken %d); want one for the hospital", out, woken)
	}
	m, _ := st.Get(ctx, out[0].ID)
	mdn, err := security.ParseMDN(m.Payload)
	if err != nil || mdn.Disposition.Type != security.Processed || mdn.Disposition.Modifier != security.ModError ||
		mdn.Error != "authentication-failed" || mdn.OriginalMessageID != "<m1@x.test>" {
		t.Errorf("refusal receipt = %+v, %v", mdn, err)
	}

	// A request, its response sent, then the same request again.
	good, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	good = bytes.Replace(good, []byte("<m1@x.test>"), []byte("<r1@x.test>"), 1)
	if res, err := r.Handle(ctx, good); err != nil || res.ID == 0 {
		t.Fatal(res, err)
	}
	a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "hospital", ControlID: "resp1",
		Payload: []byte("bundle"), Kind: store.KindBundle, InReplyTo: "<r1@x.test>"})
	st.Prepare(ctx, a.ID, "<resp1@partner.test>", nil)
	st.MarkSent(ctx, a.ID)
	res, err := r.Handle(ctx, good)
	if err != nil || !res.Replay {
		t.Fatalf("Handle(again) = %+v, %v", res, err)
	}
	resp, _ := st.Get(ctx, a.ID)
	if resp.State != store.Queued || resp.MessageID != "<resp1@partner.test>" || woken != 2 {
		t.Errorf("response after a repeated request: state %s, Message-ID %s, woken %d; want queued again with the same Message-ID",
			resp.State, resp.MessageID, woken)
	}
}

// TestRelease: mail quarantined because the partner signed with a key we did
// not have yet is released once the new key is configured, and recorded
// with who and why; a replay, a second release and a mail that still does
// not open are refused.
func TestRelease(t *testing.T) {
	l := newLabSide(t)
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	ctx := context.Background()
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	newKey, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "hospital", Email: "edi@hospital.test"})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := l.mailFrom(t, "edi@hospital.test", newKey, edi, false)
	res, err := r.Handle(ctx, raw)
	if err != nil || res.Quarantine == nil || res.Quarantine.Reason != ReasonUnknownSigner {
		t.Fatalf("Handle(new key) = %+v, %v", res, err)
	}
	qs, _ := st.QuarantineList(ctx, 0)
	qid := qs[0].ID
	if _, err := r.Release(ctx, qid, "", ""); err == nil {
		t.Error("release without who and why accepted")
	}
	if _, err := r.Release(ctx, qid, "j.smith", "checked"); err == nil || !strings.Contains(err.Error(), "unknown-signer") {
		t.Errorf("release before the key is configured = %v, want it still refused as unknown-signer", err)
	}
	if list, _ := st.List(ctx, store.Filter{Direction: store.Inbound}); len(list) != 0 {
		t.Fatalf("a refused release stored %d messages", len(list))
	}

	l.opener.Keys.PGPPartners["hospital"] = []*openpgp.Entity{newKey} // the operator configures the partner's new key
	res, err = r.Release(ctx, qid, "j.smith", "new key confirmed by phone")
	if err != nil || res.ID == 0 {
		t.Fatalf("Release = %+v, %v", res, err)
	}
	m, _ := st.Get(ctx, res.ID)
	if m.Direction != store.Inbound || m.State != store.Queued || m.ControlID != "q1" || m.Kind != store.KindRequest {
		t.Errorf("released message stored as %+v", m)
	}
	q, _ := st.QuarantineGet(ctx, qid)
	if q.ReleasedBy != "j.smith" || q.Note != "new key confirmed by phone" || q.ReleasedAs != res.ID {
		t.Errorf("release recorded as %+v", q)
	}
	if _, err := r.Release(ctx, qid, "j.smith", "again"); err == nil {
		t.Error("second release accepted")
	}

	// The same mail again is a replay; a replay is never released.
	if res, err := r.Handle(ctx, raw); err != nil || !res.Replay {
		t.Fatalf("Handle(same mail) = %+v, %v", res, err)
	}
	qs, _ = st.QuarantineList(ctx, 0)
	if _, err := r.Release(ctx, qs[0].ID, "j.smith", "checked"); err == nil || !strings.Contains(err.Error(), "not delivered twice") {
		t.Errorf("release of a replay = %v", err)
	}
	if list, _ := st.List(ctx, store.Filter{Direction: store.Inbound}); len(list) != 1 {
		t.Errorf("%d inbound messages, want 1", len(list))
	}
}

// strangerKey is a key no partner has.
func strangerKey(t *testing.T) *openpgp.Entity {
	t.Helper()
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "who", Email: "who@else.test"})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// TestUnsignedReceipt: a partner with mdn: unsigned sends its receipt plain;
// it closes the pending receipt, recorded as unsigned. The same plain
// receipt from a partner with mdn: signed is refused (not encrypted), and
// a plain HL7 message from the mdn: unsigned partner is refused too.
func TestUnsignedReceipt(t *testing.T) {
	l := newLabSide(t)
	l.opener.Config.Partners[1].MDN = "unsigned" // the clinic
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	ctx := context.Background()
	sentMIC := security.ComputeMIC([]byte("what we signed"))
	for _, p := range []string{"clinic", "hospital"} {
		a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: p, ControlID: "u-" + p, Payload: []byte(p)})
		st.Prepare(ctx, a.ID, "<u-"+p+"@partner.test>", &store.Pending{Partner: p, ControlID: "u-" + p, MIC: sentMIC.String(),
			Sent: time.Now(), Due: time.Now().Add(time.Hour)})
	}
	plain := func(from, id string) []byte {
		mdn, _ := (&security.MDN{FinalRecipient: from, OriginalMessageID: "<u-" + id + "@partner.test>",
			Disposition: security.Disposition{Type: security.Processed}, MIC: &sentMIC}).Entity()
		return append([]byte("From: "+from+"\r\nTo: lab@partner.test\r\nMessage-ID: <r-"+id+"@x.test>\r\nSubject: receipt\r\n"), mdn...)
	}
	res, err := r.Handle(ctx, plain("edi@clinic.test", "clinic"))
	if err != nil || res.Receipt == nil || *res.Receipt != ReceiptMatched {
		t.Fatalf("Handle(the clinic's plain receipt) = %+v, %v; want matched", res, err)
	}
	p, _ := st.PendingByMessageID(ctx, "<u-clinic@partner.test>")
	if p.State != store.PendingMatched || !p.Unsigned {
		t.Errorf("the clinic's receipt: %+v, want matched and unsigned", p)
	}
	res, err = r.Handle(ctx, plain("edi@hospital.test", "hospital"))
	if err != nil || res.Quarantine == nil || res.Quarantine.Reason != ReasonNotEncrypted {
		t.Errorf("Handle(the hospital's plain receipt) = %+v, %v; want quarantined not-encrypted", res, err)
	}
	if p, _ := st.PendingByMessageID(ctx, "<u-hospital@partner.test>"); p.State != store.PendingWaiting {
		t.Errorf("the hospital's receipt: %s, want still waiting", p.State)
	}
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	hl7plain := append([]byte("From: edi@clinic.test\r\nTo: lab@partner.test\r\nMessage-ID: <h1@x.test>\r\nSubject: HL7\r\n"), edi...)
	if res, err := r.Handle(ctx, hl7plain); err != nil || res.Quarantine == nil || res.Quarantine.Reason != ReasonNotEncrypted {
		t.Errorf("Handle(plain HL7 from the mdn: unsigned partner) = %+v, %v; want quarantined not-encrypted", res, err)
	}
}
