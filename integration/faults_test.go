package integration

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/pgtest"
)

// faultScale is the size of the fault suite: short in make test, long in
// make soak (HL7MAIL_SOAK=1).
type faultScale struct {
	messages int
	rate     float64 // new messages per second from the router
	kills    int     // kill -9 and restarts per kill case
	every    time.Duration
	outage   time.Duration // how long a server or the router stays down
}

func scale() faultScale {
	if os.Getenv("HL7MAIL_SOAK") != "" {
		return faultScale{messages: 3000, rate: 60, kills: 15, every: 3 * time.Second, outage: 20 * time.Second}
	}
	return faultScale{messages: 240, rate: 60, kills: 3, every: 1200 * time.Millisecond, outage: 3 * time.Second}
}

// faultWorld is a hospital and a lab (PGP both ways) as built binaries,
// over in-process SMTP and IMAP servers that can be stopped, with stand-in
// routers that can be stopped too.
type faultWorld struct {
	t                  *testing.T
	w                  *embedded.World
	hospital, lab      *instance
	hRouter, labRouter *embedded.Router
	toLab              string // the hospital's surrogate for the lab (each node's, comma-separated, in a cluster)
	// nodes are the hospital's instances: the one hospital, or the nodes
	// of its cluster on pg (hospital is the first).
	nodes      []*instance
	pg         *pgtest.Server
	killed     map[*instance][]time.Time // when each instance was dead after SIGKILL
	routerDown []time.Time               // when the lab's router had stopped
	// dbDown: the ends of the hospital's database outages (a cluster's
	// PostgreSQL stopped), taken before it starts again. A node delivering
	// at the outage cannot record the router's answer nor pick another
	// message until then: as at a kill, that one may arrive again.
	dbDown []time.Time
}

var faultKeys struct {
	once sync.Once
	dir  string
	err  error
}

// keysForFaults makes the two sites' PGP keys once for every case.
func keysForFaults(t *testing.T) string {
	faultKeys.once.Do(func() {
		faultKeys.dir, faultKeys.err = os.MkdirTemp("", "hl7mail-fault-keys")
		for _, s := range []struct{ name, email string }{{"hospital", "edi@hospital.test"}, {"lab", "lab@partner.test"}} {
			if faultKeys.err == nil {
				var out []byte
				out, faultKeys.err = exec.Command(binary, "keygen", "-kind", "pgp", "-name", s.name, "-email", s.email,
					"-out", filepath.Join(faultKeys.dir, s.name)).CombinedOutput()
				if faultKeys.err != nil {
					faultKeys.err = fmt.Errorf("keygen: %v\n%s", faultKeys.err, out)
				}
			}
		}
	})
	if faultKeys.err != nil {
		t.Fatal(faultKeys.err)
	}
	return faultKeys.dir
}

// newFaultWorld starts the two instances; prep, when set, is called with
// the test, each site's name and its folder before it starts.
func newFaultWorld(t *testing.T, prep func(t *testing.T, site, dir string)) *faultWorld {
	t.Helper()
	return newFaultCluster(t, prep, nil, 1)
}

// clusterLease is the lease of the hospital's nodes in the two-node fault
// suite: short, so that the suite sees many moves.
const clusterLease = 2 * time.Second

// newFaultCluster starts the lab and the hospital, the hospital as nodes
// nodes of a cluster on pg when pg is set.
func newFaultCluster(t *testing.T, prep func(t *testing.T, site, dir string), pg *pgtest.Server, nodes int) *faultWorld {
	t.Helper()
	keys := keysForFaults(t)
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	f := &faultWorld{t: t, w: w, killed: map[*instance][]time.Time{}, pg: pg}
	if f.hRouter, err = embedded.StartRouter("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.hRouter.Close() })
	if f.labRouter, err = embedded.StartRouter("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.labRouter.Close() })
	dir := t.TempDir()
	site := func(name, folder, email, router, partner, cluster string, listen map[string]string) *instance {
		d := filepath.Join(dir, folder)
		os.MkdirAll(d, 0o700)
		os.WriteFile(filepath.Join(d, "imap-password"), []byte("secret\n"), 0o600)
		if prep != nil {
			prep(t, name, d)
		}
		p := filepath.Join(d, "partners.yaml")
		dash := freePort(t)
		os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: %s/%s/private.asc}
store: var
%srouter: {addr: %s, ack_timeout: 5s}
smtp: {addr: %s, tls: none, retry: 300ms}
imap: {addr: %s, tls: none, username: %s, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
%s`, name, email, keys, name, cluster, router, w.SMTPAddr, w.IMAPAddr, email, dash, partner)), 0o600)
		in := &instance{t: t, dir: d, config: p, listen: listen, dash: dash}
		t.Cleanup(in.stop)
		return in
	}
	var toLab []string
	for i := range nodes {
		folder, cluster := "hospital", ""
		if pg != nil {
			node := fmt.Sprintf("gw-%c", 'a'+i)
			folder = "hospital-" + node
			os.MkdirAll(filepath.Join(dir, folder), 0o700)
			os.WriteFile(filepath.Join(dir, folder, "postgres-dsn"), []byte(pg.DSN+"\n"), 0o600)
			cluster = fmt.Sprintf("cluster: {node: %s, postgres: {dsn_file: postgres-dsn, lease: %s}}\n", node, clusterLease)
		}
		listen := freePort(t)
		toLab = append(toLab, listen)
		f.nodes = append(f.nodes, site("hospital", folder, "edi@hospital.test", f.hRouter.Addr, fmt.Sprintf(
			"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: %s/lab/public.asc}\n", listen, keys),
			cluster, map[string]string{"lab": listen}))
	}
	f.hospital, f.toLab = f.nodes[0], strings.Join(toLab, ",")
	f.lab = site("lab", "lab", "lab@partner.test", f.labRouter.Addr, fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: %s/hospital/public.asc}\n",
		freePort(t), keys), "", map[string]string{})
	for _, n := range f.nodes {
		n.start()
	}
	f.lab.start()
	return f
}

// faultRow is one line of the fault table.
type faultRow struct {
	name                  string
	ca, delivered         int
	lost, twice           int
	answers, answersTwice int
	unexplained           []string // deliveries twice not due to a kill in the window
	resentByRouter        int
	resubmitted           int // mails the SMTP server took twice (by Message-ID), both ways
	byKilled              int // of those, the ones the killed instance sent
	kills                 int
	drain                 time.Duration
	loadTable             string
}

// runFault sends the load to the hospital's surrogate while during runs,
// then waits for every message that got CA to reach the lab's router and
// its answer the hospital's.
func runFault(t *testing.T, name string, prep func(t *testing.T, site, dir string), during func(f *faultWorld)) faultRow {
	t.Helper()
	return runFaultOn(t, newFaultWorld(t, prep), name, during)
}

// runFaultOn is runFault on the world f: with a hospital of two nodes the
// router's connections are spread over both, and one that breaks goes on
// at the other (a router's failover list).
func runFaultOn(t *testing.T, f *faultWorld, name string, during func(f *faultWorld)) faultRow {
	t.Helper()
	sc := scale()
	record := filepath.Join(t.TempDir(), "acked")
	conns := 4 / len(f.nodes)
	load := exec.Command(binary, "bench", "load", "-addr", f.toLab, "-conns", fmt.Sprint(conns), "-n", fmt.Sprint(sc.messages),
		"-rate", fmt.Sprint(sc.rate), "-prefix", "F"+strings.ReplaceAll(name, " ", ""), "-record", record, "-give-up", "90s",
		fmt.Sprintf("-failover=%v", len(f.nodes) > 1))
	loadOut := &lockedBuffer{}
	load.Stdout, load.Stderr = loadOut, loadOut
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	during(f)
	recovered := time.Now()
	if err := load.Wait(); err != nil {
		t.Errorf("%s: bench load: %v\n%s", name, err, loadOut)
	}
	acked := map[string]bool{}
	if data, err := os.ReadFile(record); err == nil {
		sc := bufio.NewScanner(strings.NewReader(string(data)))
		for sc.Scan() {
			acked[sc.Text()] = true
		}
	}
	idOf := func(m []byte, ack bool) string {
		if ack {
			if a, err := hl7.ParseAck(m); err == nil {
				return a.ControlID
			}
		} else if h, err := hl7.ParseHeader(m); err == nil {
			return h.ControlID
		}
		return ""
	}
	count := func(r *embedded.Router, ack bool) map[string]int {
		seen := map[string]int{}
		msgs, _ := r.Arrivals()
		for _, m := range msgs {
			if id := idOf(m, ack); id != "" {
				seen[id]++
			}
		}
		return seen
	}
	// A second delivery is hl7mail's at-least-once edge: the instance
	// delivering was killed after the router had the message and before
	// its synced record of that. Any other is a defect.
	// Likewise when the router itself went down after it had the message
	// and before it answered: MLLP has the sender send again.
	// Each side delivers one message at a time, so the one in flight at a
	// kill (or at the router's stop) is the last to arrive before it: that
	// one, and only that one, may arrive again. The times are taken once
	// the process is dead (or the router closed), so nothing of the old
	// run can arrive after them.
	explained := func(r *embedded.Router, ins []*instance, id string, ack bool) bool {
		var ends []time.Time
		for _, in := range ins {
			ends = append(ends, f.killed[in]...)
		}
		if r == f.labRouter {
			ends = append(ends, f.routerDown...)
		} else {
			ends = append(ends, f.dbDown...)
		}
		msgs, times := r.Arrivals()
		for _, k := range ends {
			last := -1
			for i, at := range times {
				if at.After(k) {
					break
				}
				last = i
			}
			if last >= 0 && idOf(msgs[last], ack) == id {
				return true
			}
		}
		return false
	}
	// The race-enabled binaries on 2 cores carry about 20 round trips a
	// second: the soak's 3,000 messages outlast the load by minutes.
	wait := max(120*time.Second, time.Duration(sc.messages)*100*time.Millisecond)
	deadline := time.Now().Add(wait)
	var lastArrival time.Time
	for {
		at, answers := count(f.labRouter, false), count(f.hRouter, true)
		missing := 0
		for id := range acked {
			if at[id] == 0 || answers[id] == 0 {
				missing++
			}
		}
		if missing == 0 {
			_, times := f.labRouter.Arrivals()
			if len(times) > 0 {
				lastArrival = times[len(times)-1]
			}
			break
		}
		if time.Now().After(deadline) {
			var logs strings.Builder
			for _, n := range f.nodes {
				fmt.Fprintf(&logs, "hospital (%s):\n%s\n", filepath.Base(n.dir), n.log)
			}
			t.Errorf("%s: %d messages that got CA are missing at the lab's router or their answers at the hospital's after %s\n%slab:\n%s",
				name, missing, wait, logs.String(), f.lab.log)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // let a late second delivery show
	at, answers := count(f.labRouter, false), count(f.hRouter, true)
	row := faultRow{name: name, ca: len(acked), loadTable: loadOut.String(), resubmitted: f.w.Resubmitted(),
		kills: len(f.killed[f.lab])}
	// The killed instance's mails are those to the other one: the lab
	// writes to the hospital, the hospital to the lab.
	killedTo := "lab@partner.test"
	if len(f.killed[f.lab]) > 0 {
		killedTo = "edi@hospital.test"
	}
	seen := map[string]int{}
	for _, m := range f.w.Taken() {
		if seen[m.MessageID]++; seen[m.MessageID] > 1 && m.MessageID != "" && strings.EqualFold(m.To, killedTo) {
			row.byKilled++
		}
	}
	for _, n := range f.nodes {
		row.kills += len(f.killed[n])
	}
	for id := range acked {
		switch n := at[id]; {
		case n == 0:
			row.lost++
		case n > 1:
			row.twice++
			if !explained(f.labRouter, []*instance{f.lab}, id, false) {
				row.unexplained = append(row.unexplained, id+" at the lab's router")
			}
		}
		if answers[id] > 1 {
			row.answersTwice++
			if !explained(f.hRouter, f.nodes, id, true) {
				row.unexplained = append(row.unexplained, "the answer to "+id+" at the hospital's router")
			}
		}
	}
	for _, n := range at {
		if n > 0 {
			row.delivered++
		}
	}
	for _, n := range answers {
		if n > 0 {
			row.answers++
		}
	}
	if fields := strings.Fields(lastLine(loadOut.String())); len(fields) > 4 {
		fmt.Sscan(fields[4], &row.resentByRouter)
	}
	if lastArrival.After(recovered) {
		row.drain = lastArrival.Sub(recovered)
	}
	return row
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestFaults runs the router's load through the hospital to the lab while,
// case by case, an instance is killed with SIGKILL and restarted, the SMTP
// server, the IMAP server or the lab's router is stopped for a while. For
// every case: every message that got CA reaches the lab's router once and
// its answer the hospital's router once. It prints its table to
// var/artifacts/faults.txt.
func TestFaults(t *testing.T) {
	sc := scale()
	kill := func(in func(f *faultWorld) *instance) func(f *faultWorld) {
		return func(f *faultWorld) {
			for i := 0; i < sc.kills; i++ {
				time.Sleep(sc.every)
				in(f).kill()
				f.killed[in(f)] = append(f.killed[in(f)], time.Now())
				in(f).start()
			}
		}
	}
	outage := func(stop, start func(f *faultWorld) error) func(f *faultWorld) {
		return func(f *faultWorld) {
			time.Sleep(sc.every)
			if err := stop(f); err != nil {
				f.t.Fatal(err)
			}
			time.Sleep(sc.outage)
			if err := start(f); err != nil {
				f.t.Fatal(err)
			}
		}
	}
	// The hospital's store on a file system of its own, which a filler
	// file fills to the last byte for a while.
	var storeFS string
	smallDisk := func(t *testing.T, site, dir string) {
		if site != "hospital" {
			return
		}
		storeFS = filepath.Join(dir, "var")
		os.MkdirAll(storeFS, 0o700)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", storeFS).CombinedOutput(); err != nil {
			t.Fatalf("mount tmpfs for the disk-full case (needs root): %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", "-l", storeFS).Run() })
	}
	diskFull := func(f *faultWorld) {
		time.Sleep(sc.every)
		filler := filepath.Join(storeFS, "filler")
		fill, err := os.Create(filler)
		if err != nil {
			f.t.Fatal(err)
		}
		for _, size := range []int{1 << 20, 4096, 1} { // to the last byte
			chunk := make([]byte, size)
			for {
				if _, err := fill.Write(chunk); err != nil {
					break
				}
			}
		}
		fill.Close()
		var st syscall.Statfs_t
		if err := syscall.Statfs(storeFS, &st); err != nil || st.Bavail != 0 {
			f.t.Errorf("the store's file system is not full: %d blocks free, %v", st.Bavail, err)
		}
		time.Sleep(sc.outage)
		os.Remove(filler)
	}
	cases := []struct {
		name   string
		prep   func(t *testing.T, site, dir string)
		during func(f *faultWorld)
	}{
		{"none", nil, func(f *faultWorld) {}},
		{"kill -9 hospital", nil, kill(func(f *faultWorld) *instance { return f.hospital })},
		{"kill -9 lab", nil, kill(func(f *faultWorld) *instance { return f.lab })},
		{"SMTP down", nil, outage(func(f *faultWorld) error { return f.w.StopSMTP() }, func(f *faultWorld) error { return f.w.StartSMTP() })},
		{"IMAP down", nil, outage(func(f *faultWorld) error { return f.w.StopIMAP() }, func(f *faultWorld) error { return f.w.StartIMAP() })},
		{"lab router down", nil, outage(func(f *faultWorld) error {
			err := f.labRouter.Stop()
			f.routerDown = append(f.routerDown, time.Now())
			return err
		}, func(f *faultWorld) error { return f.labRouter.Restart() })},
		{"hospital disk full", smallDisk, diskFull},
	}
	var rows []faultRow
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			row := runFault(t, c.name, c.prep, c.during)
			rows = append(rows, row)
			if row.lost != 0 || len(row.unexplained) != 0 || row.ca == 0 {
				t.Errorf("%s: %d got CA, %d lost, %d delivered twice, %d answers twice; not explained by a kill: %v\n%s", c.name,
					row.ca, row.lost, row.twice, row.answersTwice, row.unexplained, row.loadTable)
			}
			// A kill sends again at most the mails submitted on the session
			// since the last commit of their group: never more than a group
			// (outbound.SenderOptions.Group, 32) a kill. The other instance
			// answers each such replay with the same receipt again, and
			// answers again the mails of an IMAP chunk (16) the killed one
			// had fetched and not yet moved. Without a kill, nothing is
			// submitted twice: a full disk is waited out before the sent
			// mails are recorded. (With IMAP down a partner may fetch a mail
			// again and answer its replay with the same receipt: shown, not
			// a resubmission by the sender.)
			strict := c.name == "none" || c.name == "hospital disk full"
			if row.kills > 0 && (row.byKilled > row.kills*32 || row.resubmitted-row.byKilled > row.byKilled+row.kills*16) ||
				strict && row.resubmitted != 0 {
				t.Errorf("%s: %d mails submitted twice after %d kills, %d of them by the killed instance", c.name,
					row.resubmitted, row.kills, row.byKilled)
			}
		})
	}
	var b strings.Builder
	fmt.Fprintf(&b, "Fault suite: %d messages at %.0f/s from the router over 4 connections, hospital → lab (PGP) → hospital, embedded SMTP/IMAP\n\n",
		sc.messages, sc.rate)
	fmt.Fprintf(&b, "%-18s %6s %10s %5s %13s %8s %13s %15s %9s %9s\n", "case", "CA", "delivered", "lost", "delivered 2x",
		"answers", "answers 2x", "router resends", "mails 2x", "drain")
	for _, r := range rows {
		fmt.Fprintf(&b, "%-18s %6d %10d %5d %13d %8d %13d %15d %9d %9s\n", r.name, r.ca, r.delivered, r.lost, r.twice, r.answers,
			r.answersTwice, r.resentByRouter, r.resubmitted, r.drain.Round(100*time.Millisecond))
	}
	fmt.Fprintln(&b, "\nlost: got CA, never reached the lab's router. delivered 2x / answers 2x: at the router twice; only when the")
	fmt.Fprintln(&b, "instance delivering was killed between the router's answer and its own synced record of it, or the router")
	fmt.Fprintln(&b, "went down after it had the message and before it answered (at-least-once; MLLP sends again).")
	fmt.Fprintln(&b, "router resends: messages the router sent again after a broken connection or CE. mails 2x: mails the SMTP")
	fmt.Fprintln(&b, "server took twice under one Message-ID, both ways: only those a killed instance had submitted and not yet")
	fmt.Fprintln(&b, "recorded as sent (at most a group of 32 a kill) and the other instance's answers to those replays (the")
	fmt.Fprintln(&b, "same receipt again), or a receipt sent again for a mail fetched again (IMAP down). A full disk is waited")
	fmt.Fprintln(&b, "out before what was sent or delivered is recorded: nothing twice.")
	fmt.Fprintln(&b, "drain: from the end of the fault (the last restart, the server back) to the last delivery at the lab's router.")
	t.Log("\n" + b.String())
	path := filepath.Join(artifactDir(t), "faults.txt")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Error(err)
	}
}
