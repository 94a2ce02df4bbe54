package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"net/mail"
	"strings"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Audit is what VerifyJournals found.
type Audit struct {
	Entries  map[string]int // journal → entries read
	Verified int            // entries whose signature was checked again
	Problems []string
	Notes    []string // not errors: entries written before digests were recorded, refused mail
}

// OK reports whether no problem was found.
func (a *Audit) OK() bool { return len(a.Problems) == 0 }

func (a *Audit) problem(format string, args ...any) {
	a.Problems = append(a.Problems, fmt.Sprintf(format, args...))
}

// VerifyJournals walks both journals and the store: every entry must have
// the digest recorded when it was written, open and verify (ours with our
// key, partners' with theirs), and have its counterpart in the store (a
// stored message, a receipt's pending row, or a quarantine record); every
// message the store says was mailed or received must be in a journal.
func VerifyJournals(ctx context.Context, o Options) (*Audit, error) {
	a := &Audit{Entries: map[string]int{}}
	msgs, err := o.Store.List(ctx, store.Filter{Limit: 1 << 30})
	if err != nil {
		return nil, err
	}
	byMsgID := map[string][]store.Message{}
	for _, m := range msgs {
		if m.MessageID != "" {
			byMsgID[m.MessageID] = append(byMsgID[m.MessageID], m)
		}
	}
	quarantined := map[string]bool{}
	qs, err := o.Store.QuarantineList(ctx, 1<<30)
	if err != nil {
		return nil, err
	}
	for _, q := range qs {
		quarantined[q.MessageID] = true
	}
	partnerByEmail := map[string]*config.Partner{}
	for i := range o.Config.Partners {
		partnerByEmail[normal(o.Config.Partners[i].Email)] = &o.Config.Partners[i]
	}
	journalled := map[string]map[string]bool{OutgoingJournal: {}, IncomingJournal: {}}
	for _, file := range []string{OutgoingJournal, IncomingJournal} {
		entries, err := o.entries(ctx, file)
		if err != nil {
			return nil, err
		}
		digests, err := o.Store.JournalDigests(ctx, file)
		if err != nil {
			return nil, err
		}
		a.Entries[file] = len(entries)
		offsets := map[int64]bool{}
		for i := range entries {
			e := &entries[i]
			offsets[e.Offset] = true
			journalled[file][e.messageID] = true
			where := fmt.Sprintf("%s offset %d (Message-ID %s)", file, e.Offset, e.messageID)
			if want, ok := digests[e.Offset]; !ok {
				a.Notes = append(a.Notes, where+": no digest recorded (written before digests were kept)")
			} else if got := sha256.Sum256(e.Mail); !bytes.Equal(got[:], want) {
				a.problem("%s: altered after it was written (SHA-256 differs from the one recorded)", where)
			}
			ours := file == OutgoingJournal
			who := e.from
			if ours {
				who = recipient(e.Mail)
			}
			p := partnerByEmail[who]
			if p == nil && !ours { // a gateway may have rewritten From: the signer tells
				for i := range o.Config.Partners {
					c := &o.Config.Partners[i]
					if _, err := (opener{o: o, partner: c}).open(e.Mail, false, e.Time); err == nil {
						p = c
						break
					}
				}
			}
			if p == nil {
				if !ours && reported(ctx, o, e.messageID) {
					a.Notes = append(a.Notes, where+": from "+who+": a delivery-status report about a mail of ours, recorded")
					continue
				}
				if !ours && quarantined[e.messageID] {
					a.Notes = append(a.Notes, where+": from "+who+", not a partner: quarantined")
					continue
				}
				a.problem("%s: %s is not a partner, and the mail has no quarantine record", where, who)
				continue
			}
			opened, err := opener{o: o, partner: p}.open(e.Mail, ours, e.Time)
			if err != nil && !ours && unsignedReceipt(p, e.Mail, byMsgID) {
				a.Notes = append(a.Notes, where+": an unsigned receipt, as the partner's mdn: unsigned allows (weaker evidence)")
				continue
			}
			if err != nil {
				if !ours && quarantined[e.messageID] {
					a.Notes = append(a.Notes, fmt.Sprintf("%s: refused when received and quarantined (%v)", where, err))
					continue
				}
				a.problem("%s: does not verify: %v", where, err)
				continue
			}
			a.Verified++
			if counterpart(ctx, o, e, opened, ours, byMsgID, quarantined) {
				continue
			}
			a.problem("%s: no counterpart in the store (no message, receipt or quarantine record names it)", where)
		}
		for off := range digests {
			if !offsets[off] {
				a.problem("%s offset %d: recorded as written, but no entry starts there", file, off)
			}
		}
	}
	for _, m := range msgs {
		switch {
		case m.Direction == store.Outbound && (m.State == store.Sent || m.State == store.Acknowledged) &&
			!journalled[OutgoingJournal][m.MessageID]:
			a.problem("message %d (%s to %s) was mailed as %s, which is not in %s", m.ID, m.ControlID, m.Partner, m.MessageID, OutgoingJournal)
		case m.Direction == store.Inbound && m.MessageID != "" && !journalled[IncomingJournal][m.MessageID]:
			a.problem("message %d (%s from %s) came in %s, which is not in %s", m.ID, m.ControlID, m.Partner, m.MessageID, IncomingJournal)
		}
	}
	return a, nil
}

// unsignedReceipt reports whether raw is a plain receipt from partner p,
// configured for unsigned ones (mdn: unsigned), for a message we sent.
func unsignedReceipt(p *config.Partner, raw []byte, byMsgID map[string][]store.Message) bool {
	if p.MDN != config.ReceiptUnsigned || security.Classify(raw) != security.KindMDN {
		return false
	}
	mdn, err := security.ParseMDN(raw)
	return err == nil && len(byMsgID[mdn.OriginalMessageID]) > 0
}

// counterpart reports whether the store knows of an opened journal entry.
func counterpart(ctx context.Context, o Options, e *entry, opened *security.Opened, ours bool,
	byMsgID map[string][]store.Message, quarantined map[string]bool) bool {
	want := store.Inbound
	if ours {
		want = store.Outbound
	}
	for _, m := range byMsgID[e.messageID] {
		if m.Direction == want {
			return true
		}
	}
	if !ours && quarantined[e.messageID] { // a replay, or mail refused after opening
		return true
	}
	// A receipt without a response: it closed a pending row (ours were
	// sent for mail of the partner's, which the store holds).
	_, mdn := receiptOf(opened.Entity)
	{
		if mdn != nil {
			if ours {
				return len(byMsgID[mdn.OriginalMessageID]) > 0 || quarantined[mdn.OriginalMessageID]
			}
			if _, err := o.Store.PendingByMessageID(ctx, mdn.OriginalMessageID); err == nil {
				return true
			}
			// Every receipt is recorded, also one that matched nothing.
			return reported(ctx, o, e.messageID)
		}
	}
	return false
}

// reported reports whether the store recorded a report (an MDN or a DSN)
// that came in the mail with that Message-ID.
func reported(ctx context.Context, o Options, mailID string) bool {
	if mailID == "" {
		return false
	}
	list, err := o.Store.Reports(ctx, store.ReportFilter{MailMessageID: mailID, Limit: 1})
	return err == nil && len(list) > 0
}

// recipient returns the first To address of a raw mail.
func recipient(raw []byte) string {
	m, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		return ""
	}
	list, err := m.Header.AddressList("To")
	if err != nil || len(list) == 0 {
		return ""
	}
	return strings.ToLower(list[0].Address)
}

// Write prints the audit.
func (a *Audit) Write(w interface{ Write([]byte) (int, error) }) {
	fmt.Fprintf(w, "%s: %d entries, %s: %d entries; %d signatures checked again\n", OutgoingJournal, a.Entries[OutgoingJournal],
		IncomingJournal, a.Entries[IncomingJournal], a.Verified)
	for _, n := range a.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	for _, p := range a.Problems {
		fmt.Fprintf(w, "PROBLEM: %s\n", p)
	}
	if a.OK() {
		fmt.Fprintln(w, "Every journal entry verifies and has its counterpart in the store.")
	} else {
		fmt.Fprintf(w, "%d problems.\n", len(a.Problems))
	}
}
