// Package notify tells personnel of hl7mail's alerts (draft-ietf-ediint-hl7-02
// §6.4: "alert personnel for corrective action"), by plain-text mail and by
// a JSON webhook. Each alert is told once; alerts that come close together
// are told as one digest; an outage's alert is told once more when it
// clears by itself. Notices carry what the alert carries (kind, partner,
// control ID, Message-ID, times, our words and a server's): never message
// content. Notices run on their own and never hold up HL7 traffic.
//
// Raise is how the rest of hl7mail raises an alert: a log line and a row
// in the store, which the notices then tell.
//
// It imports, of this module, only store, for the alerts and their notice
// marks.
package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/hl7mail/hl7mail/store"
)

// Store is what the Notifier needs of the store.
type Store interface {
	PendingNotices(ctx context.Context, limit int) (store.Notices, error)
	MarkNotified(ctx context.Context, n store.Notices) error
}

// Mail sends notices as plain-text mail.
type Mail struct {
	From string
	To   []string
	// Send submits one mail (the gateway's SMTP submission).
	Send func(ctx context.Context, from string, to []string, msg []byte) error
}

// Webhook posts notices as JSON (Payload) with an optional bearer token.
type Webhook struct {
	URL    string
	Token  string
	Client *http.Client // default: a client with a 30s timeout
}

// Options configure New. Store and at least one of Mail and Webhook are
// required.
type Options struct {
	Store   Store
	Mail    *Mail
	Webhook *Webhook
	Logger  *slog.Logger // default slog.Default()
	Site    string       // self.name, in subjects
	// Gather is how long a first alert waits for others to go with it
	// (default 10s). After a notice, the next waits until Every has passed
	// (default 1m): what comes meanwhile is one digest.
	Gather, Every time.Duration
	// Poll is how often the store is looked at (default 2s).
	Poll time.Duration
	// RetryBase is the first wait after a channel failed, doubling up to
	// 2m; a channel that fails for GiveUp (default 10m) drops that notice
	// with an error in the log.
	RetryBase, GiveUp time.Duration
	Now               func() time.Time
}

// Notifier sends the notices; Run starts it.
type Notifier struct {
	o   Options
	log *slog.Logger
}

// New returns a Notifier.
func New(o Options) (*Notifier, error) {
	if o.Store == nil || o.Mail == nil && o.Webhook == nil {
		return nil, errors.New("notify: Options.Store and Mail or Webhook are required")
	}
	if o.Mail != nil && (o.Mail.Send == nil || len(o.Mail.To) == 0) {
		return nil, errors.New("notify: Mail needs Send and To")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Gather == 0 {
		o.Gather = 10 * time.Second
	}
	if o.Every == 0 {
		o.Every = time.Minute
	}
	if o.Poll == 0 {
		o.Poll = 2 * time.Second
	}
	if o.RetryBase == 0 {
		o.RetryBase = 2 * time.Second
	}
	if o.GiveUp == 0 {
		o.GiveUp = 10 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Webhook != nil && o.Webhook.Client == nil {
		o.Webhook.Client = &http.Client{Timeout: 30 * time.Second}
	}
	return &Notifier{o: o, log: o.Logger}, nil
}

// batch is one notice on its way: the alerts it tells of, and which
// channels still have to take it.
type batch struct {
	n        store.Notices
	channels map[string]func(context.Context, store.Notices) error
	first    time.Time // first attempt
	next     time.Time // next attempt
	wait     time.Duration
}

// Run sends notices until ctx ends.
func (n *Notifier) Run(ctx context.Context) {
	t := time.NewTicker(n.o.Poll)
	defer t.Stop()
	var b *batch
	var last time.Time // when the last notice went
	for {
		now := n.o.Now()
		if b == nil {
			b = n.take(ctx, now, last)
		}
		if b != nil && !now.Before(b.next) {
			if n.attempt(ctx, b, now) {
				if err := n.o.Store.MarkNotified(context.WithoutCancel(ctx), b.n); err != nil {
					n.log.Error("notices not marked as sent; they may be sent again", "err", err)
				}
				b, last = nil, now
				continue
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// take returns the next notice to send at now, or nil: none is due yet (a
// first alert waits Gather for others; a notice waits Every after the last).
func (n *Notifier) take(ctx context.Context, now, last time.Time) *batch {
	pending, err := n.o.Store.PendingNotices(ctx, 0)
	if err != nil {
		if ctx.Err() == nil {
			n.log.Error("alerts not readable for notices", "err", err)
		}
		return nil
	}
	oldest := time.Time{}
	for _, a := range pending.Raised {
		if oldest.IsZero() || a.Raised.Before(oldest) {
			oldest = a.Raised
		}
	}
	for _, a := range pending.Cleared {
		if oldest.IsZero() || a.Cleared.Before(oldest) {
			oldest = a.Cleared
		}
	}
	if oldest.IsZero() || now.Sub(oldest) < n.o.Gather || now.Sub(last) < n.o.Every {
		return nil
	}
	b := &batch{n: pending, channels: map[string]func(context.Context, store.Notices) error{}, first: now, next: now,
		wait: n.o.RetryBase}
	if n.o.Mail != nil {
		b.channels["mail"] = n.sendMail
	}
	if n.o.Webhook != nil {
		b.channels["webhook"] = n.post
	}
	return b
}

// attempt tries every channel still to take b; it reports whether b is
// done (taken by all, or given up by those that kept failing).
func (n *Notifier) attempt(ctx context.Context, b *batch, now time.Time) bool {
	for name, send := range b.channels {
		err := send(ctx, b.n)
		if err == nil {
			n.log.Info("alert notice sent", "channel", name, "alerts", len(b.n.Raised), "cleared", len(b.n.Cleared))
			delete(b.channels, name)
			continue
		}
		if now.Sub(b.first) >= n.o.GiveUp {
			n.log.Error("alert notice not delivered; given up", "channel", name, "err", err,
				"alerts", len(b.n.Raised), "cleared", len(b.n.Cleared))
			delete(b.channels, name)
			continue
		}
		n.log.Warn("alert notice not delivered; will retry", "channel", name, "err", err)
	}
	if len(b.channels) == 0 {
		return true
	}
	b.next = now.Add(b.wait)
	b.wait = min(2*b.wait, 2*time.Minute)
	return false
}

// Subject is the subject of notice ns: the alert itself when it is one,
// else a digest's count.
func (n *Notifier) Subject(ns store.Notices) string {
	prefix := "[hl7mail " + n.o.Site + "] "
	switch {
	case len(ns.Raised) == 1 && len(ns.Cleared) == 0:
		a := ns.Raised[0]
		return prefix + "ALERT " + a.Kind + ": " + oneLine(a.Text, 120)
	case len(ns.Raised) == 0 && len(ns.Cleared) == 1:
		a := ns.Cleared[0]
		return prefix + "cleared " + a.Kind + ": " + oneLine(a.Text, 120)
	}
	return fmt.Sprintf("%sdigest: %d alerts, %d cleared", prefix, len(ns.Raised), len(ns.Cleared))
}

// Text is the plain-text body of notice ns.
func (n *Notifier) Text(ns store.Notices) string {
	var b strings.Builder
	line := func(state string, a store.Alert, at time.Time) {
		fmt.Fprintf(&b, "%s alert %d (%s) at %s\n", state, a.ID, a.Kind, at.UTC().Format(time.RFC3339))
		for _, f := range [][2]string{{"partner", a.Partner}, {"control ID", a.ControlID}, {"Message-ID", a.MessageID}} {
			if f[1] != "" {
				fmt.Fprintf(&b, "  %s: %s\n", f[0], oneLine(f[1], 200))
			}
		}
		fmt.Fprintf(&b, "  %s\n\n", oneLine(a.Text, 1000))
	}
	for _, a := range ns.Raised {
		line("raised", a, a.Raised)
	}
	for _, a := range ns.Cleared {
		line("cleared", a, a.Cleared)
	}
	b.WriteString("See the dashboard or \"hl7mail alerts\"; acknowledge with \"hl7mail alerts -ack ID\".\n")
	return b.String()
}

// oneLine keeps s to one line of at most max bytes (control characters
// become spaces), so that a notice's header and layout hold.
func oneLine(s string, max int) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > max {
		s = s[:max] + "…"
	}
	return s
}

func (n *Notifier) sendMail(ctx context.Context, ns store.Notices) error {
	m := n.o.Mail
	var h mail.Header
	h.SetAddressList("From", []*mail.Address{{Name: "hl7mail " + n.o.Site, Address: m.From}})
	to := make([]*mail.Address, len(m.To))
	for i, a := range m.To {
		to[i] = &mail.Address{Address: a}
	}
	h.SetAddressList("To", to)
	h.SetDate(n.o.Now())
	h.SetSubject(n.Subject(ns))
	if err := h.GenerateMessageID(); err != nil {
		return err
	}
	h.Set("MIME-Version", "1.0")
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Transfer-Encoding", "8bit")
	h.Set("Auto-Submitted", "auto-generated") // RFC 3834: no auto-replies
	var buf bytes.Buffer
	if err := textproto.WriteHeader(&buf, h.Header.Header); err != nil {
		return err
	}
	buf.WriteString(strings.ReplaceAll(n.Text(ns), "\n", "\r\n"))
	return m.Send(ctx, m.From, m.To, buf.Bytes())
}

// Payload is the webhook's JSON body.
type Payload struct {
	Site    string         `json:"site"`
	Subject string         `json:"subject"`
	Alerts  []PayloadAlert `json:"alerts"`
}

// PayloadAlert is one alert in a Payload: State is raised or cleared.
type PayloadAlert struct {
	State string `json:"state"`
	store.Alert
}

func (n *Notifier) post(ctx context.Context, ns store.Notices) error {
	p := Payload{Site: n.o.Site, Subject: n.Subject(ns), Alerts: []PayloadAlert{}}
	for _, a := range ns.Raised {
		p.Alerts = append(p.Alerts, PayloadAlert{State: "raised", Alert: a})
	}
	for _, a := range ns.Cleared {
		p.Alerts = append(p.Alerts, PayloadAlert{State: "cleared", Alert: a})
	}
	body, err := json.Marshal(p)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.o.Webhook.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if n.o.Webhook.Token != "" {
		req.Header.Set("Authorization", "Bearer "+n.o.Webhook.Token)
	}
	resp, err := n.o.Webhook.Client.Do(req)
	if err != nil {
		return fmt.Errorf("webhook: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook answered %d", resp.StatusCode)
	}
	return nil
}
