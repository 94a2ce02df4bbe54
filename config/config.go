// Package config reads partners.yaml, hl7mail's one configuration file: who
// we are, where the store, router, mail servers and dashboard are, and the
// partners we exchange HL7 with (one surrogate MLLP listener each,
// draft-ietf-ediint-hl7-02 §6.3 figure 9).
//
// Decoding is strict (an unknown key is an error) and validation reports
// every problem at once, each with its line.
//
// It imports, of this module, nothing.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is the whole of partners.yaml.
type Config struct {
	// Self is this hospital's own identity and keys.
	Self Self `yaml:"self"`
	// Store is the folder of the spool database and the journals, relative
	// to the config file (default var/hl7mail).
	Store string `yaml:"store"`
	// Router is the internal HL7 router (interface engine) that inbound
	// messages are delivered to over MLLP.
	Router Router `yaml:"router"`
	// SMTP is the submission server for outbound mail.
	SMTP MailServer `yaml:"smtp"`
	// IMAP is the account inbound mail is fetched from.
	IMAP IMAP `yaml:"imap"`
	// Dashboard is the web page and metrics endpoint.
	Dashboard Dashboard `yaml:"dashboard"`
	// Local are further addresses of this site, each for an internal
	// application with its own router (draft-ietf-ediint-hl7-02 §6.3):
	// mail sent to one goes to its router.
	Local []Local `yaml:"local"`
	// Alerts says who is told of alerts besides the log and the dashboard.
	Alerts Alerts `yaml:"alerts"`
	// ReturnRoutes send the answer to a partner's message to another
	// partner, by the message's MSH-3/MSH-4 (draft-ietf-ediint-hl7-02
	// §4.1.4, the first rule of the return address).
	ReturnRoutes []ReturnRoute `yaml:"return_routes"`
	// Partners are the remote parties; at least one is required.
	Partners []Partner `yaml:"partners"`
	// TrustAnchors (PEM or .p7b) are trust anchors for every S/MIME
	// partner, as smime_trust is for one.
	TrustAnchors Files `yaml:"trust_anchors"`
	// Revocation is how S/MIME certificates are checked for revocation.
	Revocation Revocation `yaml:"revocation"`
	// Cluster, when set, makes this instance one node of a cluster on a
	// shared PostgreSQL database; without it the instance runs alone on
	// its embedded store.
	Cluster *Cluster `yaml:"cluster"`

	// File is the path the configuration was read from.
	File string `yaml:"-"`

	lines map[string]int // field path → line, for problems found later
}

// Self is this site's identity.
type Self struct {
	// Name names this site in logs and MDNs (Reporting-UA); required.
	Name string `yaml:"name"`
	// Email is the address mail is sent from and received at; required.
	Email string `yaml:"email"`
	// PGPKey is our armored OpenPGP private key, or a list of them over
	// time: all decrypt, the newest valid one signs. Required when any
	// partner uses security: pgp.
	PGPKey Files `yaml:"pgp_key"`
	// SMIMECert and SMIMEKey are our PEM certificate and private key, or
	// lists of them paired by position; required when any partner uses
	// security: smime. A certificate file may hold the chain (leaf first,
	// then intermediates): our signatures carry all of it.
	SMIMECert Files `yaml:"smime_cert"`
	SMIMEKey  Files `yaml:"smime_key"`
	// PassphraseFile or PassphraseEnv hold the passphrase of the private
	// keys, if they are protected. Never inline.
	PassphraseFile string `yaml:"passphrase_file"`
	PassphraseEnv  string `yaml:"passphrase_env"`
}

// Router is the internal HL7 router.
type Router struct {
	// Addr is host:port of the router's MLLP listener for inbound messages.
	Addr string `yaml:"addr"`
	// AckTimeout is how long to wait for the router's ACK (default 30s).
	AckTimeout Duration `yaml:"ack_timeout"`
	// TLS, when set, is MLLP over TLS to every router this site delivers
	// to (router.addr, a partner's router, a local address's router).
	TLS *RouterTLS `yaml:"tls"`
}

// RouterTLS is the TLS of delivery to the router: the router's certificate
// is verified against CAFile (required) for the router's host, and
// CertFile/KeyFile, when set, are our client certificate.
type RouterTLS struct {
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// ListenTLS is the TLS of a surrogate listener (MLLP over TLS, TLS 1.2 or
// later): our CertFile and KeyFile (required), and ClientCAFile, which,
// when set, makes a client certificate signed by one of its CAs required.
type ListenTLS struct {
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
}

// MailServer is an SMTP or IMAP server and the account on it.
type MailServer struct {
	// Addr is host:port; required.
	Addr string `yaml:"addr"`
	// TLS is starttls (default), tls (implicit TLS) or none (loopback only).
	TLS TLSMode `yaml:"tls"`
	// Username for AUTH/LOGIN; when set, a password is required.
	Username string `yaml:"username"`
	// PasswordFile or PasswordEnv hold the password. Never inline.
	PasswordFile string `yaml:"password_file"`
	PasswordEnv  string `yaml:"password_env"`
	// CAFile is a PEM file of the certificate authorities that sign the
	// server's certificate (a private CA); default: the system's roots.
	// Certificates are always verified.
	CAFile string `yaml:"ca_file"`
	// Retry is, for SMTP, the wait after a failed submission, doubling up
	// to 30m (default 30s).
	Retry Duration `yaml:"retry"`
}

// IMAP is the inbound account.
type IMAP struct {
	MailServer `yaml:",inline"`
	// Mailbox is watched for partner mail (default INBOX).
	Mailbox string `yaml:"mailbox"`
	// Processed receives handled mail (default HL7/Processed).
	Processed string `yaml:"processed"`
	// Quarantine receives rejected mail (default HL7/Quarantine).
	Quarantine string `yaml:"quarantine"`
	// Poll is the polling interval where IDLE is absent, and the interval of
	// the UID search made while idling (default 30s).
	Poll Duration `yaml:"poll"`
	// MaxMailSize bounds one partner mail in bytes (default 32 MiB); a
	// larger one is quarantined unfetched (reason oversize) and its sender
	// gets a "denied" MDN.
	MaxMailSize int `yaml:"max_mail_size"`
}

// Dashboard is the operator web page.
type Dashboard struct {
	// Addr is host:port (default 127.0.0.1:8025).
	Addr string `yaml:"addr"`
	// TokenFile holds the bearer token required on non-loopback addresses.
	TokenFile string `yaml:"token_file"`
}

// Alerts are the notices to personnel (draft-ietf-ediint-hl7-02 §6.4:
// "alert personnel for corrective action"). Each alert is told once, many
// within a minute as one digest, and an outage's alert once more when it
// clears. A notice names the alert's kind, partner, control IDs,
// Message-IDs, times and the servers' words: never message content.
// Sending notices never holds up HL7 traffic.
type Alerts struct {
	// Email are addresses sent a plain-text notice through the smtp
	// server, from self.email. Never encrypted (it holds no PHI).
	Email []string `yaml:"email"`
	// Webhook, when its URL is set, gets each notice as a JSON POST,
	// retried until it answers 2xx.
	Webhook Webhook `yaml:"webhook"`
	// Digest is the least time between two notices: alerts raised within it
	// are told as one digest (default 1m). A first alert waits a sixth of
	// it (at most 10s) for others to go with it.
	Digest Duration `yaml:"digest"`
}

// Webhook is an HTTP endpoint for alert notices.
type Webhook struct {
	// URL is http:// or https://.
	URL string `yaml:"url"`
	// TokenFile, when set, holds a bearer token sent with each POST.
	TokenFile string `yaml:"token_file"`
}

// Local is an address of this site besides self.email.
type Local struct {
	// Address is the mail address; required, unique.
	Address string `yaml:"address"`
	// Router is host:port of the router for mail sent to Address
	// (default router.addr).
	Router string `yaml:"router"`
	// IMAP, when set, is the account mail to Address is fetched from;
	// without it, mail to Address must reach the imap account (an alias)
	// or "hl7mail receive".
	IMAP *IMAP `yaml:"imap"`
}

// Partner is a remote party reached by mail.
type Partner struct {
	// Name identifies the partner in logs, the store and the CLI; required,
	// unique, letters, digits, '-', '_' and '.'.
	Name string `yaml:"name"`
	// Listen is host:port of this partner's surrogate MLLP listener;
	// required and unique.
	Listen string `yaml:"listen"`
	// ListenTLS, when set, makes the surrogate MLLP over TLS, for a router
	// on another host.
	ListenTLS *ListenTLS `yaml:"listen_tls"`
	// Email is the partner's address; required and unique.
	Email string `yaml:"email"`
	// Security is pgp, smime or none (none needs AllowUnencrypted).
	Security Suite `yaml:"security"`
	// AllowUnencrypted must be true for security: none, so that mail never
	// leaves unencrypted by accident.
	AllowUnencrypted bool `yaml:"allow_unencrypted"`
	// PGPKey is the partner's armored public key, or a list of them over
	// time (security: pgp). A file holding only a revocation signature
	// (GnuPG's .rev) revokes the key it names.
	PGPKey Files `yaml:"pgp_key"`
	// SMIMECert is the partner's PEM certificate, or a list of them
	// (security: smime): pinned, only these are accepted.
	SMIMECert Files `yaml:"smime_cert"`
	// SMIMETrust, instead of pinning, are trust anchors (PEM or .p7b):
	// any valid certificate for the partner's address that chains to one
	// of them is accepted.
	SMIMETrust Files `yaml:"smime_trust"`
	// MDN is the receipt asked for: signed (default), unsigned or none.
	MDN Receipt `yaml:"mdn"`
	// MDNTimeout is when a missing receipt raises an alert (default 1h).
	MDNTimeout Duration `yaml:"mdn_timeout"`
	// ExpireAfter is how long delivery is retried (default 120h).
	ExpireAfter Duration `yaml:"expire_after"`
	// Router overrides router.addr for this partner's inbound messages.
	Router string `yaml:"router"`
	// ContentType of the MIME-EDI entity: application/edi-hl7 (default) or
	// application/x-edi-hl7 (draft-ietf-ediint-hl7-02 §2.6).
	ContentType string `yaml:"content_type"`
	// MaxConnections bounds simultaneous router connections to the
	// surrogate (default 16).
	MaxConnections int `yaml:"max_connections"`
	// IdleTimeout closes a router connection silent for this long
	// (default 10m).
	IdleTimeout Duration `yaml:"idle_timeout"`
	// MaxMessageSize bounds one HL7 message in bytes (default 1 MiB).
	MaxMessageSize int `yaml:"max_message_size"`
	// MaxConnectionsPerHost bounds the router connections from one source
	// address (default three quarters of max_connections): one host cannot
	// take every slot.
	MaxConnectionsPerHost int `yaml:"max_connections_per_host"`
	// FirstFrameTimeout closes a router connection that sends no complete
	// message this long after it opened (default 30s).
	FirstFrameTimeout Duration `yaml:"first_frame_timeout"`
	// KeyTransport is how S/MIME content keys are encrypted to this
	// partner: oaep (RSA-OAEP-SHA256, default) or pkcs1v15 for partners
	// whose software needs it.
	KeyTransport KeyTransport `yaml:"key_transport"`
	// AcceptConsent allows application/edi-consent from this partner.
	AcceptConsent bool `yaml:"accept_consent"`
	// RequireTLS hands mail for this partner only to an SMTP server reached
	// over TLS with a verified certificate that accepts REQUIRETLS (RFC
	// 8689), so that every hop on the way must use TLS too. A server that
	// cannot is a refusal and an alert, never a silent downgrade.
	RequireTLS bool `yaml:"require_tls"`
	// AcceptAck is what the surrogate answers once a message is stored: CA
	// (default; CE or CR when it cannot take responsibility), whatever the
	// sender's mode, or AA: AA, AE or AR to a sender in original mode
	// (MSH-15 and MSH-16 empty), for routers that take no other answer
	// (Mirth 3.0, Cloverleaf tps_check_reply procs).
	AcceptAck AcceptAck `yaml:"accept_ack"`
	// BatchAck is how the surrogate answers an HL7 batch (FHS/BHS … BTS/FTS,
	// sent as one frame): batch (default) with one ACK for the whole batch,
	// its MSA-2 the batch control ID (BHS-11); each with a batch
	// acknowledgement holding one ACK per message.
	BatchAck BatchAck `yaml:"batch_ack"`
	// BatchSplit delivers a batch from this partner to the router as its
	// messages, one by one, rather than as the one batch it came as; the
	// router's answers go back to the partner as a batch acknowledgement.
	BatchSplit bool `yaml:"batch_split"`
	// AckMode is immediate (default: CA as soon as the message is stored)
	// or rendezvous: the surrogate keeps the router's connection open and
	// answers with the partner's own application response (AA/AE/AR) from
	// the returned bundle, or with CE (AE in original mode with accept_ack:
	// AA) saying "timed out" after RendezvousTimeout
	// (draft-ietf-ediint-hl7-02 §4.1.4).
	AckMode AckMode `yaml:"ack_mode"`
	// RendezvousTimeout bounds the wait of ack_mode: rendezvous (default
	// 30s). The message is stored and delivered either way; a response that
	// comes later reaches the router as an unsolicited message.
	RendezvousTimeout Duration `yaml:"rendezvous_timeout"`
	// Local is the address of ours this partner talks to: the From of the
	// mail sent to it (default self.email); one of local[].address.
	Local string `yaml:"local"`
	// OrderWait is how long an inbound message is held for one that must
	// reach the router before it (draft-ietf-ediint-hl7-02 §6.1.2): the
	// request a message replies to (In-Reply-To), or the missing numbers
	// of the partner's HL7 sequence (MSH-13). Then it is delivered and an
	// alert raised (default 10m).
	OrderWait Duration `yaml:"order_wait"`
}

// Defaults.
const (
	DefaultStore          = "var/hl7mail"
	DefaultAckTimeout     = 30 * time.Second
	DefaultPoll           = 30 * time.Second
	DefaultDashboard      = "127.0.0.1:8025"
	DefaultMDNTimeout     = time.Hour
	DefaultExpireAfter    = 120 * time.Hour
	DefaultMaxConnections = 16
	DefaultIdleTimeout    = 10 * time.Minute
	DefaultMaxMessageSize = 1 << 20
	DefaultFirstFrame     = 30 * time.Second
	DefaultMaxMailSize    = 32 << 20
	DefaultRendezvous     = 30 * time.Second
	DefaultOrderWait      = 10 * time.Minute
	DefaultContentType    = "application/edi-hl7"
)

// Duration is a time.Duration written as "30s", "1h" or "120h".
type Duration time.Duration

// UnmarshalYAML parses a duration; a bad one is reported with its line
// together with the other problems of the file.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil || v < 0 {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: bad duration %q (use e.g. 30s, 15m, 2h)", n.Line, n.Value)}}
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration as text.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Load reads and validates the configuration at path. On any problem it
// returns an *Error listing all of them.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes and validates data read from path (used to resolve relative
// paths and to name the file in problems).
func Parse(path string, data []byte) (*Config, error) {
	c := &Config{File: path}
	e := &Error{File: path}
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		e.add(problemFromYAML(err))
		return nil, e
	}
	// Unknown keys are found on the tree, beside the types, each with its
	// line; the decoder reports what does not fit a type.
	for _, p := range unknownKeys(&root, reflect.TypeFor[Config](), "") {
		e.add(p)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(c); err != nil {
		if te, ok := err.(*yaml.TypeError); ok {
			for _, msg := range te.Errors {
				e.add(problemFromYAML(fmt.Errorf("%s", msg)))
			}
		} else {
			e.add(problemFromYAML(err))
		}
	}
	c.applyDefaults()
	c.lines = nodeLines(&root)
	v := validator{c: c, e: e, lines: c.lines}
	v.validate()
	if len(e.Problems) > 0 {
		return nil, e
	}
	return c, nil
}

func (c *Config) applyDefaults() {
	if c.Store == "" {
		c.Store = DefaultStore
	}
	if c.Router.AckTimeout == 0 {
		c.Router.AckTimeout = Duration(DefaultAckTimeout)
	}
	for _, s := range []*MailServer{&c.SMTP, &c.IMAP.MailServer} {
		if s.TLS == "" {
			s.TLS = "starttls"
		}
	}
	if c.IMAP.Mailbox == "" {
		c.IMAP.Mailbox = "INBOX"
	}
	if c.IMAP.Processed == "" {
		c.IMAP.Processed = "HL7/Processed"
	}
	if c.IMAP.Quarantine == "" {
		c.IMAP.Quarantine = "HL7/Quarantine"
	}
	if c.IMAP.Poll == 0 {
		c.IMAP.Poll = Duration(DefaultPoll)
	}
	if c.IMAP.MaxMailSize == 0 {
		c.IMAP.MaxMailSize = DefaultMaxMailSize
	}
	for i := range c.Local {
		if m := c.Local[i].IMAP; m != nil {
			if m.TLS == "" {
				m.TLS = "starttls"
			}
			if m.Mailbox == "" {
				m.Mailbox = "INBOX"
			}
			if m.Processed == "" {
				m.Processed = c.IMAP.Processed
			}
			if m.Quarantine == "" {
				m.Quarantine = c.IMAP.Quarantine
			}
			if m.Poll == 0 {
				m.Poll = c.IMAP.Poll
			}
			if m.MaxMailSize == 0 {
				m.MaxMailSize = c.IMAP.MaxMailSize
			}
		}
	}
	if c.Dashboard.Addr == "" {
		c.Dashboard.Addr = DefaultDashboard
	}
	if c.Alerts.Digest == 0 {
		c.Alerts.Digest = Duration(time.Minute)
	}
	if c.Revocation.Fail == "" {
		c.Revocation.Fail = FailClosed
	}
	for i := range c.Partners {
		p := &c.Partners[i]
		if p.MDN == "" {
			p.MDN = "signed"
		}
		if p.MDNTimeout == 0 {
			p.MDNTimeout = Duration(DefaultMDNTimeout)
		}
		if p.ExpireAfter == 0 {
			p.ExpireAfter = Duration(DefaultExpireAfter)
		}
		if p.ContentType == "" {
			p.ContentType = DefaultContentType
		}
		if p.MaxConnections == 0 {
			p.MaxConnections = DefaultMaxConnections
		}
		if p.IdleTimeout == 0 {
			p.IdleTimeout = Duration(DefaultIdleTimeout)
		}
		if p.MaxMessageSize == 0 {
			p.MaxMessageSize = DefaultMaxMessageSize
		}
		if p.MaxConnectionsPerHost == 0 {
			p.MaxConnectionsPerHost = max(1, p.MaxConnections-p.MaxConnections/4)
		}
		if p.FirstFrameTimeout == 0 {
			p.FirstFrameTimeout = Duration(DefaultFirstFrame)
		}
		if p.KeyTransport == "" {
			p.KeyTransport = "oaep"
		}
		if p.AckMode == "" {
			p.AckMode = "immediate"
		}
		if p.AcceptAck == "" {
			p.AcceptAck = "CA"
		}
		if p.BatchAck == "" {
			p.BatchAck = "batch"
		}
		if p.RendezvousTimeout == 0 {
			p.RendezvousTimeout = Duration(DefaultRendezvous)
		}
		if p.OrderWait == 0 {
			p.OrderWait = Duration(DefaultOrderWait)
		}
	}
}

// Files is one file or a list of them, as partners.yaml writes either:
// `pgp_key: keys/lab.asc` or `pgp_key: [keys/lab-2026.asc, keys/lab-2027.asc]`.
// A key or certificate given as a list is one party's keys over time: all
// of them are known, the newest valid one is used (see security.Keyring).
type Files []string

// UnmarshalYAML reads a scalar as a list of one.
func (f *Files) UnmarshalYAML(n *yaml.Node) error {
	switch n.Kind {
	case yaml.ScalarNode:
		if n.Value == "" {
			*f = nil
			return nil
		}
		*f = Files{n.Value}
		return nil
	case yaml.SequenceNode:
		var list []string
		if err := n.Decode(&list); err != nil {
			return err
		}
		*f = list
		return nil
	}
	return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: a file name or a list of file names is required", n.Line)}}
}

// MarshalYAML writes one file as a scalar, several as a list.
func (f Files) MarshalYAML() (any, error) {
	if len(f) == 1 {
		return f[0], nil
	}
	return []string(f), nil
}

// Field names the i-th file of the field named field: the field itself
// when it holds one file, field[i] in a list.
func (f Files) Field(field string, i int) string {
	if len(f) <= 1 {
		return field
	}
	return fmt.Sprintf("%s[%d]", field, i)
}

// Revocation says how certificate revocation is checked for S/MIME
// partners (RFC 5280 CRLs, RFC 6960 OCSP).
type Revocation struct {
	// CRLFiles are CRLs (PEM or DER) read at start and at every reload.
	CRLFiles Files `yaml:"crl_files"`
	// Fetch, when true, fetches CRLs from a certificate's distribution
	// points and asks its OCSP responder (HTTP), caching each answer until
	// its next update.
	Fetch bool `yaml:"fetch"`
	// Fail is what "cannot tell" means once no cached answer is current:
	// closed (default) refuses the certificate, open logs and accepts it.
	Fail FailMode `yaml:"fail"`
}

// Cluster makes the instance one node of several sharing a PostgreSQL
// database: every node's surrogates accept, and each role (a partner's
// sender, an IMAP account's watcher, a router's deliverer, the sweeper,
// the notices) runs on one node at a time.
type Cluster struct {
	// Node is this node's name, unique in the cluster.
	Node string `yaml:"node"`
	// Postgres is the shared database.
	Postgres Postgres `yaml:"postgres"`
}

// Postgres is how a node reaches the cluster's database.
type Postgres struct {
	// DSNFile holds one line, the database's URL
	// (postgres://user@host:5432/db?sslmode=verify-full); a password in
	// it stays out of partners.yaml.
	DSNFile string `yaml:"dsn_file"`
	// Lease is how long a node may hold a role without renewing it
	// (default 10s): the longest a dead node's roles wait for another.
	Lease Duration `yaml:"lease"`
}

// DSN reads the cluster's database URL from its file.
func (c *Config) DSN() (string, error) {
	if c.Cluster == nil {
		return "", errors.New("no cluster section")
	}
	return c.Secret(c.Cluster.Postgres.DSNFile, "")
}
