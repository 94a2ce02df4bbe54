// Package gateway assembles one hl7mail instance from its configuration
// (draft-ietf-ediint-hl7-02 §6.2 to §6.4, figure 9): the store and the
// journals; one surrogate listener per partner; the sender that mails what
// they store; the IMAP watcher and receiver that take partner mail in; the
// deliverer that hands it to the router; and the responder that answers
// with the router's response and the receipt. It starts everything or
// nothing, and stops in reverse.
package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/mailbox"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// Options configure Start. Config and Keys are required.
type Options struct {
	Config *config.Config
	Keys   *Keys        // from LoadKeys
	Logger *slog.Logger // default slog.Default()
	// Submitter replaces SMTP submission (tests); default: the smtp section.
	Submitter mailbox.Submitter
	// RetryBase is the sender's first retry wait (default 30s).
	RetryBase time.Duration
	// Tail is the log tail the dashboard streams (nil: the page has no
	// live log). The Logger's records should feed it (Tail.Handler).
	Tail *dashboard.Tail
	// NoDashboard leaves the dashboard off (tests that do not need it).
	NoDashboard bool
}

// Journal file names in the store folder.
const (
	OutgoingJournal = "outgoing.mbox"
	IncomingJournal = "incoming.mbox"
)

// Gateway is a running hl7mail instance.
type Gateway struct {
	cfg        *config.Config
	log        *slog.Logger
	store      *store.Store
	outgoing   *journal.Journal
	incoming   *journal.Journal
	sender     *mailbox.Sender
	stopMail   context.CancelFunc
	mailWG     sync.WaitGroup // sender, deliverer, watcher
	surrogates []*partnerListener
	wg         sync.WaitGroup
	receiver   *mailbox.Receiver
	deliverer  *mailbox.Deliverer
	smtpLink   mailbox.Link
	imapLink   mailbox.Link
	dash       *dashboard.Server
	dashLn     net.Listener
	dashWG     sync.WaitGroup
	stopping   atomic.Bool
	rdv        *rendezvous
	localLinks map[string]*mailbox.Link // local address (lower case) → its own IMAP account
}

type partnerListener struct {
	partner *config.Partner
	srv     *surrogate.Server
	ln      net.Listener
}

// Start opens the store and starts a surrogate for every partner. When any
// part fails to start, what was started is stopped again and the error
// returned.
func Start(ctx context.Context, opts Options) (*Gateway, error) {
	if opts.Config == nil || opts.Keys == nil {
		return nil, errors.New("gateway: Options.Config and Options.Keys are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	cfg := opts.Config
	g := &Gateway{cfg: cfg, log: opts.Logger, rdv: newRendezvous()}
	st, err := store.Open(store.Options{Dir: cfg.StoreDir(), Logger: opts.Logger.With("component", "store")})
	if err != nil {
		return nil, err
	}
	g.store = st
	if g.outgoing, err = journal.Open(filepath.Join(cfg.StoreDir(), OutgoingJournal)); err != nil {
		st.Close()
		return nil, err
	}
	if g.incoming, err = journal.Open(filepath.Join(cfg.StoreDir(), IncomingJournal)); err != nil {
		g.rollback()
		return nil, err
	}
	submitter := opts.Submitter
	if submitter == nil {
		password, err := cfg.Secret(cfg.SMTP.PasswordFile, cfg.SMTP.PasswordEnv)
		if err != nil {
			g.rollback()
			return nil, fmt.Errorf("smtp password: %w", err)
		}
		tc, err := tlsConfig(cfg.SMTP.Addr, cfg.Path(cfg.SMTP.CAFile))
		if err != nil {
			g.rollback()
			return nil, fmt.Errorf("smtp.ca_file: %w", err)
		}
		submitter = &mailbox.SMTPSubmitter{Addr: cfg.SMTP.Addr, TLS: cfg.SMTP.TLS, TLSConfig: tc, Username: cfg.SMTP.Username,
			Password: password}
	}
	sealer := &opts.Keys.Sealer
	g.sender, err = mailbox.NewSender(mailbox.SenderOptions{
		Config: cfg, Store: st, Journal: g.outgoing, Submitter: submitter, RetryBase: retryBase(opts.RetryBase, cfg.SMTP.Retry.D()),
		Logger: opts.Logger.With("component", "sender"), Sealer: sealer, Link: &g.smtpLink,
	})
	if err != nil {
		g.rollback()
		return nil, err
	}
	// The sender learns of the responses queued from the store (OnIngest).
	responder := &mailbox.Responder{Config: cfg, Store: st, Logger: opts.Logger.With("component", "responder")}
	deliverer, err := mailbox.NewDeliverer(mailbox.DelivererOptions{Config: cfg, Store: st,
		Logger: opts.Logger.With("component", "deliverer"), RetryBase: routerRetryBase(opts.RetryBase),
		Delivered: responder.Delivered, Held: g.held})
	if err != nil {
		g.rollback()
		return nil, err
	}
	receiver := &mailbox.Receiver{Opener: &mailbox.Opener{Config: cfg, Keys: sealer, MaxSize: cfg.IMAP.MaxMailSize},
		Store: st, Journal: g.incoming,
		Logger: opts.Logger.With("component", "receiver"), Notify: g.sender.Notify}
	g.receiver, g.deliverer = receiver, deliverer
	// Without imap.addr, mail comes in only through "hl7mail receive"
	// (an MTA's pipe, draft-ietf-ediint-hl7-02 §6.2 figure 7).
	var watchers []func(context.Context)
	if cfg.IMAP.Addr != "" {
		run, err := g.watcher(&cfg.IMAP, "imap", "", &g.imapLink, opts.Logger.With("component", "imap"))
		if err != nil {
			g.rollback()
			return nil, err
		}
		watchers = append(watchers, run)
	} else {
		g.imapLink.Off()
	}
	// Local addresses with an account of their own (§6.3): mail fetched
	// there is for that address, and goes to its router.
	for i := range cfg.Local {
		l := &cfg.Local[i]
		if l.IMAP == nil || l.IMAP.Addr == "" {
			continue
		}
		run, err := g.watcher(l.IMAP, "local "+l.Address+" imap", l.Address, g.localLink(l.Address),
			opts.Logger.With("component", "imap", "local", l.Address))
		if err != nil {
			g.rollback()
			return nil, err
		}
		watchers = append(watchers, run)
	}
	watchMail := func(ctx context.Context) {
		var wg sync.WaitGroup
		for _, run := range watchers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				run(ctx)
			}()
		}
		wg.Wait()
	}
	metrics := dashboard.NewMetrics()
	// The sender and the deliverer read their queues from the database:
	// they are woken when new messages have entered it.
	st.OnIngest(func(partner string, d store.Direction) {
		if d == store.Outbound {
			g.sender.Notify(partner)
		} else {
			g.deliverer.Notify(partner)
		}
	})
	ids := hl7.NewIDGen("HM", time.Now())
	for i := range cfg.Partners {
		p := &cfg.Partners[i]
		srv, err := surrogate.New(surrogate.Options{
			Partner:        p.Name,
			Spool:          st,
			Logger:         opts.Logger.With("component", "surrogate"),
			MaxMessageSize: p.MaxMessageSize,
			MaxConnections: p.MaxConnections,
			IdleTimeout:    p.IdleTimeout.D(),
			IDs:            ids,
			Observe:        metrics.AckObserver(p.Name),
			LimitHit:       func(limit string) { metrics.LimitHit(p.Name, limit) },
			Rendezvous:     g.rendezvousFor(p),
		})
		if err == nil {
			var ln net.Listener
			ln, err = surrogate.Listen(ctx, p.Listen)
			if err == nil {
				g.surrogates = append(g.surrogates, &partnerListener{partner: p, srv: srv, ln: ln})
				continue
			}
		}
		g.rollback()
		return nil, fmt.Errorf("partner %s: surrogate on %s: %w", p.Name, p.Listen, err)
	}
	if !opts.NoDashboard {
		if err := g.startDashboard(opts, metrics); err != nil {
			g.rollback()
			return nil, err
		}
	}
	for _, w := range opts.Keys.Expiring(time.Now()) {
		g.keyAlert(ctx, w)
	}
	// Requests the router took before a crash cut off their response.
	if err := responder.Recover(ctx); err != nil {
		g.rollback()
		return nil, fmt.Errorf("responses left unsent: %w", err)
	}
	mctx, cancel := context.WithCancel(context.Background())
	g.stopMail = cancel
	sweep := func(ctx context.Context) {
		mailbox.RunSweeper(ctx, cfg, st, opts.Logger.With("component", "sweeper"), time.Minute)
	}
	// Keys that come within ExpiryWarning of their end while running are
	// reported too: looked at again twice a day.
	keyWatch := func(ctx context.Context) {
		t := time.NewTicker(12 * time.Hour)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				for _, w := range opts.Keys.Expiring(now) {
					g.keyAlert(ctx, w)
				}
			}
		}
	}
	for _, run := range []func(context.Context){g.sender.Run, deliverer.Run, watchMail, sweep, keyWatch} {
		g.mailWG.Add(1)
		go func() {
			defer g.mailWG.Done()
			run(mctx)
		}()
	}
	for _, pl := range g.surrogates {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			if err := pl.srv.Serve(pl.ln); err != nil && !errors.Is(err, surrogate.ErrServerClosed) {
				g.log.Error("surrogate stopped", "partner", pl.partner.Name, "err", err)
			}
		}()
	}
	g.log.Info("hl7mail ready", "partners", len(cfg.Partners), "store", cfg.StoreDir(), "dashboard", g.DashboardURL())
	return g, nil
}

// rollback releases what Start opened before it failed.
func (g *Gateway) rollback() {
	if g.dashLn != nil {
		g.dashLn.Close()
	}
	for _, pl := range g.surrogates {
		pl.ln.Close()
	}
	for _, j := range []*journal.Journal{g.outgoing, g.incoming} {
		if j != nil {
			j.Close()
		}
	}
	g.store.Close()
}

// retryBase is the sender's first wait after a failed submission: the
// option, else smtp.retry, else 30s.
func retryBase(d, configured time.Duration) time.Duration {
	switch {
	case d != 0:
		return d
	case configured != 0:
		return configured
	}
	return 30 * time.Second
}

// routerRetryBase is the deliverer's first wait after the router failed: the
// router is local, so it is tried again sooner than a mail server.
func routerRetryBase(d time.Duration) time.Duration {
	if d == 0 {
		return 5 * time.Second
	}
	return d
}

// Shutdown stops the surrogates (each finishing the messages it is
// committing), then closes the store. When ctx ends first, connections are
// closed at once; the store is closed either way.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.stopping.Store(true)
	g.rdv.stop() // connections waiting for a response answer now
	var wg sync.WaitGroup
	errs := make([]error, len(g.surrogates))
	for i, pl := range g.surrogates {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = pl.srv.Shutdown(ctx)
		}()
	}
	wg.Wait()
	g.wg.Wait()
	// The mail side finishes what it is doing: an attempt, a delivery,
	// the mail in hand.
	g.stopMail()
	g.mailWG.Wait()
	if g.dash != nil {
		errs = append(errs, g.dash.Shutdown(ctx))
		g.dashWG.Wait()
	}
	errs = append(errs, g.outgoing.Close(), g.incoming.Close(), g.store.Close())
	g.log.Info("hl7mail stopped")
	return errors.Join(errs...)
}

// Store returns the instance's store.
func (g *Gateway) Store() *store.Store { return g.store }

// SurrogateAddr returns the address partner's surrogate listens on.
func (g *Gateway) SurrogateAddr(partner string) string {
	for _, pl := range g.surrogates {
		if pl.partner.Name == partner {
			return pl.ln.Addr().String()
		}
	}
	return ""
}

// Panics returns the number of panics recovered in surrogate connections.
func (g *Gateway) Panics() int64 {
	var n int64
	for _, pl := range g.surrogates {
		n += pl.srv.Panics()
	}
	return n
}

// startDashboard listens on dashboard.addr and serves the page.
func (g *Gateway) startDashboard(opts Options, metrics *dashboard.Metrics) error {
	cfg := g.cfg
	token := ""
	if cfg.Dashboard.TokenFile != "" {
		t, err := cfg.Secret(cfg.Dashboard.TokenFile, "")
		if err != nil {
			return fmt.Errorf("dashboard token: %w", err)
		}
		token = t
	}
	d, err := dashboard.New(dashboard.Options{Addr: cfg.Dashboard.Addr, Instance: g, Token: token, Tail: opts.Tail,
		Metrics: metrics, Logger: opts.Logger.With("component", "dashboard")})
	if err != nil {
		return err
	}
	ln, err := d.Listen()
	if err != nil {
		return err
	}
	g.dash, g.dashLn = d, ln
	g.dashWG.Add(1)
	go func() {
		defer g.dashWG.Done()
		if err := d.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.log.Error("dashboard stopped", "err", err)
		}
	}()
	return nil
}

// keyAlert raises an alert for a key or certificate that expires soon,
// unless one is open for it already (it is found again at each start).
func (g *Gateway) keyAlert(ctx context.Context, warning string) {
	g.log.Warn("ALERT key or certificate expires soon", "alert", store.AlertKey, "detail", warning)
	open, err := g.store.Alerts(ctx, false, 0)
	if err != nil {
		g.log.Error("alert not recorded", "err", err)
		return
	}
	for _, a := range open {
		if a.Kind == store.AlertKey && a.Text == warning {
			return
		}
	}
	if _, err := g.store.RaiseAlert(ctx, store.Alert{Kind: store.AlertKey, Text: warning}); err != nil {
		g.log.Error("alert not recorded", "err", err)
	}
}

// DashboardURL returns the dashboard's address as a URL, "" when it is off.
func (g *Gateway) DashboardURL() string {
	if g.dashLn == nil {
		return ""
	}
	return "http://" + g.dashLn.Addr().String() + "/"
}

// Config returns the instance's configuration.
func (g *Gateway) Config() *config.Config { return g.cfg }

// Connections returns the number of open router connections to partner's
// surrogate.
func (g *Gateway) Connections(partner string) int {
	for _, pl := range g.surrogates {
		if pl.partner.Name == partner {
			return pl.srv.Connections()
		}
	}
	return 0
}

// SMTPStatus returns the state of mail submission.
func (g *Gateway) SMTPStatus() mailbox.LinkStatus { return g.smtpLink.Status() }

// IMAPStatus returns the state of the IMAP watcher's connection.
func (g *Gateway) IMAPStatus() mailbox.LinkStatus { return g.imapLink.Status() }

// IMAPStatusFor returns the state of the account partner's mail comes to:
// its local address's own, or the imap section's.
func (g *Gateway) IMAPStatusFor(partner string) mailbox.LinkStatus {
	if p := g.cfg.Partner(partner); p != nil {
		if l, ok := g.localLinks[strings.ToLower(p.Local)]; ok {
			return l.Status()
		}
	}
	return g.imapLink.Status()
}

// Retry puts failed or expired outbound message id back in its partner's
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
	g.sender.Notify(m.Partner)
	return nil
}

// Release takes in quarantined mail id (see mailbox.Receiver.Release); it
// returns the stored message's id. The deliverer learns of it from the
// store (OnIngest).
func (g *Gateway) Release(ctx context.Context, id int64, by, note string) (int64, error) {
	res, err := g.receiver.Release(ctx, id, by, note)
	return res.ID, err
}

// Ready reports nil once the instance takes messages: the store is open
// and every surrogate listens.
func (g *Gateway) Ready() error {
	if g.stopping.Load() {
		return errors.New("shutting down")
	}
	if len(g.surrogates) != len(g.cfg.Partners) {
		return errors.New("surrogates not listening")
	}
	return nil
}

// watcher makes the watcher of one IMAP account: imap's (recipient "") or
// a local address's own. name says which in errors.
func (g *Gateway) watcher(im *config.IMAP, name, recipient string, link *mailbox.Link, log *slog.Logger) (func(context.Context), error) {
	password, err := g.cfg.Secret(im.PasswordFile, im.PasswordEnv)
	if err != nil {
		return nil, fmt.Errorf("%s password: %w", name, err)
	}
	tc, err := tlsConfig(im.Addr, g.cfg.Path(im.CAFile))
	if err != nil {
		return nil, fmt.Errorf("%s.ca_file: %w", name, err)
	}
	w, err := mailbox.NewWatcher(mailbox.WatcherOptions{
		Addr: im.Addr, TLS: im.TLS, TLSConfig: tc, Username: im.Username, Password: password,
		Mailbox: im.Mailbox, Processed: im.Processed, Quarantine: im.Quarantine,
		Poll: im.Poll.D(), MaxSize: int64(im.MaxMailSize), Receiver: g.receiver, Store: g.store,
		Logger: log, Recipient: recipient, Link: link, Handled: g.handled,
	})
	if err != nil {
		return nil, err
	}
	return w.Run, nil
}

// tlsConfig returns the TLS settings for a mail server at addr: nil (the
// system's roots) unless a CA file is configured, whose certificates then
// are the only ones trusted. Verification is never turned off.
func tlsConfig(addr, caFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
	}
	host, _, _ := net.SplitHostPort(addr)
	return &tls.Config{ServerName: host, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// rendezvousFor returns the surrogate's Rendezvous for partner p, nil for
// ack_mode: immediate.
func (g *Gateway) rendezvousFor(p *config.Partner) func(context.Context, int64) ([]byte, func(error), error) {
	if p.AckMode != "rendezvous" {
		return nil
	}
	return func(ctx context.Context, id int64) ([]byte, func(error), error) {
		return g.rdv.wait(ctx, id, p.RendezvousTimeout.D())
	}
}

// handled hands a response to the router connection waiting for it. When
// none takes it, the deliverer is woken: it may have left the response
// alone while a connection still waited.
func (g *Gateway) handled(r mailbox.Result) {
	if g.rendezvousResponse(r) {
		return
	}
	if r.ID != 0 && r.Incoming != nil && !r.Replay {
		g.deliverer.Notify(r.Incoming.Partner.Name)
	}
}

// Receive takes in one raw mail handed over by an MTA ("hl7mail receive",
// draft-ietf-ediint-hl7-02 §6.2 figure 7): the same path as mail the IMAP
// watcher fetches. An error means nothing was decided: the MTA keeps the
// mail and tries again.
func (g *Gateway) Receive(ctx context.Context, raw []byte, to string) (mailbox.Result, error) {
	if to != "" && !g.cfg.IsOurs(to) {
		g.log.Warn("mail from the MTA for an address that is not ours; routed by its To", "to", to)
		to = ""
	}
	res, err := g.receiver.HandleTo(ctx, raw, to)
	if err == nil {
		g.handled(res)
	}
	return res, err
}

// localLink returns the link of local address addr's own IMAP account.
func (g *Gateway) localLink(addr string) *mailbox.Link {
	if g.localLinks == nil {
		g.localLinks = map[string]*mailbox.Link{}
	}
	l := &mailbox.Link{}
	g.localLinks[strings.ToLower(addr)] = l
	return l
}
