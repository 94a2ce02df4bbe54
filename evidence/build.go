package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Build re-verifies the chain of message m from the journals in the store
// folder.
func Build(ctx context.Context, o Options, m store.Message) (*Report, error) {
	r := &Report{Message: m}
	for i := range o.Config.Partners {
		if o.Config.Partners[i].Name == m.Partner {
			r.Partner = &o.Config.Partners[i]
		}
	}
	if r.Partner == nil {
		return nil, fmt.Errorf("message %d: partner %s is not in the configuration", m.ID, m.Partner)
	}
	dir := o.Config.StoreDir()
	out, err := readJournal(filepath.Join(dir, OutgoingJournal))
	if err != nil {
		return nil, err
	}
	in, err := readJournal(filepath.Join(dir, IncomingJournal))
	if err != nil {
		return nil, err
	}
	op := opener{o: o, partner: r.Partner, digests: map[string]map[int64][]byte{}}
	for _, f := range []string{OutgoingJournal, IncomingJournal} {
		if op.digests[f], err = o.Store.JournalDigests(ctx, f); err != nil {
			return nil, err
		}
	}
	switch {
	case m.Direction == store.Outbound && m.Kind == store.KindHL7:
		r.outbound(ctx, o, op, out, in)
	case m.Direction == store.Inbound && m.Kind == store.KindRequest:
		r.inbound(op, out, in)
	case m.Kind == store.KindResponse:
		return nil, fmt.Errorf("message %d is %s's response to one of ours: ask for the message it answers", m.ID, m.Partner)
	default:
		return nil, fmt.Errorf("message %d is a %s (%s); evidence is kept for HL7 messages sent or received", m.ID, m.Kind, m.Direction)
	}
	return r, nil
}

func (l *Link) addf(format string, args ...any) {
	l.Lines = append(l.Lines, fmt.Sprintf(format, args...))
}

// fail marks l broken with a reason.
func (l *Link) fail(format string, args ...any) {
	l.OK = false
	l.addf("BROKEN: "+format, args...)
}

// message checks that an opened HL7 mail carries exactly the stored
// message.
func (r *Report) message(l *Link, opened *security.Opened) {
	payload, _, err := security.DecodeEDI(opened.Entity, security.Accept{Consent: true})
	if err != nil {
		l.fail("the signed entity is not MIME-EDI: %v", err)
		return
	}
	sum := sha256.Sum256(payload)
	if !bytes.Equal(sum[:], r.Message.SHA256) {
		l.fail("the HL7 it carries differs from stored message %d (SHA-256)", r.Message.ID)
		return
	}
	h, _ := hl7.ParseHeader(payload)
	if h != nil {
		l.addf("carries %s %s, %d bytes, identical to stored message %d", h.MessageType, h.ControlID, len(payload), r.Message.ID)
	}
}

// mailEntry finds the entry of entries with Message-ID id, the last one
// when the mail was submitted more than once.
func mailEntry(entries []entry, id string) *entry {
	var found *entry
	for i := range entries {
		if entries[i].messageID == id {
			found = &entries[i]
		}
	}
	return found
}

// receiptFor finds, among entries from who (signed by us when ours), the
// receipt for original: an MDN or a bundle whose MDN names it. It returns
// the entry, what opening it established, and its bundle or MDN.
func receiptFor(op opener, entries []entry, who, original string, ours bool, alsoMIC *security.MIC) (*entry, *security.Opened, *security.Bundle, *security.MDN, error) {
	var lastErr error
	try := func(e *entry) (*security.Opened, *security.Bundle, *security.MDN, bool) {
		opened, err := op.open(e.Mail, ours, e.Time)
		if err != nil {
			if e.inReplyTo == original {
				lastErr = fmt.Errorf("%s at offset %d (Message-ID %s): %w", e.file, e.Offset, e.messageID, err)
			}
			return nil, nil, nil, false
		}
		var b *security.Bundle
		var mdn *security.MDN
		switch security.Classify(opened.Entity) {
		case security.KindBundle:
			if b, err = security.ParseBundle(opened.Entity); err == nil {
				mdn = b.MDN
			}
		case security.KindMDN:
			mdn, _ = security.ParseMDN(opened.Entity) // nil when unreadable: not the receipt
		}
		// A receipt matched by its MIC names the Message-ID a gateway gave
		// the mail on the way.
		byMIC := alsoMIC != nil && mdn != nil && mdn.MIC != nil && mdn.MIC.Equal(*alsoMIC)
		if mdn == nil || mdn.OriginalMessageID != original && !byMIC {
			return nil, nil, nil, false
		}
		return opened, b, mdn, true
	}
	// Receipts written by hl7mail name the request in In-Reply-To; other
	// software's are found by opening every mail of the sender, and, when a
	// gateway rewrote From, every other mail.
	for pass := 0; pass < 3; pass++ {
		for i := len(entries) - 1; i >= 0; i-- {
			e := &entries[i]
			replies := e.inReplyTo == original
			if pass == 0 && !replies || pass == 1 && (replies || e.from != who) || pass == 2 && (replies || e.from == who) {
				continue
			}
			if opened, b, mdn, ok := try(e); ok {
				return e, opened, b, mdn, nil
			}
		}
	}
	if lastErr != nil {
		return nil, nil, nil, nil, lastErr
	}
	return nil, nil, nil, nil, nil
}

// outbound: our message, the partner's receipt, the partner's response.
func (r *Report) outbound(ctx context.Context, o Options, op opener, out, in []entry) {
	m := r.Message
	sent := &Link{Name: "sent", OK: true}
	receipt := &Link{Name: "receipt", OK: true}
	commit := &Link{Name: "commitment", OK: true}
	r.Links = []*Link{sent, receipt, commit}
	if m.MessageID == "" {
		sent.fail("message %d (%s) was never mailed (state %s)", m.ID, m.ControlID, m.State)
		receipt.fail("no mail, no receipt")
		commit.Absent, commit.OK = true, false
		return
	}
	var mic security.MIC
	e := mailEntry(out, m.MessageID)
	if e == nil {
		sent.fail("no mail with Message-ID %s in %s", m.MessageID, OutgoingJournal)
	} else {
		sent.addf("Message-ID %s, to %s, journalled %s (%s offset %d)", m.MessageID, r.Partner.Email,
			e.Time.UTC().Format(time.RFC3339), e.file, e.Offset)
		op.intact(sent, e)
		opened, err := op.open(e.Mail, true, e.Time)
		if err != nil {
			sent.fail("the journalled mail does not open with our key and signature: %v", err)
		} else {
			mic = opened.MIC
			sent.addf("signed by us (%s), encrypted; MIC recomputed from the journal: %s", opened.Signer, mic)
			r.message(sent, opened)
			if p, err := o.Store.PendingByMessageID(ctx, m.MessageID); err == nil && p.MIC != mic.String() {
				sent.fail("the store recorded MIC %s when it was sent", p.MIC)
			}
			r.export("1-sent", e.Mail, opened, true)
		}
	}
	var alsoMIC *security.MIC
	if p, err := o.Store.PendingByMessageID(ctx, m.MessageID); err == nil && p.MatchedBy == store.MatchByMIC && len(mic.Digest) > 0 {
		alsoMIC = &mic
		receipt.addf("the receipt was matched by its MIC: a gateway on the way gave the mail another Message-ID")
	}
	re, opened, bundle, mdn, err := receiptFor(op, in, normal(r.Partner.Email), m.MessageID, false, alsoMIC)
	switch {
	case err != nil:
		receipt.fail("%v", err)
	case re == nil:
		receipt.fail("no signed receipt from %s for %s in %s", r.Partner.Email, m.MessageID, IncomingJournal)
	default:
		receipt.addf("Message-ID %s from %s, journalled %s (%s offset %d)", re.messageID, r.Partner.Email,
			re.Time.UTC().Format(time.RFC3339), re.file, re.Offset)
		op.intact(receipt, re)
		receipt.addf("signed by %s; disposition %s", opened.Signer, mdn.Disposition)
		checkMDN(receipt, mdn, mic)
		r.export("2-receipt", re.Mail, opened, false)
	}
	r.commitment(commit, bundle, m.ControlID, "the partner")
}

// inbound: the partner's message, our receipt, our response.
func (r *Report) inbound(op opener, out, in []entry) {
	m := r.Message
	recv := &Link{Name: "received", OK: true}
	receipt := &Link{Name: "receipt sent", OK: true}
	commit := &Link{Name: "commitment sent", OK: true}
	r.Links = []*Link{recv, receipt, commit}
	var mic security.MIC
	e := mailEntry(in, m.MessageID)
	if e == nil {
		recv.fail("no mail with Message-ID %s in %s", m.MessageID, IncomingJournal)
	} else {
		recv.addf("Message-ID %s from %s, journalled %s (%s offset %d)", m.MessageID, r.Partner.Email,
			e.Time.UTC().Format(time.RFC3339), e.file, e.Offset)
		op.intact(recv, e)
		opened, err := op.open(e.Mail, false, e.Time)
		if err != nil {
			recv.fail("the journalled mail does not open and verify: %v", err)
		} else {
			mic = opened.MIC
			recv.addf("signed by %s, encrypted; MIC recomputed from the journal: %s", opened.Signer, mic)
			r.message(recv, opened)
			if m.MIC != "" && m.MIC != mic.String() {
				recv.fail("the store recorded MIC %s when it came in", m.MIC)
			}
			r.export("1-received", e.Mail, opened, false)
		}
	}
	re, opened, bundle, mdn, err := receiptFor(op, out, normal(op.o.Config.Self.Email), m.MessageID, true, nil)
	switch {
	case err != nil:
		receipt.fail("%v", err)
	case re == nil:
		receipt.fail("no receipt for %s in %s", m.MessageID, OutgoingJournal)
	default:
		receipt.addf("Message-ID %s to %s, journalled %s (%s offset %d)", re.messageID, r.Partner.Email,
			re.Time.UTC().Format(time.RFC3339), re.file, re.Offset)
		op.intact(receipt, re)
		receipt.addf("signed by us (%s); disposition %s", opened.Signer, mdn.Disposition)
		checkMDN(receipt, mdn, mic)
		r.export("2-receipt-sent", re.Mail, opened, true)
	}
	r.commitment(commit, bundle, m.ControlID, "our router")
}

// checkMDN checks a receipt says processed and names the MIC.
func checkMDN(l *Link, mdn *security.MDN, mic security.MIC) {
	if mdn.Disposition.Type != security.Processed || mdn.Disposition.Modifier != "" {
		l.fail("the receipt does not say processed: %s %s", mdn.Disposition, mdn.Error)
	}
	switch {
	case mdn.MIC == nil:
		l.fail("the receipt carries no Received-Content-MIC")
	case len(mic.Digest) == 0:
		l.fail("Received-Content-MIC %s cannot be compared: the message's own MIC is unknown", mdn.MIC)
	case !mdn.MIC.Equal(mic):
		l.fail("Received-Content-MIC %s does not match the MIC of the message, %s", mdn.MIC, mic)
	default:
		l.addf("Received-Content-MIC %s matches", mdn.MIC)
	}
}

// commitment reads the application response of a bundle.
func (r *Report) commitment(l *Link, b *security.Bundle, controlID, who string) {
	if b == nil || b.Response == nil {
		l.OK, l.Absent = false, true
		l.addf("none: the receipt came without an application response")
		return
	}
	payload, _, err := security.DecodeEDI(b.Response, security.Accept{Consent: true})
	if err != nil {
		l.fail("the response is not MIME-EDI: %v", err)
		return
	}
	a, err := hl7.ParseAck(payload)
	if err != nil {
		l.fail("the response is not an HL7 acknowledgement: %v", err)
		return
	}
	l.addf("%s answered %s %s: MSA-1 %s for %s, in the same signed mail as the receipt", who,
		a.Header.MessageType, a.Header.ControlID, a.Code, a.ControlID)
	if a.ControlID != controlID {
		l.fail("the response acknowledges %s, not %s", a.ControlID, controlID)
	}
	if a.Code != hl7.ApplicationAccept && a.Code != hl7.CommitAccept {
		l.fail("the response is %s, not an acceptance", a.Code)
	}
}

// intact checks a journal entry against the digest recorded when it was
// written.
func (op opener) intact(l *Link, e *entry) {
	want, ok := op.digests[e.file][e.Offset]
	if !ok {
		l.addf("no digest was recorded when this entry was written: its bytes are checked by its signature only")
		return
	}
	got := sha256.Sum256(e.Mail)
	if !bytes.Equal(got[:], want) {
		l.fail("the entry at %s offset %d was altered after it was written: its SHA-256 is not the one recorded then", e.file, e.Offset)
		return
	}
	l.addf("the journalled bytes are those written then (SHA-256 %x)", want[:8])
}
