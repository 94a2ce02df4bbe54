package mailbox

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

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
	Store  *store.Store
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
		ack := m.Payload
		if len(ack) == 0 {
			ack = nil // the router was not asked for an answer
		}
		m.Payload = nil
		r.Delivered(ctx, m, ack)
	}
	return nil
}

// Delivered is a Deliverer.Delivered callback: m was delivered to the
// router, which answered ack (nil when no answer was expected).
func (r *Responder) Delivered(ctx context.Context, m store.Message, ack []byte) {
	if m.Kind != store.KindRequest {
		return
	}
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("partner", m.Partner, "id", m.ID, "control_id", m.ControlID)
	bundle, controlID, err := r.bundle(m, ack)
	if err != nil {
		log.Error("response not built", "err", err)
		return
	}
	a, err := r.Store.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: m.Partner, ControlID: controlID,
		MessageType: "ACK", Payload: bundle, Kind: store.KindBundle, InReplyTo: m.MessageID})
	if err != nil {
		log.Error("response not stored", "err", err)
		return
	}
	log.Info("response queued", "response_id", a.ID, "in_reply_to", m.MessageID)
	if r.Notify != nil {
		r.Notify(m.Partner)
	}
}

func (r *Responder) bundle(m store.Message, ack []byte) ([]byte, string, error) {
	to := m.Recipient
	if to == "" {
		to = r.Config.Self.Email
	}
	mdn := &security.MDN{
		ReportingUA:       domainOf(to) + "; hl7mail",
		OriginalRecipient: to,
		FinalRecipient:    to,
		OriginalMessageID: m.MessageID,
		Disposition:       security.Disposition{Type: security.Processed},
	}
	if m.MIC != "" {
		mic, err := security.ParseMIC(m.MIC)
		if err != nil {
			return nil, "", fmt.Errorf("stored MIC: %w", err)
		}
		mdn.MIC = &mic
	}
	controlID := m.ControlID
	var response []byte
	if ack != nil {
		a, err := hl7.ParseAck(ack)
		if err != nil {
			return nil, "", err
		}
		if !a.Accepted() {
			mdn.Disposition.Modifier = security.ModWarning
			mdn.Text = "The message was processed; the application answered " + string(a.Code) + "."
		}
		controlID = a.Header.ControlID
		p := r.Config.Partner(m.Partner)
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

func domainOf(addr string) string {
	if _, d, ok := strings.Cut(addr, "@"); ok {
		return d
	}
	return addr
}
