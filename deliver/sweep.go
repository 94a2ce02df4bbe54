package deliver

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/store"
)

// SweepStuck raises an alert, once each, for every inbound message of a
// partner that has waited for the router longer than the partner's
// mdn_timeout (the partner is waiting for its receipt meanwhile). Outbound
// messages that do not move expire by expire_after instead.
func SweepStuck(ctx context.Context, cfg *config.Config, st Stuck, log *slog.Logger, now time.Time) ([]store.Message, error) {
	var alerted []store.Message
	for _, p := range cfg.Partners {
		stuck, err := st.Stuck(ctx, p.Name, store.Inbound, now.Add(-p.MDNTimeout.D()))
		if err != nil {
			return alerted, err
		}
		for _, m := range stuck {
			attempts, _, lastErr, _ := st.Delivery(ctx, m.ID)
			raised, err := st.RaiseOnceEver(ctx, fmt.Sprintf("stuck:%d", m.ID), store.Alert{Kind: store.AlertStuck,
				Partner: p.Name, ControlID: m.ControlID, MessageID: m.MessageID, Text: "message not delivered to the router"})
			if err != nil {
				return alerted, err
			}
			if !raised {
				continue
			}
			log.Error("ALERT message not delivered to the router", "alert", store.AlertStuck, "partner", p.Name, "id", m.ID,
				"control_id", m.ControlID, "waiting", now.Sub(m.Received).Round(time.Second).String(), "attempts", attempts,
				"last_error", lastErr)
			alerted = append(alerted, m)
		}
	}
	return alerted, nil
}
