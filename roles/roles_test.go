package roles

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/internal/pgtest"
	"github.com/hl7mail/hl7mail/internal/testlog"
)

var server *pgtest.Server

func TestMain(m *testing.M) {
	s, err := pgtest.Start()
	if err != nil {
		if os.Getenv("HL7MAIL_REQUIRE_REAL") != "" {
			fmt.Fprintln(os.Stderr, "roles:", err)
			os.Exit(1)
		}
		fmt.Fprintln(os.Stderr, "roles: skipped:", err)
		os.Exit(0)
	}
	server = s
	code := m.Run()
	s.Stop()
	os.Exit(code)
}

// cluster records which node runs which role, and fails the test the
// moment two run one.
type cluster struct {
	t       *testing.T
	mu      sync.Mutex
	owner   map[string]string
	stopped map[string]time.Time // when a node last stopped a role
}

func (c *cluster) node(name string, lease time.Duration, roles []string) *Coordinator {
	co, err := Start(Options{DSN: server.DSN, Node: name, Lease: lease, Roles: roles, Logger: testlog.New(c.t, slog.LevelWarn),
		Gain: c.gain(name), Lose: c.lose(name)})
	if err != nil {
		c.t.Fatal(err)
	}
	return co
}

// gain records that node started r, failing the test if another runs it.
func (c *cluster) gain(node string) func(string) {
	return func(r string) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if o, ok := c.owner[r]; ok {
			c.t.Errorf("%s started %s while %s runs it", node, r, o)
		}
		c.owner[r] = node
	}
}

func (c *cluster) lose(node string) func(string) {
	return func(r string) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.owner[r] == node {
			delete(c.owner, r)
			c.stopped[r] = time.Now()
		}
	}
}

func (c *cluster) count() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := map[string]int{}
	for _, o := range c.owner {
		n[o]++
	}
	return n
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// TestRolesSpreadAndMove: two nodes share four roles two and two; when one
// node's database session is terminated it stops its roles at once, and
// every role runs again within the lease, never on two nodes at once;
// spread two and two again; one node closed, the other runs all four.
func TestRolesSpreadAndMove(t *testing.T) {
	lease := 2 * time.Second
	roles := []string{"imap:inbox", "sender:lab", "sender:clinic", "deliver:router"}
	c := &cluster{t: t, owner: map[string]string{}, stopped: map[string]time.Time{}}
	a := c.node("gw-a", lease, roles)
	b := c.node("gw-b", lease, roles)
	t.Cleanup(a.Close)
	t.Cleanup(b.Close)
	waitFor(t, "two roles each", 10*lease, func() bool { n := c.count(); return n["gw-a"] == 2 && n["gw-b"] == 2 })

	// gw-a's session is terminated, as an operator or a failover would.
	admin, err := pgx.Connect(context.Background(), server.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	before := a.Held()
	cut := time.Now()
	var killed int
	if err := admin.QueryRow(context.Background(), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = $1`, ApplicationName("gw-a")).Scan(&killed); err != nil || killed != 1 {
		t.Fatalf("terminated %d sessions of gw-a: %v", killed, err)
	}
	// gw-a stops its roles at once; each runs again within the lease, on
	// gw-b or on gw-a once it has claimed again (its own session is new:
	// it too waits out the fence), never on two nodes (cluster.gain).
	took := waitFor(t, "gw-a's roles stopped and every role running again", 3*lease, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, r := range before {
			if !c.stopped[r].After(cut) {
				return false
			}
		}
		return len(c.owner) == len(roles)
	})
	t.Logf("roles running again %s after the session was cut (lease %s)", took.Round(10*time.Millisecond), lease)
	if took > lease {
		t.Errorf("roles moved after %s, want within the lease (%s)", took, lease)
	}

	// gw-a reconnects: the roles spread again.
	waitFor(t, "two roles each again", 10*lease, func() bool { n := c.count(); return n["gw-a"] == 2 && n["gw-b"] == 2 })
	if got, want := slices.Concat(a.Held(), b.Held()), len(roles); len(got) != want {
		t.Errorf("held %v", got)
	}
	a.Close()
	waitFor(t, "gw-b running all four after gw-a closed", 3*lease, func() bool { return c.count()["gw-b"] == 4 })
}

// stallProxy forwards TCP to PostgreSQL until stalled: then it forwards
// nothing more, as a half-open network does, until cut, which closes
// the connections to the server (PostgreSQL then ends the session).
type stallProxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	stalled bool
	ups     []net.Conn
}

func newStallProxy(t *testing.T, target string) *stallProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &stallProxy{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); p.cut() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.ups = append(p.ups, up)
			p.mu.Unlock()
			go p.pipe(c, up)
			go p.pipe(up, c)
		}
	}()
	return p
}

func (p *stallProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		for {
			p.mu.Lock()
			stalled := p.stalled
			p.mu.Unlock()
			if !stalled {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

func (p *stallProxy) stall() { p.mu.Lock(); p.stalled = true; p.mu.Unlock() }

func (p *stallProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.ups {
		c.Close()
	}
	p.ups = nil
}

// TestRolesFencedOnAHungNetwork: gw-a's network to the database hangs
// (nothing answers, nothing closes). gw-a stops its roles once its
// heartbeat goes unanswered; the database frees its locks only when the
// connection is finally cut; gw-b starts them after that, never while
// gw-a runs them.
func TestRolesFencedOnAHungNetwork(t *testing.T) {
	lease := 2 * time.Second
	roles := []string{"sender:lab", "sender:clinic"}
	c := &cluster{t: t, owner: map[string]string{}, stopped: map[string]time.Time{}}
	proxy := newStallProxy(t, fmt.Sprintf("127.0.0.1:%d", server.Port))
	viaProxy := strings.Replace(server.DSN, fmt.Sprintf(":%d/", server.Port), ":"+strconv.Itoa(proxy.ln.Addr().(*net.TCPAddr).Port)+"/", 1)
	a, err := Start(Options{DSN: viaProxy, Node: "gw-a", Lease: lease, Roles: roles, Logger: testlog.New(t, slog.LevelWarn),
		Gain: c.gain("gw-a"), Lose: c.lose("gw-a")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	waitFor(t, "gw-a running both", 10*lease, func() bool { return c.count()["gw-a"] == 2 })
	b := c.node("gw-b", lease, roles)
	t.Cleanup(b.Close)
	waitFor(t, "one role each", 10*lease, func() bool { n := c.count(); return n["gw-a"] == 1 && n["gw-b"] == 1 })

	proxy.stall()
	stalled := time.Now()
	waitFor(t, "gw-a stopping its role", lease, func() bool { return c.count()["gw-a"] == 0 })
	t.Logf("gw-a stopped %s after its network hung", time.Since(stalled).Round(10*time.Millisecond))
	// The database still holds gw-a's lock: gw-b must not take the role.
	time.Sleep(lease)
	if n := c.count()["gw-b"]; n != 1 {
		t.Fatalf("gw-b runs %d roles while gw-a's session still holds its lock", n)
	}
	proxy.cut()
	waitFor(t, "gw-b running both once the database ended gw-a's session", 3*lease, func() bool { return c.count()["gw-b"] == 2 })
}
