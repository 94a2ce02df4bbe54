package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/jackc/pgx/v5"

	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/pgtest"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
)

// clusterView reads a node's GET /api/cluster; nil when it does not answer.
func (in *instance) clusterView() *dashboard.ClusterView {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + in.dash + "/api/cluster")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var v dashboard.ClusterView
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&v) != nil {
		return nil
	}
	return &v
}

// rolesBack waits until every role of the hospital's cluster runs again
// after a fault at from, and returns how long that took from from: a role
// counts once a node heard from after from holds its lock and, at that
// heartbeat, runs it. A role that moves more than once (taken over, then
// handed back to its restarted node) counts at its first move. It gives
// up after four leases and returns -1.
func (f *faultWorld) rolesBack(from time.Time) time.Duration {
	var pending map[string]bool
	for time.Since(from) < 4*clusterLease {
		for _, n := range f.nodes {
			if n.cmd == nil {
				continue
			}
			v := n.clusterView()
			if v == nil {
				continue
			}
			fresh := map[string]bool{}
			for _, nd := range v.Nodes {
				fresh[nd.Name] = nd.Live && nd.Seen.After(from)
			}
			if pending == nil {
				pending = map[string]bool{}
				for _, r := range v.Roles {
					pending[r.Role] = true
				}
			}
			for _, r := range v.Roles {
				if r.Running && fresh[r.Node] {
					delete(pending, r.Role)
				}
			}
			if len(pending) == 0 {
				return time.Since(from)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return -1
}

// TestFaultsTwoNodes is the fault suite with the hospital on two nodes of
// a cluster on a throwaway PostgreSQL (the lab as in TestFaults): the
// router's connections spread over both nodes and fail over. Cases: the
// nodes killed with SIGKILL in turn, every 3 s, and started again;
// PostgreSQL stopped at once (as a crash would) and started again under
// the load (the surrogates answer CE meanwhile); a node's role session
// ended by the database (pg_terminate_backend). In every case: every
// message that got CA reaches the lab's router once and its answer the
// hospital's once, the roles run again within the lease, and no mail is
// submitted twice when a node only lost its session. It prints its table
// to var/artifacts/faults-cluster.txt.
func TestFaultsTwoNodes(t *testing.T) {
	sc := scale()
	every := max(sc.every, 3*time.Second)
	type clusterRow struct {
		faultRow
		moves []time.Duration
		twice int // control IDs mailed to the lab more than once, counted at the SMTP server
	}
	moved := func(f *faultWorld, from time.Time, moves *[]time.Duration) {
		*moves = append(*moves, f.rolesBack(from))
	}
	cases := []struct {
		name   string
		during func(f *faultWorld, moves *[]time.Duration)
	}{
		{"none", func(f *faultWorld, moves *[]time.Duration) {}},
		{"kill -9 a node", func(f *faultWorld, moves *[]time.Duration) {
			for i := range sc.kills {
				time.Sleep(every)
				n := f.nodes[i%len(f.nodes)]
				n.kill()
				at := time.Now()
				f.killed[n] = append(f.killed[n], at)
				n.start()
				moved(f, at, moves)
			}
		}},
		{"PostgreSQL restart", func(f *faultWorld, moves *[]time.Duration) {
			time.Sleep(every)
			if err := f.pg.Halt(); err != nil {
				f.t.Fatal(err)
			}
			time.Sleep(sc.outage)
			f.dbDown = append(f.dbDown, time.Now())
			if err := f.pg.Resume(); err != nil {
				f.t.Fatal(err)
			}
			moved(f, time.Now(), moves)
		}},
		{"session terminated", func(f *faultWorld, moves *[]time.Duration) {
			for i := range sc.kills {
				time.Sleep(every)
				node := fmt.Sprintf("gw-%c", 'a'+i%len(f.nodes))
				at := time.Now()
				if n := terminateRoles(f.t, f.pg, node); n != 1 {
					f.t.Errorf("%d role sessions of %s ended, want 1", n, node)
				}
				moved(f, at, moves)
			}
		}},
	}
	var rows []clusterRow
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			pg, err := pgtest.Start()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { pg.Stop() })
			f := newFaultCluster(t, nil, pg, 2)
			for _, n := range f.nodes {
				n.waitReady("")
			}
			var moves []time.Duration
			row := clusterRow{faultRow: runFaultOn(t, f, c.name, func(f *faultWorld) { c.during(f, &moves) }), moves: moves}
			row.twice = mailedTwice(t, f, row.ca)
			rows = append(rows, row)
			if c.name == "none" {
				clusterEvidence(t, f, row.ca)
			}
			if row.lost != 0 || len(row.unexplained) != 0 || row.ca == 0 {
				t.Errorf("%s: %d got CA, %d lost, %d delivered twice, %d answers twice; not explained by a kill: %v\n%s", c.name,
					row.ca, row.lost, row.twice, row.answersTwice, row.unexplained, row.loadTable)
			}
			for _, d := range moves {
				if d < 0 || d > clusterLease {
					t.Errorf("%s: roles running again after %v (lease %s); every move: %v", c.name, d, clusterLease, moves)
				}
			}
			// A node that only lost its session stopped before another
			// took its roles (fencing): nothing twice. A kill sends again
			// at most the group in flight on the session (32 mails).
			strict := c.name == "none" || c.name == "session terminated"
			if row.kills > 0 && row.resubmitted > row.kills*32 || strict && row.resubmitted != 0 {
				t.Errorf("%s: %d mails submitted twice after %d kills", c.name, row.resubmitted, row.kills)
			}
			if row.kills > 0 && row.twice > row.kills*32 || strict && row.twice != 0 {
				t.Errorf("%s: %d control IDs mailed twice after %d kills", c.name, row.twice, row.kills)
			}
			if c.name == "PostgreSQL restart" && row.resentByRouter == 0 {
				t.Errorf("%s: the router sent nothing again: no CE while the database was down?", c.name)
			}
		})
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Fault suite, hospital on two nodes (PostgreSQL, lease %s): %d messages at %.0f/s from the router over 2 connections to each node (failing over), hospital → lab (PGP) → hospital, embedded SMTP/IMAP\n\n",
		clusterLease, sc.messages, sc.rate)
	fmt.Fprintf(&b, "%-20s %6s %10s %5s %13s %8s %13s %15s %9s %12s %9s %12s\n", "case", "CA", "delivered", "lost", "delivered 2x",
		"answers", "answers 2x", "router resends", "mails 2x", "control 2x", "drain", "roles back")
	for _, r := range rows {
		back := "-"
		if len(r.moves) > 0 {
			back = slices.Max(r.moves).Round(10 * time.Millisecond).String()
		}
		fmt.Fprintf(&b, "%-20s %6d %10d %5d %13d %8d %13d %15d %9d %12d %9s %12s\n", r.name, r.ca, r.delivered, r.lost, r.faultRow.twice,
			r.answers, r.answersTwice, r.resentByRouter, r.resubmitted, r.twice, r.drain.Round(100*time.Millisecond), back)
	}
	fmt.Fprintln(&b, "\nColumns as in faults.txt. control 2x: control IDs the SMTP server took more than one mail for, the lab's")
	fmt.Fprintln(&b, "mails opened with its key (a router's resend to the other node is one message, one mail). roles back: the longest, over the faults of the case, from the fault (the kill,")
	fmt.Fprintln(&b, "PostgreSQL back, the session ended) until every role ran again on a node heard from since. kill -9: the")
	fmt.Fprintln(&b, "nodes in turn, each started again at once. PostgreSQL restart: stopped in immediate mode (no checkpoint,")
	fmt.Fprintf(&b, "as a crash) for %s, the surrogates answering CE meanwhile. session terminated: pg_terminate_backend of\n", sc.outage)
	fmt.Fprintln(&b, "a node's role session, the nodes in turn: the node stops its roles at once and the database frees their")
	fmt.Fprintln(&b, "locks; mails 2x must be 0 there (fencing), and at most the group in flight (32) a kill.")
	t.Log("\n" + b.String())
	if err := os.WriteFile(filepath.Join(artifactDir(t), "faults-cluster.txt"), []byte(b.String()), 0o644); err != nil {
		t.Error(err)
	}
}

// clusterEvidence checks the evidence commands on the cluster's second
// node, whichever node mailed or fetched: the journals verify, one
// message's evidence re-verifies, and the export holds every mail sent.
func clusterEvidence(t *testing.T, f *faultWorld, ca int) {
	t.Helper()
	b := f.nodes[1]
	if out, code := b.run("journal", "verify", "-config", b.config); code != 0 {
		t.Errorf("journal verify on gw-b: exit %d\n%s", code, out)
	}
	if out, code := b.run("evidence", "-config", b.config, "Fnone-7"); code != 0 || !strings.Contains(out, "Fnone-7") {
		t.Errorf("evidence on gw-b: exit %d\n%s", code, out)
	}
	dir := t.TempDir()
	if out, code := b.run("journal", "export", "-config", b.config, "-out", dir); code != 0 {
		t.Fatalf("journal export: exit %d\n%s", code, out)
	}
	entries, err := journal.Read(filepath.Join(dir, "outgoing.mbox"))
	hl7Mails := 0
	for _, e := range entries {
		if strings.Contains(string(e.Mail), "Disposition-Notification-To:") {
			hl7Mails++ // ours that ask for a receipt: the HL7 messages, not our receipts
		}
	}
	if err != nil || hl7Mails != ca {
		t.Errorf("exported outgoing journal: %d mails asking for a receipt (of %d entries), want %d; %v", hl7Mails, len(entries), ca, err)
	}
	if in, err := journal.Read(filepath.Join(dir, "incoming.mbox")); err != nil || len(in) == 0 {
		t.Errorf("exported incoming journal: %d entries, %v", len(in), err)
	}
	// The listings read the cluster's database.
	if out, code := b.run("messages", "-config", b.config, "-limit", "1000"); code != 0 || strings.Count(out, "Fnone-") < ca {
		t.Errorf("messages on gw-b: exit %d, %d of the load's messages listed, want %d", code, strings.Count(out, "Fnone-"), ca)
	}
	if out, code := b.run("reports", "-config", b.config); code != 0 || !strings.Contains(out, "processed") {
		t.Errorf("reports on gw-b: exit %d\n%s", code, out)
	}
	// One picture from either node: the status, /metrics.
	for _, n := range f.nodes {
		out, code := n.run("status", "-config", n.config)
		if code != 0 || !strings.Contains(out, "Cluster (this node") || !strings.Contains(out, "gw-a") ||
			!strings.Contains(out, "gw-b") || !strings.Contains(out, "sender:lab") {
			t.Errorf("status of %s: exit %d\n%s", n.dir, code, out)
		}
		resp, err := http.Get("http://" + n.dash + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, want := range []string{`hl7mail_cluster_node_live{node="gw-a"} 1`, `hl7mail_cluster_node_live{node="gw-b"} 1`,
			`hl7mail_cluster_role_held{node="`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("/metrics of %s has no %s", n.dir, want)
			}
		}
	}
	v := f.nodes[0].clusterView()
	taken := 0
	for _, n := range v.Nodes {
		taken += n.TakenToday
	}
	if taken < ca {
		t.Errorf("the nodes took %d messages today, want at least the %d CA'd: %+v", taken, ca, v.Nodes)
	}
	// The page of the second node, in headless Chromium, shows both nodes
	// live and every role running.
	br := startBrowser(t)
	br.open("http://" + b.dash + "/")
	br.waitFor("the cluster's tables", fmt.Sprintf(`
		const live = (n) => document.querySelector('#cluster-nodes tbody tr[data-node="' + n + '"] td:nth-child(2)')?.textContent === 'live';
		const roles = [...document.querySelectorAll('#cluster-roles tbody tr')];
		return !document.querySelector('#cluster').hidden && live('gw-a') && live('gw-b') && roles.length === %d &&
			roles.every((r) => r.children[2].textContent === 'yes');`, len(v.Roles)), 10*time.Second)
	br.screenshot(filepath.Join(artifactDir(t), "dashboard-cluster.png"))

	// Pipe mode with the node stopped: a mail the cluster took already is
	// recognised from its database as a replay.
	var again embedded.Taken
	for _, m := range f.w.Taken() {
		if m.To == "edi@hospital.test" && strings.Contains(string(m.Data), "application/pgp-encrypted") {
			again = m
			break
		}
	}
	b.stop()
	cmd := exec.Command(binary, "receive", "-config", b.config)
	cmd.Stdin = bytes.NewReader(again.Data)
	piped, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(piped), "quarantined: replay") {
		t.Errorf("receive of a mail the cluster took, on stopped gw-b: %v, want it quarantined as a replay\n%s", err, piped)
	}
}

// mailedTwice opens every mail the SMTP server took for the lab, with the
// lab's key, and returns how many control IDs it took more than one mail
// for (the same message mailed again, under its Message-ID or another).
func mailedTwice(t *testing.T, f *faultWorld, ca int) int {
	t.Helper()
	keys := keysForFaults(t)
	lab, _, err := security.LoadPGPKeyFile(filepath.Join(keys, "lab", "private.asc"), nil)
	if err != nil {
		t.Fatal(err)
	}
	hospital, _, err := security.LoadPGPKeyFile(filepath.Join(keys, "hospital", "public.asc"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ring := security.PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{hospital}}
	seen := map[string]int{}
	for _, m := range f.w.Taken() {
		if m.To != "lab@partner.test" {
			continue
		}
		o, err := security.PGPOpen(m.Data, ring, hospital, time.Now())
		if err != nil {
			continue // our receipts to the lab are not encrypted to it as HL7 is; they carry no control ID
		}
		payload, _, err := security.DecodeEDI(o.Entity, security.Accept{})
		if err != nil {
			continue
		}
		if h, err := hl7.ParseHeader(payload); err == nil {
			seen[h.ControlID]++
		}
	}
	twice := 0
	for _, n := range seen {
		if n > 1 {
			twice++
		}
	}
	if len(seen) != ca {
		t.Errorf("the SMTP server took mails for %d control IDs, %d got CA", len(seen), ca)
	}
	return twice
}

// terminateRoles ends node's role session from the database's side and
// returns how many sessions it ended.
func terminateRoles(t *testing.T, pg *pgtest.Server, node string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg.DSN)
	if err != nil {
		t.Error(err)
		return 0
	}
	defer c.Close(ctx)
	var n int
	if err := c.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
		"hl7mail roles "+node).Scan(&n); err != nil {
		t.Error(err)
	}
	return n
}

// TestStoreMigrate moves a running hospital into a cluster: the hospital
// mails 20 messages, takes 20 more while the SMTP server is down, and
// stops; "hl7mail store migrate" copies its store into a throwaway
// PostgreSQL; started again as a node of a cluster, it mails the 20 that
// were queued and 20 new ones, each once, and its journals verify.
func TestStoreMigrate(t *testing.T) {
	f := newFaultWorld(t, nil)
	load := func(prefix string, n int) {
		t.Helper()
		if out, err := exec.Command(binary, "bench", "load", "-addr", f.toLab, "-conns", "2", "-n", fmt.Sprint(n),
			"-prefix", prefix, "-give-up", "30s").CombinedOutput(); err != nil {
			t.Fatalf("bench load: %v\n%s", err, out)
		}
	}
	delivered := func(want int) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			msgs, _ := f.labRouter.Arrivals()
			answers, _ := f.hRouter.Arrivals()
			if len(msgs) >= want && len(answers) >= want {
				if len(msgs) != want {
					t.Errorf("%d messages at the lab's router, want %d", len(msgs), want)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d messages at the lab's router and %d answers after 60s, want %d\n%s", len(msgs), len(answers), want, f.hospital.log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	load("before", 20)
	delivered(20)
	if err := f.w.StopSMTP(); err != nil {
		t.Fatal(err)
	}
	load("queued", 20)
	f.hospital.stop()
	pg, err := pgtest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pg.Stop() })
	os.WriteFile(filepath.Join(f.hospital.dir, "postgres-dsn"), []byte(pg.DSN+"\n"), 0o600)
	f.hospital.edit("store: var\n", fmt.Sprintf("store: var\ncluster: {node: gw-a, postgres: {dsn_file: postgres-dsn, lease: %s}}\n", clusterLease))
	out, code := f.hospital.run("store", "migrate", "-config", f.hospital.config)
	if code != 0 || !strings.Contains(out, "checked the copy") {
		t.Fatalf("store migrate: exit %d\n%s", code, out)
	}
	if !strings.Contains(out, "messages    ") {
		t.Errorf("store migrate printed no message count:\n%s", out)
	}
	// A second move into the same database is refused.
	if out, code := f.hospital.run("store", "migrate", "-config", f.hospital.config); code == 0 {
		t.Errorf("second store migrate: exit 0\n%s", out)
	}
	if err := f.w.StartSMTP(); err != nil {
		t.Fatal(err)
	}
	f.hospital.start()
	load("after", 20)
	delivered(60)
	if out, code := f.hospital.run("journal", "verify", "-config", f.hospital.config); code != 0 {
		t.Errorf("journal verify on the cluster: exit %d\n%s", code, out)
	}
	if n := f.w.Resubmitted(); n != 0 {
		t.Errorf("%d mails submitted twice", n)
	}
}
