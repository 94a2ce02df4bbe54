// Package roles decides which node of a cluster runs which role (the IMAP
// watcher of an account, the sender of a partner, the deliverer of a
// router, the sweeper): each role is a PostgreSQL advisory lock held on the
// node's own dedicated session, so that exactly one node holds it, and
// PostgreSQL frees it when the session ends, however the node died.
//
// Fencing. A node acts on a role only while it knows its session lives: it
// heartbeats on that session every Lease/8, each statement bounded by
// Lease/4, and when the session breaks or a statement fails it stops every
// role at once and acts on nothing until it has claimed again: at most
// 3/8 of the lease after its session ended. A node that wins a lock whose
// last holder did not release it (it died, or lost its session) waits
// Lease/2 before it starts the role, by which time that node has stopped:
// never two nodes on one role, and a dead node's roles move within the
// lease (a round to see the lock free, the wait, a round). A role given up
// on purpose (handed back, a clean stop) is recorded as released once it
// has stopped, before its lock is freed: the next holder starts it at
// once. A node whose session broke connects again at once and claims its
// roles back before another takes them for gone: another node claims a
// free role only while the node it prefers has no session.
//
// Spread. Nodes record their heartbeats in a table; each role prefers one
// of the live nodes (by its place in the sorted list of roles and nodes).
// A node claims its preferred roles at once, others once it sees them
// free (their node is gone), and hands back a role whose preferred node is
// live again.
//
// It imports, of this module, nothing.
package roles

import (
	"context"
	"errors"
	"hash/fnv"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Options configure Start.
type Options struct {
	DSN   string
	Node  string        // this node's name, unique in the cluster
	Lease time.Duration // default 10s
	Roles []string      // every role there is, the same on every node
	// Gain starts a role; Lose stops it and returns once it has stopped.
	// Both are called from one goroutine, never at once.
	Gain, Lose func(role string)
	Logger     *slog.Logger
}

// Coordinator claims, holds and gives up roles for one node.
type Coordinator struct {
	o      Options
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	held   map[string]bool      // started (Gain called)
	locked map[string]time.Time // lock won at, waiting out the fence
	conn   *pgx.Conn
	lastOK time.Time
}

// Start connects (or keeps trying to) and runs the node's part until
// Close.
func Start(o Options) (*Coordinator, error) {
	if o.DSN == "" || o.Node == "" {
		return nil, errors.New("roles: a DSN and a node name are required")
	}
	if o.Lease <= 0 {
		o.Lease = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Coordinator{o: o, cancel: cancel, done: make(chan struct{}), held: map[string]bool{},
		locked: map[string]time.Time{}}
	go c.run(ctx)
	return c, nil
}

// Held returns the roles this node runs now, sorted.
func (c *Coordinator) Held() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := []string{}
	for r := range c.held {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// SetRoles replaces the roles there are (a reload that added or removed
// partners): roles no more are stopped and their locks freed, new ones
// claimed, from the next round.
func (c *Coordinator) SetRoles(roles []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.o.Roles = slices.Clone(roles)
}

// Close stops every role, frees the locks and ends the session. It may be
// called more than once.
func (c *Coordinator) Close() {
	c.cancel()
	<-c.done
}

// SchemaLock is the advisory lock under which nodes create what is
// missing of the schema, one at a time.
const SchemaLock int64 = 0x686c376d61696c // "hl7mail"

// ApplicationName is how node's role session is named in PostgreSQL
// (pg_stat_activity.application_name).
func ApplicationName(node string) string { return "hl7mail roles " + node }

// key is a role's advisory lock.
func key(role string) int64 {
	h := fnv.New64a()
	h.Write([]byte("hl7mail role " + role))
	return int64(h.Sum64())
}

func (c *Coordinator) run(ctx context.Context) {
	defer close(c.done)
	tick := time.NewTicker(c.o.Lease / 8)
	defer tick.Stop()
	retried := false
	for {
		had := c.conn != nil
		c.round(ctx)
		if had && c.conn == nil && !retried && ctx.Err() == nil {
			// The session broke: connect again at once rather than a
			// round later, so that the node is back before another node
			// takes its roles for gone.
			retried = true
			continue
		}
		retried = false
		select {
		case <-ctx.Done():
			c.dropAll("closing")
			if c.conn != nil {
				cctx, cancel := context.WithTimeout(context.Background(), c.o.Lease/4)
				// Every role has stopped: the next holder need not wait
				// out the fence.
				c.conn.Exec(cctx, `UPDATE roles SET released = true WHERE node = $1`, c.o.Node)
				c.conn.Close(cctx) // the locks go with the session
				cancel()
			}
			return
		case <-tick.C:
		}
	}
}

// round heartbeats, fences, claims and hands back, once.
func (c *Coordinator) round(ctx context.Context) {
	step := c.o.Lease / 4
	if c.conn == nil {
		cfg, err := pgx.ParseConfig(c.o.DSN)
		if err != nil {
			c.o.Logger.Error("roles: the DSN is not valid", "err", err)
			return
		}
		// How the session shows in pg_stat_activity, for the operator.
		cfg.RuntimeParams["application_name"] = ApplicationName(c.o.Node)
		cctx, cancel := context.WithTimeout(ctx, step)
		conn, err := pgx.ConnectConfig(cctx, cfg)
		cancel()
		if err != nil {
			c.o.Logger.Warn("roles: no database session; holding no role", "err", err)
			return
		}
		c.conn = conn
		// Nodes starting together would race on CREATE TABLE IF NOT
		// EXISTS (a duplicate pg_type row): one at a time.
		err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, SchemaLock); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, seen TIMESTAMPTZ NOT NULL)`); err != nil {
				return err
			}
			// What each node runs, as of its last heartbeat: what the
			// operators see (View).
			if _, err := tx.Exec(ctx, `ALTER TABLE nodes ADD COLUMN IF NOT EXISTS running TEXT[] NOT NULL DEFAULT '{}'`); err != nil {
				return err
			}
			// Who ran each role last, and whether it gave it up after it
			// had stopped (released): then the next holder starts at
			// once; otherwise (a node died, or lost its session) it
			// waits out the fence.
			_, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS roles (role TEXT PRIMARY KEY, node TEXT NOT NULL,
				released BOOLEAN NOT NULL)`)
			return err
		})
		if err != nil {
			c.lost(err)
			return
		}
	}
	beat := c.Held()
	if err := c.exec(ctx, `INSERT INTO nodes (name, seen, running) VALUES ($1, now(), $2)
		ON CONFLICT (name) DO UPDATE SET seen = now(), running = $2`, c.o.Node, beat); err != nil {
		c.lost(err)
		return
	}
	c.lastOK = time.Now()
	live, err := c.liveNodes(ctx)
	if err != nil {
		c.lost(err)
		return
	}
	c.mu.Lock()
	roles := slices.Sorted(slices.Values(c.o.Roles))
	var gone []string
	for r := range c.held {
		if !slices.Contains(roles, r) {
			gone = append(gone, r)
		}
	}
	for r := range c.locked {
		if !slices.Contains(roles, r) {
			gone = append(gone, r)
		}
	}
	c.mu.Unlock()
	for _, r := range gone {
		if c.conn == nil {
			return
		}
		// A role no more (a partner removed at a reload): stopped, and
		// its lock freed.
		c.release(ctx, r, "no such role any more")
	}
	for i, r := range roles {
		if ctx.Err() != nil || c.conn == nil {
			return // closing, or the session was lost in this round
		}
		prefers := live[i%len(live)]
		preferred := prefers == c.o.Node
		c.mu.Lock()
		held, at, locked := c.held[r], c.locked[r], !c.locked[r].IsZero()
		c.mu.Unlock()
		switch {
		case held && !preferred:
			// Its preferred node is live (back, or new): hand it over.
			c.release(ctx, r, "handed back to its preferred node")
		case held:
		case locked:
			if time.Since(at) >= c.o.Lease/2 && time.Since(c.lastOK) < c.o.Lease/2 {
				c.gain(ctx, r)
			}
		default:
			c.claim(ctx, r, prefers)
		}
	}
	if held := c.Held(); c.conn != nil && !slices.Equal(held, beat) {
		// What runs now is told at once, not at the next heartbeat.
		if err := c.exec(ctx, `UPDATE nodes SET running = $2 WHERE name = $1`, c.o.Node, held); err != nil {
			c.lost(err)
		}
	}
}

// gain starts role r, whose lock this node holds, once it has recorded
// that it runs it (not released: a crash from here on leaves the next
// holder to wait out the fence).
func (c *Coordinator) gain(ctx context.Context, r string) {
	if err := c.exec(ctx, `INSERT INTO roles (role, node, released) VALUES ($1, $2, false)
		ON CONFLICT (role) DO UPDATE SET node = $2, released = false`, r, c.o.Node); err != nil {
		c.lost(err)
		return
	}
	c.mu.Lock()
	delete(c.locked, r)
	c.held[r] = true
	c.mu.Unlock()
	c.o.Logger.Info("role taken", "role", r, "node", c.o.Node)
	c.o.Gain(r)
}

// claim tries role r's lock: at once when r prefers this node, otherwise
// when no node holds it and the node it prefers has no role session (it
// is gone, not merely reconnecting). Won, the role starts at once when its
// last holder released it after stopping it, and after the fence wait
// otherwise.
func (c *Coordinator) claim(ctx context.Context, r, prefers string) {
	if prefers != c.o.Node {
		var free bool
		// A bigint advisory key shows in pg_locks as its high and low
		// halves, with objsubid 1.
		if err := c.queryRow(ctx, `SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
			AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1)
			AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $2)`,
			[]any{key(r), ApplicationName(prefers)}, &free); err != nil {
			c.lost(err)
			return
		}
		if !free {
			return
		}
	}
	var got bool
	if err := c.queryRow(ctx, `SELECT pg_try_advisory_lock($1)`, []any{key(r)}, &got); err != nil {
		c.lost(err)
		return
	}
	if !got {
		return
	}
	var released bool
	if err := c.queryRow(ctx, `SELECT coalesce((SELECT released FROM roles WHERE role = $1), true)`, []any{r}, &released); err != nil {
		c.lost(err)
		return
	}
	if released {
		c.gain(ctx, r)
		return
	}
	c.mu.Lock()
	c.locked[r] = time.Now()
	c.mu.Unlock()
}

// release stops role r (if started) and frees its lock.
func (c *Coordinator) release(ctx context.Context, r, why string) {
	c.mu.Lock()
	held := c.held[r]
	delete(c.held, r)
	delete(c.locked, r)
	c.mu.Unlock()
	if held {
		c.o.Lose(r)
		// It has stopped: the next holder starts it at once.
		if err := c.exec(ctx, `UPDATE roles SET released = true WHERE role = $1 AND node = $2`, r, c.o.Node); err != nil {
			c.lost(err)
			return
		}
	}
	var ok bool
	if err := c.queryRow(ctx, `SELECT pg_advisory_unlock($1)`, []any{key(r)}, &ok); err != nil {
		c.lost(err)
		return
	}
	c.o.Logger.Info("role given up", "role", r, "node", c.o.Node, "why", why)
}

// liveNodes are the nodes heard from within the lease, sorted; this one
// among them.
func (c *Coordinator) liveNodes(ctx context.Context) ([]string, error) {
	qctx, cancel := context.WithTimeout(ctx, c.o.Lease/4)
	defer cancel()
	rows, err := c.conn.Query(qctx, `SELECT name FROM nodes WHERE seen > now() - make_interval(secs => $1) ORDER BY name`,
		c.o.Lease.Seconds())
	if err != nil {
		return nil, err
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	if !slices.Contains(names, c.o.Node) {
		names = append(names, c.o.Node)
		slices.Sort(names)
	}
	return names, nil
}

func (c *Coordinator) exec(ctx context.Context, sql string, args ...any) error {
	qctx, cancel := context.WithTimeout(ctx, c.o.Lease/4)
	defer cancel()
	_, err := c.conn.Exec(qctx, sql, args...)
	return err
}

func (c *Coordinator) queryRow(ctx context.Context, sql string, args []any, dest ...any) error {
	qctx, cancel := context.WithTimeout(ctx, c.o.Lease/4)
	defer cancel()
	return c.conn.QueryRow(qctx, sql, args...).Scan(dest...)
}

// lost ends the session after a failure on it: every role stops at once,
// and the locks are PostgreSQL's to free.
func (c *Coordinator) lost(err error) {
	if errors.Is(err, context.Canceled) {
		return // closing
	}
	c.o.Logger.Error("roles: database session lost; every role stops until claimed again", "node", c.o.Node, "err", err)
	c.dropAll("session lost")
	if c.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c.conn.Close(ctx)
		cancel()
		c.conn = nil
	}
}

// dropAll stops every role held and forgets locks won.
func (c *Coordinator) dropAll(why string) {
	c.mu.Lock()
	var held []string
	for r := range c.held {
		held = append(held, r)
	}
	c.held, c.locked = map[string]bool{}, map[string]time.Time{}
	c.mu.Unlock()
	slices.Sort(held)
	for _, r := range held {
		c.o.Logger.Info("role stopped", "role", r, "node", c.o.Node, "why", why)
		c.o.Lose(r)
	}
}

// Querier is a database handle that reads (a pool, a connection).
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// Node is a node of the cluster as the database last heard from it.
type Node struct {
	Name string    `json:"name"`
	Seen time.Time `json:"seen"` // its last heartbeat
	Live bool      `json:"live"` // heard from within the lease
}

// Holder is a role, the node that holds its lock ("" when none does), and
// whether that node runs it yet (a node that won the lock waits out the
// fence first), as of the node's last heartbeat.
type Holder struct {
	Role    string `json:"role"`
	Node    string `json:"node"`
	Running bool   `json:"running"`
}

// View is the cluster as any node sees it: every node that ever
// heartbeat, and which node holds each of roles, read from the database
// (the nodes table, and the advisory locks of the nodes' role sessions).
// lease tells a live node from a gone one.
func View(ctx context.Context, q Querier, roles []string, lease time.Duration) ([]Node, []Holder, error) {
	rows, err := q.Query(ctx, `SELECT name, seen, seen > now() - make_interval(secs => $1), running FROM nodes ORDER BY name`,
		lease.Seconds())
	if err != nil {
		return nil, nil, err
	}
	runs := map[string][]string{}
	nodes, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Node, error) {
		var n Node
		var running []string
		err := r.Scan(&n.Name, &n.Seen, &n.Live, &running)
		runs[n.Name] = running
		return n, err
	})
	if err != nil {
		return nil, nil, err
	}
	rows, err = q.Query(ctx, `SELECT ((l.classid::bigint << 32) | l.objid::bigint), a.application_name
		FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND starts_with(a.application_name, $1)`,
		ApplicationName(""))
	if err != nil {
		return nil, nil, err
	}
	byKey := map[int64]string{}
	var k int64
	var app string
	if _, err := pgx.ForEachRow(rows, []any{&k, &app}, func() error {
		byKey[k] = app[len(ApplicationName("")):]
		return nil
	}); err != nil {
		return nil, nil, err
	}
	holders := make([]Holder, 0, len(roles))
	for _, r := range slices.Sorted(slices.Values(roles)) {
		n := byKey[key(r)]
		holders = append(holders, Holder{Role: r, Node: n, Running: n != "" && slices.Contains(runs[n], r)})
	}
	return nodes, holders, nil
}
