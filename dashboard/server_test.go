package dashboard

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/store"
)

// fakeInstance is a gateway reduced to its store and configuration.
type fakeInstance struct {
	cfg      *config.Config
	st       *store.Store
	released []int64
	notReady error
	received [][]byte
	reloads  int
}

func (f *fakeInstance) Config() *config.Config                        { return f.cfg }
func (f *fakeInstance) Records() Store                                { return f.st }
func (f *fakeInstance) Cluster(context.Context) (*ClusterView, error) { return nil, nil }

func (f *fakeInstance) Keys() []KeyRow {
	return []KeyRow{{Party: "self", Field: "self.pgp_key", Kind: "pgp", Status: "active", Roles: []string{"sign", "decrypt"},
		To: time.Date(2028, 1, 2, 0, 0, 0, 0, time.UTC)}}
}
func (f *fakeInstance) Connections(string) int  { return 2 }
func (f *fakeInstance) SMTPStatus() link.Status { return link.Status{State: "up"} }
func (f *fakeInstance) IMAPStatus() link.Status {
	return link.Status{State: "down", LastError: "connect: refused", Errors: 3}
}
func (f *fakeInstance) IMAPStatusFor(string) link.Status          { return f.IMAPStatus() }
func (f *fakeInstance) Retry(ctx context.Context, id int64) error { return f.st.Retry(ctx, id) }
func (f *fakeInstance) RetryAll(ctx context.Context, partner string) (int, error) {
	counts, err := f.st.RetryAll(ctx, partner)
	n := 0
	for _, k := range counts {
		n += k
	}
	return n, err
}
func (f *fakeInstance) Reload(context.Context) error { f.reloads++; return nil }
func (f *fakeInstance) Release(ctx context.Context, id int64, by, note string) (int64, error) {
	f.released = append(f.released, id)
	return 99, f.st.MarkReleased(ctx, id, by, note, 99)
}
func (f *fakeInstance) Ready() error { return f.notReady }
func (f *fakeInstance) ReceiveOversize(ctx context.Context, header []byte, size int64) (inbound.Result, error) {
	f.received = append(f.received, header)
	return inbound.Result{Quarantine: &inbound.QuarantineError{Reason: inbound.ReasonOversize}}, nil
}
func (f *fakeInstance) Receive(ctx context.Context, raw []byte, to string) (inbound.Result, error) {
	f.received = append(f.received, raw)
	if bytes.Contains(raw, []byte("fail")) {
		return inbound.Result{}, errors.New("incoming journal: disk full")
	}
	return inbound.Result{ID: 7}, nil
}

func newInstance(t *testing.T) *fakeInstance {
	t.Helper()
	dir := t.TempDir()
	cfg, err := config.Parse(filepath.Join(dir, "partners.yaml"), []byte(`self: {name: general-hospital, email: edi@hospital.test, pgp_key: k}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: tucker-lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: pgp, pgp_key: k}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: pgp, pgp_key: k}
`))
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(store.Options{Dir: filepath.Join(dir, "store"), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &fakeInstance{cfg: cfg, st: st}
}

func newServer(t *testing.T, o Options) (*Server, *httptest.Server) {
	t.Helper()
	if o.Addr == "" {
		o.Addr = "127.0.0.1:0"
	}
	if o.Logger == nil {
		o.Logger = testlog.New(t, slog.LevelDebug)
	}
	s, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	changeToken = s.Token()
	t.Cleanup(func() {
		close(s.quit)
		ts.Close()
	})
	return s, ts
}

func get(t *testing.T, url string, v any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if v != nil && resp.StatusCode == 200 {
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
	}
	return resp.StatusCode
}

func post(t *testing.T, url, body string) (int, string) {
	t.Helper()
	return postAs(t, url, "application/json", body)
}

// changeToken is the token of the server newServer made last: every change
// needs it (the tests run one at a time).
var changeToken string

// postAs POSTs body of type ct with the server's token.
func postAs(t *testing.T, url, ct, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, strings.NewReader(body))
	req.Header.Set("Content-Type", ct)
	req.Header.Set("Authorization", "Bearer "+changeToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestToken(t *testing.T) {
	inst := newInstance(t)
	for _, addr := range []string{"0.0.0.0:8025", "192.0.2.1:8025", "[::]:8025"} {
		if _, err := New(Options{Addr: addr, Instance: inst}); !errors.Is(err, ErrNoToken) {
			t.Errorf("New(%s, no token) = %v, want ErrNoToken", addr, err)
		}
	}
	if _, err := New(Options{Addr: "0.0.0.0:8025", Instance: inst, Token: "s3cret"}); err != nil {
		t.Errorf("New(0.0.0.0 with a token) = %v", err)
	}
	_, ts := newServer(t, Options{Instance: inst, Token: "s3cret"})
	for _, path := range []string{"/", "/api/overview", "/api/log", "/metrics", "/healthz", "/readyz", "/app.js"} {
		if code := get(t, ts.URL+path, nil); code != http.StatusUnauthorized {
			t.Errorf("GET %s without token = %d, want 401", path, code)
		}
		if code := get(t, ts.URL+path+"?token=wrong", nil); code != http.StatusUnauthorized {
			t.Errorf("GET %s with a wrong token = %d, want 401", path, code)
		}
	}
	if resp, _ := http.Post(ts.URL+"/api/alerts/1/ack", "application/json", strings.NewReader(`{"by":"x"}`)); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST without token = %d, want 401", resp.StatusCode)
	}
	req, _ := http.NewRequest("GET", ts.URL+"/api/overview", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET with the bearer token = %v, %v", resp, err)
	}
	// ?token= once sets a cookie that carries the page's later requests.
	resp, err := http.Get(ts.URL + "/?token=s3cret")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /?token= = %v, %v", resp, err)
	}
	resp.Body.Close()
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == tokenCookie {
			cookie = c
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.SameSite != http.SameSiteStrictMode {
		t.Fatalf("cookie = %+v", cookie)
	}
	req, _ = http.NewRequest("GET", ts.URL+"/api/alerts", nil)
	req.AddCookie(cookie)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Errorf("GET with the cookie = %v, %v", resp, err)
	}
}

func TestAPI(t *testing.T) {
	inst := newInstance(t)
	ctx := context.Background()
	st := inst.st
	a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "tucker-lab", ControlID: "CTL-1",
		MessageType: "ORM^O01", Payload: []byte("MSH|...")})
	st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "clinic", ControlID: "CTL-2",
		MessageType: "ORU^R01", Payload: []byte("MSH|...")})
	st.MarkFinal(ctx, a.ID, store.Failed, "550 no such user")
	alertID, _ := st.RaiseAlert(ctx, store.Alert{Kind: store.AlertFailed, Partner: "tucker-lab", ControlID: "CTL-1", Text: "message failed"})
	qid, _ := st.Quarantine(ctx, store.Quarantined{Partner: "clinic", Sender: "edi@clinic.test", MessageID: "<q@c>",
		Reason: "unknown-signer", Detail: "key 0xAB", Raw: []byte("x")})
	_, ts := newServer(t, Options{Instance: inst})

	var o Overview
	if code := get(t, ts.URL+"/api/overview", &o); code != 200 {
		t.Fatalf("overview: %d", code)
	}
	if o.Self != "general-hospital" || o.OpenAlerts != 1 || len(o.Partners) != 2 || o.IMAP.State != "down" || o.SMTP.State != "up" {
		t.Errorf("overview = %+v", o)
	}
	lab := o.Partners[0]
	if lab.Name != "tucker-lab" || lab.Listen != "127.0.0.1:9012" || lab.Connections != 2 || lab.OutToday != 1 || lab.Failed != 1 {
		t.Errorf("tucker-lab row = %+v", lab)
	}
	if c := o.Partners[1]; c.Name != "clinic" || c.QueuedOut != 1 || c.Quarantined != 1 {
		t.Errorf("clinic row = %+v", c)
	}

	var msgs []store.Message
	get(t, ts.URL+"/api/messages?q=CTL-1", &msgs)
	if len(msgs) != 1 || msgs[0].ControlID != "CTL-1" || msgs[0].State != store.Failed {
		t.Errorf("search CTL-1 = %+v", msgs)
	}
	get(t, ts.URL+"/api/messages?q=clinic", &msgs)
	if len(msgs) != 1 || msgs[0].Partner != "clinic" {
		t.Errorf("search clinic = %+v", msgs)
	}

	// Changes need a JSON body: a cross-site form cannot send one.
	if code, _ := postAs(t, ts.URL+"/api/messages/1/retry", "application/x-www-form-urlencoded", "a=b"); code != http.StatusUnsupportedMediaType {
		t.Errorf("form POST = %d, want 415", code)
	}
	// A change without the token is refused, even on loopback.
	if resp, _ := http.Post(ts.URL+"/api/messages/1/retry", "application/json", strings.NewReader("{}")); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST without the token = %d, want 401", resp.StatusCode)
	}
	if code, body := post(t, ts.URL+"/api/messages/2/retry", `{}`); code != http.StatusConflict {
		t.Errorf("retry of a queued message = %d %s, want 409", code, body)
	}
	if code, body := post(t, ts.URL+"/api/messages/1/retry", `{}`); code != 200 {
		t.Errorf("retry = %d %s", code, body)
	}
	if m, _ := st.Get(ctx, a.ID); m.State != store.Queued {
		t.Errorf("after retry the message is %s", m.State)
	}
	if code, _ := post(t, ts.URL+"/api/messages/77/retry", `{}`); code != http.StatusNotFound {
		t.Errorf("retry of an unknown message = %d, want 404", code)
	}

	if code, _ := post(t, ts.URL+"/api/alerts/1/ack", `{}`); code != http.StatusBadRequest {
		t.Errorf("ack without who = %d, want 400", code)
	}
	if code, body := post(t, ts.URL+"/api/alerts/1/ack", `{"by":"night shift"}`); code != 200 {
		t.Errorf("ack = %d %s", code, body)
	}
	var alerts []store.Alert
	get(t, ts.URL+"/api/alerts", &alerts)
	if len(alerts) != 0 {
		t.Errorf("open alerts after ack = %+v", alerts)
	}
	get(t, ts.URL+"/api/alerts?all=1", &alerts)
	if len(alerts) != 1 || alerts[0].ID != alertID || alerts[0].AckedBy != "night shift" {
		t.Errorf("all alerts = %+v", alerts)
	}

	if code, _ := post(t, ts.URL+"/api/quarantine/1/release", `{"by":"j.smith"}`); code != http.StatusBadRequest {
		t.Errorf("release without a note = %d, want 400", code)
	}
	if code, body := post(t, ts.URL+"/api/quarantine/1/release", `{"by":"j.smith","note":"key confirmed"}`); code != 200 ||
		!strings.Contains(body, `"message": 99`) {
		t.Errorf("release = %d %s", code, body)
	}
	if code, _ := post(t, ts.URL+"/api/quarantine/1/release", `{"by":"j.smith","note":"again"}`); code != http.StatusConflict {
		t.Errorf("second release = %d, want 409", code)
	}
	var qs []store.Quarantined
	get(t, ts.URL+"/api/quarantine", &qs)
	if len(qs) != 1 || qs[0].ID != qid || qs[0].ReleasedBy != "j.smith" {
		t.Errorf("quarantine = %+v", qs)
	}

	if code := get(t, ts.URL+"/healthz", nil); code != 200 {
		t.Errorf("healthz = %d", code)
	}
	if code := get(t, ts.URL+"/readyz", nil); code != 200 {
		t.Errorf("readyz = %d", code)
	}
	inst.notReady = errors.New("shutting down")
	if code := get(t, ts.URL+"/readyz", nil); code != http.StatusServiceUnavailable {
		t.Errorf("readyz while not ready = %d", code)
	}
	resp, err := http.Get(ts.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(page), `id="partners"`) || resp.Header.Get("Content-Security-Policy") == "" {
		t.Errorf("page: %d bytes, CSP %q", len(page), resp.Header.Get("Content-Security-Policy"))
	}
}

func TestMetrics(t *testing.T) {
	inst := newInstance(t)
	ctx := context.Background()
	inst.st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "tucker-lab", ControlID: "1", Payload: []byte("x")})
	m := NewMetrics()
	m.AckObserver("tucker-lab")(hl7.CommitAccept, 800*time.Microsecond)
	observe := m.AckObserver("clinic")
	observe(hl7.CommitAccept, time.Millisecond)
	observe(hl7.CommitReject, time.Millisecond)
	m.LimitHit("tucker-lab", "connections")
	inst.st.Quarantine(ctx, store.Quarantined{Partner: "clinic", Reason: "oversize", Detail: "40000000 bytes, limit 33554432"})
	_, ts := newServer(t, Options{Instance: inst, Metrics: m})
	resp, err := http.Get(ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	for _, want := range []string{
		`hl7mail_ack_latency_seconds_count{code="CA",partner="tucker-lab"} 1`,
		`hl7mail_ack_latency_seconds_count{code="CA",partner="clinic"} 1`,
		`hl7mail_ack_latency_seconds_count{code="CR",partner="clinic"} 1`,
		`hl7mail_messages{direction="out",partner="tucker-lab",state="queued"} 1`,
		`hl7mail_messages_taken_total{direction="out",partner="tucker-lab"} 1`,
		`hl7mail_queue_depth{direction="out",partner="tucker-lab"} 1`,
		`hl7mail_queue_depth{direction="in",partner="clinic"} 0`,
		`hl7mail_router_connections{partner="clinic"} 2`,
		`hl7mail_mail_server_up{server="imap"} 0`,
		`hl7mail_mail_server_errors_total{server="imap"} 3`,
		`hl7mail_receipts_overdue{partner="tucker-lab"} 0`,
		`hl7mail_alerts_open 0`,
		`hl7mail_spool_syncs_total 1`,
		`hl7mail_spool_synced_messages_total 1`,
		"hl7mail_store_backlog ",
		`hl7mail_limit_hits_total{limit="connections",partner="tucker-lab"} 1`,
		`hl7mail_quarantined_total{reason="oversize"} 1`,
		`hl7mail_quarantined{partner="clinic"} 1`,
		`hl7mail_go_goroutines`,
		`hl7mail_queue_oldest_seconds{direction="in",partner="clinic"} 0`,
		`hl7mail_key_expiry_timestamp_seconds{field="self.pgp_key",party="self"} 1.830384e+09`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Every metric the shipped alerting rules use is served.
	rules, err := os.ReadFile("../deploy/prometheus/hl7mail-rules.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range regexp.MustCompile(`hl7mail_[a-z_]+`).FindAllString(string(rules), -1) {
		if !strings.Contains(text, "\n"+name+"{") && !strings.Contains(text, "\n"+name+" ") {
			t.Errorf("the alerting rules use %s, which /metrics does not serve", name)
		}
	}
	// The message queued a moment ago is the oldest waiting, and counted.
	var age float64
	if i := strings.Index(text, `hl7mail_queue_oldest_seconds{direction="out",partner="tucker-lab"} `); i < 0 {
		t.Error("no queue age for tucker-lab")
	} else if _, err := fmt.Sscan(text[i+len(`hl7mail_queue_oldest_seconds{direction="out",partner="tucker-lab"} `):], &age); err != nil || age <= 0 || age > 60 {
		t.Errorf("queue age of a message queued a moment ago = %v, %v", age, err)
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		name := strings.TrimPrefix(strings.TrimPrefix(line, "# HELP "), "# TYPE ")
		if line != "" && !strings.HasPrefix(name, "hl7mail_") {
			t.Errorf("metric not prefixed hl7mail_: %s", line)
		}
	}
}

// event is one Server-Sent Event.
type event struct {
	id   string
	data Entry
}

// readEvents reads n events from the stream at url (with lastID as
// Last-Event-ID when set).
func readEvents(t *testing.T, url, lastID string, n int) []event {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	var out []event
	var cur event
	sc := bufio.NewScanner(resp.Body)
	for len(out) < n && sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "id: "):
			cur.id = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "data: "):
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &cur.data); err != nil {
				t.Fatal(err)
			}
		case line == "" && cur.id != "":
			out = append(out, cur)
			cur = event{}
		}
	}
	if len(out) < n {
		t.Fatalf("got %d events, want %d (%v)", len(out), n, sc.Err())
	}
	return out
}

func TestLogStream(t *testing.T) {
	tail := NewTail(100)
	log := slog.New(tail.Handler(slog.NewTextHandler(io.Discard, nil), slog.LevelInfo))
	lab := log.With("component", "surrogate", "partner", "tucker-lab")
	lab.Info("message accepted", "control_id", "C1")
	log.With("partner", "clinic").Warn("mail quarantined", "reason", "bad-signature")
	lab.Debug("not kept")
	lab.WithGroup("smtp").Error("mail not submitted", "code", 451)
	_, ts := newServer(t, Options{Instance: newInstance(t), Tail: tail})

	all := readEvents(t, ts.URL+"/api/log", "", 3)
	if all[0].id != "1" || all[0].data.Msg != "message accepted" || all[0].data.Partner != "tucker-lab" ||
		all[0].data.Attrs["control_id"] != "C1" || all[0].data.Attrs["component"] != "surrogate" {
		t.Errorf("first event = %+v", all[0])
	}
	if all[2].data.Level != "ERROR" || all[2].data.Attrs["smtp.code"] != float64(451) {
		t.Errorf("third event = %+v", all[2])
	}
	// A reconnecting page sends the last id it saw and gets what followed.
	resumed := readEvents(t, ts.URL+"/api/log", "2", 1)
	if resumed[0].id != "3" {
		t.Errorf("resumed at %s, want 3", resumed[0].id)
	}
	// Filters: partner, lowest level.
	if ev := readEvents(t, ts.URL+"/api/log?partner=clinic", "", 1); ev[0].data.Msg != "mail quarantined" {
		t.Errorf("partner filter: %+v", ev)
	}
	if ev := readEvents(t, ts.URL+"/api/log?level=error", "", 1); ev[0].id != "3" {
		t.Errorf("level filter: %+v", ev)
	}
	// New records reach an open stream.
	done := make(chan []event)
	go func() { done <- readEvents(t, ts.URL+"/api/log?since=3", "", 1) }()
	time.Sleep(100 * time.Millisecond)
	lab.Info("mail submitted", "message_id", "<1@h>")
	select {
	case ev := <-done:
		if ev[0].id != "4" || ev[0].data.Msg != "mail submitted" {
			t.Errorf("live event = %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no live event")
	}
}

func TestTailRing(t *testing.T) {
	tail := NewTail(3)
	log := slog.New(tail.Handler(slog.NewTextHandler(io.Discard, nil), slog.LevelInfo))
	for i := 0; i < 5; i++ {
		log.Info("m", "i", i)
	}
	got, _ := tail.Since(0)
	if len(got) != 3 || got[0].ID != 3 || got[2].ID != 5 {
		t.Errorf("Since(0) = %+v", got)
	}
	if got, _ := tail.Since(4); len(got) != 1 || got[0].ID != 5 {
		t.Errorf("Since(4) = %+v", got)
	}
	if got, _ := tail.Since(5); len(got) != 0 {
		t.Errorf("Since(5) = %+v", got)
	}
}

// TestReceive: a mail handed over by "hl7mail receive" is taken as
// message/rfc822 (a cross-site form can send neither that nor JSON); an
// error inside is 503, for the MTA to try again.
func TestReceive(t *testing.T) {
	inst := newInstance(t)
	inst.cfg.IMAP.MaxMailSize = 64 << 10
	_, ts := newServer(t, Options{Instance: inst})
	send := func(ct, body string) (int, string) { return postAs(t, ts.URL+"/api/receive", ct, body) }
	if code, body := send("message/rfc822", "From: lab@partner.test\r\n\r\nbody"); code != 200 || !strings.Contains(body, `"stored": 7`) {
		t.Errorf("receive = %d %s", code, body)
	}
	if code, _ := send("message/rfc822", "From: lab@partner.test\r\n\r\nfail"); code != http.StatusServiceUnavailable {
		t.Errorf("receive with the store failing = %d, want 503", code)
	}
	if code, _ := send("text/plain", "From: x\r\n\r\ny"); code != http.StatusUnsupportedMediaType {
		t.Errorf("receive as text/plain = %d, want 415", code)
	}
	if code, _ := send("message/rfc822", strings.Repeat("x", 4*inst.cfg.IMAP.MaxMailSize+1)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("receive of an enormous mail = %d, want 413", code)
	}
	if len(inst.received) != 2 {
		t.Errorf("instance got %d mails, want 2", len(inst.received))
	}
}

// TestRetryAllAndReload: POST /api/retry puts back every failed message of
// one partner ({"partner": NAME}) or of all ({"partner": ""}); POST
// /api/reload asks the instance to reload.
func TestRetryAllAndReload(t *testing.T) {
	inst := newInstance(t)
	ctx := context.Background()
	st := inst.st
	var ids []int64
	for i, p := range []string{"tucker-lab", "clinic", "tucker-lab"} {
		a, _ := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: p, ControlID: fmt.Sprint("F", i),
			MessageType: "ORM^O01", Payload: []byte(fmt.Sprint("MSH|", i))})
		st.MarkFinal(ctx, a.ID, store.Failed, "550 no such user")
		ids = append(ids, a.ID)
	}
	_, ts := newServer(t, Options{Instance: inst})
	if code, body := post(t, ts.URL+"/api/retry", `{"partner":"tucker-lab"}`); code != 200 || !strings.Contains(body, `"requeued": 2`) {
		t.Errorf("retry tucker-lab = %d %s, want 2 requeued", code, body)
	}
	if m, _ := st.Get(ctx, ids[1]); m.State != store.Failed {
		t.Errorf("the clinic's message is %s, want still failed", m.State)
	}
	if code, body := post(t, ts.URL+"/api/retry", `{"partner":""}`); code != 200 || !strings.Contains(body, `"requeued": 1`) {
		t.Errorf("retry all = %d %s, want 1 requeued", code, body)
	}
	for _, id := range ids {
		if m, _ := st.Get(ctx, id); m.State != store.Queued {
			t.Errorf("message %d is %s, want queued", id, m.State)
		}
	}
	if code, _ := post(t, ts.URL+"/api/retry", `nonsense`); code != http.StatusBadRequest {
		t.Errorf("retry without a JSON body = %d, want 400", code)
	}
	if code, body := post(t, ts.URL+"/api/reload", `{}`); code != 200 || inst.reloads != 1 {
		t.Errorf("reload = %d %s, %d reloads", code, body, inst.reloads)
	}
}

// TestRebindingAndOrigin: a request whose Host is a foreign name (DNS
// rebinding) is refused, reads included; a change whose Origin is foreign
// is refused; loopback names, IP literals and the configured host pass.
func TestRebindingAndOrigin(t *testing.T) {
	inst := newInstance(t)
	ctx := context.Background()
	a, _ := inst.st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "tucker-lab", ControlID: "R1",
		MessageType: "ORM^O01", Payload: []byte("MSH|1")})
	inst.st.MarkFinal(ctx, a.ID, store.Failed, "550")
	token := strings.Repeat("t", 32)
	_, ts := newServer(t, Options{Instance: inst, Addr: "gw.hospital.test:8025", Token: token})
	do := func(method, path, host, origin string) int {
		t.Helper()
		var body io.Reader
		if method == "POST" {
			body = strings.NewReader(`{"by":"x","partner":""}`)
		}
		req, _ := http.NewRequest(method, ts.URL+path, body)
		req.Host = host
		req.Header.Set("Authorization", "Bearer "+token)
		if origin != "" {
			req.Header.Set("Origin", origin)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tt := range []struct {
		method, path, host, origin string
		want                       int
	}{
		{"GET", "/api/quarantine", "rebind.attacker.example", "", http.StatusMisdirectedRequest},
		{"POST", "/api/alerts/1/ack", "rebind.attacker.example:8025", "", http.StatusMisdirectedRequest},
		{"GET", "/api/overview", "localhost:8025", "", 200},
		{"GET", "/api/overview", "127.0.0.1:8025", "", 200},
		{"GET", "/api/overview", "[::1]:8025", "", 200},
		{"GET", "/api/overview", "gw.hospital.test:8025", "", 200},
		{"GET", "/api/overview", "GW.hospital.test.", "", 200},
		{"POST", "/api/retry", "127.0.0.1:8025", "http://evil.example", http.StatusForbidden},
		{"POST", "/api/retry", "127.0.0.1:8025", "null", http.StatusForbidden},
		{"POST", "/api/retry", "127.0.0.1:8025", "http://127.0.0.1:8025", 200},
		{"POST", "/api/retry", "127.0.0.1:8025", "", 200},
	} {
		if got := do(tt.method, tt.path, tt.host, tt.origin); got != tt.want {
			t.Errorf("%s %s with Host %q, Origin %q = %d, want %d", tt.method, tt.path, tt.host, tt.origin, got, tt.want)
		}
	}
}

// TestActivityAPI: /api/activity has every configured partner, with 24
// hours of 5-minute steps, and counts the traffic of the one that had it.
func TestActivityAPI(t *testing.T) {
	inst := newInstance(t)
	inst.st.Accept(context.Background(), store.NewMessage{Direction: store.Outbound, Partner: "tucker-lab", ControlID: "1", Payload: []byte("x")})
	_, ts := newServer(t, Options{Instance: inst})
	resp, err := http.Get(ts.URL + "/api/activity")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		StepSecs float64 `json:"step_secs"`
		Partners map[string]struct {
			Out      []int `json:"out"`
			QueueOut []int `json:"queue_out"`
		} `json:"partners"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	lab, clinic := v.Partners["tucker-lab"], v.Partners["clinic"]
	if v.StepSecs != 300 || len(lab.Out) != 288 || len(clinic.Out) != 288 {
		t.Fatalf("activity: step %v, %d and %d steps", v.StepSecs, len(lab.Out), len(clinic.Out))
	}
	if lab.Out[287] != 1 || lab.QueueOut[287] != 1 || clinic.Out[287] != 0 {
		t.Errorf("the last step: lab out %d queued %d, clinic out %d", lab.Out[287], lab.QueueOut[287], clinic.Out[287])
	}
}
