package pgstore

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/roles"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/spool"
)

// node is one in-process cluster node: its store, its roles, and a sender
// for each partner whose role it holds, started on Gain and stopped (and
// waited for) on Lose.
type node struct {
	t    *testing.T
	name string
	st   *Store
	cfg  *config.Config
	smtp string

	mu      sync.Mutex
	running map[string]func() // partner → stop and wait
}

func (n *node) gain(role string) {
	partner := strings.TrimPrefix(role, "sender:")
	cfg := *n.cfg
	cfg.Partners = nil
	for _, p := range n.cfg.Partners {
		if p.Name == partner {
			cfg.Partners = append(cfg.Partners, p)
		}
	}
	s, err := outbound.NewSender(outbound.SenderOptions{Config: &cfg, Store: n.st, Keys: &security.Keyring{},
		Submitter: &outbound.SMTPSubmitter{Addr: n.smtp, TLS: config.NoTLS, Timeout: 5 * time.Second},
		Journal:   n.st.OutgoingJournal(), Logger: testlog.New(n.t, slog.LevelError), Poll: 20 * time.Millisecond,
		Group: 8, Window: 16})
	if err != nil {
		n.t.Error(err)
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	n.mu.Lock()
	n.running[partner] = func() { cancel(); <-done }
	n.mu.Unlock()
}

func (n *node) lose(role string) {
	partner := strings.TrimPrefix(role, "sender:")
	n.mu.Lock()
	stop := n.running[partner]
	delete(n.running, partner)
	n.mu.Unlock()
	if stop != nil {
		stop() // the group in flight is submitted and recorded first
	}
}

// TestSenderFailover: two nodes share the senders of two partners, a role
// each. In the middle of the drain, the database ends one node's role
// session: it stops its sender, the other takes the partner over after the
// fence, and every message reaches the SMTP server once, in order.
func TestSenderFailover(t *testing.T) {
	fresh(t)
	ctx := context.Background()
	cfg, err := config.Parse("partners.yaml", []byte(`self: {name: h, email: edi@h.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: none, allow_unencrypted: true, mdn: none}
  - {name: clinic, listen: 127.0.0.1:9013, email: clinic@partner.test, security: none, allow_unencrypted: true, mdn: none}
`))
	if err != nil {
		t.Fatal(err)
	}
	srv := &embedded.SMTP{}
	addr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	a, b := open(t, "gw-a"), open(t, "gw-b")
	want := map[string][]string{}
	for i := range 600 {
		partner := []string{"lab", "clinic"}[i%2]
		id := fmt.Sprintf("%s-%03d", partner, i/2)
		if _, err := a.Accept(ctx, spool.Message{Direction: spool.Outbound, Partner: partner, ControlID: id, MessageType: "ORU^R01",
			Payload: []byte("MSH|^~\\&|HIS|GH|X|Y|20261201||ORU^R01|" + id + "|P|2.3\rPID|1\r")}); err != nil {
			t.Fatal(err)
		}
		want[partner+"@partner.test"] = append(want[partner+"@partner.test"], id)
	}
	lease := 2 * time.Second
	for _, st := range []*Store{a, b} {
		n := &node{t: t, name: st.o.Node, st: st, cfg: cfg, smtp: addr, running: map[string]func(){}}
		co, err := roles.Start(roles.Options{DSN: server.DSN, Node: n.name, Lease: lease, Roles: []string{"sender:lab", "sender:clinic"},
			Gain: n.gain, Lose: n.lose, Logger: testlog.New(t, slog.LevelError)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(co.Close)
	}
	deadline := time.Now().Add(30 * time.Second)
	for srv.Count() < 150 {
		if time.Now().After(deadline) {
			t.Fatalf("%d mails after 30s", srv.Count())
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The database ends gw-a's role session.
	c, err := pgxConnect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var killed int
	if err := c.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
		roles.ApplicationName("gw-a")).Scan(&killed); err != nil || killed != 1 {
		t.Fatalf("terminated %d sessions: %v", killed, err)
	}
	at := srv.Count()
	for srv.Count() < 600 {
		if time.Now().After(deadline.Add(30 * time.Second)) {
			t.Fatalf("%d mails, want 600", srv.Count())
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	got := map[string][]string{}
	for _, m := range srv.Mails() {
		h, err := textprotoHeader(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		subj := h.Get("Subject")
		got[m.To[0]] = append(got[m.To[0]], subj[strings.LastIndex(subj, " ")+1:])
	}
	for to, ids := range want {
		if strings.Join(got[to], " ") != strings.Join(ids, " ") {
			t.Errorf("mails to %s: %d, in this order (want %d, once each, in order):\n%v", to, len(got[to]), len(ids), got[to])
		}
	}
	t.Logf("session ended at %d of 600 mails; %d mails in all, none twice", at, srv.Count())
}
