package embedded

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/mail"
	"strings"
	"sync"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"
	"github.com/emersion/go-smtp"
)

// World is a small mail system in one process: an SMTP server that
// delivers each mail into the INBOX of its recipients' accounts on an IMAP
// server (go-imap's in-memory server). Accounts are named by address.
type World struct {
	SMTPAddr, IMAPAddr string

	mu    sync.Mutex
	users map[string]*imapmemserver.User
	mem   *imapmemserver.Server
	smtp  *smtp.Server
	imap  *imapserver.Server
	count int
	ids   map[string]int // mails taken, by Message-ID
	again int            // mails taken whose Message-ID was taken before
	taken []Taken
}

// Taken is one mail the SMTP server took: its first recipient, its
// Message-ID and its bytes.
type Taken struct {
	To, MessageID string
	Data          []byte
}

// NewWorld starts both servers on loopback with an account (password
// "secret") for each address.
func NewWorld(addrs ...string) (*World, error) {
	w := &World{users: map[string]*imapmemserver.User{}, mem: imapmemserver.New()}
	for _, a := range addrs {
		u := imapmemserver.NewUser(a, "secret")
		if err := u.Create("INBOX", nil); err != nil {
			return nil, err
		}
		w.users[strings.ToLower(a)] = u
		w.mem.AddUser(u)
	}
	w.IMAPAddr, w.SMTPAddr = "127.0.0.1:0", "127.0.0.1:0"
	if err := w.StartIMAP(); err != nil {
		return nil, err
	}
	if err := w.StartSMTP(); err != nil {
		w.imap.Close()
		return nil, err
	}
	return w, nil
}

// StartIMAP starts the IMAP server on IMAPAddr (again, after StopIMAP),
// with the mailboxes as they were.
func (w *World) StartIMAP() error {
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return w.mem.NewSession(), nil, nil
		},
		Caps:         imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapIMAP4rev2: {}},
		InsecureAuth: true,
	})
	ln, err := net.Listen("tcp", w.IMAPAddr)
	if err != nil {
		return err
	}
	go srv.Serve(ln)
	w.mu.Lock()
	w.imap, w.IMAPAddr = srv, ln.Addr().String()
	w.mu.Unlock()
	return nil
}

// StopIMAP stops the IMAP server and drops its connections.
func (w *World) StopIMAP() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.imap.Close()
}

// StartSMTP starts the SMTP server on SMTPAddr (again, after StopSMTP).
func (w *World) StartSMTP() error {
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &worldSession{w: w}, nil }))
	srv.Domain = "localhost"
	ln, err := net.Listen("tcp", w.SMTPAddr)
	if err != nil {
		return err
	}
	go srv.Serve(ln)
	w.mu.Lock()
	w.smtp, w.SMTPAddr = srv, ln.Addr().String()
	w.mu.Unlock()
	return nil
}

// StopSMTP stops the SMTP server and drops its connections.
func (w *World) StopSMTP() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.smtp.Close()
}

// Close stops both servers.
func (w *World) Close() {
	w.StopSMTP()
	w.StopIMAP()
}

// Delivered returns how many mails the SMTP server delivered.
func (w *World) Delivered() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.count
}

type worldSession struct {
	w  *World
	to []string
}

func (s *worldSession) Reset()                               { s.to = nil }
func (s *worldSession) Logout() error                        { return nil }
func (s *worldSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *worldSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if s.w.users[strings.ToLower(to)] == nil {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user: " + to}
	}
	s.to = append(s.to, to)
	return nil
}

func (s *worldSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	for _, to := range s.to {
		s.w.mu.Lock()
		u := s.w.users[strings.ToLower(to)]
		s.w.mu.Unlock()
		if _, err := u.Append("INBOX", literal{bytes.NewReader(data), int64(len(data))}, &imap.AppendOptions{}); err != nil {
			return fmt.Errorf("deliver to %s: %w", to, err)
		}
	}
	id := ""
	if m, err := mail.ReadMessage(bytes.NewReader(data)); err == nil {
		id = m.Header.Get("Message-Id")
	}
	s.w.mu.Lock()
	s.w.count++
	if len(s.to) > 0 {
		s.w.taken = append(s.w.taken, Taken{To: s.to[0], MessageID: id, Data: data})
	}
	if id != "" {
		if s.w.ids == nil {
			s.w.ids = map[string]int{}
		}
		if s.w.ids[id]++; s.w.ids[id] > 1 {
			s.w.again++
		}
	}
	s.w.mu.Unlock()
	return nil
}

// Taken returns the mails the SMTP server took, in the order it took them.
func (w *World) Taken() []Taken {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]Taken(nil), w.taken...)
}

// Resubmitted returns how many mails the SMTP server took under a
// Message-ID it had taken before: mails submitted again.
func (w *World) Resubmitted() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.again
}

// literal is an imap.LiteralReader over bytes.
type literal struct {
	*bytes.Reader
	size int64
}

func (l literal) Size() int64 { return l.size }
