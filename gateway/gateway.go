// Package gateway assembles one hl7mail instance from its configuration
// (draft-ietf-ediint-hl7-02 §6.2 to §6.4, figure 9): the store and the
// journals; one surrogate listener per partner; the sender that mails what
// they store; the IMAP watcher and receiver that take partner mail in; the
// deliverer that hands it to the router; and the responder that answers
// with the router's response and the receipt. It starts everything or
// nothing, and stops in reverse. With a cluster section the instance is a
// node of a cluster (cluster.go): its store is the shared PostgreSQL
// database (pgstore), and the parts of its mail side are roles (roles)
// that run on whichever node holds them.
//
// It imports, of this module, only config, dashboard, deliver, hl7, inbound,
// internal/safefile, journal, link, notify, outbound, pgstore, revocation,
// roles, security, spool, store, surrogate.
package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// Options configure Start. Config and Keys are required.
type Options struct {
	Config *config.Config
	Keys   *Keys        // from LoadKeys
	Logger *slog.Logger // default slog.Default()
	// ConfigPath is the file Reload reads again (default Config.File).
	ConfigPath string
	// Submitter replaces SMTP submission (tests); default: the smtp section.
	Submitter outbound.Submitter
	// RetryBase is the sender's first retry wait (default 30s).
	RetryBase time.Duration
	// NoticeGather is how long the notices to personnel wait for more
	// alerts to send as one (default notify's 10s).
	NoticeGather time.Duration
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

// Gateway is a running hl7mail instance. The store, the journals, the
// dashboard and the links stay for its life; the configuration, the keys
// and the mail side built from them (side) are replaced by Reload, and the
// surrogates are added, kept or removed to match.
type Gateway struct {
	opts     Options
	log      *slog.Logger
	store    Store
	outgoing outbound.Journal
	incoming journal.Appender
	cluster  *clusterNode // nil: alone, on the embedded store
	smtpLink link.Link
	imapLink link.Link
	dash     *dashboard.Server
	dashLn   net.Listener
	ctlLn    net.Listener // the control socket
	dashWG   sync.WaitGroup
	stopping atomic.Bool
	rdv      *rendezvous
	metrics  *dashboard.Metrics
	ids      *hl7.IDGen

	cur        atomic.Pointer[side]
	reloadMu   sync.Mutex // one Reload at a time, and none during Shutdown
	mu         sync.Mutex // guards surrogates
	surrogates map[string]*partnerListener
	wg         sync.WaitGroup // the surrogates' Serve loops
}

type partnerListener struct {
	partner *config.Partner
	srv     *surrogate.Server
	ln      net.Listener
	tls     *tlsHolder // listen_tls; nil for plain MLLP
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
	if opts.ConfigPath == "" {
		opts.ConfigPath = opts.Config.File
	}
	cfg := opts.Config
	g := &Gateway{opts: opts, log: opts.Logger, rdv: newRendezvous(), metrics: dashboard.NewMetrics(),
		ids: hl7.NewIDGen("HM", time.Now()), surrogates: map[string]*partnerListener{}}
	// What starts is listed with how to undo it; a failure undoes the
	// list in reverse, and only what started (maddy's lifetime list).
	var undo []func()
	failed := func(err error) (*Gateway, error) {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
		return nil, err
	}
	if cfg.Cluster != nil {
		if err := g.openCluster(ctx, cfg); err != nil {
			return nil, err
		}
		undo = append(undo, func() { g.store.Close(); g.cluster.close(true) })
	} else {
		st, err := store.Open(store.Options{Dir: cfg.StoreDir(), Logger: opts.Logger.With("component", "store")})
		if err != nil {
			return nil, err
		}
		g.store = st
		undo = append(undo, func() { st.Close() })
		out, err := journal.Open(filepath.Join(cfg.StoreDir(), OutgoingJournal))
		if err != nil {
			return failed(err)
		}
		undo = append(undo, func() { out.Close() })
		in, err := journal.Open(filepath.Join(cfg.StoreDir(), IncomingJournal))
		if err != nil {
			return failed(err)
		}
		undo = append(undo, func() { in.Close() })
		g.outgoing, g.incoming = out, in
	}
	sd, err := g.buildSide(cfg, opts.Keys)
	if err != nil {
		return failed(err)
	}
	g.cur.Store(sd)
	// The sender and the deliverer read their queues from the database:
	// they are woken when new messages have entered it.
	g.store.OnIngest(func(partner string, d store.Direction) {
		if d == store.Outbound {
			g.side().sender.Notify(partner)
		} else {
			g.side().deliverer.Notify(partner)
		}
	})
	for i := range cfg.Partners {
		pl, err := g.newSurrogate(ctx, cfg, &cfg.Partners[i])
		if err != nil {
			return failed(err)
		}
		g.surrogates[pl.partner.Name] = pl
		undo = append(undo, func() { pl.ln.Close() })
	}
	if !opts.NoDashboard {
		if err := g.startDashboard(opts); err != nil {
			return failed(err)
		}
		undo = append(undo, func() { g.dashLn.Close(); g.ctlLn.Close() })
	}
	g.keyProblems(ctx, opts.Keys)
	if g.cluster == nil {
		// Requests the router took before a crash cut off their
		// response (in a cluster: the sweeper's, wherever it runs).
		if err := sd.responder.Recover(ctx); err != nil {
			return failed(fmt.Errorf("responses left unsent: %w", err))
		}
		sd.start(nil)
	} else {
		if err := g.startRoles(); err != nil {
			return failed(err)
		}
	}
	g.mu.Lock()
	for _, pl := range g.surrogates {
		g.serve(pl)
	}
	g.mu.Unlock()
	if g.cluster != nil {
		g.log.Info("hl7mail ready, a node of a cluster", "node", g.cluster.name, "partners", len(cfg.Partners),
			"dashboard", g.DashboardURL(), "lease", g.cluster.lease)
	} else {
		g.log.Info("hl7mail ready", "partners", len(cfg.Partners), "store", cfg.StoreDir(), "dashboard", g.DashboardURL())
	}
	return g, nil
}

// side returns the mail side in use.
func (g *Gateway) side() *side { return g.cur.Load() }

// newSurrogate listens on p's address; serve starts it.
func (g *Gateway) newSurrogate(ctx context.Context, cfg *config.Config, p *config.Partner) (*partnerListener, error) {
	srv, err := surrogate.New(surrogate.Options{
		Partner:        p.Name,
		Spool:          g.store,
		Logger:         g.log.With("component", "surrogate"),
		MaxMessageSize: p.MaxMessageSize,
		MaxConnections: p.MaxConnections,
		IdleTimeout:    p.IdleTimeout.D(),
		IDs:            g.ids,

		OriginalModeAA:        p.AcceptAck == config.AcceptAA,
		BatchAckEach:          p.BatchAck == config.BatchAckEach,
		FirstFrameTimeout:     p.FirstFrameTimeout.D(),
		MaxConnectionsPerHost: p.MaxConnectionsPerHost,
		Observe:               g.metrics.AckObserver(p.Name),
		LimitHit:              func(limit string) { g.metrics.LimitHit(p.Name, limit) },
		Rendezvous:            g.rendezvousFor(p),
	})
	if err != nil {
		return nil, fmt.Errorf("partner %s: surrogate: %w", p.Name, err)
	}
	pl := &partnerListener{partner: p, srv: srv}
	var tc *tls.Config
	if p.ListenTLS != nil {
		if tc, err = listenTLSConfig(cfg, p.ListenTLS); err != nil {
			return nil, fmt.Errorf("partner %s: %w", p.Name, err)
		}
		pl.tls = &tlsHolder{}
		pl.tls.p.Store(tc)
	}
	ln, err := surrogate.Listen(ctx, p.Listen)
	if err != nil {
		return nil, fmt.Errorf("partner %s: surrogate on %s: %w", p.Name, p.Listen, err)
	}
	if pl.tls != nil {
		ln = tls.NewListener(ln, pl.tls.config())
	}
	pl.ln = ln
	return pl, nil
}

// serve runs pl's accept loop (g.mu held).
func (g *Gateway) serve(pl *partnerListener) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		if err := pl.srv.Serve(pl.ln); err != nil && !errors.Is(err, surrogate.ErrServerClosed) {
			g.log.Error("surrogate stopped", "partner", pl.partner.Name, "err", err)
		}
	}()
}

// keyProblems reports the partners' key problems of keys at start or
// reload: logged, and an alert for each partner whose key cannot be used
// at all (its queue waits; the sender raises the same alert when it tries).
// Keys that expire soon, or did, get their alert too.
func (g *Gateway) keyProblems(ctx context.Context, keys *Keys) {
	if keys.Problems != nil {
		for _, p := range keys.Problems.Problems {
			g.log.Error("partner key problem: that partner's mail waits until it is mended", "partner", p.Partner,
				"problem", p.String())
		}
	}
	for partner, why := range keys.Unusable {
		if _, _, err := g.store.RaiseOnce(ctx, outbound.HeldAlertKey(partner), store.Alert{Kind: store.AlertHeld, Partner: partner,
			Text: "queue waits: cannot seal: " + why}); err != nil {
			g.log.Error("alert not recorded", "err", err)
		}
	}
	current := map[string]bool{}
	for _, w := range keys.Expiring(time.Now()) {
		current[keyAlertPrefix+w] = true
		g.keyAlert(ctx, w)
	}
	// A key replaced since its alert was raised is no longer a problem.
	open, err := g.store.OpenAlertKeys(ctx, keyAlertPrefix)
	if err != nil {
		g.log.Error("alerts not readable", "err", err)
	}
	for _, k := range open {
		if !current[k] {
			if _, err := g.store.ClearAlert(ctx, k); err != nil {
				g.log.Error("alert not cleared", "err", err)
			}
		}
	}
}

// keyAlertPrefix starts the alert key of a key that expires soon, or did.
const keyAlertPrefix = "key-expiry:"

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
// committing), then the mail side, then closes the store. When ctx ends
// first, connections are closed at once; the store is closed either way.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	g.stopping.Store(true)
	g.rdv.stop() // connections waiting for a response answer now
	g.mu.Lock()
	list := make([]*partnerListener, 0, len(g.surrogates))
	for _, pl := range g.surrogates {
		list = append(list, pl)
	}
	g.mu.Unlock()
	var wg sync.WaitGroup
	errs := make([]error, len(list))
	for i, pl := range list {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = pl.srv.Shutdown(ctx)
		}()
	}
	wg.Wait()
	g.wg.Wait()
	// The mail side finishes what it is doing (an attempt, a delivery,
	// the mail in hand) within the bound; then it is cut short.
	stopped := g.side().stop(ctx)
	if !stopped {
		g.log.Warn("the mail side did not stop within the shutdown bound; closing the store under it")
	}
	if g.dash != nil {
		errs = append(errs, g.dash.Shutdown(ctx))
		g.dashWG.Wait()
	}
	if g.ctlLn != nil {
		os.Remove(filepath.Join(g.Config().StoreDir(), ControlSocket))
	}
	if g.cluster != nil {
		// The roles stopped with the side; the locks go with the session.
		g.cluster.close(stopped)
	}
	for _, j := range []any{g.outgoing, g.incoming} {
		if c, ok := j.(interface{ Close() error }); ok {
			errs = append(errs, c.Close())
		}
	}
	errs = append(errs, g.store.Close())
	g.log.Info("hl7mail stopped")
	return errors.Join(errs...)
}

// Store returns the instance's store.
func (g *Gateway) Store() Store { return g.store }

// SMTPSessions returns how many SMTP sessions were opened for partner's
// mails since the start (or the last reload).
func (g *Gateway) SMTPSessions(partner string) int {
	if s := g.side().sender[partner]; s != nil {
		return s.Sessions(partner)
	}
	return 0
}

// surrogate returns partner's surrogate, nil when it has none.
func (g *Gateway) surrogate(partner string) *partnerListener {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.surrogates[partner]
}

// SurrogateAddr returns the address partner's surrogate listens on.
func (g *Gateway) SurrogateAddr(partner string) string {
	if pl := g.surrogate(partner); pl != nil {
		return pl.ln.Addr().String()
	}
	return ""
}

// Panics returns the number of panics recovered in surrogate connections.
func (g *Gateway) Panics() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	var n int64
	for _, pl := range g.surrogates {
		n += pl.srv.Panics()
	}
	return n
}

// keyAlert raises an alert for a key or certificate that expires soon,
// unless one is open for it already (it is found again at each start).
func (g *Gateway) keyAlert(ctx context.Context, warning string) {
	_, raised, err := g.store.RaiseOnce(ctx, keyAlertPrefix+warning, store.Alert{Kind: store.AlertKey, Text: warning})
	if err != nil {
		g.log.Error("alert not recorded", "err", err)
	} else if raised {
		g.log.Warn("ALERT key or certificate expires soon", "alert", store.AlertKey, "detail", warning)
	}
}

// rendezvousFor returns the surrogate's Rendezvous for partner p, nil for
// ack_mode: immediate.
func (g *Gateway) rendezvousFor(p *config.Partner) func(context.Context, int64) ([]byte, func(error), error) {
	if p.AckMode != config.AckRendezvous {
		return nil
	}
	return func(ctx context.Context, id int64) ([]byte, func(error), error) {
		return g.rdv.wait(ctx, id, p.RendezvousTimeout.D())
	}
}

// handled hands a response to the router connection waiting for it. When
// none takes it, the deliverer is woken: it may have left the response
// alone while a connection still waited.
func (g *Gateway) handled(r inbound.Result) {
	if g.rendezvousResponse(r) {
		return
	}
	if r.ID != 0 && r.Incoming != nil && !r.Replay {
		g.side().deliverer.Notify(r.Incoming.Partner.Name)
	}
}
