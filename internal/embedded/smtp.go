package embedded

import (
	"crypto/tls"
	"io"
	"net"
	"sync"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Mail is one mail the server took.
type Mail struct {
	From string
	To   []string
	Data []byte
	// RequireTLS is set when the client asked for REQUIRETLS (RFC 8689).
	RequireTLS bool
	// Session numbers the SMTP session that carried the mail, from 1.
	Session int
}

// SMTP is the server's state. Its fields other than the mutex-guarded ones
// are set before Serve.
type SMTP struct {
	// TLSConfig, when set, offers STARTTLS; Users, when set, requires AUTH
	// PLAIN with one of these username/password pairs.
	TLSConfig *tls.Config
	Users     map[string]string
	// RequireTLS offers the REQUIRETLS extension (RFC 8689) over TLS.
	RequireTLS bool
	// Discard keeps no mail, only the count (a sink for benchmarks, whose
	// memory and collector the mails would burden).
	Discard bool

	mu       sync.Mutex
	mails    []Mail
	taken    int
	tempFail int    // reply 451 to this many DATA commands
	permFail bool   // reply 550 to every DATA command
	refuse   string // "greeting" or "mail": refuse every session there (RefuseSessions)
	sessions int    // sessions begun
	open     int    // sessions not ended
	srv      *smtp.Server
}

// Serve starts the server on addr ("127.0.0.1:0" for any port) and returns
// its address.
func (s *SMTP) Serve(addr string) (string, error) {
	s.srv = smtp.NewServer(s)
	s.srv.Domain = "localhost"
	s.srv.TLSConfig = s.TLSConfig
	s.srv.EnableREQUIRETLS = s.RequireTLS
	// Without TLS to offer (loopback tests), AUTH is allowed in the clear.
	s.srv.AllowInsecureAuth = s.TLSConfig == nil
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", err
	}
	go s.srv.Serve(ln)
	return ln.Addr().String(), nil
}

// Close stops the server.
func (s *SMTP) Close() error { return s.srv.Close() }

// FailTemporarily makes the next n DATA commands fail with 451.
func (s *SMTP) FailTemporarily(n int) {
	s.mu.Lock()
	s.tempFail = n
	s.mu.Unlock()
}

// FailPermanently makes every DATA command fail with 550.
func (s *SMTP) FailPermanently() {
	s.mu.Lock()
	s.permFail = true
	s.mu.Unlock()
}

// RefuseSessions makes the server refuse every session at stage, as
// Postfix does: "greeting" (554 before EHLO), "mail" (553 to MAIL FROM).
func (s *SMTP) RefuseSessions(stage string) {
	s.mu.Lock()
	s.refuse = stage
	s.mu.Unlock()
}

// Recover makes sessions and DATA commands succeed again.
func (s *SMTP) Recover() {
	s.mu.Lock()
	s.permFail, s.tempFail, s.refuse = false, 0, ""
	s.mu.Unlock()
}

func (s *SMTP) refusing(stage string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refuse == stage
}

// Mails returns the mails taken so far.
func (s *SMTP) Mails() []Mail {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Mail(nil), s.mails...)
}

// Count returns how many mails were taken.
func (s *SMTP) Count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.taken
}

// NewSession implements smtp.Backend.
func (s *SMTP) NewSession(*smtp.Conn) (smtp.Session, error) {
	if s.refusing("greeting") {
		return nil, &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 3, 2}, Message: "Service not available"}
	}
	s.mu.Lock()
	s.sessions++
	s.open++
	n := s.sessions
	s.mu.Unlock()
	return &session{s: s, n: n}, nil
}

// Open returns how many SMTP sessions are under way.
func (s *SMTP) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open
}

// Sessions returns how many SMTP sessions began.
func (s *SMTP) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sessions
}

type session struct {
	s     *SMTP
	n     int
	cur   Mail
	authd bool
}

// AuthMechanisms implements smtp.AuthSession.
func (x *session) AuthMechanisms() []string {
	if x.s.Users == nil {
		return nil
	}
	return []string{sasl.Plain}
}

// Auth implements smtp.AuthSession. It answers as Postfix with Dovecot
// SASL does: 503 when AUTH is not offered, 535 to a wrong password.
func (x *session) Auth(mech string) (sasl.Server, error) {
	if x.s.Users == nil {
		return nil, &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "Error: authentication not enabled"}
	}
	return sasl.NewPlainServer(func(_, username, password string) error {
		if pw, ok := x.s.Users[username]; !ok || pw != password {
			return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Error: authentication failed"}
		}
		x.authd = true
		return nil
	}), nil
}

func (x *session) Reset() { x.cur = Mail{} }
func (x *session) Logout() error {
	x.s.mu.Lock()
	x.s.open--
	x.s.mu.Unlock()
	return nil
}
func (x *session) Mail(from string, opts *smtp.MailOptions) error {
	if x.s.Users != nil && !x.authd {
		return smtp.ErrAuthRequired
	}
	if x.s.refusing("mail") {
		return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Sender address rejected: not owned by user"}
	}
	x.cur.From = from
	x.cur.RequireTLS = opts != nil && opts.RequireTLS
	return nil
}
func (x *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	x.cur.To = append(x.cur.To, to)
	return nil
}
func (x *session) Data(r io.Reader) error {
	var data []byte
	var err error
	if x.s.Discard {
		_, err = io.Copy(io.Discard, r)
	} else {
		data, err = io.ReadAll(r)
	}
	if err != nil {
		return err
	}
	x.s.mu.Lock()
	defer x.s.mu.Unlock()
	if x.s.permFail {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user here"}
	}
	if x.s.tempFail > 0 {
		x.s.tempFail--
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
	}
	x.s.taken++
	if x.s.Discard {
		return nil
	}
	x.cur.Data = data
	x.cur.Session = x.n
	x.s.mails = append(x.s.mails, x.cur)
	return nil
}
