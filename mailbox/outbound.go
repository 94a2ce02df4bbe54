// Package mailbox is hl7mail's mail side (draft-ietf-ediint-hl7-02 §6.2 to
// §6.4): the sender that takes stored messages to partners over SMTP, and
// the inbound handling of partner mail.
package mailbox

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

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
}

// ErrNoKey means a partner's key or ours is missing: the message cannot be
// sent safely and is not sent at all.
var ErrNoKey = errors.New("no key to seal the message with")

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
	switch p.Security {
	case "pgp":
		to := s.PGPPartners[p.Name]
		if s.PGPSelf == nil || to == nil {
			return nil, security.MIC{}, ErrNoKey
		}
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
		if s.SMIMECert == nil || to == nil {
			return nil, security.MIC{}, ErrNoKey
		}
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

// Submitter hands a mail to an SMTP server.
type Submitter interface {
	Submit(ctx context.Context, from string, to []string, mail []byte, opts SubmitOptions) error
}

// SubmitOptions are a submission's requirements.
type SubmitOptions struct {
	// RequireTLS: TLS to the server and REQUIRETLS onward (RFC 8689), or
	// ErrTLSRequired.
	RequireTLS bool
}

// ErrTLSRequired is returned when a partner's require_tls cannot be met.
// It is final for the message (an alert), not retried.
var ErrTLSRequired = errors.New("TLS required for this partner (require_tls)")

// SMTPSubmitter submits over SMTP with go-smtp.
type SMTPSubmitter struct {
	Addr string
	// TLS is starttls, tls (implicit) or none (loopback only; config
	// enforces it).
	TLS       string
	TLSConfig *tls.Config // nil: verify the server's certificate for its host name
	Username  string
	Password  string
	Timeout   time.Duration // for the whole exchange (default 2m)
}

// Submit sends one mail. An *smtp.SMTPError carries the server's reply.
func (s *SMTPSubmitter) Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error {
	if opts.RequireTLS && s.TLS == "none" {
		return fmt.Errorf("smtp %s: %w: the server is reached without TLS (smtp.tls: none)", s.Addr, ErrTLSRequired)
	}
	timeout := s.Timeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	d := net.Dialer{Timeout: 30 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	conn.SetDeadline(time.Now().Add(timeout))
	tlsConfig := s.TLSConfig
	if tlsConfig == nil {
		host, _, _ := net.SplitHostPort(s.Addr)
		tlsConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	var c *smtp.Client
	switch s.TLS {
	case "tls":
		c = smtp.NewClient(tls.Client(conn, tlsConfig))
	case "none":
		c = smtp.NewClient(conn)
	default:
		c, err = smtp.NewClientStartTLS(conn, tlsConfig)
		if err != nil {
			conn.Close()
			return fmt.Errorf("smtp %s: STARTTLS: %w", s.Addr, err)
		}
	}
	defer c.Close()
	if s.Username != "" {
		if err := c.Auth(sasl.NewPlainClient("", s.Username, s.Password)); err != nil {
			return fmt.Errorf("smtp %s: AUTH: %w", s.Addr, err)
		}
	}
	if err := c.Mail(from, &smtp.MailOptions{RequireTLS: opts.RequireTLS}); err != nil {
		if opts.RequireTLS && !isSMTPError(err) {
			// go-smtp refuses before sending when REQUIRETLS is not offered.
			return fmt.Errorf("smtp %s: %w: %v", s.Addr, ErrTLSRequired, err)
		}
		return fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, nil); err != nil {
			return fmt.Errorf("smtp %s: %w", s.Addr, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	if _, err := w.Write(m); err != nil {
		w.Close()
		return fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	return c.Quit()
}

func isSMTPError(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se)
}

// Permanent reports whether a submission error is final: an SMTP 5xx reply.
// Anything else (4xx, network, TLS, timeout) is worth retrying.
func Permanent(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se) && se.Code >= 500 && se.Code < 600 || errors.Is(err, ErrTLSRequired)
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
}

// Sender takes stored outbound messages to their partners, one goroutine
// per partner, in the order they were accepted.
type Sender struct {
	o   SenderOptions
	log *slog.Logger
	q   *queue
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
	return &Sender{o: o, log: o.Logger, q: newQueue(o.Config, o.Store, store.Outbound, o.Poll, o.Now, o.Logger)}, nil
}

// Notify tells the sender that partner has a new message.
func (s *Sender) Notify(partner string) { s.q.notify(partner) }

// Run delivers until ctx ends.
func (s *Sender) Run(ctx context.Context) {
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
	err = s.o.Submitter.Submit(ctx, from, []string{p.Email}, mailBytes, SubmitOptions{RequireTLS: p.RequireTLS})
	if err == nil || Permanent(err) {
		s.o.Link.set(LinkUp, err) // the server answered
	} else {
		s.o.Link.set(LinkDown, err)
	}
	switch {
	case err == nil:
		if err := s.o.Store.MarkSent(ctx, m.ID); err != nil {
			log.Error("store", "err", err)
			return false
		}
		log.Info("mail submitted", "message_id", msgID, "mic", mic.String())
		return true
	case Permanent(err):
		if err := s.o.Store.MarkFinal(ctx, m.ID, store.Failed, err.Error()); err != nil {
			log.Error("store", "err", err)
			return false
		}
		text := "message failed: refused by the SMTP server"
		if errors.Is(err, ErrTLSRequired) {
			text = "message failed: TLS required for this partner and not available (require_tls)"
		}
		raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertFailed, Partner: p.Name, ControlID: m.ControlID,
			MessageID: msgID, Text: text}, "message_id", msgID, "err", err)
		return true
	default:
		attempts, _, _, _ := s.o.Store.Delivery(ctx, m.ID)
		next := now.Add(backoff(s.o.RetryBase, s.o.RetryMax, attempts))
		if err := s.o.Store.MarkRetry(ctx, m.ID, err.Error(), next); err != nil {
			log.Error("store", "err", err)
		}
		log.Warn("mail not submitted; will retry", "message_id", msgID, "err", err, "attempt", attempts+1,
			"next", next.Format(time.RFC3339))
		return false
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
