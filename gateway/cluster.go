package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/pgstore"
	"github.com/hl7mail/hl7mail/roles"
	"github.com/hl7mail/hl7mail/spool"
)

// A node of a cluster (the cluster section): its store is the shared
// PostgreSQL database, its journals are kept there, its surrogates accept
// as any node's do, and what would run once per instance (a partner's
// sender and deliverer, an IMAP account's watcher, the sweeper, the
// notices) is a role that runs on whichever node holds it (package roles).

// clusterNode is what a node of a cluster adds to an instance.
type clusterNode struct {
	name  string
	dsn   string // read once, at openCluster
	lease time.Duration
	co    *roles.Coordinator
	lock  *os.File   // the node's own folder, one process at a time
	mu    sync.Mutex // a role started or stopped, or the side replaced: one at a time
	pg    *pgstore.Store
	log   *slog.Logger
}

// DefaultLease is how long a node may hold a role without renewing it when
// cluster.postgres.lease is not set.
const DefaultLease = 10 * time.Second

// openCluster opens cfg's shared database as the instance's store, with
// its journals.
func (g *Gateway) openCluster(ctx context.Context, cfg *config.Config) error {
	dsn, err := cfg.DSN()
	if err != nil {
		return fmt.Errorf("cluster.postgres.dsn_file: %w", err)
	}
	if err := os.MkdirAll(cfg.StoreDir(), 0o700); err != nil {
		return err
	}
	lock, err := spool.LockDir(cfg.StoreDir())
	if err != nil {
		return err
	}
	pg, err := pgstore.Open(ctx, pgstore.Options{DSN: dsn, Node: cfg.Cluster.Node, Logger: g.log.With("component", "pgstore")})
	if err != nil {
		lock.Close()
		return err
	}
	lease := cfg.Cluster.Postgres.Lease.D()
	if lease == 0 {
		lease = DefaultLease
	}
	g.cluster = &clusterNode{name: cfg.Cluster.Node, dsn: dsn, lease: lease, lock: lock, pg: pg, log: g.log.With("component", "roles")}
	g.store = pg
	g.outgoing, g.incoming = pg.OutgoingJournal(), pg.IncomingJournal()
	return nil
}

// startRoles starts claiming roles for the node: from here on the node
// runs those it holds.
func (g *Gateway) startRoles() error {
	c := g.cluster
	co, err := roles.Start(roles.Options{DSN: c.dsn, Node: c.name, Lease: c.lease, Roles: g.side().roleNames(),
		Logger: c.log,
		Gain: func(r string) {
			c.mu.Lock()
			defer c.mu.Unlock()
			g.side().startRole(r)
		},
		Lose: func(r string) {
			c.mu.Lock()
			defer c.mu.Unlock()
			g.side().stopRole(r)
		}})
	if err != nil {
		return err
	}
	c.co = co
	return nil
}

// close stops the node's part in the cluster (its roles ended with the
// side) and frees its folder. When the side did not stop (stopped false)
// the roles are not given up as released: the session ends with the
// process, and the next holder waits out the fence.
func (c *clusterNode) close(stopped bool) {
	if c.co != nil && stopped {
		c.co.Close()
	}
	c.lock.Close()
}

// replaceSide makes sd the running side: the old one stops, and the new
// one runs what the old one ran (alone: everything; in a cluster: the
// roles the node holds, that sd still has).
func (g *Gateway) replaceSide(old, sd *side) {
	if g.cluster == nil {
		old.stop(context.Background())
		g.cur.Store(sd)
		sd.start(nil)
		return
	}
	c := g.cluster
	c.mu.Lock()
	held := old.runningRoles()
	old.stop(context.Background())
	g.cur.Store(sd)
	var keep []string
	for _, r := range held {
		if sd.roles[r] != nil {
			keep = append(keep, r)
		}
	}
	sd.start(keep)
	c.mu.Unlock()
	if c.co != nil {
		c.co.SetRoles(sd.roleNames())
	}
}

// services are the instances of one service (the sender, the deliverer)
// by partner: one for every partner alone, one each in a cluster.
type services[T interface{ Notify(partner string) }] map[string]T

func (s services[T]) add(ps []config.Partner, v T) {
	for _, p := range ps {
		s[p.Name] = v
	}
}

// Notify wakes partner's instance.
func (s services[T]) Notify(partner string) {
	if v, ok := s[partner]; ok {
		v.Notify(partner)
	}
}

// running is a role started: its end, and when it has ended.
type running struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// role names what run does.
func (s *side) role(name string, run func(context.Context)) { s.roles[name] = run }

// roleNames are the side's roles, sorted.
func (s *side) roleNames() []string {
	out := make([]string, 0, len(s.roles))
	for r := range s.roles {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// runningRoles are the roles started, sorted.
func (s *side) runningRoles() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for r := range s.running {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// startRole runs role r until stopRole or stop; nothing once the side has
// stopped, or for a role it does not have.
func (s *side) startRole(r string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	run := s.roles[r]
	if run == nil || s.running[r] != nil || s.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(s.ctx)
	rn := &running{cancel: cancel, done: make(chan struct{})}
	s.running[r] = rn
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(rn.done)
		run(ctx)
	}()
}

// stopRole ends role r and returns once it has stopped: the mail in hand
// and the attempt under way finish first.
func (s *side) stopRole(r string) {
	s.mu.Lock()
	rn := s.running[r]
	delete(s.running, r)
	s.mu.Unlock()
	if rn != nil {
		rn.cancel()
		<-rn.done
	}
}

// Roles returns the roles this node runs now, sorted; nil alone.
func (g *Gateway) Roles() []string {
	if g.cluster == nil || g.cluster.co == nil {
		return nil
	}
	return g.cluster.co.Held()
}

// Cluster returns the cluster as the database knows it: the nodes, their
// last heartbeat, and which node holds which role; nil alone.
func (g *Gateway) Cluster(ctx context.Context) (*dashboard.ClusterView, error) {
	c := g.cluster
	if c == nil {
		return nil, nil
	}
	names := g.side().roleNames()
	nodes, holders, err := c.pg.Cluster(ctx, names, c.lease)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	taken, err := c.pg.TakenBy(ctx, time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, now.Location()))
	if err != nil {
		return nil, err
	}
	v := &dashboard.ClusterView{Node: c.name, Lease: c.lease.String(), Roles: []dashboard.ClusterRole{}}
	held := map[string]int{}
	for _, h := range holders {
		v.Roles = append(v.Roles, dashboard.ClusterRole{Role: h.Role, Node: h.Node, Running: h.Running})
		held[h.Node]++
	}
	for _, n := range nodes {
		v.Nodes = append(v.Nodes, dashboard.ClusterNode{Name: n.Name, Seen: n.Seen, Live: n.Live, Roles: held[n.Name],
			TakenToday: taken[n.Name]})
	}
	return v, nil
}
