// Package outbound takes stored messages to partners over SMTP
// (draft-ietf-ediint-hl7-02 §6.3): the Sender seals each with the
// partner's suite, journals it and submits it, asking for a signed
// receipt, and defers a partner's queue on a fault that is not about the
// message. Sweep alerts receipts that became overdue.
//
// It imports, of this module, only config, hl7, internal/partnerq,
// journal, link, notify, security, store.
package outbound

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/partnerq"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Seal returns the MIME entity that carries payload of kind (a store kind)
// to p, signed and then encrypted with p's suite from keys, and the MIC of
// what was signed. HL7 is wrapped as MIME-EDI first; a response bundle is
// signed as it is. A partner with security none gets the unsigned entity
// (config allows that only with allow_unencrypted). A key that cannot be
// used gives a *security.KeyError.
func Seal(keys *security.Keyring, p *config.Partner, payload []byte, kind string, now time.Time) ([]byte, security.MIC, error) {
	edi := payload
	if kind != store.KindBundle {
		var err error
		if edi, err = security.EncodeEDI(payload, security.EDIOptions{ContentType: p.ContentType}); err != nil {
			return nil, security.MIC{}, err
		}
	}
	if p.Security == config.NoSecurity && !p.AllowUnencrypted {
		return nil, security.MIC{}, fmt.Errorf("partner %s: security none without allow_unencrypted", p.Name)
	}
	return keys.Suite(string(p.Security), p.Name, string(p.KeyTransport)).Seal(edi, now)
}

// Journal is the outgoing journal as the sender writes to it: a group of
// mails with one sync, each placed by an offset; *journal.Journal is one.
type Journal interface {
	AppendAll(ms []journal.Mail) ([]int64, error)
	Path() string
}

// SenderOptions configure a Sender. Config, Store, Keys, Submitter and
// Journal are required.
type SenderOptions struct {
	Config    *config.Config
	Store     Store
	Keys      *security.Keyring
	Submitter Submitter
	Journal   Journal          // the outgoing journal
	Logger    *slog.Logger     // default slog.Default()
	Now       func() time.Time // default time.Now
	// RetryBase is the wait after the first failed attempt, doubling each
	// time up to RetryMax (defaults 30s and 30m). Zero in tests.
	RetryBase, RetryMax time.Duration
	// Poll is how often each partner's queue is looked at without a Notify
	// (default 5s).
	Poll time.Duration
	// Link, when set, follows the outcome of submissions.
	Link *link.Link
	// Abort, when set, cuts a submission under way short when it ends:
	// the second phase of a shutdown whose bound ran out. The message
	// stays queued, with its Message-ID, for the next start.
	Abort context.Context
	// Window is how many of a partner's messages are sealed ahead of the
	// one submitted (default 64); Group, how many sealed ones at most are
	// journalled, prepared and marked sent with one sync each (default
	// 32); Sealers, how many messages are sealed at once, for every
	// partner together (default GOMAXPROCS).
	Window, Group, Sealers int
	// SessionMails is how many mails one SMTP session carries before it is
	// closed and another opened (default 100); SessionIdle, how long an
	// unused session stays open (default 5s).
	SessionMails int
	SessionIdle  time.Duration
}

// Sender takes stored outbound messages to their partners, one goroutine
// per partner, in the order they were accepted.
type Sender struct {
	o    SenderOptions
	log  *slog.Logger
	q    *partnerq.Queue
	open keySet // conditions with an alert open: cleared when they end
	seal *sealQueue
	// sessions counts the SMTP sessions opened, by partner.
	mu       sync.Mutex
	partners map[string]*partnerSender
}

// NewSender returns a Sender; Run starts it.
func NewSender(o SenderOptions) (*Sender, error) {
	if o.Config == nil || o.Store == nil || o.Keys == nil || o.Submitter == nil || o.Journal == nil {
		return nil, errors.New("outbound: SenderOptions.Config, Store, Keys, Submitter and Journal are required")
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
	o.Window = cmp.Or(o.Window, 64)
	o.Group = cmp.Or(o.Group, 32)
	o.Sealers = cmp.Or(o.Sealers, runtime.NumCPU())
	o.SessionMails = cmp.Or(o.SessionMails, 100)
	o.SessionIdle = cmp.Or(o.SessionIdle, 5*time.Second)
	return &Sender{o: o, log: o.Logger, q: partnerq.New(o.Config, o.Store, store.Outbound, o.Poll, o.Now, o.Logger),
		seal: newSealQueue()}, nil
}

// Notify tells the sender that partner has a new message.
func (s *Sender) Notify(partner string) { s.q.Notify(partner) }

// Run delivers until ctx ends. It may run again once it has returned (a
// cluster's node that gains the partner's role again), never twice at once.
func (s *Sender) Run(ctx context.Context) {
	// The sealers end with each run: each run has its own.
	s.seal = newSealQueue()
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
	sealersDone := make(chan struct{})
	go func() { s.sealers(s.o.Sealers); close(sealersDone) }()
	s.q.Run(ctx, func(p *config.Partner) partnerq.Worker {
		w := &partnerSender{s: s, p: p}
		s.mu.Lock()
		if s.partners == nil {
			s.partners = map[string]*partnerSender{}
		}
		s.partners[p.Name] = w
		s.mu.Unlock()
		return partnerq.Worker{Step: w.step, Stop: w.sess.close}
	})
	// The workers are done: nothing waits on a seal any more.
	s.seal.close()
	<-sealersDone
}

// Sessions returns how many SMTP sessions were opened for partner's mails.
func (s *Sender) Sessions(partner string) int {
	s.mu.Lock()
	w := s.partners[partner]
	s.mu.Unlock()
	if w == nil {
		return 0
	}
	return w.sess.sessions()
}

// expired ends m as expired, with an alert, when it has waited longer than
// the partner's expire_after (since it was accepted, or retried by an
// operator); it reports whether it did.
func (s *Sender) expired(ctx context.Context, p *config.Partner, m store.Message, now time.Time, log *slog.Logger) bool {
	since := m.Received
	if m.Retried.After(since) {
		since = m.Retried
	}
	age := now.Sub(since)
	if age <= p.ExpireAfter.D() {
		return false
	}
	reason := fmt.Sprintf("not delivered within expire_after %s", p.ExpireAfter.D())
	if err := s.o.Store.MarkFinal(ctx, m.ID, store.Expired, reason); err != nil {
		log.Error("store", "err", err)
		return false // tried again at the next attempt
	}
	notify.Raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertExpired, Partner: p.Name, ControlID: m.ControlID,
		MessageID: m.MessageID, Text: "message expired (deleted/expired)"}, "age", age.Round(time.Second).String())
	return true
}

// sealFailed handles a message that could not be sealed: a key problem
// holds the partner's queue; any other fails the message, with an alert.
func (s *Sender) sealFailed(ctx context.Context, p *config.Partner, m store.Message, err error, log *slog.Logger) bool {
	if Classify(err) == FaultPartner {
		s.hold(ctx, p, m, err, log)
		return false
	}
	if err := s.o.Store.MarkFinal(ctx, m.ID, store.Failed, "cannot seal: "+err.Error()); err != nil {
		log.Error("store", "err", err)
		return false
	}
	notify.Raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertFailed, Partner: p.Name, ControlID: m.ControlID,
		Text: "message failed: cannot seal"}, "err", err)
	return true
}

// submitFailed records a submission that failed, by its fault class
// (Classify): the message fails, the partner's queue is held, the message
// is retried later, or every queue waits for the server with one alert.
func (s *Sender) submitFailed(ctx context.Context, p *config.Partner, m store.Message, msgID string, err error, log *slog.Logger) bool {
	switch Classify(err) {
	case FaultMessage:
		s.o.Link.Set(link.Up, err) // the server answered
		if err := s.o.Store.MarkFinal(ctx, m.ID, store.Failed, err.Error()); err != nil {
			log.Error("store", "err", err)
			return false
		}
		notify.Raise(ctx, s.o.Store, log, store.Alert{Kind: store.AlertFailed, Partner: p.Name, ControlID: m.ControlID,
			MessageID: msgID, Text: "message failed: refused by the SMTP server"}, "message_id", msgID, "err", err)
		return true
	case FaultPartner:
		s.o.Link.Set(link.Up, err)
		s.hold(ctx, p, m, err, log)
	case FaultRetry:
		s.o.Link.Set(link.Up, err)
		s.retryLater(ctx, m, err, log)
	default:
		s.o.Link.Set(link.Down, err)
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
	next := s.o.Now().Add(partnerq.Backoff(s.o.RetryBase, s.o.RetryMax, attempts))
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
	s.o.Link.Set(link.Up, nil)
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
		subject, mdn = "HL7 response "+m.ControlID, config.ReceiptNone
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
	case config.ReceiptSigned:
		proto := "pgp-signature"
		if p.Security == config.SMIME {
			proto = "pkcs7-signature"
		}
		to, opts := security.MDNRequest{To: from, Protocol: proto}.Headers()
		h.Set("Disposition-Notification-To", to)
		h.Set("Disposition-Notification-Options", opts)
	case config.ReceiptUnsigned:
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
