package outbound

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
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

// Submit sends one mail. Errors before RCPT TO are *SessionError; an
// *smtp.SMTPError carries the server's reply.
func (s *SMTPSubmitter) Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error {
	if opts.RequireTLS && s.TLS == config.NoTLS {
		return fmt.Errorf("smtp %s: %w: the server is reached without TLS (smtp.tls: none)", s.Addr, ErrTLSRequired)
	}
	session := func(stage string, err error) error {
		return fmt.Errorf("smtp %s: %w", s.Addr, &SessionError{Stage: stage, Err: err})
	}
	timeout := s.Timeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	c, _, stage, release, err := s.open(ctx, timeout)
	if err != nil {
		return session(stage, err)
	}
	defer release()
	defer c.Close()
	if s.Username != "" {
		if err := c.Auth(sasl.NewPlainClient("", s.Username, s.Password)); err != nil {
			return session("auth", err)
		}
	}
	mailOpts := &smtp.MailOptions{RequireTLS: opts.RequireTLS}
	var rcptOpts *smtp.RcptOptions
	if opts.EnvelopeID != "" {
		// go-smtp sends these only to a server that offers DSN.
		mailOpts.EnvelopeID, mailOpts.Return = opts.EnvelopeID, smtp.DSNReturnHeaders
		rcptOpts = &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed}}
	}
	if err := c.Mail(from, mailOpts); err != nil {
		if opts.RequireTLS && !isSMTPError(err) {
			// go-smtp refuses before sending when REQUIRETLS is not offered.
			return fmt.Errorf("smtp %s: %w: %v", s.Addr, ErrTLSRequired, err)
		}
		return session("mail", err)
	}
	for _, rcpt := range to {
		if err := c.Rcpt(rcpt, rcptOpts); err != nil {
			return fmt.Errorf("smtp %s: RCPT TO: %w", s.Addr, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("smtp %s: DATA: %w", s.Addr, err)
	}
	if _, err := w.Write(m); err != nil {
		w.Close()
		return fmt.Errorf("smtp %s: DATA: %w", s.Addr, err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("smtp %s: DATA: %w", s.Addr, err)
	}
	return c.Quit()
}

// open connects to the server and says EHLO, over TLS as s.TLS says; each
// step is bounded by timeout. It returns the client, whether the session is
// encrypted, and on error the stage that failed (connect, starttls, hello).
//
// When ctx ends the connection is closed, whatever command waits on it: a
// shutdown cuts a session short within its bound (the mail is sent again
// at start, and the partner's replay check absorbs a copy that arrived).
// The caller calls release when done with the client.
func (s *SMTPSubmitter) open(ctx context.Context, timeout time.Duration) (c *smtp.Client, encrypted bool, stage string,
	release func(), err error) {
	d := net.Dialer{Timeout: min(timeout, 30*time.Second)}
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return nil, false, "connect", nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	release = func() { stop() }
	defer func() {
		if err != nil {
			stop()
		}
	}()
	tlsConfig := s.TLSConfig
	if tlsConfig == nil {
		host, _, _ := net.SplitHostPort(s.Addr)
		tlsConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	// The greeting, EHLO and STARTTLS are bounded by the whole timeout;
	// go-smtp then sets a deadline of its own for each command.
	conn.SetDeadline(time.Now().Add(timeout))
	switch s.TLS {
	case config.ImplicitTLS:
		c, encrypted = smtp.NewClient(tls.Client(conn, tlsConfig)), true
	case config.NoTLS:
		c = smtp.NewClient(conn)
	default:
		if c, err = smtp.NewClientStartTLS(conn, tlsConfig); err != nil {
			conn.Close()
			return nil, false, "starttls", nil, err
		}
		encrypted = true
	}
	c.CommandTimeout, c.SubmissionTimeout = timeout, timeout
	if err = c.Hello("localhost"); err != nil {
		c.Close()
		return nil, false, "hello", nil, err
	}
	return c, encrypted, "", release, nil
}

func isSMTPError(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se)
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
