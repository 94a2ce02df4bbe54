package config

import (
	"fmt"
	"net"
	"net/mail"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
)

type validator struct {
	c     *Config
	e     *Error
	lines map[string]int
}

// lineOf returns the line of path, or of its nearest ancestor present.
func (v *validator) lineOf(path string) int {
	for path != "" {
		if l, ok := v.lines[path]; ok {
			return l
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return 0
}

func (v *validator) addf(path, partner, hint, format string, args ...any) {
	v.addfAt(path, path, partner, hint, format, args...)
}

// addfAt reports a problem of field path at the line of linePath: a missing
// key is reported at the line of the setting that requires it.
func (v *validator) addfAt(linePath, path, partner, hint, format string, args ...any) {
	v.e.add(Problem{Line: v.lineOf(linePath), Partner: partner, Field: path, Msg: fmt.Sprintf(format, args...), Hint: hint})
}

var partnerName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

func (v *validator) validate() {
	c := v.c
	if c.Self.Name == "" {
		v.addf("self.name", "", "", "required")
	}
	v.email("self.email", "", c.Self.Email)
	v.secret("self.passphrase", "", c.Self.PassphraseFile, c.Self.PassphraseEnv, false)
	v.addr("router.addr", "", c.Router.Addr, true)
	v.positive("router.ack_timeout", "", c.Router.AckTimeout)
	v.server("smtp", &c.SMTP)
	if c.IMAP.Addr != "" || c.IMAP.Username != "" {
		// Without an IMAP account, mail comes in through "hl7mail receive".
		v.server("imap", &c.IMAP.MailServer)
	}
	v.positive("imap.poll", "", c.IMAP.Poll)
	if c.IMAP.Retry != 0 {
		v.addf("imap.retry", "", "the IMAP watcher reconnects by itself within a minute", "retry applies to smtp only")
	}
	if c.IMAP.MaxMailSize < 64<<10 {
		v.addf("imap.max_mail_size", "", "e.g. 33554432 (32 MiB)", "%d bytes is too small for a signed and encrypted message", c.IMAP.MaxMailSize)
	}
	v.addr("dashboard.addr", "", c.Dashboard.Addr, true)
	if host, _, err := net.SplitHostPort(c.Dashboard.Addr); err == nil && !isLoopback(host) && c.Dashboard.TokenFile == "" {
		v.addf("dashboard.token_file", "", "or listen on 127.0.0.1", "required when the dashboard listens on %s, not loopback", host)
	}
	for i, a := range c.Alerts.Email {
		v.email(fmt.Sprintf("alerts.email[%d]", i), "", a)
	}
	if u := c.Alerts.Webhook.URL; u != "" {
		if pu, err := url.Parse(u); err != nil || pu.Scheme != "http" && pu.Scheme != "https" || pu.Host == "" {
			v.addf("alerts.webhook.url", "", "e.g. https://ops.hospital.example/hooks/hl7mail", "%q is not an http or https URL", u)
		}
	} else if c.Alerts.Webhook.TokenFile != "" {
		v.addf("alerts.webhook.url", "", "", "required with alerts.webhook.token_file")
	}
	if t := c.Router.TLS; t != nil {
		if t.CAFile == "" {
			v.addf("router.tls.ca_file", "", "the CA that signs the router's certificate", "required with router.tls")
		}
		if (t.CertFile == "") != (t.KeyFile == "") {
			v.addf("router.tls.key_file", "", "", "cert_file and key_file go together")
		}
	}
	// No partners yet is a configuration too: a site set up by "hl7mail
	// init" runs its inbound side and its page until "hl7mail partner
	// add" names the first.
	v.locals()
	v.returnRoutes()
	v.partners()
}

// locals checks our other addresses (local[]).
func (v *validator) locals() {
	c := v.c
	locals := map[string]int{}
	for i, l := range c.Local {
		f := func(field string) string { return fmt.Sprintf("local[%d].%s", i, field) }
		if v.email(f("address"), "", l.Address) {
			key := strings.ToLower(l.Address)
			if j, dup := locals[key]; dup {
				v.addf(f("address"), "", "", "%s is listed already as local[%d]", l.Address, j)
			} else if strings.EqualFold(l.Address, c.Self.Email) {
				v.addf(f("address"), "", "", "%s is self.email already", l.Address)
			}
			locals[key] = i
		}
		if l.Router != "" {
			v.addr(f("router"), "", l.Router, true)
		}
		if l.IMAP != nil {
			v.server(fmt.Sprintf("local[%d].imap", i), &l.IMAP.MailServer)
			v.positive(f("imap.poll"), "", l.IMAP.Poll)
		}
	}
}

// returnRoutes checks return_routes[].
func (v *validator) returnRoutes() {
	c := v.c
	for i, r := range c.ReturnRoutes {
		f := func(field string) string { return fmt.Sprintf("return_routes[%d].%s", i, field) }
		if strings.TrimSpace(r.Application) == "" {
			v.addf(f("application"), "", "the sending application (MSH-3) the route is for", "is required")
		}
		if c.Partner(r.Partner) == nil {
			v.addf(f("partner"), "", "a partner's name from partners[]", "%q is not a configured partner", r.Partner)
		}
	}
}

// partners checks each partner, and what they need together:
// distinct names, addresses and ports, and our keys for their suites.
func (v *validator) partners() {
	c := v.c
	names := map[string]int{}
	emails := map[string]int{}
	ports := map[string]string{}
	if _, port, err := net.SplitHostPort(c.Dashboard.Addr); err == nil {
		ports[port] = "dashboard.addr"
	}
	seen := &seenPartners{names: names, emails: emails, ports: ports}
	for i := range c.Partners {
		v.partner(i, &c.Partners[i], seen)
	}
	if seen.pgp && len(c.Self.PGPKey) == 0 {
		v.addf("self.pgp_key", "", "hl7mail keygen -kind pgp writes one", "required because a partner uses security: pgp")
	}
	if seen.smime && (len(c.Self.SMIMECert) == 0 || len(c.Self.SMIMEKey) == 0) {
		v.addf("self.smime_cert", "", "hl7mail keygen -kind smime writes both", "self.smime_cert and self.smime_key are required because a partner uses security: smime")
	} else if len(c.Self.SMIMECert) != len(c.Self.SMIMEKey) {
		v.addf("self.smime_key", "", "list one key for each certificate, in the same order",
			"self.smime_cert names %d certificates and self.smime_key %d keys", len(c.Self.SMIMECert), len(c.Self.SMIMEKey))
	}
	if !valid(c.Revocation.Fail) {
		v.addf("revocation.fail", "", "closed or open", "unknown value %q", c.Revocation.Fail)
	}
	if cl := c.Cluster; cl != nil {
		if !partnerName.MatchString(cl.Node) {
			v.addf("cluster.node", "", "a name unique in the cluster, such as gw-a", "required: letters, digits, '.', '_' or '-'")
		}
		if cl.Postgres.DSNFile == "" {
			v.addf("cluster.postgres.dsn_file", "", "a file with one line: postgres://user@host:5432/db?sslmode=verify-full", "required")
		}
		if l := cl.Postgres.Lease.D(); l != 0 && (l < time.Second || l > 10*time.Minute) {
			v.addf("cluster.postgres.lease", "", "between 1s and 10m; 10s if unset", "%s is out of range", l)
		}
	}
}

// seenPartners is what the partners checked so far used: names, addresses
// and ports (to find one used twice), and suites (to require our keys).
type seenPartners struct {
	names      map[string]int
	emails     map[string]int
	ports      map[string]string
	pgp, smime bool
}

// partner checks partners[i].
func (v *validator) partner(i int, p *Partner, seen *seenPartners) {
	c := v.c
	names, emails, ports := seen.names, seen.emails, seen.ports
	f := func(field string) string { return fmt.Sprintf("partners[%d].%s", i, field) }
	who := p.Name
	switch {
	case p.Name == "":
		v.addf(f("name"), "", "", "required")
		who = fmt.Sprintf("#%d", i+1)
	case !partnerName.MatchString(p.Name):
		v.addf(f("name"), "", "use letters, digits, '-', '_' and '.'", "%q is not a valid name", p.Name)
	}
	if j, dup := names[p.Name]; dup && p.Name != "" {
		v.addf(f("name"), who, "partner names must be unique", "already used by the partner on line %d", v.lineOf(fmt.Sprintf("partners[%d]", j)))
	} else {
		names[p.Name] = i
	}
	if v.email(f("email"), who, p.Email) {
		key := strings.ToLower(p.Email)
		if j, dup := emails[key]; dup {
			v.addf(f("email"), who, "each partner needs its own address", "%s is already the address of partner %s", p.Email, c.Partners[j].Name)
		} else {
			emails[key] = i
		}
		if c.IsOurs(p.Email) {
			v.addf(f("email"), who, "", "%s is one of our own addresses", p.Email)
		}
	}
	if v.addr(f("listen"), who, p.Listen, true) {
		_, port, _ := net.SplitHostPort(p.Listen)
		if other, dup := ports[port]; dup {
			v.addf(f("listen"), who, "each partner needs its own listen port", "port %s is already used by %s", port, other)
		} else {
			ports[port] = "partner " + who
		}
	}
	if p.Router != "" {
		v.addr(f("router"), who, p.Router, true)
	}
	if p.Local != "" && !c.IsOurs(p.Local) {
		v.addf(f("local"), who, "self.email or one of local[].address", "%s is not one of our addresses", p.Local)
	}
	v.partnerSettings(f, who, p, seen)
}

// partnerSettings checks a partner's suite and the settings of a few words
// or a bound; f names its fields, who the partner.
func (v *validator) partnerSettings(f func(string) string, who string, p *Partner, seen *seenPartners) {
	c := v.c
	switch p.Security {
	case PGP:
		seen.pgp = true
		if len(p.PGPKey) == 0 {
			v.addfAt(f("security"), f("pgp_key"), who, "the partner's armored public key", "required with security: pgp")
		}
	case SMIME:
		seen.smime = true
		if len(p.SMIMECert) == 0 && len(p.SMIMETrust) == 0 && len(c.TrustAnchors) == 0 {
			v.addfAt(f("security"), f("smime_cert"), who, "the partner's PEM certificate, or smime_trust: its CA",
				"required with security: smime")
		}
	case NoSecurity:
		if !p.AllowUnencrypted {
			v.addf(f("security"), who, "set allow_unencrypted: true if this is really wanted",
				"security: none would send HL7 unencrypted over the Internet")
		}
	case "":
		v.addf(f("security"), who, "pgp, smime or none", "required")
	default:
		v.addf(f("security"), who, "pgp, smime or none", "unknown value %q", p.Security)
	}
	if !valid(p.MDN) {
		v.addf(f("mdn"), who, "signed, unsigned or none", "unknown value %q", p.MDN)
	}
	if !valid(p.KeyTransport) {
		v.addf(f("key_transport"), who, "oaep or pkcs1v15", "unknown value %q", p.KeyTransport)
	}
	switch p.ContentType {
	case "application/edi-hl7", "application/x-edi-hl7":
	default:
		v.addf(f("content_type"), who, "application/edi-hl7 or application/x-edi-hl7", "unknown value %q", p.ContentType)
	}
	if !valid(p.BatchAck) {
		v.addf(f("batch_ack"), who, "batch (the default: one ACK for a batch) or each (one per message)", "unknown value %q", p.BatchAck)
	}
	if !valid(p.AcceptAck) {
		v.addf(f("accept_ack"), who, "CA (the default) or AA", "unknown value %q", p.AcceptAck)
	}
	if !valid(p.AckMode) {
		v.addf(f("ack_mode"), who, "immediate or rendezvous", "unknown value %q", p.AckMode)
	}
	if p.RequireTLS && c.SMTP.TLS == NoTLS {
		v.addf(f("require_tls"), who, "set smtp.tls to starttls or tls", "require_tls cannot be met: smtp.tls is none")
	}
	v.positive(f("mdn_timeout"), who, p.MDNTimeout)
	v.positive(f("expire_after"), who, p.ExpireAfter)
	v.positive(f("idle_timeout"), who, p.IdleTimeout)
	if t := p.ListenTLS; t != nil && (t.CertFile == "" || t.KeyFile == "") {
		v.addf(f("listen_tls"), who, "", "cert_file and key_file are required")
	}
	if p.MaxConnections < 0 {
		v.addf(f("max_connections"), who, "", "must be positive")
	}
	if p.MaxMessageSize < 0 {
		v.addf(f("max_message_size"), who, "", "must be positive")
	}
}

func (v *validator) server(name string, s *MailServer) {
	hostOK := v.addr(name+".addr", "", s.Addr, true)
	switch s.TLS {
	case StartTLS, ImplicitTLS:
	case NoTLS:
		if host, _, err := net.SplitHostPort(s.Addr); hostOK && err == nil && !isLoopback(host) {
			v.addf(name+".tls", "", "use starttls or tls", "tls: none is allowed only for loopback addresses, not %s", host)
		}
	default:
		v.addf(name+".tls", "", "starttls, tls or none", "unknown value %q", s.TLS)
	}
	v.secret(name+".password", "", s.PasswordFile, s.PasswordEnv, s.Username != "")
}

// secret checks a *_file / *_env pair.
func (v *validator) secret(path, who, file, env string, required bool) {
	switch {
	case file != "" && env != "":
		v.addf(path+"_file", who, "keep one", "%s_file and %s_env are both set", path, path)
	case required && file == "" && env == "":
		v.addf(path+"_file", who, "passwords are never written inline", "%s_file or %s_env is required with a username", path, path)
	}
}

func (v *validator) email(path, who, addr string) bool {
	if addr == "" {
		v.addf(path, who, "", "required")
		return false
	}
	a, err := mail.ParseAddress(addr)
	if err != nil || a.Address != addr {
		v.addf(path, who, "a bare address like lab@partner.example", "%q is not a valid address", addr)
		return false
	}
	return true
}

func (v *validator) addr(path, who, addr string, required bool) bool {
	if addr == "" {
		if required {
			v.addf(path, who, "host:port", "required")
		}
		return false
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		v.addf(path, who, "host:port, e.g. 127.0.0.1:9012", "%q is not host:port", addr)
		return false
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		v.addf(path, who, "1 to 65535", "bad port %q", port)
		return false
	}
	if host == "" {
		v.addf(path, who, "e.g. 127.0.0.1", "no host in %q", addr)
		return false
	}
	return true
}

func (v *validator) positive(path, who string, d Duration) {
	if d <= 0 {
		v.addf(path, who, "", "must be a positive duration")
	}
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
