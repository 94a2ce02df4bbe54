package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// What the dashboard and the control socket ask of the running instance
// (dashboard.Instance): its state, and the operators' commands.

// DashboardURL returns the dashboard's address as a URL, "" when it is off.
func (g *Gateway) DashboardURL() string {
	if g.dashLn == nil {
		return ""
	}
	return "http://" + g.dashLn.Addr().String() + "/"
}

// Config returns the configuration in use.
func (g *Gateway) Config() *config.Config { return g.side().cfg }

// Suite is the security suite the instance seals to and opens from
// partner with, with the keys in use (the bench measures with it).
func (g *Gateway) Suite(partner string) (security.Suite, error) {
	s := g.side()
	p := s.cfg.Partner(partner)
	if p == nil {
		return nil, fmt.Errorf("no partner %q", partner)
	}
	return s.keys.Suite(string(p.Security), p.Name, string(p.KeyTransport)), nil
}

// Connections returns the number of open router connections to partner's
// surrogate.
func (g *Gateway) Connections(partner string) int {
	if pl := g.surrogate(partner); pl != nil {
		return pl.srv.Connections()
	}
	return 0
}

// SMTPStatus returns the state of mail submission.
func (g *Gateway) SMTPStatus() link.Status { return g.smtpLink.Status() }

// Keys are the loaded keys and certificates, with their state now.
func (g *Gateway) Keys() []dashboard.KeyRow {
	sd := g.side()
	return KeyReport(sd.cfg, sd.keys, time.Now(), false)
}

// IMAPStatus returns the state of the IMAP watcher's connection.
func (g *Gateway) IMAPStatus() link.Status { return g.imapLink.Status() }

// IMAPStatusFor returns the state of the account partner's mail comes to:
// its local address's own, or the imap section's.
func (g *Gateway) IMAPStatusFor(partner string) link.Status {
	sd := g.side()
	if p := sd.cfg.Partner(partner); p != nil {
		if l, ok := sd.localLinks[strings.ToLower(p.Local)]; ok {
			return l.Status()
		}
	}
	return g.imapLink.Status()
}

// Retry puts failed, expired or bounced outbound message id back in its partner's
// queue and wakes the sender.
func (g *Gateway) Retry(ctx context.Context, id int64) error {
	if err := g.store.Retry(ctx, id); err != nil {
		return err
	}
	m, err := g.store.Get(ctx, id)
	if err != nil {
		return err
	}
	g.log.Info("message put back in the queue by an operator", "partner", m.Partner, "id", id, "control_id", m.ControlID)
	g.side().sender.Notify(m.Partner)
	return nil
}

// RetryAll puts every failed, expired or bounced outbound message of partner (of
// every partner for "") back in its queue, oldest first, and wakes the
// sender; it returns how many.
func (g *Gateway) RetryAll(ctx context.Context, partner string) (int, error) {
	if partner != "" && g.Config().Partner(partner) == nil {
		return 0, fmt.Errorf("%w: no partner %q", store.ErrNotFound, partner)
	}
	counts, err := g.store.RetryAll(ctx, partner)
	if err != nil {
		return 0, err
	}
	n := 0
	for p, k := range counts {
		g.log.Info("messages put back in the queue by an operator", "partner", p, "count", k)
		g.side().sender.Notify(p)
		n += k
	}
	return n, nil
}

// Release takes in quarantined mail id (see inbound.Receiver.Release); it
// returns the stored message's id. The deliverer learns of it from the
// store (OnIngest).
func (g *Gateway) Release(ctx context.Context, id int64, by, note string) (int64, error) {
	res, err := g.side().receiver.Release(ctx, id, by, note)
	return res.ID, err
}

// Ready reports nil once the instance takes messages: the store is open
// and every surrogate listens.
func (g *Gateway) Ready() error {
	if g.stopping.Load() {
		return errors.New("shutting down")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, p := range g.Config().Partners {
		if g.surrogates[p.Name] == nil {
			return errors.New("surrogates not listening")
		}
	}
	return nil
}

// Receive takes in one raw mail handed over by an MTA ("hl7mail receive",
// draft-ietf-ediint-hl7-02 §6.2 figure 7): the same path as mail the IMAP
// watcher fetches. An error means nothing was decided: the MTA keeps the
// mail and tries again.
func (g *Gateway) Receive(ctx context.Context, raw []byte, to string) (inbound.Result, error) {
	if max := g.Config().IMAP.MaxMailSize; len(raw) > max {
		return g.ReceiveOversize(ctx, raw[:min(len(raw), maxKeptHeader)], int64(len(raw)))
	}
	sd := g.side()
	if to != "" && !sd.cfg.IsOurs(to) {
		g.log.Warn("mail from the MTA for an address that is not ours; routed by its To", "to", to)
		to = ""
	}
	res, err := sd.receiver.HandleTo(ctx, raw, to)
	if err == nil {
		g.handled(res)
	}
	return res, err
}

// maxKeptHeader bounds what is kept of an oversize mail: its header, for
// the quarantine entry and the "denied" receipt.
const maxKeptHeader = 64 << 10

// ReceiveOversize quarantines a mail from the MTA that is larger than
// imap.max_mail_size, of which header is the start (the rest was streamed
// past, never held) and size the whole length.
func (g *Gateway) ReceiveOversize(ctx context.Context, header []byte, size int64) (inbound.Result, error) {
	if i := bytes.Index(header, []byte("\r\n\r\n")); i >= 0 {
		header = header[:i+4]
	}
	return g.side().receiver.HandleOversize(ctx, header[:min(len(header), maxKeptHeader)], size)
}
