package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/packet"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// site is a hospital's configuration folder with an embedded SMTP server.
type site struct {
	dir  string
	smtp *embedded.SMTP
	addr string
	self *openpgp.Entity
}

func newSite(t *testing.T) *site {
	t.Helper()
	s := &site{dir: t.TempDir(), smtp: &embedded.SMTP{}}
	var err error
	if s.addr, err = s.smtp.Serve("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.smtp.Close() })
	s.self, _ = security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	priv, _ := security.ArmorPGPPrivate(s.self, nil)
	os.WriteFile(filepath.Join(s.dir, "self.asc"), priv, 0o600)
	return s
}

// key writes a partner key for email to file, made two days ago; life
// bounds it (0: no expiry), and change may alter it before it is written.
func (s *site) key(t *testing.T, file, email string, life time.Duration, change func(*openpgp.Entity)) {
	t.Helper()
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: file, Email: email, Now: time.Now().Add(-48 * time.Hour),
		Lifetime: life})
	if err != nil {
		t.Fatal(err)
	}
	if change != nil {
		change(e)
	}
	pub, _ := security.ArmorPGPPublic(e)
	if err := os.WriteFile(filepath.Join(s.dir, file), pub, 0o600); err != nil {
		t.Fatal(err)
	}
}

// config writes partners.yaml with the partners' lines (name, listen) and
// returns its path.
func (s *site) config(t *testing.T, partners ...[2]string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "self: {name: h, email: edi@hospital.test, pgp_key: self.asc}\nstore: var\nrouter: {addr: 127.0.0.1:6661}\n"+
		"smtp: {addr: %s, tls: none}\nimap: {addr: 127.0.0.1:1143, tls: none}\npartners:\n", s.addr)
	for _, p := range partners {
		fmt.Fprintf(&b, "  - {name: %s, listen: %s, email: %s@partner.test, security: pgp, pgp_key: %s.asc}\n", p[0], p[1], p[0], p[0])
	}
	path := filepath.Join(s.dir, "partners.yaml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func (s *site) start(t *testing.T, path string) *Gateway {
	t.Helper()
	cfg, keys, err := Load(path, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	g, err := Start(context.Background(), Options{Config: cfg, Keys: keys, Logger: testlog.New(t, slog.LevelInfo),
		RetryBase: 20 * time.Millisecond, NoDashboard: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Shutdown(context.Background()) })
	return g
}

// send sends one message with control ID id to addr and returns the ACK code.
func send(t *testing.T, c *mllp.Client, id string) (hl7.AckCode, error) {
	t.Helper()
	msg := fmt.Sprintf("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|%s|P|2.3|||AL\rPID|1||9\rORC|NW|%s\r", id, id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	reply, err := c.Send(ctx, []byte(msg))
	if err != nil {
		return "", err
	}
	a, err := hl7.ParseAck(reply)
	return a.Code, err
}

func sendAll(t *testing.T, addr string, ids ...string) {
	t.Helper()
	c, err := mllp.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, id := range ids {
		if code, err := send(t, c, id); err != nil || code != hl7.CommitAccept {
			t.Fatalf("%s to %s: %s, %v; want CA", id, addr, code, err)
		}
	}
}

func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// subjects returns, per partner address, the control IDs of the mails the
// SMTP server took, in order.
func subjects(t *testing.T, srv *embedded.SMTP) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, m := range srv.Mails() {
		i := strings.Index(string(m.Data), "Subject: HL7 ORM^O01 ")
		if i < 0 {
			t.Fatalf("mail without the subject: %.200q", m.Data)
		}
		rest := string(m.Data[i+len("Subject: HL7 ORM^O01 "):])
		out[m.To[0]] = append(out[m.To[0]], rest[:strings.IndexByte(rest, '\r')])
	}
	return out
}

// TestKeyProblemHoldsOnePartner: a partner whose key expired, and one
// whose encryption subkey expired, do not stop the gateway: the others'
// mail flows, theirs gets CA and waits with one alert each; their keys are
// replaced and the configuration reloaded: the mail leaves, in order, and
// the alerts clear.
func TestKeyProblemHoldsOnePartner(t *testing.T) {
	s := newSite(t)
	s.key(t, "lab.asc", "lab@partner.test", 0, nil)
	s.key(t, "late.asc", "late@partner.test", 24*time.Hour, nil) // made two days ago, for one day
	s.key(t, "sub.asc", "sub@partner.test", 0, func(e *openpgp.Entity) { expireSubkey(t, e) })
	path := s.config(t, [2]string{"lab", freeAddr(t)}, [2]string{"late", freeAddr(t)}, [2]string{"sub", freeAddr(t)})
	_, keys, err := Load(path, time.Now())
	if err != nil || keys.Problems == nil || len(keys.Problems.Problems) != 2 {
		t.Fatalf("Load = %v, problems %v; want it to load with the two partners' problems", err, keys.Problems)
	}
	if p := keys.Problems.Error(); !strings.Contains(p, "partner late") || !strings.Contains(p, "expired on") ||
		!strings.Contains(p, "partner sub") || !strings.Contains(p, "encryption subkey expired on") {
		t.Errorf("problems:\n%s", p)
	}
	g := s.start(t, path)
	for _, p := range []string{"lab", "late", "sub"} {
		sendAll(t, g.SurrogateAddr(p), p+"1", p+"2", p+"3")
	}
	waitUntil(t, "the lab's three mails", 20*time.Second, func() bool { return s.smtp.Count() == 3 })
	ctx := context.Background()
	waitUntil(t, "one alert for each held partner", 20*time.Second, func() bool {
		open, _ := g.Store().Alerts(ctx, false, 0)
		held := 0
		for _, a := range open {
			if a.Kind == store.AlertHeld {
				held++
			}
		}
		return held == 2
	})
	time.Sleep(200 * time.Millisecond) // a few more attempts: still one alert each, nothing failed
	open, _ := g.Store().Alerts(ctx, false, 0)
	held := map[string]string{}
	for _, a := range open {
		if a.Kind == store.AlertHeld {
			if _, dup := held[a.Partner]; dup {
				t.Errorf("a second held alert for %s", a.Partner)
			}
			held[a.Partner] = a.Text
		}
	}
	if !strings.Contains(held["late"], "expired on") || !strings.Contains(held["sub"], "subkey expired on") {
		t.Errorf("held alerts %q", held)
	}
	if failed, _ := g.Store().List(ctx, store.Filter{State: store.Failed}); len(failed) != 0 {
		t.Errorf("%d messages failed, want none", len(failed))
	}
	if s.smtp.Count() != 3 {
		t.Fatalf("%d mails, want only the lab's 3", s.smtp.Count())
	}
	// The partners send their renewed keys; the operator reloads.
	s.key(t, "late.asc", "late@partner.test", 0, nil)
	s.key(t, "sub.asc", "sub@partner.test", 0, nil)
	if err := g.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "all nine mails", 20*time.Second, func() bool { return s.smtp.Count() == 9 })
	got := subjects(t, s.smtp)
	for _, p := range []string{"lab", "late", "sub"} {
		if want := p + "1 " + p + "2 " + p + "3"; strings.Join(got[p+"@partner.test"], " ") != want {
			t.Errorf("%s's mails: %v, want %s", p, got[p+"@partner.test"], want)
		}
	}
	waitUntil(t, "the held and key alerts cleared", 10*time.Second, func() bool {
		open, _ := g.Store().Alerts(ctx, false, 0)
		return len(open) == 0
	})
}

// expireSubkey gives e's encryption subkey a lifetime of one day from its
// creation two days ago, signed again by the primary key.
func expireSubkey(t *testing.T, e *openpgp.Entity) {
	t.Helper()
	sk := &e.Subkeys[0]
	day := uint32(24 * 3600)
	sk.Sig.KeyLifetimeSecs = &day
	made := sk.PublicKey.CreationTime
	if err := sk.Sig.SignKey(sk.PublicKey, e.PrivateKey, &packet.Config{Time: func() time.Time { return made }}); err != nil {
		t.Fatal(err)
	}
}

// TestReload: while a router sends to one partner's surrogate, a partner
// is added and one removed: no connection of the first drops and nothing
// is lost; the new partner's surrogate answers; a configuration with a
// problem is refused and the running one kept.
func TestReload(t *testing.T) {
	s := newSite(t)
	for _, p := range []string{"busy", "gone", "new"} {
		s.key(t, p+".asc", p+"@partner.test", 0, nil)
	}
	busy, gone, added := freeAddr(t), freeAddr(t), freeAddr(t)
	path := s.config(t, [2]string{"busy", busy}, [2]string{"gone", gone})
	g := s.start(t, path)
	ctx := context.Background()

	// The load: two connections sending until stopped; any broken
	// connection or answer other than CA is a failure.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var accepted []string
	var loadErr error
	stop := make(chan struct{})
	for c := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := mllp.Dial(ctx, busy)
			if err != nil {
				mu.Lock()
				loadErr = err
				mu.Unlock()
				return
			}
			defer conn.Close()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := fmt.Sprintf("b%d-%d", c, i)
				code, err := send(t, conn, id)
				mu.Lock()
				if err != nil || code != hl7.CommitAccept {
					loadErr = fmt.Errorf("%s: %s, %v", id, code, err)
					mu.Unlock()
					return
				}
				accepted = append(accepted, id)
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	s.config(t, [2]string{"busy", busy}, [2]string{"new", added})
	if err := g.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	sendAll(t, added, "n1")
	if c, err := mllp.Dial(ctx, gone); err == nil {
		c.Close()
		t.Errorf("the removed partner's surrogate still listens on %s", gone)
	}
	// A configuration with a problem is refused; the running one stays.
	os.WriteFile(path, []byte(strings.Replace(readFile(t, path), "security: pgp", "security: pgpp", 1)), 0o600)
	if err := g.Reload(ctx); !errors.Is(err, ErrReloadRefused) || !strings.Contains(err.Error(), "security") {
		t.Errorf("Reload of a broken file = %v, want ErrReloadRefused naming the problem", err)
	}
	if g.Config().Partner("new") == nil || g.Config().Partner("gone") != nil {
		t.Errorf("running partners changed by a refused reload")
	}
	sendAll(t, added, "n2")
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	if loadErr != nil {
		t.Fatalf("the router's load broke: %v", loadErr)
	}
	if len(accepted) < 20 {
		t.Fatalf("only %d messages accepted under load", len(accepted))
	}
	// Every CA'd message is stored, and mailed.
	waitUntil(t, "every accepted message mailed", 30*time.Second, func() bool {
		return len(subjects(t, s.smtp)["busy@partner.test"]) == len(accepted) && len(subjects(t, s.smtp)["new@partner.test"]) == 2
	})
	list, _ := g.Store().List(ctx, store.Filter{Partner: "busy", Limit: 100000})
	if len(list) != len(accepted) {
		t.Errorf("store holds %d of busy's messages, %d were accepted", len(list), len(accepted))
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestNoPartnersYet: a site without partners starts (the inbound side and
// the page run), is ready, and takes its first partner by a reload: the
// partner's surrogate listens and its mail leaves, without a restart.
func TestNoPartnersYet(t *testing.T) {
	s := newSite(t)
	path := s.config(t)
	g := s.start(t, path)
	if err := g.Ready(); err != nil {
		t.Fatalf("a site without partners is not ready: %v", err)
	}
	s.key(t, "lab.asc", "lab@partner.test", 0, nil)
	addr := freeAddr(t)
	s.config(t, [2]string{"lab", addr})
	if err := g.Reload(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := g.SurrogateAddr("lab"); got == "" {
		t.Fatal("no surrogate for the partner added by the reload")
	}
	sendAll(t, g.SurrogateAddr("lab"), "first1")
	waitUntil(t, "the first partner's first mail", 20*time.Second, func() bool { return s.smtp.Count() == 1 })
}
