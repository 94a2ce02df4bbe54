package outbound

import (
	"context"
	"log/slog"
	"time"

	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/store"
)

// Sweep raises an alert for every receipt that became overdue
// (draft-ietf-ediint-hl7-02 §6.4): each is marked overdue and reported once.
// It returns them.
func Sweep(ctx context.Context, st Receipts, log *slog.Logger, now time.Time) ([]store.Pending, error) {
	overdue, err := st.Overdue(ctx, now)
	if err != nil {
		return nil, err
	}
	for _, p := range overdue {
		notify.Raise(ctx, st, log, store.Alert{Kind: store.AlertOverdue, Partner: p.Partner, ControlID: p.ControlID,
			MessageID: p.MessageID, Text: "receipt overdue"},
			"partner", p.Partner, "control_id", p.ControlID, "message_id", p.MessageID,
			"sent", p.Sent.Format(time.RFC3339), "due", p.Due.Format(time.RFC3339))
	}
	return overdue, nil
}
