package mailbox

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
	// message sent to this partner, with a processed disposition.
	ReceiptMatched Receipt = iota
	// ReceiptMICMismatch: the partner reports a different MIC than was
	// sent: what it received is not what was signed. An alert.
	ReceiptMICMismatch
	// ReceiptError: matched, with an error or failure disposition.
	ReceiptError
	// ReceiptUnknown: no message of this partner has that Message-ID.
	ReceiptUnknown
)

func (r Receipt) String() string {
	return [...]string{"matched", "mic-mismatch", "error-disposition", "unknown"}[r]
}

// Reconcile matches an MDN from partner against the pending receipts
// (draft-ietf-ediint-hl7-02 §6.2 figure 8, §6.4): first by
// Original-Message-ID, then, when a gateway rewrote the Message-ID on the
// way, by the Received-Content-MIC alone; always within the partner, never
// across partners. It records the outcome and the rule that matched, and
// returns the outcome with the pending entry involved, if any.
//
// unsigned says the MDN came unsigned (a partner with mdn: unsigned); it is
// recorded with the receipt, as weaker evidence.
func Reconcile(ctx context.Context, st *store.Store, partner string, mdn *security.MDN, unsigned bool) (Receipt, store.Pending, error) {
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
	outcome, state := ReceiptMatched, store.PendingMatched
	switch {
	case mdn.MIC == nil || !mdn.MIC.Equal(want):
		outcome, state = ReceiptMICMismatch, store.PendingMismatch
	case !mdn.Disposition.OK() && mdn.Disposition.Modifier != security.ModWarning:
		outcome, state = ReceiptError, store.PendingError
	}
	p, err = st.SetReceipt(ctx, p.MessageID, state, rule, unsigned)
	return outcome, p, err
}
