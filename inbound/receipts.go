package inbound

import (
	"context"
	"errors"
	"fmt"

	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Receipt outcomes (draft-ietf-ediint-hl7-02 §6.4).
type Receipt int

const (
	// ReceiptMatched: Original-Message-ID and Received-Content-MIC match a
	// message sent to this partner, with a processed disposition (a
	// warning included), or a dispatched one with the MIC.
	ReceiptMatched Receipt = iota
	// ReceiptMICMismatch: the partner reports a different MIC than was
	// sent: what it received is not what was signed. An alert.
	ReceiptMICMismatch
	// ReceiptError: matched, with processed/error, failed, deleted or
	// denied (§4.1.3 tables 4 and 5). An alert.
	ReceiptError
	// ReceiptUnknown: no message of this partner has that Message-ID.
	ReceiptUnknown
	// ReceiptDispatched: a dispatched MDN without a MIC for a message of
	// this partner: it was forwarded (Direct: to its final destination).
	// Recorded against the message; the receipt it waits for is unchanged.
	ReceiptDispatched
	// ReceiptRepeated: the same receipt mail came before and was recorded.
	ReceiptRepeated
)

func (r Receipt) String() string {
	return [...]string{"matched", "mic-mismatch", "error-disposition", "unknown", "dispatched", "repeated"}[r]
}

// Reconcile matches an MDN from partner against the pending receipts
// (draft-ietf-ediint-hl7-02 §6.2 figure 8, §6.4): first by
// Original-Message-ID, then, when a gateway rewrote the Message-ID on the
// way, by the Received-Content-MIC alone; always within the partner, never
// across partners. Every receipt is recorded as a store.Report, matched or
// not (one of a message's several, or one that names nothing of ours), with
// the Message-ID of its own mail (mailID), where the incoming journal has
// its bytes. It returns the outcome with the pending entry involved, if
// any.
//
// unsigned says the MDN came unsigned (a partner with mdn: unsigned); it is
// recorded with the receipt, as weaker evidence.
func Reconcile(ctx context.Context, st Receipts, partner string, mdn *security.MDN, unsigned bool, mailID string) (Receipt, store.Pending, error) {
	if mailID != "" {
		if prev, err := st.Reports(ctx, store.ReportFilter{Partner: partner, MailMessageID: mailID, Limit: 1}); err != nil {
			return ReceiptUnknown, store.Pending{}, err
		} else if len(prev) > 0 {
			return ReceiptRepeated, store.Pending{}, nil
		}
	}
	outcome, p, err := match(ctx, st, partner, mdn, unsigned)
	if err != nil {
		return outcome, p, err
	}
	r := store.Report{Type: store.ReportMDN, Partner: partner, OriginalMessageID: mdn.OriginalMessageID, MailMessageID: mailID,
		Disposition: mdn.Disposition.Status(), Detail: mdn.Reason(), Outcome: outcome.String(), Unsigned: unsigned,
		FinalDelivery: mdn.FinalDelivery}
	if outcome != ReceiptUnknown {
		r.Message, r.MatchedBy = p.ID, p.MatchedBy
	}
	_, err = st.AddReport(ctx, r)
	return outcome, p, err
}

func match(ctx context.Context, st Receipts, partner string, mdn *security.MDN, unsigned bool) (Receipt, store.Pending, error) {
	rule := store.MatchByMessageID
	p, err := st.PendingByMessageID(ctx, mdn.OriginalMessageID)
	if err == nil && p.Partner != partner {
		return ReceiptUnknown, store.Pending{}, nil
	}
	if errors.Is(err, store.ErrNotFound) {
		if mdn.MIC == nil {
			return ReceiptUnknown, store.Pending{}, nil
		}
		// The oldest awaited receipt for the same content: mail with the
		// same MIC carries the same signed bytes.
		list, err := st.PendingByMIC(ctx, partner, mdn.MIC.String())
		if err != nil || len(list) == 0 {
			return ReceiptUnknown, store.Pending{}, err
		}
		p, rule = list[0], store.MatchByMIC
	} else if err != nil {
		return ReceiptUnknown, p, err
	}
	want, err := security.ParseMIC(p.MIC)
	if err != nil {
		return ReceiptUnknown, p, fmt.Errorf("stored MIC of %s: %w", p.MessageID, err)
	}
	d := mdn.Disposition
	outcome, state := ReceiptMatched, store.PendingMatched
	switch {
	case d.Failure():
		// A failure says so whether or not it carries the MIC.
		outcome, state = ReceiptError, store.PendingError
	case mdn.MIC == nil && d.Type == security.Dispatched:
		if p.MatchedBy == "" {
			p.MatchedBy = rule
		}
		return ReceiptDispatched, p, nil
	case mdn.MIC == nil || !mdn.MIC.Equal(want):
		outcome, state = ReceiptMICMismatch, store.PendingMismatch
	}
	p, err = st.SetReceipt(ctx, p.MessageID, state, rule, unsigned)
	return outcome, p, err
}
