// Package dashboard is hl7mail's operator page and its HTTP API: the
// partners with their queues, receipts and connections, the alerts to
// acknowledge, refused mail to release, a message table searchable by
// control ID, Message-ID or partner, and a live log tail over Server-Sent
// Events that resumes from Last-Event-ID. It also serves /metrics
// (Prometheus), /healthz and /readyz.
//
// Nothing it serves carries a payload or patient data: messages are shown
// by their MSH header fields (type, control ID) and mail identifiers, and
// the log records it streams carry none either.
//
// It imports, of this module, only config, hl7, inbound (a release's
// result), link (connection states), store.
package dashboard

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/store"
)

type linkStatus = link.Status

// KeyRow is one key or certificate of ours or of a partner's, as
// "hl7mail keys" and the dashboard's key table show it.
type KeyRow struct {
	Party string `json:"party"` // "self" or a partner's name
	// Field is where partners.yaml names it: self.pgp_key,
	// partners[0].smime_cert[1], …; "store" for a certificate a partner
	// signed with that its anchors accepted.
	Field       string    `json:"field"`
	Kind        string    `json:"kind"` // pgp, smime, anchor
	Fingerprint string    `json:"fingerprint"`
	Subject     string    `json:"subject,omitempty"` // a certificate's
	From        time.Time `json:"valid_from"`
	To          time.Time `json:"valid_to,omitzero"` // zero: never expires
	// Roles: sign, decrypt (ours); encrypt-to, verify (a partner's); trust
	// (an anchor). None for one that serves no more, or not yet.
	Roles    []string `json:"roles"`
	Status   string   `json:"status"`              // active, next, retiring, expired, revoked
	DaysLeft *int     `json:"days_left,omitempty"` // until To
	Note     string   `json:"note,omitempty"`      // why revoked, or what cannot be told
}

// Instance is the running gateway the dashboard shows and acts on.
type Instance interface {
	Config() *config.Config
	// Keys are the loaded keys and certificates, ours and the partners'.
	Keys() []KeyRow
	// Records is the store the figures and lists are read from.
	Records() Store
	// Connections is the number of open router connections to partner's
	// surrogate.
	Connections(partner string) int
	SMTPStatus() link.Status
	IMAPStatus() link.Status
	IMAPStatusFor(partner string) link.Status
	// Cluster is the cluster the instance is a node of, nil alone.
	Cluster(ctx context.Context) (*ClusterView, error)
	// Retry puts a failed or expired outbound message back in its queue.
	Retry(ctx context.Context, id int64) error
	// RetryAll puts every failed or expired outbound message of partner
	// (of every partner for "") back in its queue; it returns how many.
	RetryAll(ctx context.Context, partner string) (int, error)
	// Reload reads the configuration, keys and secrets again and applies
	// them, or refuses them and keeps the running configuration.
	Reload(ctx context.Context) error
	// Release takes in quarantined mail after a person checked it; it
	// returns the stored message's id.
	Release(ctx context.Context, id int64, by, note string) (int64, error)
	// Ready reports why the instance is not ready to take messages, or nil.
	Ready() error
	// Receive takes in one raw mail handed over by an MTA (pipe mode),
	// for recipient to ("": the mail's To says).
	Receive(ctx context.Context, raw []byte, to string) (inbound.Result, error)
	// ReceiveOversize quarantines a mail larger than the limit, of which
	// only the header was handed over, size bytes in all.
	ReceiveOversize(ctx context.Context, header []byte, size int64) (inbound.Result, error)
}

// Options configure New. Addr and Instance are required.
type Options struct {
	Addr     string
	Instance Instance
	// Token, when set, is required on every request (Authorization: Bearer,
	// or once as ?token= which sets a cookie). It is required when Addr is
	// not a loopback address. Without it, a loopback page may be read, and
	// every change (a POST) needs the token New makes (Server.Token).
	Token   string
	Tail    *Tail    // the live log; nil: none
	Metrics *Metrics // nil: a new set
	Logger  *slog.Logger
}

// ErrNoToken is returned by New for a dashboard reachable from the network
// without a token.
var ErrNoToken = errors.New("dashboard: a token (dashboard.token_file) is required on a non-loopback address")

//go:embed static
var static embed.FS

// Server is the dashboard's HTTP server.
type Server struct {
	o     Options
	token atomic.Pointer[string] // Options.Token, changed by SetToken, or the one made for changes
	// all is set when the token guards every request (a token file), not
	// only the changes.
	all  atomic.Bool
	ctl  *http.Server // the control socket's (ServeControl)
	log  *slog.Logger
	srv  *http.Server
	mux  *http.ServeMux
	ln   net.Listener
	quit chan struct{} // closed by Shutdown: event streams end
}

// New checks the options and builds the handlers; Serve starts it.
func New(o Options) (*Server, error) {
	if o.Addr == "" || o.Instance == nil {
		return nil, errors.New("dashboard: Options.Addr and Options.Instance are required")
	}
	host, _, err := net.SplitHostPort(o.Addr)
	if err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	if o.Token == "" && !loopback(host) {
		return nil, fmt.Errorf("%w (listening on %s)", ErrNoToken, o.Addr)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Metrics == nil {
		o.Metrics = NewMetrics()
	}
	if err := o.Metrics.watch(o.Instance); err != nil {
		return nil, fmt.Errorf("dashboard: metrics: %w", err)
	}
	s := &Server{o: o, log: o.Logger, mux: http.NewServeMux(), quit: make(chan struct{})}
	token := o.Token
	s.all.Store(token != "")
	if token == "" {
		var b [32]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, err
		}
		token = hex.EncodeToString(b[:])
	}
	s.token.Store(&token)
	s.routes()
	s.srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(o.Logger.Handler(), slog.LevelWarn)}
	s.ctl = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		s.mux.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(o.Logger.Handler(), slog.LevelWarn)}
	return s, nil
}

func loopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ourHost reports whether a request's Host names this dashboard: its
// configured host, a loopback name, or an IP literal (which no rebinding
// attack can use: it needs a name of its own).
func (s *Server) ourHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	configured, _, _ := net.SplitHostPort(s.o.Addr)
	return host != "" && (loopback(host) || net.ParseIP(host) != nil || strings.EqualFold(host, configured))
}

// sameOrigin reports whether an Origin header names the host the request
// was sent to.
func sameOrigin(origin, host string) bool {
	u, err := url.Parse(origin)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && strings.EqualFold(u.Host, host)
}

// Listen opens the dashboard's address.
func (s *Server) Listen() (net.Listener, error) {
	ln, err := net.Listen("tcp", s.o.Addr)
	if err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	s.ln = ln
	return ln, nil
}

// Serve serves on ln until Shutdown; it returns http.ErrServerClosed then.
func (s *Server) Serve(ln net.Listener) error { return s.srv.Serve(ln) }

// Shutdown ends the event streams and stops the server.
func (s *Server) Shutdown(ctx context.Context) error {
	close(s.quit)
	return errors.Join(s.ctl.Shutdown(ctx), s.srv.Shutdown(ctx))
}

// Handler returns the dashboard with its token check.
func (s *Server) Handler() http.Handler { return s.auth(s.mux) }

func (s *Server) routes() {
	sub, _ := fs.Sub(static, "static")
	files := http.FileServerFS(sub)
	s.mux.Handle("GET /", noStore(files))
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(s.o.Metrics.Registry(), promhttp.HandlerOpts{}))
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprintln(w, "ok") })
	s.mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := s.o.Instance.Ready(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	s.mux.HandleFunc("GET /api/overview", s.overview)
	s.mux.HandleFunc("GET /api/partners", s.partners)
	s.mux.HandleFunc("GET /api/alerts", s.alerts)
	s.mux.HandleFunc("GET /api/keys", s.keys)
	s.mux.HandleFunc("GET /api/cluster", s.cluster)
	s.mux.HandleFunc("POST /api/alerts/{id}/ack", s.ackAlert)
	s.mux.HandleFunc("GET /api/messages", s.messages)
	s.mux.HandleFunc("POST /api/messages/{id}/retry", s.retry)
	s.mux.HandleFunc("POST /api/retry", s.retryAll)
	s.mux.HandleFunc("POST /api/reload", s.reload)
	s.mux.HandleFunc("GET /api/reports", s.reports)
	s.mux.HandleFunc("GET /api/activity", s.activity)
	s.mux.HandleFunc("GET /api/quarantine", s.quarantine)
	s.mux.HandleFunc("POST /api/quarantine/{id}/release", s.release)
	s.mux.HandleFunc("GET /api/log", s.logStream)
	s.mux.HandleFunc("POST /api/receive", s.receive)
}

func noStore(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		h.ServeHTTP(w, r)
	})
}

const tokenCookie = "hl7mail_token"

// auth checks the token on every request, and keeps requests that change
// state to JSON bodies (or a mail, message/rfc822, for /api/receive): a
// form on another site cannot send either without the browser asking first
// (CORS preflight), which this server never allows.
func (s *Server) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'self'; script-src 'self'")
		// DNS rebinding: a page of another site whose name was made to point
		// here arrives with its own name in Host. Only the configured host,
		// loopback names and IP literals are ours.
		if !s.ourHost(r.Host) {
			http.Error(w, "421 misdirected request: unknown host", http.StatusMisdirectedRequest)
			return
		}
		// A change sent from another origin's page is refused, whatever it
		// carries.
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if origin := r.Header.Get("Origin"); origin != "" && !sameOrigin(origin, r.Host) {
				http.Error(w, "403 forbidden: foreign origin", http.StatusForbidden)
				return
			}
		}
		// Every change needs the token; with a token file, every request.
		change := r.Method != http.MethodGet && r.Method != http.MethodHead
		token := *s.token.Load()
		got := ""
		if h := r.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
			got = strings.TrimPrefix(h, "Bearer ")
		} else if q := r.URL.Query().Get("token"); q != "" {
			got = q
		} else if c, err := r.Cookie(tokenCookie); err == nil {
			got = c.Value
		}
		ok := subtle.ConstantTimeCompare([]byte(got), []byte(token)) == 1
		if !ok && (s.all.Load() || change) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="hl7mail"`)
			http.Error(w, "401 unauthorized: a dashboard token is required (hl7mail dashboard -config F prints the page's address with it)",
				http.StatusUnauthorized)
			return
		}
		if ok && r.URL.Query().Get("token") != "" {
			// The page's later requests carry it; no other site's do.
			http.SetCookie(w, &http.Cookie{Name: tokenCookie, Value: token, Path: "/", HttpOnly: true,
				SameSite: http.SameSiteStrictMode})
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
			if mt != "application/json" && !(mt == "message/rfc822" && r.URL.Path == "/api/receive") {
				http.Error(w, "415: send application/json", http.StatusUnsupportedMediaType)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetIndent("", " ")
	enc.Encode(v)
}

// fail answers with err's text (no payload or patient data reaches an
// error from the store or the mailbox) and a status fitting its kind.
func fail(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, store.ErrNotFound):
		code = http.StatusNotFound
	case errors.Is(err, errBadRequest):
		code = http.StatusBadRequest
	case errors.Is(err, store.ErrReleased), errors.Is(err, errConflict):
		code = http.StatusConflict
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
}

var (
	errBadRequest = errors.New("bad request")
	errConflict   = errors.New("conflict")
)

// Overview is the head of the page.
type Overview struct {
	Self       string       `json:"self"`
	Email      string       `json:"email"`
	Now        time.Time    `json:"now"`
	SMTP       linkStatus   `json:"smtp"`
	IMAP       linkStatus   `json:"imap"`
	OpenAlerts int          `json:"open_alerts"`
	Partners   []PartnerRow `json:"partners"`
	// Cluster is the cluster this instance is a node of; absent alone.
	Cluster *ClusterView `json:"cluster,omitempty"`
}

// SetToken changes the token required from now on (a reload read the
// token file again); it may not become empty on a non-loopback address.
func (s *Server) SetToken(token string) error {
	if token == "" {
		return ErrNoToken
	}
	s.token.Store(&token)
	s.all.Store(true)
	return nil
}

// Token returns the token in force: the token file's, or the one made for
// changes when there is none.
func (s *Server) Token() string { return *s.token.Load() }

// ServeControl serves the same API on ln, a unix socket the operator
// commands use ("hl7mail status", "alerts", "retry", "release", "reload")
// and pipe mode's hand-over ("hl7mail receive"): who may connect is decided
// by the socket file's mode (owner only), as mox's ctl does, so no token is
// asked there. It returns when ln is closed.
func (s *Server) ServeControl(ln net.Listener) error { return s.ctl.Serve(ln) }

func (s *Server) quarantine(w http.ResponseWriter, r *http.Request) {
	list, err := s.o.Instance.Records().QuarantineList(r.Context(), limit(r, 200))
	writeList(w, list, err)
}

func (s *Server) release(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r)
	if err != nil {
		fail(w, err)
		return
	}
	b, err := readAct(r)
	if err == nil && b.Note == "" {
		err = fmt.Errorf("%w: say why the mail may be released (\"note\")", errBadRequest)
	}
	if err != nil {
		fail(w, err)
		return
	}
	msg, err := s.o.Instance.Release(r.Context(), id, b.By, b.Note)
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			err = fmt.Errorf("%w: %v", errConflict, err)
		}
		fail(w, err)
		return
	}
	writeJSON(w, map[string]any{"released": id, "message": msg})
}

func limit(r *http.Request, def int) int {
	if n, err := strconv.Atoi(r.URL.Query().Get("limit")); err == nil && n > 0 && n <= 5000 {
		return n
	}
	return def
}

// writeList answers with list (as [] when empty), or with err.
func writeList[T any](w http.ResponseWriter, list []T, err error) {
	if err != nil {
		fail(w, err)
		return
	}
	if list == nil {
		list = []T{}
	}
	writeJSON(w, list)
}
