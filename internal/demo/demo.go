// Package demo runs the whole hl7mail loop in one process (what "make demo"
// shows): a hospital and two partners, each a real hl7mail instance, over
// an embedded SMTP/IMAP mail system; the lab on PGP, the clinic on S/MIME.
// Messages go from the hospital's router through its surrogates, by mail,
// to the partners' routers; their answers come back bundled with receipts.
//
// It imports, of this module, only config, dashboard, gateway, hl7, internal/embedded, mllp, security, store.
package demo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Options configure Run.
type Options struct {
	Dir      string   // where the sites keep keys, configuration and stores (required)
	Messages [][]byte // HL7 messages to send besides the draft's §5 order
	Out      io.Writer
	// Wait, when set, keeps everything running after the summary until it
	// is closed (Ctrl-C).
	Wait <-chan struct{}
	// Timeout bounds the wait for the loop to complete (default 60s).
	Timeout time.Duration
}

// Summary is what the run established.
type Summary struct {
	Sent, Accepted, AtPartner, Identical, Responses, Receipts int
	Elapsed                                                   time.Duration
}

// OK reports whether every message made the whole round trip.
func (s Summary) OK() bool {
	return s.Sent > 0 && s.Accepted == s.Sent && s.AtPartner == s.Sent && s.Identical == s.Sent &&
		s.Responses == s.Sent && s.Receipts == s.Sent
}

// DraftORM is the order of draft-ietf-ediint-hl7-02 §5 (its "..." filled in).
const DraftORM = "MSH|^~\\&|OE|DR.SCHADOW|LAB|TUCKER-GENERAL|19971226175948||ORM^O01|RQ-O01-001|P|2.3|||AL\r" +
	"PID|||08157411||Doe^John||19690219|M|\rPV1||O|||||0123^SCHADOW^GUNTHER||||||||||||12|\r" +
	"ORC|NW|12345|||F|\rOBR||12345||||||19971226175948||7^ML||||||BLDV\r" +
	"ORC|CH|12345-1|||F||12345|\rOBR||12345-1|||5383-5^THYROID MICROSOMAL AB^LN|\r"

// Env is the running demo world: the mail system, the three sites and the
// hospital's surrogates for the lab and the clinic.
type Env struct {
	World                 *embedded.World
	Hospital, Lab, Clinic *Site
	Surrogate             map[string]string // partner → the hospital's surrogate address
	closers               []func()
}

// Site is one running hl7mail instance and its stand-in router.
type Site struct {
	name, email string
	dir         string
	Router      *embedded.Router
	Gateway     *gateway.Gateway
	cfg         *config.Config
}

// Name is the site's name (hospital, lab, clinic), as its partners call it.
func (s *Site) Name() string { return s.name }

// Start sets up the mail system and the three sites in dir; logs go to
// trace (nil: dropped). Close stops everything.
func Start(ctx context.Context, dir string, trace io.Writer) (*Env, error) {
	world, err := embedded.NewWorld(Addresses...)
	if err != nil {
		return nil, err
	}
	env, err := StartOn(ctx, dir, trace, MailSystem{SMTP: world.SMTPAddr, IMAP: world.IMAPAddr})
	if err != nil {
		world.Close()
		return nil, err
	}
	env.World = world
	env.closers = append([]func(){world.Close}, env.closers...)
	return env, nil
}

// Addresses are the three sites' mail addresses: a mail system for
// StartOn has an account for each (password "secret").
var Addresses = []string{"edi@hospital.test", "lab@partner.test", "edi@clinic.test"}

// MailSystem is where the sites submit mail (SMTP, no AUTH, no TLS: a
// loopback server) and fetch it (IMAP, an account per address).
type MailSystem struct{ SMTP, IMAP string }

// StartOn is Start over the mail system ms (a real Postfix and Dovecot,
// say) instead of the embedded one; Env.World is nil.
func StartOn(ctx context.Context, dir string, trace io.Writer, ms MailSystem) (*Env, error) {
	env := &Env{Surrogate: map[string]string{}}
	var err error
	sites := []*Site{
		{name: "hospital", email: "edi@hospital.test"},
		{name: "lab", email: "lab@partner.test"},
		{name: "clinic", email: "edi@clinic.test"},
	}
	env.Hospital, env.Lab, env.Clinic = sites[0], sites[1], sites[2]
	for _, s := range sites {
		s.dir = filepath.Join(dir, s.name)
		if err := WriteKeys(s.dir, s.name, s.email); err != nil {
			env.Close()
			return nil, err
		}
		if s.Router, err = embedded.StartRouter("127.0.0.1:0"); err != nil {
			env.Close()
			return nil, err
		}
		r := s.Router
		env.closers = append(env.closers, func() { r.Close() })
	}
	port := Ports{}
	env.Surrogate["lab"], env.Surrogate["clinic"] = port.Free(), port.Free()
	partners := map[string]string{
		"hospital": fmt.Sprintf("  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}\n"+
			"  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: ../clinic/cert.pem}\n",
			env.Surrogate["lab"], env.Surrogate["clinic"]),
		"lab":    fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n", port.Free()),
		"clinic": fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: smime, smime_cert: ../hospital/cert.pem}\n", port.Free()),
	}
	if trace == nil {
		trace = io.Discard
	}
	for _, s := range sites {
		if err := s.start(ctx, ms, partners[s.name], port.Free(), trace); err != nil {
			env.Close()
			return nil, err
		}
		g := s.Gateway
		env.closers = append(env.closers, func() { g.Shutdown(context.Background()) })
	}
	return env, nil
}

// Close stops the sites, the routers and the mail system.
func (e *Env) Close() {
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	e.closers = nil
}

// Send sends msg to the hospital's surrogate for partner and returns the
// code it answered with.
func (e *Env) Send(ctx context.Context, partner string, msg []byte) (hl7.AckCode, error) {
	return send(ctx, e.Surrogate[partner], msg)
}

// Run sets the sites up, sends the messages and reports.
func Run(ctx context.Context, o Options) (Summary, error) {
	if o.Out == nil {
		o.Out = os.Stdout
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	out := &syncWriter{w: o.Out}
	fmt.Fprintf(out, "hl7mail demo in %s\n", o.Dir)
	env, err := Start(ctx, o.Dir, out)
	if err != nil {
		return Summary{}, err
	}
	defer env.Close()
	h, lab, clinic := env.Hospital, env.Lab, env.Clinic
	fmt.Fprintf(out, "mail system: SMTP %s, IMAP %s (embedded)\n", env.World.SMTPAddr, env.World.IMAPAddr)
	for _, s := range []*Site{h, lab, clinic} {
		fmt.Fprintf(out, "%-8s %s, router %s, store %s\n", s.name, s.email, s.Router.Addr, s.cfg.StoreDir())
	}
	fmt.Fprintf(out, "dashboards: hospital %s  lab %s  clinic %s\n", h.Gateway.DashboardURL(), lab.Gateway.DashboardURL(),
		clinic.Gateway.DashboardURL())
	fmt.Fprintf(out, "surrogates at the hospital: lab %s (PGP), clinic %s (S/MIME)\n\n", env.Surrogate["lab"], env.Surrogate["clinic"])

	// The §5 order goes to the lab; the corpus messages alternate.
	type outMsg struct {
		to  string
		msg []byte
	}
	msgs := []outMsg{{"lab", []byte(DraftORM)}}
	for i, m := range o.Messages {
		to := "lab"
		if i%2 == 0 {
			to = "clinic"
		}
		msgs = append(msgs, outMsg{to, m})
	}
	start := time.Now()
	var sum Summary
	sent := map[string][]byte{} // control ID → message
	for _, m := range msgs {
		hdr, err := hl7.ParseHeader(m.msg)
		if err != nil {
			return sum, err
		}
		sum.Sent++
		sent[hdr.ControlID] = m.msg
		code, err := env.Send(ctx, m.to, m.msg)
		if err != nil {
			return sum, err
		}
		if code == hl7.CommitAccept {
			sum.Accepted++
		}
	}
	deadline := time.Now().Add(o.Timeout)
	for time.Now().Before(deadline) {
		sum = count(sum, sent, h, lab, clinic)
		if sum.OK() {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	sum.Elapsed = time.Since(start)
	fmt.Fprintf(out, "\nsummary: %d sent, %d answered CA, %d at the partners' routers (%d byte-identical), %d responses back at the hospital's router, %d receipts matched, in %s\n",
		sum.Sent, sum.Accepted, sum.AtPartner, sum.Identical, sum.Responses, sum.Receipts, sum.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(out, "journals: %s/{outgoing,incoming}.mbox (a temporary folder is removed at exit: keep it with -dir)\n", h.cfg.StoreDir())
	if o.Wait != nil && sum.OK() {
		fmt.Fprintln(out, "running; Ctrl-C to stop")
		select {
		case <-o.Wait:
		case <-ctx.Done():
		}
	}
	if !sum.OK() {
		return sum, fmt.Errorf("the loop did not complete within %s", o.Timeout)
	}
	return sum, nil
}

func count(sum Summary, sent map[string][]byte, h, lab, clinic *Site) Summary {
	sum.AtPartner, sum.Identical, sum.Responses, sum.Receipts = 0, 0, 0, 0
	for _, s := range []*Site{lab, clinic} {
		for _, m := range s.Router.Messages() {
			hdr, err := hl7.ParseHeader(m)
			if err != nil {
				continue
			}
			if want, ok := sent[hdr.ControlID]; ok {
				sum.AtPartner++
				if bytes.Equal(want, m) {
					sum.Identical++
				}
			}
		}
	}
	for _, m := range h.Router.Messages() {
		if a, err := hl7.ParseAck(m); err == nil && sent[a.ControlID] != nil {
			sum.Responses++
		}
	}
	list, _ := h.Gateway.Store().List(context.Background(), store.Filter{Direction: store.Outbound, State: store.Acknowledged, Limit: 10000})
	sum.Receipts = len(list)
	return sum
}

func send(ctx context.Context, addr string, msg []byte) (hl7.AckCode, error) {
	c, err := mllp.Dial(ctx, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	reply, err := c.Send(sctx, msg)
	if err != nil {
		return "", err
	}
	a, err := hl7.ParseAck(reply)
	return a.Code, err
}

func (s *Site) start(ctx context.Context, ms MailSystem, partners, dashAddr string, out io.Writer) error {
	if err := os.WriteFile(filepath.Join(s.dir, "imap-password"), []byte("secret\n"), 0o600); err != nil {
		return err
	}
	cfgText := fmt.Sprintf(`# %s, written by hl7mail demo
self: {name: %s, email: %s, pgp_key: private.asc, smime_cert: cert.pem, smime_key: key.pem}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none, username: %s, password_file: imap-password, poll: 2s}
dashboard: {addr: %s}
partners:
%s`, s.name, s.name, s.email, s.Router.Addr, ms.SMTP, ms.IMAP, s.email, dashAddr, partners)
	path := filepath.Join(s.dir, "partners.yaml")
	if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
		return err
	}
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	if err := cfg.CheckFiles(); err != nil {
		return err
	}
	keys, err := gateway.LoadKeys(cfg, time.Now())
	if err != nil {
		return err
	}
	s.cfg = cfg
	// The trace prints the steps; the dashboard's live log shows them all.
	tail := dashboard.NewTail(0)
	s.Gateway, err = gateway.Start(ctx, gateway.Options{Config: cfg, Keys: keys, RetryBase: 100 * time.Millisecond,
		Logger: slog.New(tail.Handler(&traceHandler{site: s.name, out: out}, slog.LevelInfo)), Tail: tail})
	return err
}

// WriteKeys writes a site's keys to dir: private.asc and public.asc
// (OpenPGP), key.pem and cert.pem (S/MIME).
func WriteKeys(dir, name, email string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: name, Email: email})
	if err != nil {
		return err
	}
	priv, err := security.ArmorPGPPrivate(e, nil)
	if err != nil {
		return err
	}
	pub, err := security.ArmorPGPPublic(e)
	if err != nil {
		return err
	}
	key, cert, err := security.GenerateCert(security.CertOptions{Name: name, Email: email})
	if err != nil {
		return err
	}
	keyPEM, err := security.PEMKey(key)
	if err != nil {
		return err
	}
	for file, data := range map[string][]byte{"private.asc": priv, "public.asc": pub, "key.pem": keyPEM, "cert.pem": security.PEMCert(cert)} {
		if err := os.WriteFile(filepath.Join(dir, file), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// traceHandler prints the records that tell the story of a message, one
// readable line each; the rest it drops.
type traceHandler struct {
	site  string
	out   io.Writer
	attrs []slog.Attr
}

var traced = map[string]string{
	"message accepted":             "CA to the router for %s",
	"mail submitted":               "mail submitted (%s), signed and encrypted",
	"mail received":                "mail received and verified for %s",
	"delivered to router":          "delivered to the router: %s",
	"response queued":              "response and MDN bundled for %s",
	"receipt matched":              "receipt matched for %s",
	"mail quarantined":             "QUARANTINED %s",
	"ALERT receipt does not match": "ALERT receipt does not match for %s",
}

func (t *traceHandler) Enabled(context.Context, slog.Level) bool { return true }

func (t *traceHandler) Handle(_ context.Context, r slog.Record) error {
	format, ok := traced[r.Message]
	if !ok && r.Level < slog.LevelError {
		return nil
	}
	attrs := map[string]string{}
	for _, a := range t.attrs {
		attrs[a.Key] = a.Value.String()
	}
	r.Attrs(func(a slog.Attr) bool {
		attrs[a.Key] = a.Value.String()
		return true
	})
	subject := attrs["control_id"]
	if p := attrs["partner"]; p != "" {
		subject += " (" + p + ")"
	}
	var extra []string
	for _, k := range []string{"ack", "signer", "message_id", "reason"} {
		if v := attrs[k]; v != "" {
			extra = append(extra, k+"="+v)
		}
	}
	sort.Strings(extra)
	line := r.Message
	if ok {
		line = fmt.Sprintf(format, subject)
	} else if subject != "" {
		line += " " + subject
	}
	if len(extra) > 0 {
		line += "  [" + strings.Join(extra, " ") + "]"
	}
	_, err := fmt.Fprintf(t.out, "%s  %-8s %s\n", r.Time.Format("15:04:05.000"), t.site, line)
	return err
}

func (t *traceHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &traceHandler{site: t.site, out: t.out, attrs: append(append([]slog.Attr(nil), t.attrs...), as...)}
}

func (t *traceHandler) WithGroup(string) slog.Handler { return t }

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// Ports hands out loopback addresses that were free a moment ago, never
// the same one twice within one run. The zero value is not ready: make
// one with Ports{}.
type Ports map[string]bool

// Free returns such an address.
func (p Ports) Free() string {
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "127.0.0.1:0"
		}
		addr := ln.Addr().String()
		ln.Close()
		if !p[addr] {
			p[addr] = true
			return addr
		}
	}
}
