package inbound

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/link"
)

// WatcherOptions configure a Watcher. Addr, Mailbox, Processed, Quarantine,
// Receiver and Store are required.
type WatcherOptions struct {
	Addr      string
	TLS       config.TLSMode // starttls (default), tls, or none (loopback only)
	TLSConfig *tls.Config    // nil: verify the server's certificate
	Username  string
	Password  string
	// Mailbox is watched; handled mail moves to Processed, refused mail to
	// Quarantine. Both are created when missing.
	Mailbox, Processed, Quarantine string
	// Poll is the interval of the UID search: while idling (IDLE can go
	// silent on a half-open connection) and as polling without IDLE
	// (default 30s).
	Poll time.Duration
	// MaxSize bounds a mail; larger ones are quarantined unfetched
	// (default 32 MiB).
	MaxSize  int64
	Receiver *Receiver
	Store    Positions // keeps UIDVALIDITY and the last UID handled
	Logger   *slog.Logger
	// Handled is called after each mail was handled and moved.
	Handled func(Result)
	// Link, when set, follows the connection's state.
	Link *link.Link
	// Recipient is the address of ours this account receives for ("": the
	// mail's To says).
	Recipient string
}

// Watcher fetches partner mail from one IMAP account (go-imap v2) and hands
// each to the Receiver. It reconnects by itself, with backoff, and keeps
// its position (UIDVALIDITY, last UID) in the store, so that a restart
// neither skips nor repeats mail.
type Watcher struct {
	o   WatcherOptions
	log *slog.Logger
}

// NewWatcher returns a Watcher; Run starts it.
func NewWatcher(o WatcherOptions) (*Watcher, error) {
	if o.Addr == "" || o.Mailbox == "" || o.Processed == "" || o.Quarantine == "" || o.Receiver == nil || o.Store == nil {
		return nil, errors.New("inbound: WatcherOptions.Addr, Mailbox, Processed, Quarantine, Receiver and Store are required")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Poll == 0 {
		o.Poll = 30 * time.Second
	}
	if o.MaxSize == 0 {
		o.MaxSize = 32 << 20
	}
	return &Watcher{o: o, log: o.Logger.With("imap", o.Addr, "mailbox", o.Mailbox)}, nil
}

// Run watches until ctx ends, reconnecting after any failure.
func (w *Watcher) Run(ctx context.Context) {
	delay := time.Second
	for ctx.Err() == nil {
		start := time.Now()
		err := w.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(start) > time.Minute {
			delay = time.Second
		}
		w.o.Link.Set(link.Down, err)
		w.log.Warn("IMAP session ended; reconnecting", "err", err, "delay", delay.String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Minute)
	}
}

func (w *Watcher) dial(newMail chan<- struct{}) (*imapclient.Client, error) {
	opts := &imapclient.Options{
		TLSConfig: w.o.TLSConfig,
		Dialer:    &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second},
		UnilateralDataHandler: &imapclient.UnilateralDataHandler{
			Mailbox: func(d *imapclient.UnilateralDataMailbox) {
				if d.NumMessages != nil {
					select {
					case newMail <- struct{}{}:
					default:
					}
				}
			},
		},
	}
	if opts.TLSConfig == nil {
		host, _, _ := net.SplitHostPort(w.o.Addr)
		opts.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	switch w.o.TLS {
	case config.NoTLS:
		return imapclient.DialInsecure(w.o.Addr, opts)
	case config.ImplicitTLS:
		return imapclient.DialTLS(w.o.Addr, opts)
	}
	return imapclient.DialStartTLS(w.o.Addr, opts)
}

// session runs one connection: log in, make the folders, select, then
// handle new mail and wait for more, until an error.
func (w *Watcher) session(ctx context.Context) error {
	newMail := make(chan struct{}, 1)
	w.o.Link.Set(link.Connecting, nil)
	c, err := w.dial(newMail)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if w.o.Username != "" {
		if err := c.Login(w.o.Username, w.o.Password).Wait(); err != nil {
			return fmt.Errorf("login: %w", err)
		}
	}
	processed, quarantine, err := w.ensureFolders(c)
	if err != nil {
		return err
	}
	sel, err := c.Select(w.o.Mailbox, nil).Wait()
	if err != nil {
		return fmt.Errorf("select %s: %w", w.o.Mailbox, err)
	}
	last, err := w.position(ctx, sel.UIDValidity)
	if err != nil {
		return err
	}
	w.o.Link.Set(link.Up, nil)
	w.log.Info("IMAP watching", "uidvalidity", sel.UIDValidity, "last_uid", last, "idle", c.Caps().Has(imap.CapIdle))
	for {
		if last, err = w.handleNew(ctx, c, sel.UIDValidity, last, processed, quarantine); err != nil {
			return err
		}
		if err := w.wait(ctx, c, newMail); err != nil {
			return err
		}
	}
}

// ensureFolders learns the server's hierarchy delimiter, writes the
// configured folder names ("HL7/Processed") with it ("HL7.Processed" on a
// Dovecot with Maildir), and creates the folders that are missing. It
// returns the processed and quarantine folder names as the server knows
// them.
func (w *Watcher) ensureFolders(c *imapclient.Client) (processed, quarantine string, err error) {
	delim := '/'
	if root, err := c.List("", "", nil).Collect(); err == nil && len(root) > 0 && root[0].Delim != 0 {
		delim = root[0].Delim
	}
	name := func(n string) string { return strings.ReplaceAll(n, "/", string(delim)) }
	processed, quarantine = name(w.o.Processed), name(w.o.Quarantine)
	list, err := c.List("", "*", nil).Collect()
	if err != nil {
		return "", "", fmt.Errorf("list: %w", err)
	}
	have := map[string]bool{}
	for _, m := range list {
		have[m.Mailbox] = true
	}
	for _, n := range []string{processed, quarantine} {
		if have[n] {
			continue
		}
		if err := c.Create(n, nil).Wait(); err != nil {
			return "", "", fmt.Errorf("create %s: %w", n, err)
		}
		w.log.Info("IMAP folder created", "folder", n)
	}
	return processed, quarantine, nil
}

// position returns the last UID handled in this mailbox, starting over when
// the server's UIDVALIDITY changed.
func (w *Watcher) position(ctx context.Context, validity uint32) (imap.UID, error) {
	v, err := w.o.Store.Value(ctx, w.key())
	if err != nil {
		return 0, err
	}
	val, uid, ok := strings.Cut(v, ":")
	if !ok || val != strconv.FormatUint(uint64(validity), 10) {
		if v != "" {
			w.log.Warn("IMAP UIDVALIDITY changed; reading the mailbox from the start", "was", val, "now", validity)
		}
		return 0, nil
	}
	n, err := strconv.ParseUint(uid, 10, 32)
	return imap.UID(n), err
}

func (w *Watcher) key() string { return "imap:" + w.o.Addr + ":" + w.o.Username + ":" + w.o.Mailbox }

// handleNew handles every mail above last, in UID order, and returns the
// new last UID.
func (w *Watcher) handleNew(ctx context.Context, c *imapclient.Client, validity uint32, last imap.UID, processed, quarantine string) (imap.UID, error) {
	var set imap.UIDSet
	set.AddRange(last+1, 0) // last+1:*
	found, err := c.UIDSearch(&imap.SearchCriteria{UID: []imap.UIDSet{set}}, nil).Wait()
	if err != nil {
		return last, fmt.Errorf("search: %w", err)
	}
	for _, uid := range found.AllUIDs() {
		if uid <= last {
			continue // "n:*" always matches the highest UID
		}
		if err := w.handleOne(ctx, c, uid, processed, quarantine); err != nil {
			return last, err
		}
		last = uid
		if err := w.o.Store.SetValue(ctx, w.key(), fmt.Sprintf("%d:%d", validity, uid)); err != nil {
			return last, err
		}
	}
	return last, nil
}

func (w *Watcher) handleOne(ctx context.Context, c *imapclient.Client, uid imap.UID, processed, quarantine string) error {
	uidSet := imap.UIDSetNum(uid)
	sizes, err := c.Fetch(uidSet, &imap.FetchOptions{UID: true, RFC822Size: true}).Collect()
	if err != nil || len(sizes) != 1 {
		return fmt.Errorf("fetch size of %d: %v", uid, err)
	}
	var res Result
	if sizes[0].RFC822Size > w.o.MaxSize {
		// Only the header is fetched: who sent it, and whether a receipt
		// (denied) is asked for.
		section := &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, Peek: true}
		msgs, err := c.Fetch(uidSet, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{section}}).Collect()
		if err != nil || len(msgs) != 1 {
			return fmt.Errorf("fetch header of %d: %v", uid, err)
		}
		if res, err = w.o.Receiver.HandleOversize(ctx, msgs[0].FindBodySection(section), sizes[0].RFC822Size); err != nil {
			return fmt.Errorf("handle %d: %w", uid, err)
		}
	} else {
		section := &imap.FetchItemBodySection{Peek: true}
		msgs, err := c.Fetch(uidSet, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{section}}).Collect()
		if err != nil || len(msgs) != 1 {
			return fmt.Errorf("fetch %d: %v", uid, err)
		}
		raw := msgs[0].FindBodySection(section)
		if res, err = w.o.Receiver.HandleTo(ctx, raw, w.o.Recipient); err != nil {
			return fmt.Errorf("handle %d: %w", uid, err)
		}
	}
	folder := processed
	if res.Quarantine != nil {
		folder = quarantine
	}
	if _, err := c.Move(uidSet, folder).Wait(); err != nil {
		return fmt.Errorf("move %d to %s: %w", uid, folder, err)
	}
	if w.o.Handled != nil {
		w.o.Handled(res)
	}
	return nil
}

// wait returns when new mail may have arrived: on the server's word while
// idling, or after the poll interval in any case.
func (w *Watcher) wait(ctx context.Context, c *imapclient.Client, newMail <-chan struct{}) error {
	timer := time.NewTimer(w.o.Poll)
	defer timer.Stop()
	if !c.Caps().Has(imap.CapIdle) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			return nil
		}
	}
	idle, err := c.Idle()
	if err != nil {
		return fmt.Errorf("idle: %w", err)
	}
	select {
	case <-ctx.Done():
	case <-timer.C:
	case <-newMail:
	case <-c.Closed():
	}
	if err := idle.Close(); err != nil {
		return fmt.Errorf("idle: %w", err)
	}
	if err := idle.Wait(); err != nil {
		return fmt.Errorf("idle: %w", err)
	}
	return ctx.Err()
}
