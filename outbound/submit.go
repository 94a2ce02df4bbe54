package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/security"
)

// Submitter hands a mail to an SMTP server.
type Submitter interface {
	Submit(ctx context.Context, from string, to []string, mail []byte, opts SubmitOptions) error
}

// SubmitOptions are a submission's requirements.
type SubmitOptions struct {
	// RequireTLS: TLS to the server and REQUIRETLS onward (RFC 8689), or
	// ErrTLSRequired.
	RequireTLS bool
	// EnvelopeID, when set, asks a server that offers DSN (RFC 3461) for a
	// delivery-status notification on failure or delay, with the returned
	// mail's header only (RET=HDRS: never the encrypted body back), under
	// this ENVID: the Message-ID of our mail, without its angle brackets.
	EnvelopeID string
}

// ErrTLSRequired is returned when a partner's require_tls cannot be met.
// It is about the partner's policy and the server, not the message: the
// partner's queue waits with an alert until the server offers it.
var ErrTLSRequired = errors.New("TLS required for this partner (require_tls)")

// SessionError is a submission that failed before the message was named:
// connecting, the greeting, EHLO, STARTTLS, AUTH or MAIL FROM. It is about
// the server or our account (a wrong password, a server that offers no
// AUTH, one that refuses our sender), never about the message.
type SessionError struct {
	Stage string // connect, starttls, hello, auth, mail
	Err   error
}

func (e *SessionError) Error() string { return e.Stage + ": " + e.Err.Error() }
func (e *SessionError) Unwrap() error { return e.Err }

// SMTPSubmitter submits over SMTP with go-smtp.
type SMTPSubmitter struct {
	Addr string
	// TLS is starttls, tls (implicit) or none (loopback only; config
	// enforces it).
	TLS       config.TLSMode
	TLSConfig *tls.Config // nil: verify the server's certificate for its host name
	Username  string
	Password  string
	Timeout   time.Duration // for each command and the data (default 2m)
}

// Submit sends one mail on a session of its own. Errors before RCPT TO are
// *SessionError; an *smtp.SMTPError carries the server's reply.
func (s *SMTPSubmitter) Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error {
	sess, err := s.Open(ctx)
	if err != nil {
		return err
	}
	if err := sess.Submit(ctx, from, to, m, opts); err != nil {
		sess.Abandon()
		return err
	}
	return sess.Close()
}

// A SessionOpener opens SMTP sessions that carry many mails, one
// transaction after another (SMTPSubmitter is one). The Sender keeps one
// open per partner; a Submitter that is not one submits each mail alone.
type SessionOpener interface {
	Open(ctx context.Context) (Session, error)
}

// Session is an open SMTP session, greeted and logged in.
type Session interface {
	// Submit sends one mail in a transaction of its own. After an error
	// the session is not used again.
	Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error
	// Close ends the session with QUIT; Abandon just drops the connection.
	Close() error
	Abandon()
}

// Open connects, says EHLO (over TLS as s.TLS says) and logs in. ctx bounds
// the opening only. Errors are *SessionError.
func (s *SMTPSubmitter) Open(ctx context.Context) (Session, error) {
	session := func(stage string, err error) error {
		return fmt.Errorf("smtp %s: %w", s.Addr, &SessionError{Stage: stage, Err: err})
	}
	c, conn, stage, release, err := s.open(ctx, s.timeout())
	if err != nil {
		return nil, session(stage, err)
	}
	defer release()
	if s.Username != "" {
		if err := c.auth(sasl.NewPlainClient("", s.Username, s.Password)); err != nil {
			conn.Close()
			return nil, session("auth", err)
		}
	}
	return &smtpSession{s: s, c: c, conn: conn}, nil
}

func (s *SMTPSubmitter) timeout() time.Duration {
	if s.Timeout == 0 {
		return 2 * time.Minute
	}
	return s.Timeout
}

// smtpSession is an SMTPSubmitter's open session.
type smtpSession struct {
	s    *SMTPSubmitter
	c    *client
	conn net.Conn // the TCP connection under c
}

// Submit sends one mail. When ctx ends the connection is closed, whatever
// command waits on it: a shutdown cuts a session short within its bound
// (the mail is sent again at start, and the partner's replay check absorbs
// a copy that arrived).
func (x *smtpSession) Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error {
	s := x.s
	if opts.RequireTLS && s.TLS == config.NoTLS {
		return fmt.Errorf("smtp %s: %w: the server is reached without TLS (smtp.tls: none)", s.Addr, ErrTLSRequired)
	}
	if opts.RequireTLS && !x.c.offers("REQUIRETLS") {
		return fmt.Errorf("smtp %s: %w: the server does not offer REQUIRETLS", s.Addr, ErrTLSRequired)
	}
	defer context.AfterFunc(ctx, func() { x.conn.Close() })()
	err := x.c.send(from, to, m, opts)
	var te *transactionError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &te) && te.Command == "MAIL FROM":
		// Refused before the message was named: about the server or our
		// account, not the message.
		return fmt.Errorf("smtp %s: %w", s.Addr, &SessionError{Stage: "mail", Err: te.Err})
	case errors.As(err, &te):
		return fmt.Errorf("smtp %s: %s: %w", s.Addr, te.Command, te.Err)
	}
	return fmt.Errorf("smtp %s: %w", s.Addr, err)
}

// Close says QUIT, waiting at most 10 seconds for the answer, and closes
// the connection.
func (x *smtpSession) Close() error { return x.c.quit(10 * time.Second) }

// Abandon closes the connection without a word.
func (x *smtpSession) Abandon() { x.conn.Close() }

// open connects to the server, reads its greeting and says EHLO, over TLS
// as s.TLS says; each step is bounded by timeout. It returns the client,
// the TCP connection under it, and on error the stage that failed
// (connect, starttls, hello). When ctx ends before release is called, the
// connection is closed.
func (s *SMTPSubmitter) open(ctx context.Context, timeout time.Duration) (c *client, conn net.Conn, stage string,
	release func(), err error) {
	d := net.Dialer{Timeout: min(timeout, 30*time.Second)}
	raw, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return nil, nil, "connect", nil, err
	}
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	release = func() { stop() }
	defer func() {
		if err != nil {
			stop()
			raw.Close()
		}
	}()
	conn = raw
	tlsConfig := s.TLSConfig
	if tlsConfig == nil {
		host, _, _ := net.SplitHostPort(s.Addr)
		tlsConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	switch s.TLS {
	case config.ImplicitTLS, config.NoTLS:
		if s.TLS == config.ImplicitTLS {
			c = newClient(tls.Client(conn, tlsConfig), true, timeout)
		} else {
			c = newClient(conn, false, timeout)
		}
		if err = c.greet(); err != nil {
			return nil, nil, "hello", nil, err
		}
	default:
		c = newClient(conn, false, timeout)
		if err = c.greet(); err == nil {
			if err = c.hello(); err == nil {
				err = c.startTLS(tlsConfig)
			}
		}
		if err != nil {
			return nil, nil, "starttls", nil, err
		}
	}
	if err = c.hello(); err != nil {
		return nil, nil, "hello", nil, err
	}
	return c, conn, "", release, nil
}

// sessionHolder keeps a partner's session open from one mail to the next:
// at most mails mails on one session, none on a session idle for longer
// than idle (servers close idle sessions: Postfix after 300 s). A failed
// transaction ends its session, and the next mail starts on a new one in a
// clean state.
type sessionHolder struct {
	mu    sync.Mutex
	sess  Session
	mails int
	last  time.Time
	timer *time.Timer
	// Opened counts the sessions opened (for tests and the bench).
	opened int
}

// submit sends one mail through sub: on the held session when sub opens
// sessions, else on its own.
func (h *sessionHolder) submit(ctx context.Context, sub Submitter, mails int, idle time.Duration, from string, to []string,
	m []byte, opts SubmitOptions) error {
	opener, ok := sub.(SessionOpener)
	if !ok {
		return sub.Submit(ctx, from, to, m, opts)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sess != nil && (h.mails >= mails || time.Since(h.last) > idle) {
		h.sess.Close()
		h.sess = nil
	}
	reused := h.sess != nil
	err := h.send(ctx, opener, from, to, m, opts)
	var se *SessionError
	if err != nil && reused && errors.As(err, &se) && ctx.Err() == nil {
		// The server may have ended a session kept open (its timeout, a
		// restart) before the mail was named: one try on a new session.
		err = h.send(ctx, opener, from, to, m, opts)
	}
	return err
}

func (h *sessionHolder) send(ctx context.Context, opener SessionOpener, from string, to []string, m []byte,
	opts SubmitOptions) error {
	if h.sess == nil {
		sess, err := opener.Open(ctx)
		if err != nil {
			return err
		}
		h.sess, h.mails = sess, 0
		h.opened++
	}
	err := h.sess.Submit(ctx, from, to, m, opts)
	h.last = time.Now()
	if err != nil {
		h.sess.Abandon()
		h.sess = nil
		return err
	}
	h.mails++
	return nil
}

// busy stops the idle timer: mails are on their way.
func (h *sessionHolder) busy() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.timer != nil {
		h.timer.Stop()
	}
}

// idle closes the session after d unless it is used again meanwhile.
func (h *sessionHolder) idle(d time.Duration) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sess == nil {
		return
	}
	if h.timer != nil {
		h.timer.Stop()
	}
	h.timer = time.AfterFunc(d, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.sess != nil && time.Since(h.last) >= d {
			h.sess.Close()
			h.sess = nil
		}
	})
}

// close ends the session, if one is open.
func (h *sessionHolder) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.timer != nil {
		h.timer.Stop()
	}
	if h.sess != nil {
		h.sess.Close()
		h.sess = nil
	}
}

// sessions returns how many sessions were opened.
func (h *sessionHolder) sessions() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.opened
}

// Fault is whom a failed submission is about; Classify decides it, in one
// place (draft-ietf-ediint-hl7-02 §6.1.1: store and forward holds what it
// cannot forward yet).
type Fault int

const (
	// FaultLink: the server or our account (unreachable, TLS, a refused
	// login, a session refused before the message was named). Every queue
	// waits; one alert; retried with backoff; no message fails.
	FaultLink Fault = iota
	// FaultPartner: what this partner needs is missing (its key or ours,
	// its TLS requirement). Its queue waits with one alert.
	FaultPartner
	// FaultMessage: the server refused this message for good (5xx to RCPT
	// TO or to the data): it fails, with the server's words.
	FaultMessage
	// FaultRetry: the server put this message off (4xx to RCPT TO or to the
	// data): it is tried again; the link is fine.
	FaultRetry
)

// Classify says whom err, from Seal or Submit, is about.
func Classify(err error) Fault {
	var se *smtp.SMTPError
	var sess *SessionError
	switch {
	case errors.Is(err, ErrTLSRequired), errors.Is(err, security.ErrNoKey):
		return FaultPartner
	case errors.As(err, &sess):
		return FaultLink
	case errors.As(err, &se) && se.Code >= 500 && se.Code < 600:
		return FaultMessage
	case errors.As(err, &se) && se.Code >= 400 && se.Code < 500:
		return FaultRetry
	}
	return FaultLink // the connection broke while the message was on its way
}
