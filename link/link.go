// Package link keeps the state of hl7mail's connections to mail servers
// (SMTP submission, IMAP), as the dashboard and the metrics show it.
//
// It imports nothing of this module.
package link

import (
	"sync"
	"time"
)

// Link states.
const (
	Unknown    = "unknown"    // not tried yet
	Connecting = "connecting" // dialling, logging in
	Up         = "up"         // connected (IMAP) or the last submission went through (SMTP)
	Down       = "down"       // the last attempt failed; retrying
	Off        = "off"        // not used by this configuration
)

// Link is the state of one connection to a mail server. The zero Link is
// unknown and ready to use; its methods are safe for concurrent use, and
// on a nil Link they do nothing.
type Link struct {
	mu     sync.Mutex
	state  string
	since  time.Time
	err    string
	errors int64
}

// Status is a snapshot of a Link.
type Status struct {
	State     string    `json:"state"`
	Since     time.Time `json:"since,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	Errors    int64     `json:"errors"` // failed attempts since start
}

// Set records a state; err, when not nil, is counted and kept as the last
// error. The server's own words are kept (no mail content reaches them).
func (l *Link) Set(state string, err error) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.state != state {
		l.state, l.since = state, time.Now()
	}
	if err != nil {
		l.errors++
		l.err = err.Error()
	}
}

// Status returns the current state.
func (l *Link) Status() Status {
	if l == nil {
		return Status{State: Unknown}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Status{State: l.state, Since: l.since, LastError: l.err, Errors: l.errors}
	if s.State == "" {
		s.State = Unknown
	}
	return s
}

// Off marks the link as not used (no IMAP account: pipe mode).
func (l *Link) Off() { l.Set(Off, nil) }
