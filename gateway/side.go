package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/outbound"
)

// side is what one configuration builds and a reload replaces: the keys
// and the mail side (the sender, the deliverer, the receiver and its IMAP
// watchers, the sweeper, the key watch and the notices to personnel). The
// store, the journals, the surrogates and the dashboard stay.
type side struct {
	cfg        *config.Config
	keys       *Keys
	sender     services[*outbound.Sender]
	deliverer  services[*deliver.Deliverer]
	receiver   *inbound.Receiver
	responder  *deliver.Responder
	localLinks map[string]*link.Link            // local address (lower case) → its own IMAP account
	roles      map[string]func(context.Context) // what runs, by role name (cluster.go)

	mu      sync.Mutex
	ctx     context.Context // what the roles run under; ended by stop
	cancel  context.CancelFunc
	running map[string]*running
	// abort cuts short what is under way (a submission) once a shutdown's
	// bound has run out; abortCtx is what it ends.
	abortCtx context.Context
	abort    context.CancelFunc
	wg       sync.WaitGroup
}

// buildSide makes the mail side of cfg and keys; nothing runs until start.
// Secrets (the SMTP and IMAP passwords, the webhook token) are read here,
// so that a reload reads them again.
func (g *Gateway) buildSide(cfg *config.Config, keys *Keys) (*side, error) {
	s := &side{cfg: cfg, keys: keys, localLinks: map[string]*link.Link{}, roles: map[string]func(context.Context){},
		running: map[string]*running{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	keys.Attach(g.store, g.log)
	s.abortCtx, s.abort = context.WithCancel(context.Background())
	log := g.log
	submitter := g.opts.Submitter
	if submitter == nil {
		var err error
		if submitter, err = newSubmitter(cfg); err != nil {
			return nil, err
		}
	}
	// The sender learns of the responses queued from the store (OnIngest).
	s.responder = &deliver.Responder{Config: cfg, Store: g.store, Logger: log.With("component", "responder")}
	routerTLS, err := routerTLSConfig(cfg)
	if err != nil {
		return nil, err
	}
	// Alone, one sender and one deliverer serve every partner. In a
	// cluster each partner's are roles of their own, so that they spread
	// over the nodes and move one by one.
	groups := [][]config.Partner{cfg.Partners}
	if g.cluster != nil {
		groups = groups[:0]
		for _, p := range cfg.Partners {
			groups = append(groups, []config.Partner{p})
		}
	}
	s.sender, s.deliverer = services[*outbound.Sender]{}, services[*deliver.Deliverer]{}
	for _, ps := range groups {
		gc := *cfg
		gc.Partners = ps
		sender, err := outbound.NewSender(outbound.SenderOptions{
			Config: &gc, Store: g.store, Journal: g.outgoing, Submitter: submitter,
			RetryBase: retryBase(g.opts.RetryBase, cfg.SMTP.Retry.D()),
			Logger:    log.With("component", "sender"), Keys: &keys.Keyring, Link: &g.smtpLink, Abort: s.abortCtx,
		})
		if err != nil {
			return nil, err
		}
		deliverer, err := deliver.NewDeliverer(deliver.DelivererOptions{Config: &gc, Store: g.store,
			Logger: log.With("component", "deliverer"), RetryBase: routerRetryBase(g.opts.RetryBase),
			Delivered: s.responder.Delivered, Expired: s.responder.Expired, Held: g.held, TLS: routerTLS})
		if err != nil {
			return nil, err
		}
		role := ""
		if g.cluster != nil {
			role = ":" + ps[0].Name
		}
		s.sender.add(ps, sender)
		s.deliverer.add(ps, deliverer)
		s.role("sender"+role, sender.Run)
		s.role("deliverer"+role, deliverer.Run)
	}
	s.receiver = NewReceiver(cfg, keys, g.store, g.incoming, log.With("component", "receiver"), s.sender.Notify)
	// Without imap.addr, mail comes in only through "hl7mail receive"
	// (an MTA's pipe, draft-ietf-ediint-hl7-02 §6.2 figure 7).
	if cfg.IMAP.Addr != "" {
		run, err := g.watcher(s, &cfg.IMAP, "imap", "", &g.imapLink, log.With("component", "imap"))
		if err != nil {
			return nil, err
		}
		s.role("imap", run)
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
		link := &link.Link{}
		s.localLinks[strings.ToLower(l.Address)] = link
		run, err := g.watcher(s, l.IMAP, "local "+l.Address+" imap", l.Address, link,
			log.With("component", "imap", "local", l.Address))
		if err != nil {
			return nil, err
		}
		s.role("imap:"+strings.ToLower(l.Address), run)
	}
	notifier, err := newNotifier(cfg, g.store, submitter, log.With("component", "notify"), g.opts.NoticeGather)
	if err != nil {
		return nil, err
	}
	keyWatch := g.keyWatch(keys)
	s.role("sweeper", func(ctx context.Context) {
		if g.cluster != nil {
			// Alone, Start does this before anything runs; in a cluster
			// the node that sweeps does, each time it takes the role.
			if err := s.responder.Recover(ctx); err != nil && ctx.Err() == nil {
				log.Error("responses left unsent by a node that stopped are not all queued; tried again when the sweeper moves",
					"err", err)
			}
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); keyWatch(ctx) }()
		runSweeper(ctx, cfg, g.store, log.With("component", "sweeper"), sweepInterval(cfg))
		wg.Wait()
	})
	if notifier != nil {
		s.role("notices", notifier.Run)
	}
	return s, nil
}

// sweepInterval is how often receipts and stuck messages are looked at: a
// tenth of the shortest mdn_timeout, between a second and a minute.
func sweepInterval(cfg *config.Config) time.Duration {
	d := time.Minute
	for _, p := range cfg.Partners {
		d = min(d, p.MDNTimeout.D()/10)
	}
	return max(d, time.Second)
}

// newSubmitter is the SMTP submission of cfg's smtp section.
func newSubmitter(cfg *config.Config) (*outbound.SMTPSubmitter, error) {
	password, err := cfg.Secret(cfg.SMTP.PasswordFile, cfg.SMTP.PasswordEnv)
	if err != nil {
		return nil, fmt.Errorf("smtp password: %w", err)
	}
	tc, err := SMTPTLSConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("smtp.ca_file: %w", err)
	}
	return &outbound.SMTPSubmitter{Addr: cfg.SMTP.Addr, TLS: cfg.SMTP.TLS, TLSConfig: tc, Username: cfg.SMTP.Username,
		Password: password}, nil
}

// SMTPTLSConfig returns the TLS settings for cfg's SMTP server (see
// tlsConfig).
func SMTPTLSConfig(cfg *config.Config) (*tls.Config, error) {
	return tlsConfig(cfg.SMTP.Addr, cfg.Path(cfg.SMTP.CAFile))
}

// newNotifier is the notices to personnel of cfg's alerts section, nil
// when it names nobody.
func newNotifier(cfg *config.Config, st notify.Store, sub outbound.Submitter, log *slog.Logger, gather time.Duration) (*notify.Notifier, error) {
	a := cfg.Alerts
	if len(a.Email) == 0 && a.Webhook.URL == "" {
		return nil, nil
	}
	if gather == 0 {
		gather = min(a.Digest.D()/6, 10*time.Second)
	}
	o := notify.Options{Store: st, Logger: log, Site: cfg.Self.Name, Gather: gather, Every: a.Digest.D()}
	if len(a.Email) > 0 {
		o.Mail = &notify.Mail{From: cfg.Self.Email, To: a.Email,
			Send: func(ctx context.Context, from string, to []string, msg []byte) error {
				return sub.Submit(ctx, from, to, msg, outbound.SubmitOptions{})
			}}
	}
	if a.Webhook.URL != "" {
		token, err := cfg.Secret(a.Webhook.TokenFile, "")
		if err != nil {
			return nil, fmt.Errorf("alerts.webhook.token_file: %w", err)
		}
		o.Webhook = &notify.Webhook{URL: a.Webhook.URL, Token: token}
	}
	return notify.New(o)
}

// NewReceiver is the one inbound pipeline of cfg and keys: the running
// instance's, and that of the commands that take mail with it stopped
// (receive, release). incoming (the journal), log and notify may be nil
// for a command that only releases.
func NewReceiver(cfg *config.Config, keys *Keys, st inbound.Store, incoming journal.Appender, log *slog.Logger,
	notify func(partner string)) *inbound.Receiver {
	keys.Attach(st, log)
	return &inbound.Receiver{Opener: &inbound.Opener{Config: cfg, Keys: &keys.Keyring, MaxSize: cfg.IMAP.MaxMailSize},
		Store: st, Journal: incoming, Logger: log, Notify: notify}
}

// start runs every role of the side until stop: alone, the node runs
// them all; in a cluster, those it holds (the rest start as it gains them).
func (s *side) start(roles []string) {
	if roles == nil {
		roles = s.roleNames()
	}
	for _, r := range roles {
		s.startRole(r)
	}
}

// stop ends the side and waits for it: the mail in hand and the attempt
// under way finish, within ctx (a shutdown's bound). When ctx ends first,
// what is under way is cut short (the second phase of the shutdown) and
// waited for a moment more; it reports whether everything ended.
func (s *side) stop(ctx context.Context) bool {
	s.mu.Lock()
	s.cancel()
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.abort()
		return true
	case <-ctx.Done():
	}
	s.abort()
	select {
	case <-done:
		return true
	case <-time.After(time.Second):
		return false
	}
}

// keyWatch reports keys that come within ExpiryWarning of their end while
// running: looked at again twice a day.
func (g *Gateway) keyWatch(keys *Keys) func(context.Context) {
	return func(ctx context.Context) {
		t := time.NewTicker(12 * time.Hour)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				for _, w := range keys.Expiring(now) {
					g.keyAlert(ctx, w)
				}
			}
		}
	}
}

// watcher makes the watcher of one IMAP account: imap's (recipient "") or
// a local address's own. name says which in errors.
func (g *Gateway) watcher(s *side, im *config.IMAP, name, recipient string, link *link.Link, log *slog.Logger) (func(context.Context), error) {
	password, err := s.cfg.Secret(im.PasswordFile, im.PasswordEnv)
	if err != nil {
		return nil, fmt.Errorf("%s password: %w", name, err)
	}
	tc, err := tlsConfig(im.Addr, s.cfg.Path(im.CAFile))
	if err != nil {
		return nil, fmt.Errorf("%s.ca_file: %w", name, err)
	}
	w, err := inbound.NewWatcher(inbound.WatcherOptions{
		Addr: im.Addr, TLS: im.TLS, TLSConfig: tc, Username: im.Username, Password: password,
		Mailbox: im.Mailbox, Processed: im.Processed, Quarantine: im.Quarantine,
		Poll: im.Poll.D(), MaxSize: int64(im.MaxMailSize), Receiver: s.receiver, Store: g.store,
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

// runSweeper looks every interval, until ctx ends, for receipts that became
// overdue (outbound.Sweep) and messages the router does not take
// (deliver.SweepStuck), and alerts them.
func runSweeper(ctx context.Context, cfg *config.Config, st sweepStore, log *slog.Logger, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := outbound.Sweep(ctx, st, log, time.Now()); err != nil && ctx.Err() == nil {
			log.Error("sweep", "err", err)
		}
		if _, err := deliver.SweepStuck(ctx, cfg, st, log, time.Now()); err != nil && ctx.Err() == nil {
			log.Error("sweep", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sweepStore is what the sweeper needs of the store.
type sweepStore interface {
	outbound.Receipts
	deliver.Stuck
}
