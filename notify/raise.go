package notify

import (
	"context"
	"log/slog"

	"github.com/hl7mail/hl7mail/store"
)

// Alerts records alerts (*store.Store does).
type Alerts interface {
	RaiseAlert(ctx context.Context, a store.Alert) (int64, error)
}

// Raise reports something an operator must look at: an ALERT log line with
// attrs, and an alert in the store that stays listed (dashboard, "hl7mail
// alerts") until someone acknowledges it. Texts name states, never content.
// The alert is recorded even when ctx has ended: what went wrong at a
// shutdown is still told.
func Raise(ctx context.Context, st Alerts, log *slog.Logger, a store.Alert, attrs ...any) {
	log.Error("ALERT "+a.Text, append([]any{"alert", a.Kind}, attrs...)...)
	if _, err := st.RaiseAlert(context.WithoutCancel(ctx), a); err != nil {
		log.Error("alert not recorded", "alert", a.Kind, "err", err)
	}
}
