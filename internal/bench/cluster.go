package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/pgstore"
	"github.com/hl7mail/hl7mail/surrogate"
)

// PGBaseline is the cluster's baseline: a bare MLLP server that INSERTs
// each message into PostgreSQL and COMMITs it (one statement, autocommit,
// on the connection's own database session) before answering CA. It is
// the floor any acknowledgement durable in the shared database pays.
type PGBaseline struct {
	ln   net.Listener
	srv  mllp.Server
	pool *pgxpool.Pool
	ids  *hl7.IDGen
}

// StartPGBaseline starts the baseline on the database at dsn, with room
// for conns sessions.
func StartPGBaseline(ctx context.Context, dsn string, conns int) (*PGBaseline, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = int32(conns + 1)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS bench_baseline (id BIGSERIAL PRIMARY KEY, payload BYTEA NOT NULL)`); err != nil {
		pool.Close()
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		pool.Close()
		return nil, err
	}
	b := &PGBaseline{ln: ln, pool: pool, ids: hl7.NewIDGen("BL", time.Now())}
	b.srv.Handler = mllp.HandlerFunc(b.serveConn)
	go b.srv.Serve(ln)
	return b, nil
}

// Addr is the listening address.
func (b *PGBaseline) Addr() string { return b.ln.Addr().String() }

func (b *PGBaseline) serveConn(ctx context.Context, nc net.Conn) {
	serveDurable(nc, b.ids, func(frame []byte) error {
		_, err := b.pool.Exec(ctx, `INSERT INTO bench_baseline (payload) VALUES ($1)`, frame)
		return err
	})
}

// Close stops the server.
func (b *PGBaseline) Close() {
	b.srv.Close()
	b.srv.Wait()
	b.pool.Close()
}

// clusterNode is an in-process node: a surrogate on the shared store.
type clusterNode struct {
	st   *pgstore.Store
	srv  *surrogate.Server
	ln   net.Listener
	done chan error
}

func startNode(ctx context.Context, dsn, node string) (*clusterNode, error) {
	log := slog.New(slog.NewJSONHandler(io.Discard, nil))
	st, err := pgstore.Open(ctx, pgstore.Options{DSN: dsn, Node: node, Logger: log})
	if err != nil {
		return nil, err
	}
	srv, err := surrogate.New(surrogate.Options{Partner: "bench", Spool: st, Logger: log, MaxConnections: 64})
	if err != nil {
		st.Close()
		return nil, err
	}
	ln, err := surrogate.Listen(ctx, "127.0.0.1:0")
	if err != nil {
		st.Close()
		return nil, err
	}
	n := &clusterNode{st: st, srv: srv, ln: ln, done: make(chan error, 1)}
	go func() { n.done <- srv.Serve(ln) }()
	return n, nil
}

func (n *clusterNode) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n.srv.Shutdown(ctx)
	<-n.done
	n.st.Close()
}

// ClusterNodes is how many nodes the cluster bench runs at more than one
// connection.
const ClusterNodes = 2

// RunCluster measures the CA path of a cluster on the PostgreSQL at dsn
// beside the PostgreSQL baseline, taking turns slice by slice as Run does:
// at one connection, one node; at more, ClusterNodes nodes with conns
// connections each, against the baseline with as many connections in all.
func RunCluster(ctx context.Context, dsn string, opts Options) ([]Result, error) {
	if len(opts.Conns) == 0 {
		opts.Conns = []int{1, 16}
	}
	if opts.Messages <= 0 {
		opts.Messages = 20000
	}
	if opts.Warmup <= 0 {
		opts.Warmup = 200
	}
	if opts.Rounds <= 0 {
		opts.Rounds = 5
	}
	var out []Result
	for _, conns := range opts.Conns {
		for round := 1; round <= opts.Rounds; round++ {
			pair, err := runClusterPair(ctx, dsn, opts, conns)
			if err != nil {
				return nil, err
			}
			for j := range pair {
				pair[j].Round = round
			}
			out = append(out, pair...)
		}
	}
	return out, nil
}

func runClusterPair(ctx context.Context, dsn string, opts Options, conns int) ([]Result, error) {
	nodes := 1
	if conns > 1 {
		nodes = ClusterNodes
	}
	total := conns * nodes
	base, err := StartPGBaseline(ctx, dsn, total)
	if err != nil {
		return nil, fmt.Errorf("baseline: %w", err)
	}
	defer base.Close()
	var addrs []string
	var stores []*pgstore.Store
	for i := range nodes {
		n, err := startNode(ctx, dsn, fmt.Sprintf("bench-%c", 'a'+i))
		if err != nil {
			return nil, fmt.Errorf("node: %w", err)
		}
		defer n.close()
		addrs, stores = append(addrs, n.ln.Addr().String()), append(stores, n.st)
	}
	run := time.Now().UnixNano()
	if _, err := Drive(ctx, base.Addr(), total, opts.Warmup, Unique(opts.Corpus, opts.Warmup, fmt.Sprintf("W%x", run))); err != nil {
		return nil, err
	}
	if _, _, _, err := driveAll(ctx, addrs, conns, Unique(opts.Corpus, opts.Warmup, fmt.Sprintf("V%x", run))); err != nil {
		return nil, err
	}
	msgs := Unique(opts.Corpus, opts.Messages, fmt.Sprintf("M%x", run))
	per := max(opts.Messages/Chunks, total)
	var lat [2][]time.Duration
	var bad [2]int
	var elapsed [2]time.Duration
	var commits, accepted int64
	for _, s := range stores {
		st := s.Stats()
		commits, accepted = commits-st.Commits, accepted-st.Messages
	}
	for off := 0; off < len(msgs); off += per {
		chunk := msgs[off:min(off+per, len(msgs))]
		l, b, e, err := drive(ctx, base.Addr(), total, len(chunk), chunk)
		if err != nil {
			return nil, fmt.Errorf("baseline: %w", err)
		}
		lat[0], bad[0], elapsed[0] = append(lat[0], l...), bad[0]+b, elapsed[0]+e
		if l, b, e, err = driveAll(ctx, addrs, conns, chunk); err != nil {
			return nil, fmt.Errorf("hl7mail: %w", err)
		}
		lat[1], bad[1], elapsed[1] = append(lat[1], l...), bad[1]+b, elapsed[1]+e
	}
	for _, s := range stores {
		st := s.Stats()
		commits, accepted = commits+st.Commits, accepted+st.Messages
	}
	b := summarize(total, lat[0], bad[0], elapsed[0])
	b.Server, b.PerCommit = "baseline (INSERT+COMMIT)", 1
	h := summarize(total, lat[1], bad[1], elapsed[1])
	h.Server = fmt.Sprintf("hl7mail, %d node(s)", nodes)
	if commits > 0 {
		h.PerCommit = float64(accepted) / float64(commits)
	}
	return []Result{b, h}, nil
}

// driveAll sends msgs split evenly over the nodes at addrs, conns
// connections each, all at once; elapsed is until the last is answered.
func driveAll(ctx context.Context, addrs []string, conns int, msgs [][]byte) ([]time.Duration, int, time.Duration, error) {
	var mu sync.Mutex
	var all []time.Duration
	var bad int
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	share := (len(msgs) + len(addrs) - 1) / len(addrs)
	for i, addr := range addrs {
		part := msgs[min(i*share, len(msgs)):min((i+1)*share, len(msgs))]
		if len(part) == 0 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, b, _, err := drive(ctx, addr, conns, len(part), part)
			mu.Lock()
			defer mu.Unlock()
			all, bad = append(all, l...), bad+b
			if err != nil && firstErr == nil {
				firstErr = err
			}
		}()
	}
	wg.Wait()
	return all, bad, time.Since(start), firstErr
}
