package inbound

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
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
	if err := w.moveLeftovers(ctx, c, sel.UIDValidity); err != nil {
		return err
	}
	w.o.Link.Set(link.Up, nil)
	w.log.Info("IMAP watching", "uidvalidity", sel.UIDValidity, "last_uid", last, "idle", c.Caps().Has(imap.CapIdle))
	for {
		before := last
		if last, err = w.handleNew(ctx, c, sel.UIDValidity, last, processed, quarantine); err != nil {
			return err
		}
		if last != before {
			// Mail that came while these were handled may have been told
			// of before IDLE began: search again first.
			continue
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
	var uids []imap.UID
	for _, uid := range found.AllUIDs() {
		if uid > last { // "n:*" always matches the highest UID
			uids = append(uids, uid)
		}
	}
	for len(uids) > 0 && ctx.Err() == nil {
		done, unmoved, err := w.handleChunk(ctx, c, uids[:min(len(uids), fetchChunk)], processed, quarantine)
		if len(unmoved) > 0 {
			// Handled, but the connection broke before they moved: moved at
			// the next session's start, never handled again.
			if err := w.recordLeftovers(ctx, validity, unmoved); err != nil {
				return last, err
			}
		}
		if done > 0 {
			last = uids[done-1]
			if err := w.o.Store.SetValue(ctx, w.key(), fmt.Sprintf("%d:%d", validity, last)); err != nil {
				return last, err
			}
		}
		if err != nil {
			return last, err
		}
		uids = uids[done:]
	}
	return last, nil
}

// fetchChunk is how many mails are fetched with one command and opened at
// once; fetchBytes bounds the bytes of one chunk's mails.
const (
	fetchChunk = 16
	fetchBytes = 64 << 20
)

// fetched is one mail of a chunk.
type fetched struct {
	uid      imap.UID
	size     int64
	raw      []byte // the whole mail, or only its header when oversize
	oversize bool
	opened   *Opened
	res      Result
}

// handleChunk fetches the mails uids with one command (their sizes first:
// an oversize mail's header only), opens them on every core, then hands
// them to the receiver one after another in UID order, and moves them with
// one command per folder. It returns how many of uids, from the first,
// were handled, and those handled that could not be moved, by folder.
func (w *Watcher) handleChunk(ctx context.Context, c *imapclient.Client, uids []imap.UID, processed,
	quarantine string) (int, map[string][]imap.UID, error) {
	all := imap.UIDSetNum(uids...)
	sizes, err := c.Fetch(all, &imap.FetchOptions{UID: true, RFC822Size: true}).Collect()
	if err != nil {
		return 0, nil, fmt.Errorf("fetch sizes: %v", err)
	}
	size := map[imap.UID]int64{}
	for _, m := range sizes {
		size[m.UID] = m.RFC822Size
	}
	var mails []*fetched
	var whole, headers imap.UIDSet
	var total int64
	for _, uid := range uids {
		sz, ok := size[uid]
		if !ok {
			return 0, nil, fmt.Errorf("fetch size of %d: not in the answer", uid)
		}
		f := &fetched{uid: uid, size: sz, oversize: sz > w.o.MaxSize}
		if !f.oversize && total+sz > fetchBytes && len(mails) > 0 {
			break // the rest comes in the next chunk
		}
		if f.oversize {
			headers.AddNum(uid)
		} else {
			whole.AddNum(uid)
			total += sz
		}
		mails = append(mails, f)
	}
	byUID := map[imap.UID]*fetched{}
	for _, f := range mails {
		byUID[f.uid] = f
	}
	for _, part := range []struct {
		set     imap.UIDSet
		section *imap.FetchItemBodySection
	}{
		{whole, &imap.FetchItemBodySection{Peek: true}},
		// Of an oversize mail only the header: who sent it, and whether a
		// receipt (denied) is asked for.
		{headers, &imap.FetchItemBodySection{Specifier: imap.PartSpecifierHeader, Peek: true}},
	} {
		if len(part.set) == 0 {
			continue
		}
		msgs, err := c.Fetch(part.set, &imap.FetchOptions{UID: true, BodySection: []*imap.FetchItemBodySection{part.section}}).Collect()
		if err != nil {
			return 0, nil, fmt.Errorf("fetch: %v", err)
		}
		for _, m := range msgs {
			if f := byUID[m.UID]; f != nil {
				f.raw = m.FindBodySection(part.section)
			}
		}
	}
	// Decrypting and verifying is most of the work, and touches nothing
	// but the keys: done for the whole chunk at once.
	var wg sync.WaitGroup
	sem := make(chan struct{}, runtime.GOMAXPROCS(0))
	for _, f := range mails {
		if f.oversize || f.raw == nil {
			continue
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			f.opened = w.o.Receiver.Open(f.raw, w.o.Recipient)
		}()
	}
	wg.Wait()
	// The store and the journal take them in the order they came.
	var toProcessed, toQuarantine imap.UIDSet
	var processedUIDs, quarantineUIDs []imap.UID
	handled := 0
	var herr error
	for _, f := range mails {
		switch {
		case f.raw == nil:
			herr = fmt.Errorf("fetch %d: not in the answer", f.uid)
		case f.oversize:
			f.res, herr = w.o.Receiver.HandleOversize(ctx, f.raw, f.size)
		default:
			f.res, herr = w.o.Receiver.Take(ctx, f.opened)
		}
		if herr != nil {
			herr = fmt.Errorf("handle %d: %w", f.uid, herr)
			break
		}
		if f.res.Quarantine != nil {
			toQuarantine.AddNum(f.uid)
			quarantineUIDs = append(quarantineUIDs, f.uid)
		} else {
			toProcessed.AddNum(f.uid)
			processedUIDs = append(processedUIDs, f.uid)
		}
		handled++
	}
	var unmoved map[string][]imap.UID
	for _, mv := range []struct {
		set    imap.UIDSet
		uids   []imap.UID
		folder string
	}{{toProcessed, processedUIDs, processed}, {toQuarantine, quarantineUIDs, quarantine}} {
		if len(mv.set) == 0 {
			continue
		}
		if _, err := c.Move(mv.set, mv.folder).Wait(); err != nil {
			if unmoved == nil {
				unmoved = map[string][]imap.UID{}
			}
			unmoved[mv.folder] = mv.uids
			if herr == nil {
				herr = fmt.Errorf("move to %s: %w", mv.folder, err)
			}
		}
	}
	if w.o.Handled != nil {
		for _, f := range mails[:handled] {
			w.o.Handled(f.res)
		}
	}
	return handled, unmoved, herr
}

// leftovers are mails handled but not moved, by folder, in a mailbox of
// UIDVALIDITY Validity; kept in the store under leftoverKey.
type leftovers struct {
	Validity uint32                `json:"validity"`
	Moves    map[string][]imap.UID `json:"moves"` // folder → UIDs
}

func (w *Watcher) leftoverKey() string { return w.key() + ":unmoved" }

// recordLeftovers adds unmoved to the mails moved at the next session's
// start.
func (w *Watcher) recordLeftovers(ctx context.Context, validity uint32, unmoved map[string][]imap.UID) error {
	l := leftovers{Validity: validity, Moves: map[string][]imap.UID{}}
	if v, err := w.o.Store.Value(ctx, w.leftoverKey()); err == nil && v != "" {
		var old leftovers
		if json.Unmarshal([]byte(v), &old) == nil && old.Validity == validity {
			l.Moves = old.Moves
		}
	}
	for folder, uids := range unmoved {
		l.Moves[folder] = append(l.Moves[folder], uids...)
	}
	b, _ := json.Marshal(l)
	return w.o.Store.SetValue(ctx, w.leftoverKey(), string(b))
}

// moveLeftovers moves the mails a broken session handled but did not move
// (recordLeftovers), so that they are not fetched and handled again.
func (w *Watcher) moveLeftovers(ctx context.Context, c *imapclient.Client, validity uint32) error {
	v, err := w.o.Store.Value(ctx, w.leftoverKey())
	if err != nil || v == "" {
		return err
	}
	var l leftovers
	if err := json.Unmarshal([]byte(v), &l); err == nil && l.Validity == validity {
		for folder, uids := range l.Moves {
			if len(uids) == 0 {
				continue
			}
			// UIDs no longer in the mailbox are passed over by the server.
			if _, err := c.Move(imap.UIDSetNum(uids...), folder).Wait(); err != nil {
				return fmt.Errorf("move handled mail to %s: %w", folder, err)
			}
			w.log.Info("IMAP mail handled before a broken connection moved", "folder", folder, "mails", len(uids))
		}
	}
	return w.o.Store.SetValue(ctx, w.leftoverKey(), "")
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
