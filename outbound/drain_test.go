package outbound

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/store"
)

// subjectIDs returns the control ID each mail's Subject names.
func subjectIDs(t *testing.T, data [][]byte) []string {
	t.Helper()
	var out []string
	for _, d := range data {
		h := header(t, d)
		s := h.Get("Subject")
		out = append(out, s[strings.LastIndex(s, " ")+1:])
	}
	return out
}

// TestDrainInOrder: 300 messages for the lab and 30 for the clinic, sealed
// ahead on four sealers through a small window: each partner's mails reach
// the server in the order they were accepted, many on one session (at most
// SessionMails each), each journalled once and marked sent.
func TestDrainInOrder(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	var want []string
	for i := range 300 {
		id := fmt.Sprintf("o%03d", i)
		f.accept(t, "lab", id)
		want = append(want, id)
		if i%10 == 0 {
			f.accept(t, "clinic", fmt.Sprintf("c%03d", i))
		}
	}
	s, stop := f.start(t, SenderOptions{Submitter: &SMTPSubmitter{Addr: addr, TLS: "none", Timeout: 10 * time.Second},
		Window: 16, Group: 8, Sealers: 4, SessionMails: 50, SessionIdle: time.Minute})
	defer stop()
	mailtest.WaitFor(t, "330 mails", func() bool { return srv.Count() == 330 })
	stop()

	var lab [][]byte
	perSession := map[int]int{}
	for _, m := range srv.Mails() {
		if m.To[0] == "lab@partner.test" {
			lab = append(lab, m.Data)
			perSession[m.Session]++
		}
	}
	if got := subjectIDs(t, lab); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("the lab's mails came in this order:\n%v", got)
	}
	if n := s.Sessions("lab"); n != 6 || len(perSession) != 6 {
		t.Errorf("the lab's 300 mails went on %d sessions (%d seen by the server: %v), want 6 of 50", n, len(perSession), perSession)
	}
	for sess, n := range perSession {
		if n > 50 {
			t.Errorf("session %d carried %d mails, more than SessionMails", sess, n)
		}
	}
	entries, err := journal.Read(f.journal)
	if err != nil || len(entries) != 330 {
		t.Fatalf("journal: %d entries, %v; want 330", len(entries), err)
	}
	digests, _ := f.st.JournalDigests(context.Background(), "outgoing.mbox")
	if len(digests) != 330 {
		t.Errorf("%d journal entries indexed, want 330", len(digests))
	}
	sent, _ := f.st.List(context.Background(), store.Filter{State: store.Sent})
	if len(sent) != 330 {
		t.Errorf("%d messages sent, want 330", len(sent))
	}
}

// failingOpener fails the transaction of the mail whose Subject names
// control ID once, with 451, as a server putting one mail off does.
type failingOpener struct {
	SMTPSubmitter
	mu     sync.Mutex
	fail   string
	failed int
}

func (o *failingOpener) Open(ctx context.Context) (Session, error) {
	s, err := o.SMTPSubmitter.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &failingSession{Session: s, o: o}, nil
}

type failingSession struct {
	Session
	o *failingOpener
}

func (x *failingSession) Submit(ctx context.Context, from string, to []string, m []byte, opts SubmitOptions) error {
	x.o.mu.Lock()
	hit := x.o.failed == 0 && strings.Contains(string(m), " "+x.o.fail+"\r\n")
	if hit {
		x.o.failed++
	}
	x.o.mu.Unlock()
	if hit {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
	}
	return x.Session.Submit(ctx, from, to, m, opts)
}

// TestDrainRetryKeepsOrder: the server puts off one mail in the middle of
// a group: the mails after it, sealed already, wait for it; it goes after
// its retry and the rest follow in order, each sent once.
func TestDrainRetryKeepsOrder(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	var want []string
	for i := range 40 {
		id := fmt.Sprintf("r%02d", i)
		f.accept(t, "lab", id)
		want = append(want, id)
	}
	sub := &failingOpener{SMTPSubmitter: SMTPSubmitter{Addr: addr, TLS: "none", Timeout: 10 * time.Second}, fail: "r13"}
	_, stop := f.start(t, SenderOptions{Submitter: sub, Window: 32, Group: 16, Sealers: 4, RetryBase: 50 * time.Millisecond,
		RetryMax: 50 * time.Millisecond})
	defer stop()
	mailtest.WaitFor(t, "40 mails", func() bool { return srv.Count() == 40 })
	stop()
	var data [][]byte
	for _, m := range srv.Mails() {
		data = append(data, m.Data)
	}
	if got := subjectIDs(t, data); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("mails came in this order:\n%v", got)
	}
	list, _ := f.st.List(context.Background(), store.Filter{})
	for _, m := range list {
		attempts, _, _, _ := f.st.Delivery(context.Background(), m.ID)
		if wantN := map[bool]int{true: 2, false: 1}[m.ControlID == "r13"]; attempts != wantN || m.State != store.Sent {
			t.Errorf("%s: %s after %d attempts, want sent after %d", m.ControlID, m.State, attempts, wantN)
		}
	}
}

// TestSessionEndedByServer: the server goes away while the sender keeps
// its session open (a restart, its idle timeout). The next mail goes on a
// new session at once: no retry, no alert.
func TestSessionEndedByServer(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	f.accept(t, "lab", "s1")
	s, stop := f.start(t, SenderOptions{Submitter: &SMTPSubmitter{Addr: addr, TLS: "none", Timeout: 10 * time.Second},
		SessionIdle: time.Hour, RetryBase: time.Hour, RetryMax: time.Hour})
	defer stop()
	mailtest.WaitFor(t, "the first mail", func() bool { return srv.Count() == 1 })
	srv.Close()
	srv2, _ := newSMTP(t, addr)
	f.accept(t, "lab", "s2")
	s.Notify("lab")
	mailtest.WaitFor(t, "the second mail, on a new session", func() bool { return srv2.Count() == 1 })
	stop()
	if n := s.Sessions("lab"); n != 2 {
		t.Errorf("%d sessions opened, want 2", n)
	}
	list, _ := f.st.List(context.Background(), store.Filter{State: store.Sent})
	for _, m := range list {
		if attempts, _, _, _ := f.st.Delivery(context.Background(), m.ID); attempts != 1 {
			t.Errorf("%s: %d attempts, want 1", m.ControlID, attempts)
		}
	}
	if alerts, _ := f.st.Alerts(context.Background(), true, 0); len(alerts) != 0 || len(list) != 2 {
		t.Errorf("%d sent, alerts %+v; want 2 sent and no alert", len(list), alerts)
	}
}

// TestSessionIdleClose: a session unused for SessionIdle is closed by the
// sender (QUIT), not left to the server's timeout.
func TestSessionIdleClose(t *testing.T) {
	f := newFixture(t, nil)
	srv, addr := newSMTP(t, "127.0.0.1:0")
	f.accept(t, "lab", "i1")
	_, stop := f.start(t, SenderOptions{Submitter: &SMTPSubmitter{Addr: addr, TLS: "none", Timeout: 10 * time.Second},
		SessionIdle: 100 * time.Millisecond})
	defer stop()
	mailtest.WaitFor(t, "the mail", func() bool { return srv.Count() == 1 })
	mailtest.WaitFor(t, "the session's QUIT", func() bool { return srv.Open() == 0 })
}

// TestOutageTriesOneAlone: with the SMTP server gone, a queue of 50 waits
// with backoff; after the first attempt, each attempt seals and journals
// the first message alone, not a group ahead of it.
func TestOutageTriesOneAlone(t *testing.T) {
	f := newFixture(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there
	for i := range 50 {
		f.accept(t, "lab", fmt.Sprintf("d%02d", i))
	}
	_, stop := f.start(t, SenderOptions{Submitter: &SMTPSubmitter{Addr: addr, TLS: "none", Timeout: time.Second},
		RetryBase: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond})
	defer stop()
	ctx := context.Background()
	list, _ := f.st.List(ctx, store.Filter{})
	first := list[len(list)-1].ID // List is newest first
	attempts := func() int { n, _, _, _ := f.st.Delivery(ctx, first); return n }
	mailtest.WaitFor(t, "five attempts", func() bool { return attempts() >= 5 })
	stop()
	entries, _ := journal.Read(f.journal)
	if n := attempts(); len(entries) > 32+n {
		t.Errorf("%d attempts journalled %d mails; want at most one group, then one an attempt", n, len(entries))
	}
}

// TestDrainPastRefusedGroup: the server refuses for good every mail of the
// first group (550 after the data); those fail, and the rest of the queue
// goes on, on the same session. (The next group is prepared once the
// first went through, not only once the server took a mail.)
func TestDrainPastRefusedGroup(t *testing.T) {
	f := newFixture(t, nil)
	srv := &scripted{pipelining: true, refuse: 32}
	addr := srv.serve(t)
	for i := range 40 {
		f.accept(t, "lab", fmt.Sprintf("r%02d", i))
	}
	_, stop := f.run(t, addr, nil)
	defer stop()
	ctx := context.Background()
	mailtest.WaitFor(t, "every message sent or failed", func() bool {
		sent, _ := f.st.List(ctx, store.Filter{State: store.Sent})
		failed, _ := f.st.List(ctx, store.Filter{State: store.Failed})
		return len(sent)+len(failed) == 40
	})
	failed, _ := f.st.List(ctx, store.Filter{State: store.Failed})
	if n := srv.queued(); len(failed) != 32 || n != 8 {
		t.Errorf("%d failed and %d taken by the server, want 32 and 8", len(failed), n)
	}
}
