package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Build re-verifies the chain of message m from the journals in the store
// folder.
func Build(ctx context.Context, o Options, m store.Message) (*Report, error) {
	r := &Report{Message: m, Partner: o.Config.Partner(m.Partner)}
	if r.Partner == nil {
		return nil, fmt.Errorf("message %d: partner %s is not in the configuration", m.ID, m.Partner)
	}
	out, err := o.entries(ctx, OutgoingJournal)
	if err != nil {
		return nil, err
	}
	in, err := o.entries(ctx, IncomingJournal)
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
		b, mdn := receiptOf(opened.Entity)
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
	p, _ := o.Store.PendingByMessageID(ctx, m.MessageID)
	mic := r.mailLink(sent, op, out, true, p.MIC, "1-sent")
	var alsoMIC *security.MIC
	if p.MatchedBy == store.MatchByMIC && len(mic.Digest) > 0 {
		alsoMIC = &mic
		receipt.addf("the receipt was matched by its MIC: a gateway on the way gave the mail another Message-ID")
	}
	bundle := r.receiptLink(receipt, op, in, false, alsoMIC, mic, "2-receipt")
	r.commitment(commit, bundle, m.ControlID, "the partner")
}

// inbound: the partner's message, our receipt, our response.
func (r *Report) inbound(op opener, out, in []entry) {
	recv := &Link{Name: "received", OK: true}
	receipt := &Link{Name: "receipt sent", OK: true}
	commit := &Link{Name: "commitment sent", OK: true}
	r.Links = []*Link{recv, receipt, commit}
	mic := r.mailLink(recv, op, in, false, r.Message.MIC, "1-received")
	bundle := r.receiptLink(receipt, op, out, true, nil, mic, "2-receipt-sent")
	r.commitment(commit, bundle, r.Message.ControlID, "our router")
}

// mailLink fills l from the journal entry of the message's mail (ours: sent
// by us, else by the partner): where it was journalled, that its bytes are
// those written then, that it opens and its signature verifies, that it
// carries the stored message and the MIC the store recorded (recorded, if
// any). It returns the MIC recomputed from the journal.
func (r *Report) mailLink(l *Link, op opener, entries []entry, ours bool, recorded, prefix string) security.MIC {
	m := r.Message
	file, dir, signer := IncomingJournal, "from", ""
	if ours {
		file, dir, signer = OutgoingJournal, "to", "us "
	}
	e := mailEntry(entries, m.MessageID)
	if e == nil {
		l.fail("no mail with Message-ID %s in %s", m.MessageID, file)
		return security.MIC{}
	}
	l.addf("Message-ID %s, %s %s, journalled %s (%s offset %d)", m.MessageID, dir, r.Partner.Email,
		e.Time.UTC().Format(time.RFC3339), e.file, e.Offset)
	op.intact(l, e)
	opened, err := op.open(e.Mail, ours, e.Time)
	if err != nil {
		l.fail("the journalled mail does not open and verify: %v", err)
		return security.MIC{}
	}
	l.addf("signed by %s(%s), encrypted; MIC recomputed from the journal: %s", signer, opened.Signer, opened.MIC)
	r.message(l, opened)
	if recorded != "" && recorded != opened.MIC.String() {
		l.fail("the store recorded MIC %s", recorded)
	}
	r.export(prefix, e.Mail, opened, ours)
	return opened.MIC
}

// receiptLink fills l from the receipt for the message's mail (ours: the
// one we sent, else the partner's), checking it against mic, and returns
// the bundle it came in, if any.
func (r *Report) receiptLink(l *Link, op opener, entries []entry, ours bool, alsoMIC *security.MIC, mic security.MIC, prefix string) *security.Bundle {
	m := r.Message
	file, dir, signer, from := IncomingJournal, "from", "", r.Partner.Email
	if ours {
		file, dir, signer, from = OutgoingJournal, "to", "us ", op.o.Config.Self.Email
	}
	re, opened, bundle, mdn, err := receiptFor(op, entries, normal(from), m.MessageID, ours, alsoMIC)
	switch {
	case err != nil:
		l.fail("%v", err)
		return nil
	case re == nil:
		l.fail("no signed receipt for %s in %s", m.MessageID, file)
		return nil
	}
	l.addf("Message-ID %s, %s %s, journalled %s (%s offset %d)", re.messageID, dir, r.Partner.Email,
		re.Time.UTC().Format(time.RFC3339), re.file, re.Offset)
	op.intact(l, re)
	l.addf("signed by %s(%s); disposition %s", signer, opened.Signer, mdn.Disposition)
	checkMDN(l, mdn, mic)
	r.export(prefix, re.Mail, opened, ours)
	return bundle
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

// receiptOf returns the receipt an opened entity carries, with the bundle
// it came in, if any; nil when it carries none or it cannot be read (then
// it is not the receipt looked for).
func receiptOf(entity []byte) (*security.Bundle, *security.MDN) {
	switch security.Classify(entity) {
	case security.KindBundle:
		if b, err := security.ParseBundle(entity); err == nil {
			return b, b.MDN
		}
	case security.KindMDN:
		if m, err := security.ParseMDN(entity); err == nil {
			return nil, m
		}
	}
	return nil, nil
}
