// Package gateway assembles one hl7mail instance from its configuration: the
// store and one surrogate listener per partner (draft-ietf-ediint-hl7-02
// §6.3, figure 9). It starts everything or nothing, and stops in reverse.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// Options configure New. Config is required.
type Options struct {
	Config *config.Config
	Logger *slog.Logger // default slog.Default()
}

// Gateway is a running hl7mail instance.
type Gateway struct {
	cfg        *config.Config
	log        *slog.Logger
	store      *store.Store
	surrogates []*partnerListener
	wg         sync.WaitGroup
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
	if opts.Config == nil {
		return nil, errors.New("gateway: Options.Config is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	cfg := opts.Config
	g := &Gateway{cfg: cfg, log: opts.Logger}
	st, err := store.Open(store.Options{Dir: cfg.StoreDir(), Logger: opts.Logger.With("component", "store")})
	if err != nil {
		return nil, err
	}
	g.store = st
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
	for _, pl := range g.surrogates {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			if err := pl.srv.Serve(pl.ln); err != nil && !errors.Is(err, surrogate.ErrServerClosed) {
				g.log.Error("surrogate stopped", "partner", pl.partner.Name, "err", err)
			}
		}()
	}
	g.log.Info("hl7mail ready", "partners", len(cfg.Partners), "store", cfg.StoreDir())
	return g, nil
}

// rollback releases what Start opened before it failed.
func (g *Gateway) rollback() {
	for _, pl := range g.surrogates {
		pl.ln.Close()
	}
	g.store.Close()
}

// Shutdown stops the surrogates (each finishing the messages it is
// committing), then closes the store. When ctx ends first, connections are
// closed at once; the store is closed either way.
func (g *Gateway) Shutdown(ctx context.Context) error {
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
	errs = append(errs, g.store.Close())
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
