package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/store"
)

// The operator commands work on a running instance through its control
// socket (the store folder's hl7mail.sock, mode 0600: the user running
// serve only), and on a stopped one through its store.

// errNotRunning means no instance answers on the control socket.
var errNotRunning = errors.New("not running")

// errNoAccess means an instance runs, but this user may not reach its
// control socket.
var errNoAccess = errors.New("the control socket is not open to this user (run the command as the user that runs hl7mail serve)")

// instanceAPI calls the API of the instance cfg describes, over its
// control socket.
type instanceAPI struct {
	base   string
	socket string
	http   *http.Client
}

func newInstanceAPI(cfg *config.Config) (*instanceAPI, error) {
	socket := filepath.Join(cfg.StoreDir(), gateway.ControlSocket)
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}
	return &instanceAPI{base: "http://hl7mail", socket: socket,
		http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: dial}}}, nil
}

// do sends req over the control socket: no socket, or none listening, is
// errNotRunning; one this user may not open, errNoAccess. It returns the
// status and the body.
func (a *instanceAPI) do(req *http.Request) (int, []byte, error) {
	resp, err := a.http.Do(req)
	if err != nil {
		var op *net.OpError
		switch {
		case errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission):
			return 0, nil, errNoAccess
		case errors.As(err, &op) && op.Op == "dial":
			return 0, nil, errNotRunning
		}
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp.StatusCode, data, err
}

// call sends a JSON request and decodes the answer into out; an answer
// other than 200 is an error with the server's words.
func (a *instanceAPI) call(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	status, data, err := a.do(req)
	if err != nil {
		return err
	}
	if status != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("dashboard answered %d: %s", status, strings.TrimSpace(string(data)))
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}

// loadOps loads the configuration and returns the instance's API client.
func loadOps(path string) (*config.Config, *instanceAPI, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, nil, err
	}
	api, err := newInstanceAPI(cfg)
	return cfg, api, err
}

// openStore opens the store of a stopped instance: read-only for queries,
// for writing to change it (which fails while serve holds it).
func openStore(cfg *config.Config, write bool) (*store.Store, error) {
	if _, err := os.Stat(filepath.Join(cfg.StoreDir(), store.FileName)); err != nil {
		return nil, fmt.Errorf("no store in %s (has hl7mail serve run?)", cfg.StoreDir())
	}
	if !write {
		return store.OpenReadOnly(cfg.StoreDir())
	}
	return openWritable(cfg)
}

// openWritable opens the store for writing (making it when hl7mail serve
// has never run); it fails while serve has it open.
func openWritable(cfg *config.Config) (*store.Store, error) {
	st, err := store.Open(store.Options{Dir: cfg.StoreDir()})
	if errors.Is(err, store.ErrLocked) {
		return nil, fmt.Errorf("hl7mail serve has the store open but its control socket (%s) did not answer",
			filepath.Join(cfg.StoreDir(), gateway.ControlSocket))
	}
	return st, err
}

// orStore runs local on the instance's store when err says the instance is
// not running (its dashboard did not answer), and returns err otherwise.
func orStore(err error, cfg *config.Config, write bool, local func(st *store.Store) error) error {
	if err != nil && errors.Is(err, errNotRunning) && cfg.Cluster != nil {
		// A node of a cluster has no store of its own: any running node
		// answers for the whole cluster.
		return fmt.Errorf("this node of the cluster is not running; ask a node that is (its partners.yaml, or its dashboard)")
	}
	if !errors.Is(err, errNotRunning) {
		return err
	}
	st, err := openStore(cfg, write)
	if err != nil {
		return err
	}
	defer st.Close()
	return local(st)
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func whoAmI() string {
	if u := os.Getenv("SUDO_USER"); u != "" {
		return u
	}
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return ""
}

func parseID(fs interface{ Args() []string }) (int64, error) {
	if len(fs.Args()) != 1 {
		return 0, errors.New("give one id")
	}
	id, err := strconv.ParseInt(fs.Args()[0], 10, 64)
	if err != nil || id <= 0 {
		return 0, fmt.Errorf("bad id %q", fs.Args()[0])
	}
	return id, nil
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("status", "[-config FILE] [-json]", `
Prints the partner table: listener, open router connections, messages today
in and out, queued (to mail / to the router), receipts awaited and overdue,
failed, quarantined, last activity; and the SMTP and IMAP connections. From
the running instance's dashboard, or from the store when it is stopped.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	var o dashboard.Overview
	running := true
	err = orStore(api.call("GET", "/api/overview", nil, &o), cfg, false, func(st *store.Store) (err error) {
		running = false
		ctx := context.Background()
		o = dashboard.Overview{Self: cfg.Self.Name, Email: cfg.Self.Email, Now: time.Now(),
			SMTP: link.Status{State: "stopped"}, IMAP: link.Status{State: "stopped"}}
		if o.Partners, err = dashboard.Rows(ctx, cfg, st, nil); err == nil {
			o.OpenAlerts, err = st.OpenAlerts(ctx)
		}
		return err
	})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail status:", err)
		return 1
	}
	if *asJSON {
		printJSON(stdout, o)
		return 0
	}
	state := "running, dashboard " + dashboardURL(cfg)
	if !running {
		state = "not running (figures from the store)"
	}
	fmt.Fprintf(stdout, "%s <%s>: %s\n", o.Self, o.Email, state)
	fmt.Fprintf(stdout, "SMTP %s   IMAP %s   open alerts %d\n\n", linkText(o.SMTP), linkText(o.IMAP), o.OpenAlerts)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PARTNER\tLISTEN\tCONNS\tIN-TODAY\tOUT-TODAY\tQUEUED(OUT/IN)\tAWAITING-RECEIPT\tOVERDUE\tFAILED\tQUARANTINED\tLAST-ACTIVITY")
	for _, p := range o.Partners {
		conns := "-"
		if p.Connections >= 0 {
			conns = strconv.Itoa(p.Connections)
		}
		last := "-"
		if !p.LastActivity.IsZero() {
			last = p.LastActivity.Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d/%d\t%d\t%d\t%d\t%d\t%s\n", p.Name, p.Listen, conns, p.InToday, p.OutToday,
			p.QueuedOut, p.QueuedIn, p.AwaitingReceipt, p.Overdue, p.Failed, p.Quarantined, last)
	}
	tw.Flush()
	if c := o.Cluster; c != nil {
		fmt.Fprintf(stdout, "\nCluster (this node %s, lease %s)\n", c.Node, c.Lease)
		tw = tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NODE\tLIVE\tLAST-HEARTBEAT\tROLES\tTAKEN-TODAY")
		for _, n := range c.Nodes {
			fmt.Fprintf(tw, "%s\t%v\t%s\t%d\t%d\n", n.Name, n.Live, n.Seen.Format(time.DateTime+".000"), n.Roles, n.TakenToday)
		}
		fmt.Fprintln(tw, "\nROLE\tHELD BY\tRUNNING")
		for _, r := range c.Roles {
			node := r.Node
			if node == "" {
				node = "(none yet)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\n", r.Role, node, r.Running)
		}
		tw.Flush()
	}
	return 0
}

func linkText(l link.Status) string {
	if l.LastError != "" && l.State != link.Up {
		return l.State + " (" + l.LastError + ")"
	}
	return l.State
}

func runAlerts(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("alerts", "[-config FILE] [-all] [-json] [-ack ID [-by NAME]]", `
Lists the open alerts (receipts overdue or not matching, messages failed or
expired, mail quarantined, inbound messages stuck at the router, keys about
to expire), newest first; -all includes acknowledged ones. -ack ID
acknowledges one, recorded with -by (default: the user running the command).`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	asJSON := fs.Bool("json", false, "print JSON")
	all := fs.Bool("all", false, "include acknowledged alerts")
	ack := fs.Int64("ack", 0, "acknowledge alert `ID`")
	by := fs.String("by", whoAmI(), "who acknowledges")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	ctx := context.Background()
	if *ack != 0 {
		if strings.TrimSpace(*by) == "" {
			fmt.Fprintln(stderr, "hl7mail alerts: -by is required")
			return 2
		}
		err := orStore(api.call("POST", fmt.Sprintf("/api/alerts/%d/ack", *ack), map[string]string{"by": *by}, nil),
			cfg, true, func(st *store.Store) error { return st.AckAlert(ctx, *ack, *by) })
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail alerts:", err)
			return 1
		}
		fmt.Fprintf(stdout, "alert %d acknowledged by %s\n", *ack, *by)
		return 0
	}
	var list []store.Alert
	q := "/api/alerts"
	if *all {
		q += "?all=1"
	}
	err = orStore(api.call("GET", q, nil, &list), cfg, false, func(st *store.Store) (err error) {
		list, err = st.Alerts(ctx, *all, 0)
		return err
	})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail alerts:", err)
		return 1
	}
	if *asJSON {
		if list == nil {
			list = []store.Alert{}
		}
		printJSON(stdout, list)
		return 0
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "no open alerts")
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRAISED\tKIND\tPARTNER\tCONTROL-ID\tMESSAGE-ID\tTEXT\tACKNOWLEDGED")
	for _, a := range list {
		acked := "-"
		if !a.Acked.IsZero() {
			acked = a.Acked.Format(time.DateTime) + " by " + a.AckedBy
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.Raised.Format(time.DateTime), a.Kind, dash(a.Partner),
			dash(a.ControlID), dash(a.MessageID), term(a.Text), acked)
	}
	tw.Flush()
	return 0
}

func runReload(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("reload", "[-config FILE]", `
Asks the running instance to read its configuration, every key and
certificate and every secret file again and apply them without a restart
(as SIGHUP does). A configuration with problems is refused with every
problem listed, and the running one is kept; the command then exits 1. It
checks the file itself first.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if _, _, err := loadChecked(*cfgPath); err != nil {
		fmt.Fprintln(stderr, err)
		fmt.Fprintln(stderr, "hl7mail reload: refused; the running configuration is kept")
		return 1
	}
	_, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if err := api.call("POST", "/api/reload", struct{}{}, nil); err != nil {
		fmt.Fprintln(stderr, "hl7mail reload:", err)
		return 1
	}
	fmt.Fprintln(stdout, "configuration reloaded")
	return 0
}

func runRelease(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("release", "[-config FILE] [-by NAME] -note WHY ID", `
Takes in a quarantined mail (ID as listed by the dashboard or "hl7mail
alerts") after a person has checked it: the mail is opened again with the
keys and partners configured now (say, after adding the partner's new key)
and delivered to the router like any other; who released it and why is
recorded. A mail that still does not open stays quarantined and the reason
is printed; a replay is never released.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	by := fs.String("by", whoAmI(), "who releases the mail")
	note := fs.String("note", "", "why it may be delivered (required; recorded)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	id, err := parseID(fs)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail release:", err)
		return 2
	}
	if strings.TrimSpace(*note) == "" || strings.TrimSpace(*by) == "" {
		fmt.Fprintln(stderr, "hl7mail release: -note (and -by) are required: the release is recorded with who and why")
		return 2
	}
	cfg, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	var out struct {
		Message int64 `json:"message"`
	}
	err = api.call("POST", fmt.Sprintf("/api/quarantine/%d/release", id), map[string]string{"by": *by, "note": *note}, &out)
	if errors.Is(err, errNotRunning) {
		out.Message, err = releaseStopped(cfg, id, *by, *note)
	}
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail release:", err)
		return 1
	}
	fmt.Fprintf(stdout, "quarantined mail %d released as message %d\n", id, out.Message)
	return 0
}

// releaseStopped releases quarantined mail with the instance stopped: the
// message is stored and goes to the router at the next start.
func releaseStopped(cfg *config.Config, id int64, by, note string) (int64, error) {
	keys, err := gateway.LoadKeys(cfg, time.Now())
	if err != nil {
		return 0, err
	}
	st, _, closeStore, err := openInbound(cfg)
	if err != nil {
		return 0, err
	}
	defer closeStore()
	r := gateway.NewReceiver(cfg, keys, st, nil, nil, nil)
	res, err := r.Release(context.Background(), id, by, note)
	return res.ID, err
}

// openInbound opens, for a command that takes mail in with the instance
// stopped, where it goes: the embedded store and its incoming journal, or
// a cluster's database (which any running node then serves from).
func openInbound(cfg *config.Config) (inbound.Store, journal.Appender, func(), error) {
	if cfg.Cluster != nil {
		pg, err := openClusterStore(cfg)
		if err != nil {
			return nil, nil, nil, err
		}
		return pg, pg.IncomingJournal(), func() { pg.Close() }, nil
	}
	st, err := openWritable(cfg)
	if err != nil {
		return nil, nil, nil, err
	}
	j, err := journal.Open(filepath.Join(cfg.StoreDir(), gateway.IncomingJournal))
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	return st, j, func() { j.Close(); st.Close() }, nil
}

// dashboardURL is the address of cfg's dashboard page.
func dashboardURL(cfg *config.Config) string {
	host, port, err := net.SplitHostPort(cfg.Dashboard.Addr)
	if err != nil {
		return cfg.Dashboard.Addr
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/"
}

func runDashboard(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("dashboard", "[-config FILE]", `
Prints the address of the running instance's operator page with its token
(?token=...), which the browser keeps as a cookie: every change on the page
(acknowledge, retry, release) needs it. The token is dashboard.token_file's,
or, without one, the one the instance made at its start (the store folder's
dashboard.token, readable by the user running serve only).`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	file := cfg.Dashboard.TokenFile
	if file == "" {
		file = filepath.Join(cfg.StoreDir(), gateway.TokenFile)
	}
	token, err := cfg.Secret(file, "")
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail dashboard: the token:", err)
		return 1
	}
	fmt.Fprintf(stdout, "%s?token=%s\n", dashboardURL(cfg), url.QueryEscape(strings.TrimSpace(token)))
	return 0
}
