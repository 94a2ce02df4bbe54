// Package mailbox is hl7mail's mail side (draft-ietf-ediint-hl7-02 §6.2 to
// §6.4): the sender that takes stored messages to partners over SMTP, and
// the inbound handling of partner mail.
//
// It imports, of this module, only config, hl7, journal, mllp, security, store.
package mailbox

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Sealer holds the keys that wrap HL7 for partners.
type Sealer struct {
	PGPSelf       *openpgp.Entity
	SMIMECert     *x509.Certificate
	SMIMEKey      crypto.Signer
	PGPPartners   map[string]*openpgp.Entity   // by partner name
	SMIMEPartners map[string]*x509.Certificate // by partner name
	// Unusable says, by partner name, why a partner's key could not be
	// loaded: its mail waits with that reason.
	Unusable map[string]string
}

// ErrNoKey means a partner's key or ours is missing or unusable: the
// message cannot be sent safely and is not sent at all. It is not about the
// message: the partner's queue waits (a KeyError says why) until the key is
// mended.
var ErrNoKey = errors.New("no key to seal the message with")

// KeyError says why a partner's mail cannot be sealed: its key or ours is
// missing, expired or unreadable. It wraps ErrNoKey.
type KeyError struct {
	Reason string // our own words and dates: never key material
}

func (e *KeyError) Error() string { return "cannot seal: " + e.Reason }
func (e *KeyError) Unwrap() error { return ErrNoKey }

// Seal returns the MIME entity that carries payload of kind (a store kind)
// to p, signed and then encrypted with p's suite, and the MIC of what was
// signed. HL7 is wrapped as MIME-EDI first; a response bundle is signed as
// it is. A partner with security none gets the unsigned entity (config
// allows that only with allow_unencrypted).
func (s *Sealer) Seal(p *config.Partner, payload []byte, kind string, now time.Time) ([]byte, security.MIC, error) {
	edi := payload
	if kind != store.KindBundle {
		var err error
		if edi, err = security.EncodeEDI(payload, security.EDIOptions{ContentType: p.ContentType}); err != nil {
			return nil, security.MIC{}, err
		}
	}
	if err := s.Usable(p, now); err != nil {
		return nil, security.MIC{}, err
	}
	switch p.Security {
	case "pgp":
		to := s.PGPPartners[p.Name]
		signed, mic, err := security.PGPSign(edi, s.PGPSelf, now)
		if err != nil {
			return nil, mic, err
		}
		// Encrypted to ourselves too: the outgoing journal stays readable
		// to us, as evidence of what was sent (hl7mail evidence).
		enc, err := security.PGPEncrypt(signed, []*openpgp.Entity{to, s.PGPSelf}, now)
		return enc, mic, err
	case "smime":
		to := s.SMIMEPartners[p.Name]
		signed, mic, err := security.SMIMESign(edi, s.SMIMECert, s.SMIMEKey)
		if err != nil {
			return nil, mic, err
		}
		kt := security.OAEPSHA256
		if p.KeyTransport == "pkcs1v15" {
			kt = security.PKCS1v15
		}
		enc, err := security.SMIMEEncrypt(signed, []*x509.Certificate{to, s.SMIMECert}, kt)
		return enc, mic, err
	case "none":
		if !p.AllowUnencrypted {
			return nil, security.MIC{}, fmt.Errorf("partner %s: security none without allow_unencrypted", p.Name)
		}
		return edi, security.ComputeMIC(edi), nil
	}
	return nil, security.MIC{}, fmt.Errorf("partner %s: unknown security %q", p.Name, p.Security)
}

// Usable returns a *KeyError when mail to p cannot be sealed at now: the
// partner's key or ours is missing, or has no valid key for the job left
// (expired, an expired encryption subkey, revoked, not yet valid).
func (s *Sealer) Usable(p *config.Partner, now time.Time) error {
	if why, ok := s.Unusable[p.Name]; ok {
		return &KeyError{Reason: why}
	}
	switch p.Security {
	case "pgp":
		to := s.PGPPartners[p.Name]
		if s.PGPSelf == nil || to == nil {
			return &KeyError{Reason: "no OpenPGP key loaded for partner " + p.Name}
		}
		if why := security.PGPUnusable(to, now); why != "" {
			return &KeyError{Reason: "partner " + p.Name + ": " + why}
		}
		if why := security.PGPUnusableToSign(s.PGPSelf, now); why != "" {
			return &KeyError{Reason: "our OpenPGP key: " + why}
		}
	case "smime":
		to := s.SMIMEPartners[p.Name]
		if s.SMIMECert == nil || to == nil {
			return &KeyError{Reason: "no S/MIME certificate loaded for partner " + p.Name}
		}
		if why := security.CertUnusable(to, now); why != "" {
			return &KeyError{Reason: "partner " + p.Name + ": " + why}
		}
		if why := security.CertUnusable(s.SMIMECert, now); why != "" {
			return &KeyError{Reason: "our S/MIME certificate: " + why}
		}
	}
	return nil
}

// SenderOptions configure a Sender. Config, Store, Sealer, Submitter and
// Journal are required.
type SenderOptions struct {
	Config    *config.Config
	Store     *store.Store
	Sealer    *Sealer
	Submitter Submitter
	Journal   *journal.Journal // the outgoing journal
	Logger    *slog.Logger     // default slog.Default()
	Now       func() time.Time // default time.Now
	// RetryBase is the wait after the first failed attempt, doubling each
	// time up to RetryMax (defaults 30s and 30m). Zero in tests.
	RetryBase, RetryMax time.Duration
	// Poll is how often each partner's queue is looked at without a Notify
	// (default 5s).
	Poll time.Duration
	// Link, when set, follows the outcome of submissions.
	Link *Link
	// Abort, when set, cuts a submission under way short when it ends:
	// the second phase of a shutdown whose bound ran out. The message
	// stays queued, with its Message-ID, for the next start.
	Abort context.Context
}

// Sender takes stored outbound messages to their partners, one goroutine
// per partner, in the order they were accepted.
type Sender struct {
	o    SenderOptions
	log  *slog.Logger
	q    *queue
	open keySet // conditions with an alert open: cleared when they end
}

// NewSender returns a Sender; Run starts it.
func NewSender(o SenderOptions) (*Sender, error) {
	if o.Config == nil || o.Store == nil || o.Sealer == nil || o.Submitter == nil || o.Journal == nil {
		return nil, errors.New("mailbox: SenderOptions.Config, Store, Sealer, Submitter and Journal are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.RetryMax == 0 {
		o.RetryMax = 30 * time.Minute
	}
	if o.Poll == 0 {
		o.Poll = 5 * time.Second
	}
	if o.Abort == nil {
		o.Abort = context.Background() // never ends: nothing is cut short
	}
	return &Sender{o: o, log: o.Logger, q: newQueue(o.Config, o.Store, store.Outbound, o.Poll, o.Now, o.Logger)}, nil
}

// Notify tells the sender that partner has a new message.
func (s *Sender) Notify(partner string) { s.q.notify(partner) }

// Run delivers until ctx ends.
func (s *Sender) Run(ctx context.Context) {
	// Conditions raised before a restart are cleared as those after it.
	for _, prefix := range []string{LinkAlertSMTP, heldAlertPrefix} {
		keys, err := s.o.Store.OpenAlertKeys(ctx, prefix)
		if err != nil {
			s.log.Error("open alerts not read", "err", err)
		}
		for _, k := range keys {
			s.open.add(k)
		}
	}
	s.q.run(ctx, func(p *config.Partner) partnerWorker {
		return partnerWorker{step: func(ctx context.Context, m store.Message) bool { return s.deliver(ctx, p, m) }}
	})
}

// deliver makes one attempt at m; it reports whether the partner's queue
// may go on at once.
func (s *Sender) deliver(ctx context.Context, p *config.Partner, m store.Message) bool {
	// What happened is recorded even when shutdown begins meanwhile: a mail
	// the server took but the store does not know of would be sent twice.
	ctx = context.WithoutCancel(ctx)
	now := s.o.Now()
	log := s.log.With("partner", p.Name, "id", m.ID, "control_id", m.ControlID)
	since := m.Received
	if m.Retried.After(since) {
		since = m.Retried
	}
	if age := now.Sub(since); age > p.ExpireAfter.D() {
		reason := fmt.Sprintf("not delivered within expire_after %s", p.ExpireAfter.D())
		if err := s.o.Store.MarkFinal(ctx, m.ID, store.Expired, reason); err != nil {
			log.Error("store", "err", err)
			return false
		}
		raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertExpired, Partner: p.Name, ControlID: m.ControlID,
			MessageID: m.MessageID, Text: "message expired (deleted/expired)"}, "age", age.Round(time.Second).String())
		return true
	}
	sealed, mic, err := s.o.Sealer.Seal(p, m.Payload, m.Kind, now)
	if err != nil && Classify(err) == FaultPartner {
		s.hold(ctx, p, m, err, log)
		return false
	}
	if err != nil {
		if err := s.o.Store.MarkFinal(ctx, m.ID, store.Failed, "cannot seal: "+err.Error()); err != nil {
			log.Error("store", "err", err)
			return false
		}
		raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertFailed, Partner: p.Name, ControlID: m.ControlID,
			Text: "message failed: cannot seal"}, "err", err)
		return true
	}
	from := s.o.Config.FromFor(p) // the local address this partner talks to
	msgID := m.MessageID
	if msgID == "" {
		msgID = newMessageID(m.ID, from)
	}
	mailBytes, err := s.compose(p, from, m, msgID, now, sealed)
	if err != nil {
		log.Error("compose", "err", err)
		return false
	}
	var pending *store.Pending
	if p.MDN != "none" && m.Kind != store.KindBundle {
		pending = &store.Pending{Partner: p.Name, ControlID: m.ControlID, MIC: mic.String(), Sent: now,
			Due: now.Add(p.MDNTimeout.D())}
	}
	if err := s.o.Store.Prepare(ctx, m.ID, msgID, pending); err != nil {
		log.Error("store", "err", err)
		return false
	}
	if err := journalAppend(ctx, s.o.Journal, s.o.Store, from, now, msgID, mailBytes); err != nil {
		log.Error("outgoing journal not written; not sending", "err", err)
		return false
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.o.Abort, cancel)()
	err = s.o.Submitter.Submit(sctx, from, []string{p.Email}, mailBytes, SubmitOptions{RequireTLS: p.RequireTLS,
		EnvelopeID: strings.Trim(msgID, "<>")})
	if err != nil && s.o.Abort.Err() != nil {
		// Cut short by the shutdown: nothing is known of this attempt. The
		// message stays queued and goes at the next start under the same
		// Message-ID.
		log.Warn("submission cut short by the shutdown; the message is sent at the next start", "message_id", msgID)
		return false
	}
	if err == nil {
		if err := s.o.Store.MarkSent(ctx, m.ID); err != nil {
			log.Error("store", "err", err)
			return false
		}
		log.Info("mail submitted", "message_id", msgID, "mic", mic.String())
		s.submitted(ctx, p)
		return true
	}
	switch Classify(err) {
	case FaultMessage:
		s.o.Link.set(LinkUp, err) // the server answered
		if err := s.o.Store.MarkFinal(ctx, m.ID, store.Failed, err.Error()); err != nil {
			log.Error("store", "err", err)
			return false
		}
		raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertFailed, Partner: p.Name, ControlID: m.ControlID,
			MessageID: msgID, Text: "message failed: refused by the SMTP server"}, "message_id", msgID, "err", err)
		return true
	case FaultPartner:
		s.o.Link.set(LinkUp, err)
		s.hold(ctx, p, m, err, log)
	case FaultRetry:
		s.o.Link.set(LinkUp, err)
		s.retryLater(ctx, m, err, log)
	default:
		s.o.Link.set(LinkDown, err)
		s.open.add(LinkAlertSMTP)
		if _, raised, rerr := s.o.Store.RaiseOnce(ctx, LinkAlertSMTP, store.Alert{Kind: store.AlertLinkDown,
			Text: "mail submission fails; every queue waits: " + err.Error()}); rerr != nil {
			log.Error("alert not recorded", "err", rerr)
		} else if raised {
			log.Error("ALERT mail submission fails; every queue waits until it works again", "alert", store.AlertLinkDown, "err", err)
		}
		s.retryLater(ctx, m, err, log)
	}
	return false
}

// Alert keys of the conditions the sender raises and clears.
const (
	LinkAlertSMTP   = "link:smtp" // mail submission fails (FaultLink)
	heldAlertPrefix = "held:"     // + partner: its queue waits (FaultPartner); HeldAlertKey
)

// HeldAlertKey is the alert key of partner's queue waiting for what only an
// operator can mend (its key, its TLS requirement).
func HeldAlertKey(partner string) string { return heldAlertPrefix + partner }

// retryLater schedules m's next attempt after the backoff.
func (s *Sender) retryLater(ctx context.Context, m store.Message, err error, log *slog.Logger) {
	attempts, _, _, _ := s.o.Store.Delivery(ctx, m.ID)
	next := s.o.Now().Add(backoff(s.o.RetryBase, s.o.RetryMax, attempts))
	if serr := s.o.Store.MarkRetry(ctx, m.ID, err.Error(), next); serr != nil {
		log.Error("store", "err", serr)
	}
	log.Warn("mail not submitted; will retry", "err", err, "attempt", attempts+1, "next", next.Format(time.RFC3339))
}

// hold keeps p's queue waiting for what only an operator can mend (a key,
// the TLS the partner requires): one alert for the partner, the message
// tried again after the backoff, never failed for it.
func (s *Sender) hold(ctx context.Context, p *config.Partner, m store.Message, err error, log *slog.Logger) {
	s.open.add(HeldAlertKey(p.Name))
	if _, raised, rerr := s.o.Store.RaiseOnce(ctx, HeldAlertKey(p.Name), store.Alert{Kind: store.AlertHeld,
		Partner: p.Name, Text: "queue waits: " + err.Error()}); rerr != nil {
		log.Error("alert not recorded", "err", rerr)
	} else if raised {
		log.Error("ALERT partner's queue waits until this is mended", "alert", store.AlertHeld, "err", err)
	}
	s.retryLater(ctx, m, err, log)
}

// submitted records that a submission for p went through: the link is up,
// and the conditions that held the queues are over. When submission had
// been failing, every queue waiting for a retry goes on at once.
func (s *Sender) submitted(ctx context.Context, p *config.Partner) {
	s.o.Link.set(LinkUp, nil)
	for _, key := range []string{HeldAlertKey(p.Name), LinkAlertSMTP} {
		if !s.open.take(key) {
			continue
		}
		cleared, err := s.o.Store.ClearAlert(ctx, key)
		if err != nil {
			s.log.Error("alert not cleared", "err", err)
			continue
		}
		if !cleared {
			continue
		}
		s.log.Info("alert cleared: mail submission works again", "partner", p.Name, "alert", key)
		if key == LinkAlertSMTP {
			if err := s.o.Store.Reschedule(ctx, store.Outbound, ""); err != nil {
				s.log.Error("store", "err", err)
			}
			for _, q := range s.o.Config.Partners {
				s.Notify(q.Name)
			}
		}
	}
}

// compose puts the mail header before the sealed entity. The Subject names
// the message type and control ID only: no patient data.
func (s *Sender) compose(p *config.Partner, from string, m store.Message, msgID string, now time.Time, sealed []byte) ([]byte, error) {
	var h mail.Header
	h.SetAddressList("From", []*mail.Address{{Name: s.o.Config.Self.Name, Address: from}})
	h.SetAddressList("To", []*mail.Address{{Address: p.Email}})
	h.SetDate(now)
	h.SetMessageID(strings.Trim(msgID, "<>"))
	subject := "HL7 " + m.MessageType + " " + m.ControlID
	mdn := p.MDN
	if m.Kind == store.KindBundle {
		// A response carries the receipt for the request and asks for none
		// in turn (draft-ietf-ediint-hl7-02 §4.1.4).
		subject, mdn = "HL7 response "+m.ControlID, "none"
		if m.InReplyTo != "" {
			h.Set("In-Reply-To", m.InReplyTo)
			h.Set("References", m.InReplyTo)
		}
	} else if req, err := hl7.ParseHeader(m.Payload); err == nil && req.IsAck() {
		subject = "HL7 acknowledgement " + m.ControlID
	}
	h.SetSubject(subject)
	h.Set("MIME-Version", "1.0")
	switch mdn {
	case "signed":
		proto := "pgp-signature"
		if p.Security == "smime" {
			proto = "pkcs7-signature"
		}
		to, opts := security.MDNRequest{To: from, Protocol: proto}.Headers()
		h.Set("Disposition-Notification-To", to)
		h.Set("Disposition-Notification-Options", opts)
	case "unsigned":
		h.Set("Disposition-Notification-To", from)
	}
	var b bytes.Buffer
	if err := textproto.WriteHeader(&b, h.Header.Header); err != nil {
		return nil, err
	}
	out := bytes.TrimSuffix(b.Bytes(), []byte("\r\n")) // the sealed entity's header follows
	out = append(out, sealed...)
	// SMTP ends the data with a line end; the journal holds what was sent.
	if !bytes.HasSuffix(out, []byte("\r\n")) {
		out = append(out, '\r', '\n')
	}
	return out, nil
}

// newMessageID returns a unique Message-ID in the domain of our address.
func newMessageID(id int64, self string) string {
	var r [8]byte
	rand.Read(r[:])
	domain := "hl7mail.invalid"
	if _, d, ok := strings.Cut(self, "@"); ok && d != "" {
		domain = d
	}
	return fmt.Sprintf("<hl7mail.%d.%s@%s>", id, hex.EncodeToString(r[:]), domain)
}

// keySet is a set of alert keys, safe for concurrent use.
type keySet struct {
	mu sync.Mutex
	m  map[string]bool
}

func (k *keySet) add(key string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m == nil {
		k.m = map[string]bool{}
	}
	k.m[key] = true
}

// take removes key and reports whether it was there.
func (k *keySet) take(key string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	ok := k.m[key]
	delete(k.m, key)
	return ok
}
