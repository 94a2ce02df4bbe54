package notify

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/store"
)

// sink records what the notifier sent by mail and by webhook.
type sink struct {
	mu    sync.Mutex
	mails []string
	posts []Payload
	auth  []string
}

func (k *sink) send(_ context.Context, from string, to []string, msg []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.mails = append(k.mails, string(msg))
	return nil
}

func (k *sink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var p Payload
	if err := json.Unmarshal(body, &p); err != nil {
		http.Error(w, "bad json", 400)
		return
	}
	k.mu.Lock()
	k.posts = append(k.posts, p)
	k.auth = append(k.auth, r.Header.Get("Authorization"))
	k.mu.Unlock()
}

func (k *sink) counts() (int, int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.mails), len(k.posts)
}

func start(t *testing.T, every time.Duration) (*store.Store, *sink, func()) {
	t.Helper()
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	k := &sink{}
	hook := httptest.NewServer(k)
	n, err := New(Options{Store: st, Logger: testlog.New(t, slog.LevelInfo), Site: "General Hospital",
		Mail:    &Mail{From: "edi@hospital.test", To: []string{"ops@hospital.test"}, Send: k.send},
		Webhook: &Webhook{URL: hook.URL, Token: "t0ken"},
		Gather:  300 * time.Millisecond, Every: every, Poll: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { n.Run(ctx); close(done) }()
	return st, k, func() { cancel(); <-done; hook.Close(); st.Close() }
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestOneAlertOneNotice: an alert is told once by mail and once by webhook,
// with what the alert holds, and once more when its outage clears.
func TestOneAlertOneNotice(t *testing.T) {
	st, k, stop := start(t, 200*time.Millisecond)
	defer stop()
	ctx := context.Background()
	if _, err := st.RaiseAlert(ctx, store.Alert{Kind: store.AlertOverdue, Partner: "tucker-lab", ControlID: "ORM-7",
		MessageID: "<hl7mail.7.ab@hospital.test>", Text: "receipt overdue"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "one mail and one post", func() bool { m, p := k.counts(); return m == 1 && p == 1 })
	time.Sleep(400 * time.Millisecond)
	if m, p := k.counts(); m != 1 || p != 1 {
		t.Fatalf("%d mails, %d posts; want one of each", m, p)
	}
	mail := k.mails[0]
	for _, want := range []string{"Subject: [hl7mail General Hospital] ALERT receipt-overdue: receipt overdue",
		"To: <ops@hospital.test>", "partner: tucker-lab", "control ID: ORM-7", "Message-ID: <hl7mail.7.ab@hospital.test>",
		"Auto-Submitted: auto-generated"} {
		if !strings.Contains(mail, want) {
			t.Errorf("notice mail lacks %q:\n%s", want, mail)
		}
	}
	if p := k.posts[0]; len(p.Alerts) != 1 || p.Alerts[0].State != "raised" || p.Alerts[0].ControlID != "ORM-7" ||
		k.auth[0] != "Bearer t0ken" {
		t.Errorf("webhook got %+v with %q", p, k.auth[0])
	}
	// An outage's alert, raised and cleared: a notice each.
	if _, _, err := st.RaiseOnce(ctx, "link:smtp", store.Alert{Kind: store.AlertLinkDown, Text: "mail submission fails"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the outage's notice", func() bool { m, _ := k.counts(); return m == 2 })
	if _, err := st.ClearAlert(ctx, "link:smtp"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the cleared notice", func() bool { m, p := k.counts(); return m == 3 && p == 3 })
	if !strings.Contains(k.mails[2], "Subject: [hl7mail General Hospital] cleared link-down") || k.posts[2].Alerts[0].State != "cleared" {
		t.Errorf("cleared notice:\n%s\n%+v", k.mails[2], k.posts[2])
	}
}

// TestDigest: twenty alerts within a minute are one notice.
func TestDigest(t *testing.T) {
	st, k, stop := start(t, time.Minute)
	defer stop()
	ctx := context.Background()
	for i := range 20 {
		if _, err := st.RaiseAlert(ctx, store.Alert{Kind: store.AlertFailed, Partner: "tucker-lab",
			ControlID: fmt.Sprintf("ORU-%d", i), Text: "message failed: refused by the SMTP server"}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a notice", func() bool { m, p := k.counts(); return m == 1 && p == 1 })
	for range 3 {
		st.RaiseAlert(ctx, store.Alert{Kind: store.AlertFailed, Partner: "tucker-lab", Text: "message failed"})
	}
	time.Sleep(600 * time.Millisecond)
	if m, p := k.counts(); m != 1 || p != 1 {
		t.Fatalf("%d mails, %d posts within the minute; want one digest of each", m, p)
	}
	if !strings.Contains(k.mails[0], "digest: 20 alerts, 0 cleared") || len(k.posts[0].Alerts) != 20 ||
		strings.Count(k.mails[0], "raised alert ") != 20 {
		t.Errorf("digest: %d alerts posted; mail:\n%s", len(k.posts[0].Alerts), k.mails[0])
	}
}

// TestRetried: a webhook that fails is tried again; the mail is not sent
// twice meanwhile.
func TestRetried(t *testing.T) {
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	k := &sink{}
	var mu sync.Mutex
	fails := 2
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if fails > 0 {
			fails--
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		k.ServeHTTP(w, r)
	}))
	defer hook.Close()
	n, _ := New(Options{Store: st, Logger: testlog.New(t, slog.LevelInfo), Site: "h",
		Mail: &Mail{From: "edi@hospital.test", To: []string{"ops@hospital.test"}, Send: k.send}, Webhook: &Webhook{URL: hook.URL},
		Gather: time.Millisecond, Poll: 5 * time.Millisecond, RetryBase: 10 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { n.Run(ctx); close(done) }()
	st.RaiseAlert(ctx, store.Alert{Kind: store.AlertStuck, Text: "message not delivered to the router"})
	waitFor(t, "the post after two failures", func() bool { _, p := k.counts(); return p == 1 })
	cancel()
	<-done
	if m, _ := k.counts(); m != 1 {
		t.Errorf("%d mails, want 1", m)
	}
	if pending, _ := st.PendingNotices(context.Background(), 0); len(pending.Raised) != 0 {
		t.Errorf("alert still pending after its notices: %+v", pending)
	}
}
