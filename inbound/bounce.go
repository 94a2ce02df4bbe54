package inbound

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// ReasonUnknownBounce: a delivery-status report that names no mail of
// ours (or not its recipient).
const ReasonUnknownBounce Reason = "unknown-bounce"

// bounce takes in a delivery-status notification (RFC 3464) that a mail
// server sent back about a mail of ours: found by its ENVID (the
// Message-ID we submitted with, RFC 3461), else by the Message-ID of the
// returned header, and for the partner the mail went to. Action: failed
// marks the message bounced with the Status and Diagnostic-Code, with one
// alert; delayed is a warning in the log; every report is recorded. A
// bounce is never taken for a receipt, and one that names nothing of ours
// is quarantined as unknown-bounce. The mail was journalled already.
func (r *Receiver) bounce(ctx context.Context, log *slog.Logger, sender, mailID string, raw []byte) (Result, error) {
	unknown := func(err error) (Result, error) {
		return r.quarantine(ctx, log, sender, raw, &QuarantineError{Reason: ReasonUnknownBounce, Err: err}, false)
	}
	d, err := security.ParseDSN(raw)
	if err != nil {
		return r.quarantine(ctx, log, sender, raw, &QuarantineError{Reason: ReasonMalformed, Err: err}, false)
	}
	if mailID != "" {
		if prev, err := r.Store.Reports(ctx, store.ReportFilter{MailMessageID: mailID, Limit: 1}); err != nil {
			return Result{}, err
		} else if len(prev) > 0 {
			log.Info("delivery-status report already recorded", "message_id", mailID, "report", prev[0].ID)
			return Result{Bounce: &prev[0]}, nil
		}
	}
	var m store.Message
	err = store.ErrNotFound
	rule := ""
	for i, id := range []string{d.EnvelopeID, d.ReturnedMessageID} {
		if id = strings.Trim(strings.TrimSpace(id), "<>"); id == "" {
			continue
		}
		if m, err = r.Store.FindOutbound(ctx, "<"+id+">"); !errors.Is(err, store.ErrNotFound) {
			rule = [...]string{"envid", "message-id"}[i]
			break
		}
	}
	if errors.Is(err, store.ErrNotFound) {
		return unknown(errors.New("the report names no mail of ours (by ENVID or the returned Message-ID)"))
	}
	if err != nil {
		return Result{}, err
	}
	p := r.Opener.Config.Partner(m.Partner)
	if p == nil {
		return unknown(fmt.Errorf("the report names message %d, of a partner no longer configured", m.ID))
	}
	var rc *security.DSNRecipient
	for i := range d.Recipients {
		if strings.EqualFold(d.Recipients[i].FinalRecipient, p.Email) {
			rc = &d.Recipients[i]
		}
	}
	if rc == nil && len(d.Recipients) == 1 {
		rc = &d.Recipients[0] // the partner's server rewrote the address (an alias)
	}
	if rc == nil {
		return unknown(fmt.Errorf("the report names message %d but not its recipient", m.ID))
	}
	detail := strings.TrimSpace(rc.Status + " " + rc.Diagnostic)
	rep := store.Report{Type: store.ReportDSN, Partner: p.Name, Message: m.ID, OriginalMessageID: m.MessageID,
		MailMessageID: mailID, Disposition: rc.Action, Detail: detail, MatchedBy: rule}
	attrs := []any{"partner", p.Name, "id", m.ID, "control_id", m.ControlID, "message_id", m.MessageID,
		"action", rc.Action, "status", rc.Status, "diagnostic", rc.Diagnostic, "reporting_mta", d.ReportingMTA}
	switch rc.Action {
	case "failed":
		changed, err := r.Store.MarkBounced(ctx, m.ID, "bounced: "+detail)
		if err != nil {
			return Result{}, err
		}
		rep.Outcome = "bounced"
		if !changed {
			// A receipt came already, or the message was sent again
			// meanwhile: recorded, and left as it is.
			rep.Outcome = "bounced after " + string(m.State)
		}
		if _, err := r.Store.AddReport(ctx, rep); err != nil {
			return Result{}, err
		}
		if !changed {
			log.Warn("a bounce for a message no longer waiting on this mail; recorded only", append(attrs, "state", string(m.State))...)
			break
		}
		notify.Raise(ctx, r.Store, log, store.Alert{Kind: store.AlertBounced, Partner: p.Name, ControlID: m.ControlID, MessageID: m.MessageID,
			Text: "message bounced: " + detail}, attrs...)
	case "delayed":
		rep.Outcome = "delayed"
		if _, err := r.Store.AddReport(ctx, rep); err != nil {
			return Result{}, err
		}
		log.Warn("mail delayed on its way to the partner; the server goes on trying", attrs...)
	default: // delivered, relayed, expanded
		rep.Outcome = rc.Action
		if _, err := r.Store.AddReport(ctx, rep); err != nil {
			return Result{}, err
		}
		log.Info("delivery-status report", attrs...)
	}
	return Result{Bounce: &rep}, nil
}
