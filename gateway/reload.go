package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// ErrReloadRefused wraps the reason a configuration was not applied; the
// running one is kept (as "nginx -s reload" does).
var ErrReloadRefused = errors.New("configuration refused; the running one is kept")

// surrogateDrain bounds how long a removed surrogate may take to store and
// answer the messages it is reading.
const surrogateDrain = 30 * time.Second

// Reload reads the configuration file again, with every key, certificate
// and secret file it names, and applies it without a restart:
//   - partners added get their surrogate, and partners removed lose theirs
//     once the messages they are reading are stored and answered;
//   - a kept partner's surrogate keeps its router connections, and its
//     limits (max_message_size, max_connections, idle_timeout) apply from
//     the next read; a new listen address or ack mode opens a new listener
//     and closes the old one;
//   - the mail side (sender, deliverer, IMAP watchers, sweeper, notices)
//     finishes what it has in hand and starts again with the new keys,
//     settings and passwords; whatever waited for a retry is tried at once.
//
// A configuration with problems, or one that moves the store, is refused
// with every problem (ErrReloadRefused) and the running one is kept.
func (g *Gateway) Reload(ctx context.Context) error {
	cfg, keys, err := Load(g.opts.ConfigPath, time.Now())
	if err != nil {
		g.log.Error("reload refused; the running configuration is kept", "err", err)
		return fmt.Errorf("%w:\n%v", ErrReloadRefused, err)
	}
	return g.apply(ctx, cfg, keys)
}

// apply makes cfg and keys the running configuration.
func (g *Gateway) apply(ctx context.Context, cfg *config.Config, keys *Keys) error {
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	if g.stopping.Load() {
		return fmt.Errorf("%w: shutting down", ErrReloadRefused)
	}
	old := g.side()
	if cfg.StoreDir() != old.cfg.StoreDir() {
		err := fmt.Errorf("%w: store moves from %s to %s: that needs a restart", ErrReloadRefused, old.cfg.StoreDir(), cfg.StoreDir())
		g.log.Error("reload refused", "err", err)
		return err
	}
	if cfg.Dashboard.Addr != old.cfg.Dashboard.Addr {
		g.log.Warn("dashboard.addr changed: the dashboard stays where it is until a restart", "addr", old.cfg.Dashboard.Addr)
	}
	sd, err := g.buildSide(cfg, keys)
	if err != nil {
		g.log.Error("reload refused", "err", err)
		return fmt.Errorf("%w: %v", ErrReloadRefused, err)
	}
	if g.dash != nil && cfg.Dashboard.TokenFile != "" {
		token, err := cfg.Secret(cfg.Dashboard.TokenFile, "")
		if err == nil {
			err = g.dash.SetToken(token)
		}
		if err != nil {
			return fmt.Errorf("%w: dashboard token: %v", ErrReloadRefused, err)
		}
	}
	plan, err := g.planSurrogates(ctx, cfg)
	if err != nil {
		g.log.Error("reload refused", "err", err)
		return fmt.Errorf("%w: %v", ErrReloadRefused, err)
	}
	// From here on the new configuration is applied. The old mail side
	// stops before the new one starts: one sender per queue, ever.
	g.replaceSide(old, sd)
	plan.commit(g)
	for _, d := range []store.Direction{store.Outbound, store.Inbound} {
		if err := g.store.Reschedule(ctx, d, ""); err != nil {
			g.log.Error("store", "err", err)
		}
	}
	for _, p := range cfg.Partners {
		sd.sender.Notify(p.Name)
		sd.deliverer.Notify(p.Name)
	}
	// A partner removed, or whose keys now serve, is no longer held (the
	// sender raises the alert again if its next attempt finds otherwise).
	release := append([]string(nil), plan.removed...)
	for i := range cfg.Partners {
		p := &cfg.Partners[i]
		if !p.RequireTLS && keys.Suite(string(p.Security), p.Name, string(p.KeyTransport)).Usable(time.Now()) == nil {
			release = append(release, p.Name)
		}
	}
	for _, name := range release {
		if _, err := g.store.ClearAlert(ctx, outbound.HeldAlertKey(name)); err != nil {
			g.log.Error("alert not cleared", "err", err)
		}
	}
	g.keyProblems(ctx, keys)
	g.log.Info("configuration reloaded", "partners", len(cfg.Partners), "added", plan.added, "removed", plan.removed,
		"replaced", plan.replaced)
	return nil
}

// surrogatePlan is how a reload changes the surrogates: listeners opened
// already for partners added or moved, the servers to close, and the
// limits of those kept.
type surrogatePlan struct {
	cfg                      *config.Config
	open                     []*partnerListener // listening, not serving yet
	close                    []*partnerListener // to shut down
	reopen                   []*config.Partner  // same address, new settings: after close
	keep                     map[string]*config.Partner
	tls                      map[string]*tls.Config // kept TLS listeners' new settings
	added, removed, replaced []string
}

// planSurrogates compares cfg's partners with the running surrogates and
// opens the listeners on new addresses, so that a reload whose address is
// taken is refused before anything changed.
func (g *Gateway) planSurrogates(ctx context.Context, cfg *config.Config) (*surrogatePlan, error) {
	g.mu.Lock()
	cur := make(map[string]*partnerListener, len(g.surrogates))
	for k, v := range g.surrogates {
		cur[k] = v
	}
	g.mu.Unlock()
	plan := &surrogatePlan{cfg: cfg, keep: map[string]*config.Partner{}, tls: map[string]*tls.Config{}}
	fail := func(err error) (*surrogatePlan, error) {
		for _, pl := range plan.open {
			pl.ln.Close()
		}
		return nil, err
	}
	for i := range cfg.Partners {
		p := &cfg.Partners[i]
		pl := cur[p.Name]
		switch {
		case pl == nil:
			np, err := g.newSurrogate(ctx, cfg, p)
			if err != nil {
				return fail(err)
			}
			plan.open = append(plan.open, np)
			plan.added = append(plan.added, p.Name)
		case pl.partner.Listen != p.Listen:
			np, err := g.newSurrogate(ctx, cfg, p)
			if err != nil {
				return fail(err)
			}
			plan.open = append(plan.open, np)
			plan.close = append(plan.close, pl)
			plan.replaced = append(plan.replaced, p.Name)
		case pl.partner.AckMode != p.AckMode || pl.partner.RendezvousTimeout != p.RendezvousTimeout || pl.partner.AcceptAck != p.AcceptAck ||
			(pl.tls == nil) != (p.ListenTLS == nil):
			plan.close = append(plan.close, pl)
			plan.reopen = append(plan.reopen, p)
			plan.replaced = append(plan.replaced, p.Name)
		default:
			plan.keep[p.Name] = p
			if p.ListenTLS != nil {
				// The certificate files are read again: a renewed one
				// serves new connections; open ones keep theirs.
				tc, err := listenTLSConfig(cfg, p.ListenTLS)
				if err != nil {
					return fail(fmt.Errorf("partner %s: %w", p.Name, err))
				}
				plan.tls[p.Name] = tc
			}
		}
	}
	for name, pl := range cur {
		if cfg.Partner(name) == nil {
			plan.close = append(plan.close, pl)
			plan.removed = append(plan.removed, name)
		}
	}
	sort.Strings(plan.removed)
	return plan, nil
}

// commit carries out the plan.
func (p *surrogatePlan) commit(g *Gateway) {
	g.mu.Lock()
	for name, np := range p.keep {
		pl := g.surrogates[name]
		pl.srv.SetLimits(surrogate.Limits{MaxMessageSize: np.MaxMessageSize, MaxConnections: np.MaxConnections,
			MaxConnectionsPerHost: np.MaxConnectionsPerHost, IdleTimeout: np.IdleTimeout.D(),
			FirstFrameTimeout: np.FirstFrameTimeout.D()})
		pl.partner = np
		if tc := p.tls[name]; tc != nil && pl.tls != nil {
			pl.tls.p.Store(tc)
		}
	}
	for _, pl := range p.close {
		if g.surrogates[pl.partner.Name] == pl {
			delete(g.surrogates, pl.partner.Name)
		}
	}
	for _, pl := range p.open {
		g.surrogates[pl.partner.Name] = pl
		g.serve(pl)
	}
	g.mu.Unlock()
	// Closed surrogates store and answer what they are reading first.
	ctx, cancel := context.WithTimeout(context.Background(), surrogateDrain)
	defer cancel()
	for _, pl := range p.close {
		if err := pl.srv.Shutdown(ctx); err != nil {
			g.log.Warn("surrogate closed before its connections finished", "partner", pl.partner.Name, "err", err)
		}
	}
	for _, np := range p.reopen {
		pl, err := g.newSurrogate(ctx, p.cfg, np)
		if err != nil {
			g.log.Error("ALERT surrogate not reopened after a reload", "partner", np.Name, "err", err)
			if _, _, aerr := g.store.RaiseOnce(ctx, "surrogate:"+np.Name, store.Alert{Kind: store.AlertHeld, Partner: np.Name,
				Text: "surrogate not listening after a reload: " + err.Error()}); aerr != nil {
				g.log.Error("alert not recorded", "err", aerr)
			}
			continue
		}
		g.mu.Lock()
		g.surrogates[np.Name] = pl
		g.serve(pl)
		g.mu.Unlock()
	}
}
