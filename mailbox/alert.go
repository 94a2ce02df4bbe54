package mailbox

import (
	"context"
	"log/slog"

	"github.com/hl7mail/hl7mail/store"
)

// raise reports something an operator must look at: an ALERT log line with
// attrs, and an alert in the store that stays listed (dashboard, "hl7mail
// alerts") until someone acknowledges it. Texts name states, never content.
func raise(ctx context.Context, st *store.Store, log *slog.Logger, a store.Alert, attrs ...any) {
	log.Error("ALERT "+a.Text, append([]any{"alert", a.Kind}, attrs...)...)
	if _, err := st.RaiseAlert(context.WithoutCancel(ctx), a); err != nil {
		log.Error("alert not recorded", "alert", a.Kind, "err", err)
	}
}
