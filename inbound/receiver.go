package inbound

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/mail"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Receiver handles mail fetched from partners: journal first, then open,
// verify and store, or quarantine with a reason (draft-ietf-ediint-hl7-02
// §6.2, §6.4). Opener, Store and Journal (the incoming journal) are required.
type Receiver struct {
	Opener  *Opener
	Store   Store
	Journal journal.Appender
	Logger  *slog.Logger
	// Notify wakes the sender for a partner when a receipt is queued.
	Notify func(partner string)

	releaseMu sync.Mutex // one release at a time: each sees the last one's message
}

// Result is what became of one mail.
type Result struct {
	Incoming *Incoming
	// ID is the stored inbound message (an HL7 message, or the response of
	// a bundle), 0 when none was stored.
	ID int64
	// Quarantine is set when the mail was refused; Replay when it repeats a
	// Message-ID already received from the partner.
	Quarantine *QuarantineError
	Replay     bool
	// Receipt is the outcome of the MDN the mail carried, if any, and
	// ReceiptFor the stored outbound message it matched.
	Receipt    *Receipt
	ReceiptFor int64
	// Bounce is the recorded delivery-status report, when the mail was one.
	Bounce *store.Report
}

// Handle processes one raw mail. An error means nothing was decided (the
// journal or the store failed): keep the mail and try again. Otherwise the
// mail may move on, to the processed folder or, with Result.Quarantine set,
// to the quarantine folder.
func (r *Receiver) Handle(ctx context.Context, raw []byte) (Result, error) {
	return r.HandleTo(ctx, raw, "")
}

// HandleTo is Handle for a mail known to be for recipient, an address of
// ours (the IMAP account it was fetched from, or the MTA's envelope
// recipient); with "", the first of our addresses in To or Cc, else
// self.email. Its messages go to that address's router.
func (r *Receiver) HandleTo(ctx context.Context, raw []byte, recipient string) (Result, error) {
	return r.Take(ctx, r.Open(raw, recipient))
}

// Opened is a mail decrypted and verified ahead of its turn (Open), for
// Take to handle.
type Opened struct {
	raw           []byte
	h             textproto.Header
	sender, msgID string
	dsn           bool
	in            *Incoming
	err           error
}

// Open does what handling a mail needs of the keys alone: decrypting and
// verifying it. It reads nothing of the store and writes nothing, so many
// mails may be opened at once, on every core; Take then handles them one
// after another, in the order they came.
func (r *Receiver) Open(raw []byte, recipient string) *Opened {
	o := &Opened{raw: raw, sender: "MAILER-DAEMON"}
	o.h, _ = headerOf(raw) // unreadable: empty, and Open quarantines the mail
	if a, err := mail.ParseAddress(o.h.Get("From")); err == nil {
		o.sender = a.Address
	}
	o.msgID = strings.TrimSpace(o.h.Get("Message-Id"))
	if o.dsn = security.IsDSN(raw); o.dsn {
		return o
	}
	o.in, o.err = r.Opener.Open(raw)
	if o.err == nil {
		if o.in.Recipient = recipient; recipient == "" {
			o.in.Recipient = r.recipientIn(o.h)
		}
	}
	return o
}

// Take handles a mail Open opened: it journals it, then stores it, records
// its receipt or bounce, or quarantines it with a reason. An error means
// nothing was decided, as for Handle.
func (r *Receiver) Take(ctx context.Context, o *Opened) (Result, error) {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := journal.AppendIndexed(ctx, r.Journal, r.Store, o.sender, time.Now(), o.msgID, o.raw); err != nil {
		return Result{}, fmt.Errorf("incoming journal: %w", err)
	}
	if o.dsn {
		return r.bounce(ctx, log, o.sender, o.msgID, o.raw)
	}
	var q *QuarantineError
	if errors.As(o.err, &q) {
		return r.quarantine(ctx, log, o.sender, o.raw, q, false)
	}
	if o.err != nil {
		return Result{}, o.err
	}
	return r.take(ctx, log, o.sender, o.raw, o.in)
}

// HandleOversize takes in a mail larger than the limit of which only the
// header was read (an MTA's pipe streamed past the rest; the IMAP watcher
// fetched only the header): the header is journalled, as the evidence that
// the mail came, and quarantined as oversize, size bytes in all, with an
// alert; a known partner that asked for a receipt gets a "denied" MDN. The
// body is never held, so it is not in the journal.
func (r *Receiver) HandleOversize(ctx context.Context, header []byte, size int64) (Result, error) {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	if !bytes.HasSuffix(header, []byte("\r\n\r\n")) && !bytes.HasSuffix(header, []byte("\n\n")) {
		header = append(bytes.TrimRight(header, "\r\n"), "\r\n\r\n"...)
	}
	h, _ := headerOf(header)
	sender := "MAILER-DAEMON"
	q := &QuarantineError{Reason: ReasonOversize, Err: fmt.Errorf("%d bytes, limit %d", size, r.Opener.MaxSize)}
	if a, err := mail.ParseAddress(h.Get("From")); err == nil {
		sender = a.Address
		q.Partner = r.Opener.Config.PartnerByEmail(a.Address)
	}
	if err := journal.AppendIndexed(ctx, r.Journal, r.Store, sender, time.Now(), strings.TrimSpace(h.Get("Message-Id")), header); err != nil {
		return Result{}, fmt.Errorf("incoming journal: %w", err)
	}
	return r.quarantine(ctx, log, sender, header, q, false)
}

// recipientIn returns the first address of ours in the To or Cc of a mail
// header, else self.email.
func (r *Receiver) recipientIn(h textproto.Header) string {
	cfg := r.Opener.Config
	for _, field := range []string{"To", "Cc"} {
		list, _ := mail.ParseAddressList(h.Get(field))
		for _, a := range list {
			if cfg.IsOurs(a.Address) {
				return a.Address
			}
		}
	}
	return cfg.Self.Email
}

// take handles a mail that opened: a replay, a receipt, a message to store.
func (r *Receiver) take(ctx context.Context, log *slog.Logger, sender string, raw []byte, in *Incoming) (Result, error) {
	res := Result{Incoming: in}
	log = log.With("partner", in.Partner.Name, "message_id", in.MessageID)
	if in.MessageID != "" && in.Payload != nil {
		if prev, err := r.Store.FindInbound(ctx, in.Partner.Name, in.MessageID); err == nil {
			q := &QuarantineError{Reason: ReasonReplay, Partner: in.Partner,
				Err: fmt.Errorf("Message-ID already received as message %d", prev.ID)}
			res, err := r.quarantine(ctx, log, sender, raw, q, true)
			res.Incoming, res.ID = in, prev.ID
			if err == nil {
				err = r.resendResponse(ctx, log, in)
			}
			return res, err
		} else if !errors.Is(err, store.ErrNotFound) {
			return Result{}, err
		}
	}
	if in.MDN != nil {
		outcome, p, err := Reconcile(ctx, r.Store, in.Partner.Name, in.MDN, in.Unsigned, in.MessageID)
		if err != nil {
			return Result{}, err
		}
		res.Receipt = &outcome
		if outcome != ReceiptUnknown && outcome != ReceiptRepeated {
			res.ReceiptFor = p.ID
			// What the bundle answers is the mail we sent, whatever
			// Message-ID a gateway gave it on the way.
			in.InReplyTo = p.MessageID
		}
		// A bundle whose receipt is recorded already but whose response
		// is not stored (a crash between the two; once stored, it is a
		// replay above) goes on to store it.
		r.receiptOutcome(ctx, log, in, outcome, p)
	}
	if in.Payload != nil {
		// A partner's request gets a response; a response in a bundle does
		// not, or the two sides would answer each other forever.
		kind := store.KindRequest
		if in.Kind == security.KindBundle {
			kind = store.KindResponse
		}
		nm := store.NewMessage{Direction: store.Inbound, Partner: in.Partner.Name,
			ControlID: in.Header.ControlID, MessageType: in.Header.MessageType, Payload: in.Payload,
			MessageID: in.MessageID, MIC: in.MIC.String(), Kind: kind, Recipient: in.Recipient, InReplyTo: in.InReplyTo,
			ReceiptNote: in.ReceiptNote}
		if kind == store.KindRequest {
			if p, rule := AnswerTo(r.Opener.Config, in); p.Name != in.Partner.Name {
				nm.AnswerTo = p.Name
				log.Info("its answer goes to another partner", "answer_to", p.Name, "rule", rule)
			}
		}
		a, err := r.Store.Accept(ctx, nm)
		if err != nil {
			return Result{}, err
		}
		res.ID = a.ID
		log.Info("mail received", "id", a.ID, "control_id", in.Header.ControlID, "kind", in.Kind.String(), "signer", in.Signer,
			"to", in.Recipient)
	}
	return res, nil
}

// receiptOutcome logs what a receipt established and raises the alert it
// calls for: a failure disposition (with its modifier and bounded reason),
// a MIC that differs, a receipt that names nothing of ours.
func (r *Receiver) receiptOutcome(ctx context.Context, log *slog.Logger, in *Incoming, outcome Receipt, p store.Pending) {
	d := in.MDN.Disposition
	attrs := []any{"original_message_id", in.MDN.OriginalMessageID, "outcome", outcome.String(),
		"disposition", d.Status()}
	if reason := in.MDN.Reason(); reason != "" {
		attrs = append(attrs, "reason", reason)
	}
	if p.ControlID != "" {
		attrs = append(attrs, "control_id", p.ControlID, "matched_by", p.MatchedBy)
	}
	alert := store.Alert{Kind: store.AlertMismatch, Partner: in.Partner.Name, ControlID: p.ControlID,
		MessageID: in.MDN.OriginalMessageID}
	switch outcome {
	case ReceiptRepeated:
		log.Info("receipt already recorded", attrs...)
		return
	case ReceiptMatched, ReceiptDispatched:
		if d.Modifier == security.ModWarning {
			log.Warn("receipt matched, with a warning", attrs...)
		} else {
			log.Info("receipt "+outcome.String(), attrs...)
		}
		return
	case ReceiptError:
		alert.Kind, alert.Text = store.AlertReceiptError, "receipt reports "+d.Status()
		if reason := in.MDN.Reason(); reason != "" {
			alert.Text += " (" + reason + ")"
		}
	case ReceiptMICMismatch:
		alert.Text = "receipt does not match: its MIC differs from the one sent"
	default:
		alert.Text = "receipt matches no message sent to this partner; recorded"
	}
	notify.Raise(ctx, r.Store, log, alert, attrs...)
}

func (r *Receiver) quarantine(ctx context.Context, log *slog.Logger, sender string, raw []byte, q *QuarantineError, replay bool) (Result, error) {
	rec := store.Quarantined{Sender: sender, Reason: string(q.Reason), Detail: q.Error(), Raw: raw}
	if q.Partner != nil {
		rec.Partner = q.Partner.Name
	}
	if h, err := headerOf(raw); err == nil {
		rec.MessageID = h.Get("Message-Id")
	}
	qid, err := r.Store.Quarantine(ctx, rec)
	if err != nil {
		return Result{}, err
	}
	log.Warn("mail quarantined", "quarantine_id", qid, "partner", rec.Partner, "sender", sender, "message_id", rec.MessageID,
		"reason", string(q.Reason), "detail", q.Error())
	if _, err := r.Store.RaiseAlert(ctx, store.Alert{Kind: store.AlertQuarantine, Partner: rec.Partner, MessageID: rec.MessageID,
		Text: fmt.Sprintf("mail quarantined (%s), quarantine id %d", q.Reason, qid)}); err != nil {
		return Result{}, err
	}
	if q.Partner != nil && !replay {
		if err := r.refusalReceipt(ctx, log, raw, q, rec.MessageID); err != nil {
			return Result{}, err
		}
	}
	return Result{Quarantine: q, Replay: replay}, nil
}

// refusalReceipt queues, for a known partner that asked for a receipt, the
// MDN that says why its mail was refused (Reason.Disposition). It goes to
// the partner's configured address, not to one taken from the mail.
func (r *Receiver) refusalReceipt(ctx context.Context, log *slog.Logger, raw []byte, q *QuarantineError, messageID string) error {
	d, text, ok := q.Reason.Disposition()
	if !ok || messageID == "" {
		return nil
	}
	h, err := headerOf(raw)
	if err != nil {
		return nil
	}
	if security.ParseMDNRequest(h) == nil {
		return nil
	}
	self := r.recipientIn(h)
	mdn := security.ReceiptFrom(self, messageID, d)
	mdn.Text = "The message was not processed: " + text + "."
	if d.Type == security.Failed {
		mdn.Failure = text // RFC 3798 §3.2.7
	} else {
		mdn.Error = text
	}
	entity, err := mdn.Entity()
	if err != nil {
		return err
	}
	a, err := r.Store.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: q.Partner.Name,
		ControlID: "mdn-" + strings.Trim(messageID, "<>"), MessageType: "MDN", Payload: entity,
		Kind: store.KindBundle, InReplyTo: messageID})
	if err != nil {
		return err
	}
	log.Info("refusal receipt queued", "partner", q.Partner.Name, "response_id", a.ID, "disposition", d.String(), "error", text)
	if r.Notify != nil {
		r.Notify(q.Partner.Name)
	}
	return nil
}

// resendResponse sends again the response already sent for a request the
// partner sent again: it evidently did not receive it.
func (r *Receiver) resendResponse(ctx context.Context, log *slog.Logger, in *Incoming) error {
	resp, err := r.Store.FindResponse(ctx, in.Partner.Name, in.MessageID)
	if errors.Is(err, store.ErrNotFound) {
		return nil // not answered yet: the answer follows the delivery
	}
	if err != nil {
		return err
	}
	if resp.State != store.Sent && resp.State != store.Acknowledged {
		return nil // still on its way
	}
	if err := r.Store.Requeue(ctx, resp.ID); err != nil {
		return err
	}
	log.Info("response sent again for a repeated request", "response_id", resp.ID)
	if r.Notify != nil {
		r.Notify(in.Partner.Name)
	}
	return nil
}

// Release takes in quarantined mail id after a person has checked it: the
// mail is opened again with the keys and partners configured now (after,
// say, the partner's new key was added), and stored for the router like any
// other mail; who released it and why is recorded. A mail that still does
// not open stays quarantined and the error says why; a replay is never
// released (its message was delivered already).
func (r *Receiver) Release(ctx context.Context, id int64, by, note string) (Result, error) {
	log := r.Logger
	if log == nil {
		log = slog.Default()
	}
	if strings.TrimSpace(by) == "" || strings.TrimSpace(note) == "" {
		return Result{}, errors.New("release: say who releases the mail and why")
	}
	r.releaseMu.Lock()
	defer r.releaseMu.Unlock()
	q, err := r.Store.QuarantineGet(ctx, id)
	if err != nil {
		return Result{}, err
	}
	if !q.Released.IsZero() {
		return Result{}, fmt.Errorf("release: quarantined mail %d was released by %s on %s as message %d",
			id, q.ReleasedBy, q.Released.Format(time.RFC3339), q.ReleasedAs)
	}
	if Reason(q.Reason) == ReasonReplay {
		return Result{}, fmt.Errorf("release: quarantined mail %d repeats a mail already received (%s); not delivered twice", id, q.Detail)
	}
	if len(q.Raw) == 0 {
		return Result{}, fmt.Errorf("release: quarantined mail %d was recorded without its bytes; take it from the incoming journal", id)
	}
	in, err := r.Opener.Open(q.Raw)
	if err != nil {
		return Result{}, fmt.Errorf("release: quarantined mail %d still does not open: %w", id, err)
	}
	if in.MessageID != "" {
		if prev, err := r.Store.FindInbound(ctx, in.Partner.Name, in.MessageID); err == nil {
			return Result{}, fmt.Errorf("release: %s was received already as message %d", in.MessageID, prev.ID)
		}
	}
	h, _ := headerOf(q.Raw)
	in.Recipient = r.recipientIn(h)
	res, err := r.take(ctx, log, q.Sender, q.Raw, in)
	if err != nil {
		return res, err
	}
	if err := r.Store.MarkReleased(ctx, id, by, note, res.ID); err != nil {
		return res, err
	}
	log.Warn("quarantined mail released", "quarantine_id", id, "partner", in.Partner.Name, "message_id", in.MessageID,
		"id", res.ID, "released_by", by, "reason", q.Reason)
	return res, nil
}
