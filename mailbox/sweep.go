package mailbox

import (
	"context"
	"log/slog"
	"time"

	"github.com/hl7mail/hl7mail/store"
)

// Sweep raises an alert for every receipt that became overdue
// (draft-ietf-ediint-hl7-02 §6.4): each is marked overdue and reported once.
// It returns them.
func Sweep(ctx context.Context, st *store.Store, log *slog.Logger, now time.Time) ([]store.Pending, error) {
	overdue, err := st.Overdue(ctx, now)
	if err != nil {
		return nil, err
	}
	for _, p := range overdue {
		log.Error("ALERT receipt overdue", "partner", p.Partner, "control_id", p.ControlID, "message_id", p.MessageID,
			"sent", p.Sent.Format(time.RFC3339), "due", p.Due.Format(time.RFC3339))
	}
	return overdue, nil
}

// RunSweeper sweeps every interval until ctx ends.
func RunSweeper(ctx context.Context, st *store.Store, log *slog.Logger, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := Sweep(ctx, st, log, time.Now()); err != nil && ctx.Err() == nil {
			log.Error("sweep", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
