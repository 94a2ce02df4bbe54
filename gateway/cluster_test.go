package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/pgtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// startPostgres starts a throwaway PostgreSQL for one test; without one
// installed the test is skipped (unless real servers are required).
func startPostgres(t *testing.T) *pgtest.Server {
	t.Helper()
	s, err := pgtest.Start()
	if err != nil {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	t.Cleanup(func() { s.Stop() })
	return s
}

// TestTwoNodes runs two instances as the nodes of one cluster: both
// surrogates take messages, the roles spread over the nodes, each mail
// reaches the server once, and when one node stops the other runs every
// role within the lease and sends what comes next.
func TestTwoNodes(t *testing.T) {
	pg := startPostgres(t)
	dir := t.TempDir()
	self, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	clinic, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Clinic", Email: "edi@clinic.test"})
	priv, _ := security.ArmorPGPPrivate(self, nil)
	os.WriteFile(filepath.Join(dir, "self.asc"), priv, 0o600)
	for name, e := range map[string]*openpgp.Entity{"lab.asc": lab, "clinic.asc": clinic} {
		pub, _ := security.ArmorPGPPublic(e)
		os.WriteFile(filepath.Join(dir, name), pub, 0o600)
	}
	os.WriteFile(filepath.Join(dir, "dsn"), []byte(pg.DSN+"\n"), 0o600)
	smtpSrv := &embedded.SMTP{}
	smtpAddr, err := smtpSrv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer smtpSrv.Close()
	const lease = 2 * time.Second
	type node struct {
		g      *Gateway
		listen map[string]string
	}
	start := func(name string) *node {
		n := &node{listen: map[string]string{"lab": freeAddr(t), "clinic": freeAddr(t)}}
		path := filepath.Join(dir, name+".yaml")
		os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: h, email: edi@hospital.test, pgp_key: self.asc}
store: var-%s
cluster: {node: %s, postgres: {dsn_file: dsn, lease: %s}}
router: {addr: 127.0.0.1:6661}
smtp: {addr: %s, tls: none}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: lab.asc}
  - {name: clinic, listen: %s, email: edi@clinic.test, security: pgp, pgp_key: clinic.asc}
`, name, name, lease, smtpAddr, n.listen["lab"], n.listen["clinic"])), 0o600)
		cfg, err := config.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		keys, err := LoadKeys(cfg, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		n.g, err = Start(context.Background(), Options{Config: cfg, Keys: keys, Logger: testlog.New(t, slog.LevelWarn),
			RetryBase: 10 * time.Millisecond, NoDashboard: true})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	a, b := start("gw-a"), start("gw-b")
	stopped := map[*node]bool{}
	defer func() {
		for _, n := range []*node{a, b} {
			if !stopped[n] {
				n.g.Shutdown(context.Background())
			}
		}
	}()
	all := a.g.side().roleNames()
	if want := []string{"deliverer:clinic", "deliverer:lab", "sender:clinic", "sender:lab", "sweeper"}; !slices.Equal(all, want) {
		t.Fatalf("roles %v, want %v", all, want)
	}
	// Every role on one node, none on both, some on each.
	waitRoles := func(what string, want func(a, b []string) bool) {
		t.Helper()
		deadline := time.Now().Add(4 * lease)
		for {
			ra, rb := a.g.Roles(), b.g.Roles()
			if !stopped[b] && want(ra, rb) {
				return
			}
			if stopped[b] && want(ra, nil) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: gw-a holds %v, gw-b %v", what, ra, rb)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitRoles("spread", func(ra, rb []string) bool {
		both := slices.Sorted(slices.Values(append(slices.Clone(ra), rb...)))
		return slices.Equal(both, all) && len(ra) > 0 && len(rb) > 0
	})
	send := func(n *node, partner string, from, to int) {
		t.Helper()
		c, err := mllp.Dial(context.Background(), n.listen[partner])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for i := from; i < to; i++ {
			msg := fmt.Sprintf("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|%s%d|P|2.3|||AL\rPID|1||%d\r", partner, i, i)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			reply, err := c.Send(ctx, []byte(msg))
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			if ack, err := hl7.ParseAck(reply); err != nil || ack.Code != hl7.CommitAccept {
				t.Fatalf("ACK %q, %v", reply, err)
			}
		}
	}
	waitMails := func(want int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for smtpSrv.Count() < want {
			if time.Now().After(deadline) {
				t.Fatalf("%d mails after 30s, want %d", smtpSrv.Count(), want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// The same messages to both nodes: a router that failed over and
	// sent again. One mail each.
	for _, n := range []*node{a, b} {
		send(n, "lab", 0, 20)
		send(n, "clinic", 0, 20)
	}
	waitMails(40)
	if err := a.g.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	stopped[a] = true
	a, b = b, a // the survivor is a from here on
	waitRoles("all on the survivor", func(ra, _ []string) bool { return slices.Equal(ra, all) })
	send(a, "lab", 20, 40)
	send(a, "clinic", 20, 40)
	waitMails(80)
	time.Sleep(3 * lease / 2) // nothing more comes
	if n := smtpSrv.Count(); n != 80 {
		t.Errorf("%d mails, want 80", n)
	}
	seen := map[string]int{}
	for _, m := range smtpSrv.Mails() {
		seen[m.To[0]]++
	}
	if seen["lab@partner.test"] != 40 || seen["edi@clinic.test"] != 40 {
		t.Errorf("mails by recipient %v, want 40 each", seen)
	}
	list, err := a.g.Store().List(context.Background(), store.Filter{Direction: store.Outbound, Limit: 1000})
	if err != nil || len(list) != 80 {
		t.Fatalf("%d outbound messages stored, %v; want 80", len(list), err)
	}
	view, err := a.g.Cluster(context.Background())
	if err != nil || len(view.Nodes) != 2 || view.Node != "gw-b" {
		t.Fatalf("cluster view %+v, %v", view, err)
	}
	for _, r := range view.Roles {
		if r.Node != "gw-b" {
			t.Errorf("role %s held by %q, want gw-b", r.Role, r.Node)
		}
	}
}
