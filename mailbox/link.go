package mailbox

import (
	"sync"
	"time"
)

// Link states.
const (
	LinkUnknown    = "unknown"    // not tried yet
	LinkConnecting = "connecting" // dialling, logging in
	LinkUp         = "up"         // connected (IMAP) or the last submission went through (SMTP)
	LinkDown       = "down"       // the last attempt failed; retrying
	LinkOff        = "off"        // not used by this configuration
)

// Link is the state of hl7mail's connection to a mail server, as the
// dashboard and the metrics show it. The zero Link is unknown and ready to
// use; its methods are safe for concurrent use.
type Link struct {
	mu     sync.Mutex
	state  string
	since  time.Time
	err    string
	errors int64
}

// LinkStatus is a snapshot of a Link.
type LinkStatus struct {
	State     string    `json:"state"`
	Since     time.Time `json:"since,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	Errors    int64     `json:"errors"` // failed attempts since start
}

// set records a state; err, when not nil, is counted and kept as the last
// error. The server's own words are kept (no mail content reaches them).
func (l *Link) set(state string, err error) {
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
func (l *Link) Status() LinkStatus {
	if l == nil {
		return LinkStatus{State: LinkUnknown}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	s := LinkStatus{State: l.state, Since: l.since, LastError: l.err, Errors: l.errors}
	if s.State == "" {
		s.State = LinkUnknown
	}
	return s
}

// Off marks the link as not used (no IMAP account: pipe mode).
func (l *Link) Off() { l.set(LinkOff, nil) }
