package inbound

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapclient"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"

	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// imapServer is go-imap's in-memory server with one account.
type imapServer struct {
	mem  *imapmemserver.Server
	srv  *imapserver.Server
	addr string
	tls  *tls.Config // client side, when the server wants STARTTLS
}

func startIMAP(t *testing.T, mem *imapmemserver.Server, addr string) *imapServer {
	t.Helper()
	return startIMAPWith(t, mem, addr, imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapIMAP4rev2: {}}, nil)
}

// startIMAPWith starts the server with the given capabilities, offering
// STARTTLS when tlsConfig is set.
func startIMAPWith(t *testing.T, mem *imapmemserver.Server, addr string, caps imap.CapSet, tlsConfig *tls.Config) *imapServer {
	t.Helper()
	if mem == nil {
		mem = imapmemserver.New()
		u := imapmemserver.NewUser("lab@partner.test", "secret")
		u.Create("INBOX", nil)
		mem.AddUser(u)
	}
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return mem.NewSession(), nil, nil
		},
		Caps:         caps,
		TLSConfig:    tlsConfig,
		InsecureAuth: tlsConfig == nil,
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	s := &imapServer{mem: mem, srv: srv, addr: ln.Addr().String()}
	t.Cleanup(func() { srv.Close() })
	return s
}

// client logs in to the test account.
func (s *imapServer) client(t *testing.T) *imapclient.Client {
	t.Helper()
	var c *imapclient.Client
	var err error
	if s.tls != nil {
		c, err = imapclient.DialStartTLS(s.addr, &imapclient.Options{TLSConfig: s.tls})
	} else {
		c, err = imapclient.DialInsecure(s.addr, nil)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Login("lab@partner.test", "secret").Wait(); err != nil {
		t.Fatal(err)
	}
	return c
}

func (s *imapServer) deliver(t *testing.T, mail []byte) {
	t.Helper()
	c := s.client(t)
	defer c.Close()
	cmd := c.Append("INBOX", int64(len(mail)), nil)
	cmd.Write(mail)
	cmd.Close()
	if _, err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
}

func (s *imapServer) count(t *testing.T, mailbox string) int {
	t.Helper()
	c := s.client(t)
	defer c.Close()
	st, err := c.Status(mailbox, &imap.StatusOptions{NumMessages: true}).Wait()
	if err != nil {
		return -1
	}
	return int(*st.NumMessages)
}

func TestWatcher(t *testing.T) {
	l := newLabSide(t)
	is := startIMAP(t, nil, "127.0.0.1:0")
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	var mu sync.Mutex
	handled := 0
	run := func(addr string) func() {
		w, err := NewWatcher(WatcherOptions{Addr: addr, TLS: "none", Username: "lab@partner.test", Password: "secret",
			Mailbox: "INBOX", Processed: "HL7/Processed", Quarantine: "HL7/Quarantine", Poll: 30 * time.Second,
			Receiver: r, Store: st, Logger: testlog.New(t, slog.LevelInfo),
			Handled: func(Result) { mu.Lock(); handled++; mu.Unlock() }})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { w.Run(ctx); close(done) }()
		return func() { cancel(); <-done }
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return handled }

	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	good, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	forged, _ := l.mailFrom(t, "edi@hospital.test", l.clinic, edi, false)
	is.deliver(t, good)
	is.deliver(t, forged)
	stop := run(is.addr)
	mailtest.WaitFor(t, "two mails handled", func() bool { return count() == 2 })
	if is.count(t, "INBOX") != 0 || is.count(t, "HL7/Processed") != 1 || is.count(t, "HL7/Quarantine") != 1 {
		t.Errorf("folders: INBOX %d, processed %d, quarantine %d", is.count(t, "INBOX"), is.count(t, "HL7/Processed"), is.count(t, "HL7/Quarantine"))
	}

	// New mail is noticed while idling, well before the 30s poll. The
	// in-memory server sends during IDLE only what arrives after IDLE began
	// (an update queued just before waits for the next command, which the
	// watcher's periodic UID search provides); so let the watcher settle
	// into IDLE first.
	time.Sleep(300 * time.Millisecond)
	second := []byte(string(good))
	second = []byte(strings.Replace(string(second), "<m1@x.test>", "<m2@x.test>", 1))
	start := time.Now()
	is.deliver(t, second)
	mailtest.WaitFor(t, "the mail delivered during IDLE", func() bool { return count() == 3 })
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("IDLE took %s to notice new mail", d)
	}
	stop()

	// A restart repeats nothing.
	stop = run(is.addr)
	time.Sleep(300 * time.Millisecond)
	if n := count(); n != 3 {
		t.Errorf("after a restart %d mails handled, want still 3", n)
	}
	stop()

	// The server goes away and comes back: the watcher reconnects.
	stop = run(is.addr)
	time.Sleep(200 * time.Millisecond)
	is.srv.Close()
	is2 := startIMAP(t, is.mem, is.addr)
	third := []byte(strings.Replace(string(good), "<m1@x.test>", "<m3@x.test>", 1))
	is2.deliver(t, third)
	mailtest.WaitFor(t, "the mail after the server came back", func() bool { return count() == 4 })
	stop()
	if list, _ := st.List(context.Background(), store.Filter{Direction: store.Inbound}); len(list) != 3 {
		t.Errorf("%d inbound messages stored, want 3", len(list))
	}
}

// TestWatcherStartTLSPolling: a server with neither IDLE nor MOVE, reached
// over STARTTLS: the watcher polls, and moves mail by COPY and EXPUNGE.
func TestWatcherStartTLSPolling(t *testing.T) {
	l := newLabSide(t)
	cert, pool := mailtest.ServerCert(t)
	is := startIMAPWith(t, nil, "127.0.0.1:0", imap.CapSet{imap.CapIMAP4rev1: {}},
		&tls.Config{Certificates: []tls.Certificate{cert}})
	is.tls = &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	done := make(chan Result, 4)
	w, err := NewWatcher(WatcherOptions{Addr: is.addr, TLS: "starttls", TLSConfig: is.tls,
		Username: "lab@partner.test", Password: "secret", Mailbox: "INBOX", Processed: "HL7/Processed",
		Quarantine: "HL7/Quarantine", Poll: 200 * time.Millisecond, Receiver: r, Store: st,
		Logger: testlog.New(t, slog.LevelInfo), Handled: func(res Result) { done <- res }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { w.Run(ctx); close(stopped) }()
	defer func() { cancel(); <-stopped }()
	time.Sleep(300 * time.Millisecond) // connected and polling
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	good, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	is.deliver(t, good)
	select {
	case res := <-done:
		if res.ID == 0 || res.Quarantine != nil {
			t.Errorf("handled: %+v", res)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("mail not handled by polling within 10s")
	}
	mailtest.WaitFor(t, "the mail moved", func() bool { return is.count(t, "INBOX") == 0 && is.count(t, "HL7/Processed") == 1 })
}

// TestWatcherOversize: a mail over the limit is not fetched whole: its
// header is, journalled as the evidence that it came, and it is
// quarantined as oversize with an alert; the known partner that asked for a
// receipt gets a "denied" MDN.
func TestWatcherOversize(t *testing.T) {
	l := newLabSide(t)
	is := startIMAP(t, nil, "127.0.0.1:0")
	r, jpath := l.receiver(t)
	st := r.Store.(*store.Store)
	big := "From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: <big@x.test>\r\nSubject: HL7\r\n" +
		"Disposition-Notification-To: edi@hospital.test\r\nMIME-Version: 1.0\r\nContent-Type: application/edi-hl7\r\n\r\n" +
		strings.Repeat("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n", 4000)
	is.deliver(t, []byte(big))
	handled := make(chan Result, 1)
	w, err := NewWatcher(WatcherOptions{Addr: is.addr, TLS: "none", Username: "lab@partner.test", Password: "secret",
		Mailbox: "INBOX", Processed: "HL7/Processed", Quarantine: "HL7/Quarantine", Poll: 30 * time.Second, MaxSize: 64 << 10,
		Receiver: r, Store: st, Logger: testlog.New(t, slog.LevelInfo), Handled: func(res Result) { handled <- res }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	var res Result
	select {
	case res = <-handled:
	case <-time.After(10 * time.Second):
		t.Fatal("the oversize mail was not handled within 10s")
	}
	if res.Quarantine == nil || res.Quarantine.Reason != ReasonOversize || res.Quarantine.Partner == nil {
		t.Fatalf("result %+v, want quarantined as oversize, from the partner", res)
	}
	if is.count(t, "HL7/Quarantine") != 1 {
		t.Errorf("the mail is not in the quarantine folder")
	}
	journal, err := os.ReadFile(jpath)
	if err != nil || !strings.Contains(string(journal), "Message-ID: <big@x.test>") || len(journal) > len(big)/2 {
		t.Errorf("incoming journal holds %d bytes, %v; want the header only", len(journal), err)
	}
	alerts, _ := st.Alerts(ctx, false, 10)
	if len(alerts) != 1 || alerts[0].Kind != store.AlertQuarantine || !strings.Contains(alerts[0].Text, "oversize") {
		t.Errorf("alerts %+v, want one for the quarantined mail", alerts)
	}
	out, _ := st.List(ctx, store.Filter{Direction: store.Outbound})
	if len(out) != 1 {
		t.Fatalf("outbound %+v, want the denied receipt", out)
	}
	m, _ := st.Get(ctx, out[0].ID)
	if mdn, err := security.ParseMDN(m.Payload); err != nil || mdn.Disposition.Type != security.Denied || mdn.OriginalMessageID != "<big@x.test>" {
		t.Errorf("receipt %+v, %v; want denied for <big@x.test>", mdn, err)
	}
}

// TestWatcherChunks: 40 mails wait in the mailbox, one too large and one
// signed by another partner among them. They are fetched and opened in
// chunks, and taken in the order they came: each stored message in UID
// order, the refused two quarantined, every mail moved once.
func TestWatcherChunks(t *testing.T) {
	l := newLabSide(t)
	is := startIMAP(t, nil, "127.0.0.1:0")
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	var want []string
	for i := range 40 {
		id := fmt.Sprintf("c%02d", i)
		var mail []byte
		switch i {
		case 17:
			mail = []byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: <big@x.test>\r\nSubject: HL7\r\n" +
				"MIME-Version: 1.0\r\nContent-Type: application/edi-hl7\r\n\r\n" + strings.Repeat("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\r\n", 4000))
		default:
			signer := l.hospital
			if i == 29 {
				signer = l.clinic // not the hospital's key: refused
			} else {
				want = append(want, id)
			}
			edi, _ := security.EncodeEDI([]byte(strings.Replace(orm, "|q1|", "|"+id+"|", 1)), security.EDIOptions{})
			mail, _ = l.mailFrom(t, "edi@hospital.test", signer, edi, false)
			mail = []byte(strings.Replace(string(mail), "<m1@x.test>", "<"+id+"@x.test>", 1))
		}
		is.deliver(t, mail)
	}
	var mu sync.Mutex
	handled := 0
	w, err := NewWatcher(WatcherOptions{Addr: is.addr, TLS: "none", Username: "lab@partner.test", Password: "secret",
		Mailbox: "INBOX", Processed: "HL7/Processed", Quarantine: "HL7/Quarantine", Poll: 30 * time.Second, MaxSize: 64 << 10,
		Receiver: r, Store: st, Logger: testlog.New(t, slog.LevelWarn),
		Handled: func(Result) { mu.Lock(); handled++; mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	mailtest.WaitFor(t, "40 mails handled", func() bool { mu.Lock(); defer mu.Unlock(); return handled == 40 })
	cancel()
	<-done
	if is.count(t, "INBOX") != 0 || is.count(t, "HL7/Processed") != 38 || is.count(t, "HL7/Quarantine") != 2 {
		t.Errorf("folders: INBOX %d, processed %d, quarantine %d; want 0, 38, 2", is.count(t, "INBOX"),
			is.count(t, "HL7/Processed"), is.count(t, "HL7/Quarantine"))
	}
	list, _ := st.List(context.Background(), store.Filter{Direction: store.Inbound})
	var got []string
	for i := len(list) - 1; i >= 0; i-- { // List is newest first
		got = append(got, list[i].ControlID)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("stored in this order:\n%v\nwant\n%v", got, want)
	}
}

// failingMove is the in-memory server's session whose first MOVE fails.
type failingMove struct {
	imapserver.SessionIMAP4rev2
	failed *atomic.Bool
}

func (s failingMove) Move(w *imapserver.MoveWriter, numSet imap.NumSet, dest string) error {
	if s.failed.CompareAndSwap(false, true) {
		return &imap.Error{Type: imap.StatusResponseTypeNo, Text: "try again"}
	}
	return s.SessionIMAP4rev2.Move(w, numSet, dest)
}

// TestWatcherMoveFails: a chunk is taken and its MOVE fails (the server
// says NO, as when the connection breaks). The next session moves those
// mails before anything else: none is handled twice, no replay is
// quarantined and no response is sent again.
func TestWatcherMoveFails(t *testing.T) {
	l := newLabSide(t)
	mem := imapmemserver.New()
	u := imapmemserver.NewUser("lab@partner.test", "secret")
	u.Create("INBOX", nil)
	mem.AddUser(u)
	var failed atomic.Bool
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(*imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			return failingMove{SessionIMAP4rev2: mem.NewSession().(imapserver.SessionIMAP4rev2), failed: &failed}, nil, nil
		},
		Caps:         imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapIMAP4rev2: {}},
		InsecureAuth: true,
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	is := &imapServer{mem: mem, srv: srv, addr: ln.Addr().String()}
	for i := range 5 {
		id := fmt.Sprintf("mv%d", i)
		edi, _ := security.EncodeEDI([]byte(strings.Replace(orm, "|q1|", "|"+id+"|", 1)), security.EDIOptions{})
		mail, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
		is.deliver(t, []byte(strings.Replace(string(mail), "<m1@x.test>", "<"+id+"@x.test>", 1)))
	}
	r, _ := l.receiver(t)
	st := r.Store.(*store.Store)
	var mu sync.Mutex
	handled := 0
	w, err := NewWatcher(WatcherOptions{Addr: is.addr, TLS: "none", Username: "lab@partner.test", Password: "secret",
		Mailbox: "INBOX", Processed: "HL7/Processed", Quarantine: "HL7/Quarantine", Poll: 30 * time.Second,
		Receiver: r, Store: st, Logger: testlog.New(t, slog.LevelWarn),
		Handled: func(Result) { mu.Lock(); handled++; mu.Unlock() }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	mailtest.WaitFor(t, "the five mails moved", func() bool { return is.count(t, "HL7/Processed") == 5 })
	time.Sleep(200 * time.Millisecond)
	cancel()
	<-done
	if !failed.Load() {
		t.Fatal("the MOVE never failed")
	}
	mu.Lock()
	defer mu.Unlock()
	q, _ := st.QuarantineList(context.Background(), 10)
	if handled != 5 || len(q) != 0 || is.count(t, "INBOX") != 0 {
		t.Errorf("%d mails handled, %d quarantined, %d left in INBOX; want 5, none, none", handled, len(q), is.count(t, "INBOX"))
	}
}
