package inbound

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/mail"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/security"
)

// Reason says why a mail is quarantined instead of delivered.
type Reason string

// Quarantine reasons.
const (
	ReasonMalformed     Reason = "malformed"      // not a readable mail
	ReasonUnknownSender Reason = "unknown-sender" // From names no partner
	ReasonOversize      Reason = "oversize"       // larger than allowed
	ReasonNotEncrypted  Reason = "not-encrypted"  // plain where encryption is required
	ReasonUndecryptable Reason = "undecryptable"  // not encrypted to us
	ReasonWrongSuite    Reason = "wrong-suite"    // PGP/MIME from an S/MIME partner, or the reverse
	ReasonIntegrity     Reason = "integrity"      // decrypted, but the content was altered on the way
	ReasonUnsigned      Reason = "unsigned"
	ReasonBadSignature  Reason = "bad-signature"  // tampered
	ReasonWrongSigner   Reason = "wrong-signer"   // signed by someone else than the From partner
	ReasonUnknownSigner Reason = "unknown-signer" // signed by a key we do not know
	ReasonExpired       Reason = "expired-key"
	ReasonRevoked       Reason = "revoked"            // the signer's key or certificate is revoked
	ReasonRevocation    Reason = "revocation-unknown" // revocation cannot be told, and fails closed
	ReasonUntrusted     Reason = "untrusted"          // the certificate does not chain to the partner's anchors
	ReasonWeak          Reason = "weak-algorithm"
	ReasonNotHL7        Reason = "not-hl7" // opened, but carries no HL7, MDN or bundle
	ReasonReplay        Reason = "replay"  // a Message-ID already seen from the partner
	// ReasonReceiptRefused: the sender requires a receipt this gateway
	// cannot make: signed in a protocol other than the partner's suite;
	// ReasonMICRefused: with only MIC algorithms it does not compute.
	ReasonReceiptRefused Reason = "receipt-unsupported"
	ReasonMICRefused     Reason = "receipt-micalg-unsupported"
)

// QuarantineError is why Open refused a mail. Partner is set when the
// sender is a known partner (who may then get an MDN saying so).
type QuarantineError struct {
	Reason  Reason
	Partner *config.Partner
	Err     error
}

func (e *QuarantineError) Error() string {
	if e.Err == nil {
		return string(e.Reason)
	}
	return fmt.Sprintf("%s: %v", e.Reason, e.Err)
}

func (e *QuarantineError) Unwrap() error { return e.Err }

// reasonFor maps the security package's errors to quarantine reasons: the
// one place that decides what a failed verification means.
func reasonFor(err error) Reason {
	switch {
	case errors.Is(err, security.ErrNotEncrypted):
		return ReasonNotEncrypted
	case errors.Is(err, security.ErrNotForUs):
		return ReasonUndecryptable
	case errors.Is(err, security.ErrWrongSuite):
		return ReasonWrongSuite
	case errors.Is(err, security.ErrIntegrity):
		return ReasonIntegrity
	case errors.Is(err, security.ErrUnsigned):
		return ReasonUnsigned
	case errors.Is(err, security.ErrBadSignature):
		return ReasonBadSignature
	case errors.Is(err, security.ErrRevoked):
		return ReasonRevoked
	case errors.Is(err, security.ErrRevocationUnknown):
		return ReasonRevocation
	case errors.Is(err, security.ErrUntrusted):
		return ReasonUntrusted
	case errors.Is(err, security.ErrWrongSigner):
		return ReasonWrongSigner
	case errors.Is(err, security.ErrUnknownSigner):
		return ReasonUnknownSigner
	case errors.Is(err, security.ErrExpired):
		return ReasonExpired
	case errors.Is(err, security.ErrWeakAlgorithm), errors.Is(err, security.ErrMICAlgorithm):
		return ReasonWeak
	case errors.Is(err, security.ErrContentType):
		return ReasonNotHL7
	}
	return ReasonMalformed
}

// Disposition returns the MDN a known partner gets for a mail quarantined
// for reason r (draft-ietf-ediint-hl7-02 §4.1.3 tables 4 and 5, with the
// error texts of RFC 4130 §7.4.3), and false where none is sent.
func (r Reason) Disposition() (security.Disposition, string, bool) {
	errored := security.Disposition{Type: security.Processed, Modifier: security.ModError}
	switch r {
	case ReasonUndecryptable, ReasonNotEncrypted, ReasonWrongSuite:
		return errored, "decryption-failed", true
	case ReasonBadSignature, ReasonIntegrity:
		return errored, "integrity-check-failed", true
	case ReasonUnsigned, ReasonWrongSigner, ReasonUnknownSigner, ReasonExpired, ReasonWeak,
		ReasonRevoked, ReasonRevocation, ReasonUntrusted:
		return errored, "authentication-failed", true
	case ReasonNotHL7, ReasonMalformed:
		return errored, "unexpected-processing-error", true
	case ReasonOversize:
		return security.Disposition{Type: security.Denied}, "message too large", true
	case ReasonReceiptRefused:
		return security.Disposition{Type: security.Failed}, "unsupported format", true
	case ReasonMICRefused:
		return security.Disposition{Type: security.Failed}, "unsupported MIC-algorithms", true
	}
	// Unknown senders get nothing; replays get the MDN already sent.
	return security.Disposition{}, "", false
}

// Incoming is a mail that was opened and verified.
type Incoming struct {
	Partner *config.Partner
	From    string
	// FromRewritten is set when From named no partner and the partner was
	// known by the key that signed the mail (a gateway rewrote From).
	FromRewritten bool
	// Recipient is the address of ours the mail was for (see HandleTo).
	Recipient string
	// InReplyTo is the Message-ID of the mail this one answers.
	InReplyTo  string
	MessageID  string
	Subject    string
	MDNRequest *security.MDNRequest // nil when no receipt was asked for
	Kind       security.Kind
	Signer     string
	MIC        security.MIC     // of the signed entity, for our receipt
	Payload    []byte           // KindHL7: the HL7 message
	Header     *hl7.Header      // KindHL7: its MSH
	MDN        *security.MDN    // KindMDN, KindBundle
	Bundle     *security.Bundle // KindBundle
	// Unsigned is set for a receipt that came plain, from a partner
	// configured with mdn: unsigned: weaker evidence, recorded as such.
	Unsigned bool
	// ReplyTo is the address of the mail's Reply-To, if it has one.
	ReplyTo string
	// ReceiptNote is the warning the receipt for this mail carries
	// (processed/warning), when its request could not be honoured as
	// written.
	ReceiptNote string
}

// Opener opens partner mail. Config and the key fields are required.
type Opener struct {
	Config *config.Config
	// Keys holds our keys and every partner's.
	Keys *security.Keyring
	// MaxSize bounds a mail in bytes (default 32 MiB).
	MaxSize int
	Now     func() time.Time
}

// Open reads a raw mail: who sent it, whether it is theirs, and what it
// carries. Every refusal is a *QuarantineError.
func (o *Opener) Open(raw []byte) (*Incoming, error) {
	max := o.MaxSize
	if max == 0 {
		max = 32 << 20
	}
	if len(raw) > max {
		return nil, &QuarantineError{Reason: ReasonOversize, Err: fmt.Errorf("%d bytes, limit %d", len(raw), max)}
	}
	h, err := headerOf(raw)
	if err != nil {
		return nil, &QuarantineError{Reason: ReasonMalformed, Err: err}
	}
	in := &Incoming{MessageID: strings.TrimSpace(h.Get("Message-Id")), Subject: h.Get("Subject"),
		InReplyTo: strings.TrimSpace(h.Get("In-Reply-To"))}
	from, err := mail.ParseAddress(h.Get("From"))
	if err != nil {
		// The parser's words may quote the header: only its length is told.
		return nil, &QuarantineError{Reason: ReasonMalformed, Err: fmt.Errorf("%w: From (%d bytes) is not one address",
			security.ErrMalformed, len(h.Get("From")))}
	}
	in.From = from.Address
	if rt, err := mail.ParseAddress(h.Get("Reply-To")); err == nil {
		in.ReplyTo = rt.Address
	}
	in.Partner = o.Config.PartnerByEmail(from.Address)
	now := time.Now()
	if o.Now != nil {
		now = o.Now()
	}
	var entity []byte
	if in.Partner == nil {
		// A gateway on the way may rewrite From (draft-ietf-ediint-hl7-02
		// §6.2, figure 8): the partner whose key signed the mail sent it.
		for i := range o.Config.Partners {
			p := &o.Config.Partners[i]
			if p.Security == config.NoSecurity {
				continue
			}
			if opened, err := o.openAs(p, raw, now); err == nil {
				in.Partner, in.FromRewritten = p, true
				entity, in.MIC, in.Signer = opened.Entity, opened.MIC, opened.Signer
				break
			}
		}
		if in.Partner == nil {
			return nil, &QuarantineError{Reason: ReasonUnknownSender, Err: fmt.Errorf("%s is not a partner, and no partner's key signed the mail", from.Address)}
		}
	}
	p := in.Partner
	q := func(err error) error { return &QuarantineError{Reason: reasonFor(err), Partner: p, Err: err} }
	in.MDNRequest = security.ParseMDNRequest(h)
	switch {
	case in.FromRewritten:
	case p.MDN == config.ReceiptUnsigned && security.Classify(raw) == security.KindMDN:
		// A partner asked for unsigned receipts sends them as they are
		// (draft-ietf-ediint-hl7-02 §4.1.3): a receipt only, never a
		// message, and recorded as unsigned.
		entity, in.Unsigned = raw, true
	default:
		// The partner's suite; with none (allowed only with
		// allow_unencrypted) the mail is taken as it is.
		opened, err := o.Keys.Suite(string(p.Security), p.Name, string(p.KeyTransport)).Open(raw, now)
		if err != nil {
			return nil, q(err)
		}
		entity, in.MIC, in.Signer = opened.Entity, opened.MIC, opened.Signer
	}
	if err := honour(p, in, entity); err != nil {
		return nil, err
	}
	c, err := security.Read(entity, security.Accept{Consent: p.AcceptConsent})
	if err != nil {
		return nil, q(err)
	}
	in.Kind, in.MDN, in.Bundle = c.Kind, c.MDN, c.Bundle
	switch c.Kind {
	case security.KindHL7, security.KindBundle:
		if c.Payload == nil { // a bundle with only the receipt
			break
		}
		if in.Header, err = headerOfPayload(c.Payload); err != nil {
			return nil, &QuarantineError{Reason: ReasonNotHL7, Partner: p, Err: err}
		}
		in.Payload = c.Payload
	case security.KindMDN:
	default:
		return nil, &QuarantineError{Reason: ReasonNotHL7, Partner: p, Err: errors.New("carries no HL7, MDN or bundle")}
	}
	return in, nil
}

// AnswerTo returns the partner the answer to in (its HL7 response and
// the MDN) goes to, by the return address rules of draft-ietf-ediint-hl7-02
// §4.1.4, and the rule that chose it; always a configured partner, never
// an address taken from the mail alone:
//  1. a return route for the message's MSH-3/MSH-4 (return_routes);
//  2. the partner the signature authenticated;
//  3. for unsigned mail (security: none), the partner whose address is
//     the Disposition-Notification-To, 4. the Reply-To, 5. the From.
func AnswerTo(cfg *config.Config, in *Incoming) (*config.Partner, string) {
	if in.Header != nil {
		if p := cfg.ReturnRouteFor(in.Header.SendingAppID(), in.Header.SendingFacilityID()); p != nil {
			return p, "return-route"
		}
	}
	if in.Signer != "" {
		return in.Partner, "signer"
	}
	if in.MDNRequest != nil {
		if p := cfg.PartnerByEmail(in.MDNRequest.To); p != nil {
			return p, "disposition-notification-to"
		}
	}
	if p := cfg.PartnerByEmail(in.ReplyTo); p != nil {
		return p, "reply-to"
	}
	return in.Partner, "from"
}

// honour fits the receipt to what the sender asked for in
// Disposition-Notification-Options (RFC 4130 §7.3): the MIC with the first
// requested algorithm this gateway computes. A receipt required in a form
// it cannot make (another signed-receipt-protocol than the partner's
// suite, or only unknown algorithms) refuses the mail with a "failed" MDN;
// the same asked as optional, or options that cannot be read, get the
// partner's usual receipt, and the latter a warning in it.
func honour(p *config.Partner, in *Incoming, entity []byte) error {
	req := in.MDNRequest
	if req == nil {
		return nil
	}
	refuse := func(r Reason, what string) error {
		return &QuarantineError{Reason: r, Partner: p, Err: errors.New(what)}
	}
	if req.Unreadable {
		in.ReceiptNote = "disposition-notification-options unreadable"
	}
	signs := p.Security.Signs()
	if req.Protocol != "" && req.Required && (!signs || !req.ProtocolFits(string(p.Security))) {
		return refuse(ReasonReceiptRefused, fmt.Sprintf("a signed receipt is required in a protocol other than the partner's (%s)", p.Security))
	}
	if len(req.MICAlgs) == 0 || in.MIC.Hash == 0 {
		return nil
	}
	h, ok := req.MICHash()
	switch {
	case !ok && req.MICRequired:
		return refuse(ReasonMICRefused, "only MIC algorithms this gateway does not compute are allowed for the receipt")
	case ok && h != in.MIC.Hash:
		in.MIC = security.MICWith(entity, h)
	}
	return nil
}

// headerOfPayload reads the header of an HL7 message, or of a batch (the
// batch header, with the first message's type and version).
func headerOfPayload(payload []byte) (*hl7.Header, error) {
	if hl7.IsBatch(payload) {
		b, err := hl7.ParseBatch(payload)
		if err != nil {
			return nil, err
		}
		h := *b.Header
		h.MessageType = hl7.BatchType
		return &h, nil
	}
	return hl7.ParseHeader(payload)
}

// openAs decrypts raw and verifies that partner p signed it.
func (o *Opener) openAs(p *config.Partner, raw []byte, now time.Time) (*security.Opened, error) {
	if !p.Security.Signs() {
		return nil, fmt.Errorf("partner %s: security %s is not signed", p.Name, p.Security)
	}
	return o.Keys.Suite(string(p.Security), p.Name, string(p.KeyTransport)).Open(raw, now)
}

// headerOf reads the header of a raw mail. Its error says what is wrong in
// bounded facts (security.HeaderFault), never quoting the mail.
func headerOf(raw []byte) (textproto.Header, error) {
	h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		return h, security.HeaderFault(raw)
	}
	return h, nil
}
