package deliver

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Responder answers a partner's request once the router has taken it: the
// router's response and the MDN for the request, bundled in
// multipart/related; type="application/x-edi-response"
// (draft-ietf-ediint-hl7-02 §4.1.4), queued for the sender. The response
// goes to the partner's configured address: the authenticated originator,
// never an address from the mail's headers (§4.1.4 return address rules).
type Responder struct {
	Config *config.Config
	Store  Store
	Logger *slog.Logger
	// Notify wakes the sender for a partner (Sender.Notify).
	Notify func(partner string)
}

// Recover queues the responses a crash left unsent: for every request the
// router acknowledged (the acknowledgement is stored with the delivery)
// that has no response yet. Run it before the deliverer starts.
func (r *Responder) Recover(ctx context.Context) error {
	list, err := r.Store.Unanswered(ctx)
	if err != nil {
		return err
	}
	for _, m := range list {
		if m.State == store.Expired {
			r.Expired(ctx, m)
			continue
		}
		ack := m.Payload
		if len(ack) == 0 {
			ack = nil // the router was not asked for an answer
		}
		m.Payload = nil
		r.Delivered(ctx, m, ack)
	}
	return nil
}

// Expired is a Deliverer.Expired callback: the partner's request m could
// not be delivered to the router within the partner's expire_after. The
// partner gets an MDN deleted/expired (draft-ietf-ediint-hl7-02 §4.1.3:
// "a store-and-forward service ... must be able to remove the message
// from its queue ... reported to the originator"), with no response.
func (r *Responder) Expired(ctx context.Context, m store.Message) {
	if m.Kind != store.KindRequest || m.MessageID == "" {
		return
	}
	mdn := r.mdnFor(m)
	mdn.Disposition = security.Disposition{Type: security.Deleted, Modifier: security.ModExpired}
	mdn.Text = "The message was removed: it could not be delivered to the application in time."
	entity, err := mdn.Entity()
	if err == nil {
		err = r.queue(ctx, m, entity, "mdn-"+m.ControlID, "MDN")
	}
	if err != nil {
		r.logger(m).Error("expiry receipt not queued", "err", err)
	}
}

// Delivered is a Deliverer.Delivered callback: m was delivered to the
// router, which answered ack (nil when no answer was expected).
func (r *Responder) Delivered(ctx context.Context, m store.Message, ack []byte) {
	if m.Kind != store.KindRequest {
		return
	}
	bundle, controlID, err := r.bundle(m, ack)
	if err == nil {
		err = r.queue(ctx, m, bundle, controlID, "ACK")
	}
	if err != nil {
		r.logger(m).Error("response not queued", "err", err)
	}
}

func (r *Responder) logger(m store.Message) *slog.Logger {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	return log.With("partner", m.Partner, "id", m.ID, "control_id", m.ControlID)
}

// answerTo is the partner the answer to request m goes to: its sender, or
// the partner the return address rules chose when it came (AnswerTo).
func answerTo(m store.Message) string {
	if m.AnswerTo != "" {
		return m.AnswerTo
	}
	return m.Partner
}

// queue stores the answer to request m for the sender.
func (r *Responder) queue(ctx context.Context, m store.Message, entity []byte, controlID, typ string) error {
	to := answerTo(m)
	a, err := r.Store.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: to, ControlID: controlID,
		MessageType: typ, Payload: entity, Kind: store.KindBundle, InReplyTo: m.MessageID})
	if err != nil {
		return err
	}
	r.logger(m).Info("response queued", "response_id", a.ID, "in_reply_to", m.MessageID, "type", typ, "to_partner", to)
	if r.Notify != nil {
		r.Notify(to)
	}
	return nil
}

// mdnFor is the MDN for request m, processed: from the address of ours
// it was sent to.
func (r *Responder) mdnFor(m store.Message) *security.MDN {
	to := m.Recipient
	if to == "" {
		to = r.Config.Self.Email
	}
	return security.ReceiptFrom(to, m.MessageID, security.Disposition{Type: security.Processed})
}

func (r *Responder) bundle(m store.Message, ack []byte) ([]byte, string, error) {
	mdn := r.mdnFor(m)
	if m.MIC != "" {
		mic, err := security.ParseMIC(m.MIC)
		if err != nil {
			return nil, "", fmt.Errorf("stored MIC: %w", err)
		}
		mdn.MIC = &mic
	}
	if m.ReceiptNote != "" {
		mdn.Disposition.Modifier = security.ModWarning
		mdn.Warning = m.ReceiptNote
		mdn.Text = "The message was processed; " + m.ReceiptNote + "."
	}
	controlID := m.ControlID
	var response []byte
	if ack != nil {
		code, ackID, accepted, err := answerOf(ack)
		if err != nil {
			return nil, "", err
		}
		if !accepted {
			mdn.Disposition.Modifier = security.ModWarning
			mdn.Text = "The message was processed; the application answered " + string(code) + "."
		}
		if ackID != "" {
			controlID = ackID
		}
		p := r.Config.Partner(answerTo(m))
		ct := config.DefaultContentType
		if p != nil {
			ct = p.ContentType
		}
		if response, err = security.EncodeEDI(ack, security.EDIOptions{ContentType: ct}); err != nil {
			return nil, "", err
		}
	}
	mdnEntity, err := mdn.Entity()
	if err != nil {
		return nil, "", err
	}
	if response == nil {
		return mdnEntity, controlID, nil
	}
	return security.BuildBundle(response, mdnEntity), controlID, nil
}

// answerOf reads the router's answer: an ACK, or for a batch a batch
// acknowledgement; its code (the first that is not an accept, for a
// batch), its control ID and whether it accepts.
func answerOf(ack []byte) (hl7.AckCode, string, bool, error) {
	if hl7.IsBatch(ack) {
		r, err := hl7.ParseBatchAck(ack)
		return r.Code(), r.ControlID, r.Accepted(), err
	}
	a, err := hl7.ParseAck(ack)
	if err != nil {
		return "", "", false, err
	}
	return a.Code, a.Header.ControlID, a.Accepted(), nil
}
