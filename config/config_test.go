package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestShippedExample(t *testing.T) {
	c, err := Load("../partners.yaml")
	if err != nil {
		t.Fatalf("Load(partners.yaml): %v", err)
	}
	if len(c.Partners) != 2 || c.Partners[0].Name != "tucker-lab" || c.Partners[0].Listen != "127.0.0.1:9012" {
		t.Errorf("partners = %+v", c.Partners)
	}
	lab := c.Partner("tucker-lab")
	if lab.MDNTimeout.D() != time.Hour || lab.ExpireAfter.D() != 120*time.Hour || c.RouterFor(lab) != "127.0.0.1:6662" {
		t.Errorf("tucker-lab = %+v", lab)
	}
	clinic := c.Partner("northside-clinic")
	if c.RouterFor(clinic) != "127.0.0.1:6661" || clinic.ContentType != DefaultContentType || clinic.MaxConnections != 16 {
		t.Errorf("northside-clinic = %+v", clinic)
	}
	if got, want := c.StoreDir(), filepath.Join("..", "var/hl7mail"); got != want {
		t.Errorf("StoreDir = %q, want %q", got, want)
	}
}

const minimal = `self: {name: h, email: edi@h.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@p.test, security: none, allow_unencrypted: true}
`

func TestDefaults(t *testing.T) {
	c, err := Parse("x.yaml", []byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	p := c.Partners[0]
	if c.Store != DefaultStore || c.Router.AckTimeout.D() != DefaultAckTimeout || c.IMAP.Mailbox != "INBOX" ||
		c.IMAP.Poll.D() != DefaultPoll || c.IMAP.MaxMailSize != DefaultMaxMailSize || c.Dashboard.Addr != DefaultDashboard || p.MDN != "signed" ||
		p.IdleTimeout.D() != DefaultIdleTimeout || p.MaxMessageSize != DefaultMaxMessageSize {
		t.Errorf("defaults not applied: %+v", c)
	}
}

// broken has one problem on most lines; the test expects each at its line.
const broken = `self:
  name: h
  email: not-an-address
  passphrase_file: a
  passphrase_env: B
router: {addr: 127.0.0.1, ack_timeout: 5 seconds}
smtp: {addr: mail.example:587, tls: none, username: u}
imap: {addr: 127.0.0.1:1143, tls: sometimes}
dashboard: {addr: 0.0.0.0:8025}
partners:
  - name: lab
    listen: 127.0.0.1:9012
    email: lab@p.test
    security: pgp
    mdn: maybe
    expire_after: -1h
    listn: 127.0.0.1:1
  - name: lab
    listen: 127.0.0.2:9012
    email: LAB@p.test
    security: none
  - name: bad name
    listen: 127.0.0.1:70000
    email: c@p.test
    security: smime
    content_type: text/plain
`

func TestBrokenReportsEverything(t *testing.T) {
	_, err := Parse("broken.yaml", []byte(broken))
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("Parse(broken) error = %v, want *Error", err)
	}
	out := err.Error()
	t.Log("\n" + out)
	want := []string{
		"broken.yaml:3: self.email: \"not-an-address\" is not a valid address",
		"broken.yaml:4: self.passphrase_file: self.passphrase_file and self.passphrase_env are both set",
		"broken.yaml:6: bad duration \"5 seconds\"",
		"broken.yaml:6: router.addr: \"127.0.0.1\" is not host:port",
		"broken.yaml:7: smtp.tls: tls: none is allowed only for loopback addresses, not mail.example",
		"broken.yaml:7: smtp.password_file: smtp.password_file or smtp.password_env is required with a username",
		"broken.yaml:8: imap.tls: unknown value \"sometimes\"",
		"broken.yaml:9: dashboard.token_file: required when the dashboard listens on 0.0.0.0",
		"broken.yaml:14: partner lab: partners[0].pgp_key: required with security: pgp",
		"broken.yaml:15: partner lab: partners[0].mdn: unknown value \"maybe\"",
		"broken.yaml:16: bad duration \"-1h\"",
		"broken.yaml:17: unknown key \"listn\" (did you mean \"listen\"?)",
		"broken.yaml:18: partner lab: partners[1].name: already used by the partner on line 11",
		"broken.yaml:19: partner lab: partners[1].listen: port 9012 is already used by partner lab",
		"broken.yaml:20: partner lab: partners[1].email: LAB@p.test is already the address of partner lab",
		"broken.yaml:21: partner lab: partners[1].security: security: none would send HL7 unencrypted",
		"broken.yaml:22: partners[2].name: \"bad name\" is not a valid name",
		"broken.yaml:23: partner bad name: partners[2].listen: bad port \"70000\"",
		"broken.yaml:25: partner bad name: partners[2].smime_cert: required with security: smime",
		"broken.yaml:26: partner bad name: partners[2].content_type: unknown value \"text/plain\"",
		"self.pgp_key: required because a partner uses security: pgp",
		"self.smime_cert: self.smime_cert and self.smime_key are required",
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("missing problem %q", w)
		}
	}
	if n := len(e.Problems); n != len(want) {
		t.Errorf("%d problems reported, want %d", n, len(want))
	}
}

func TestSyntaxError(t *testing.T) {
	_, err := Parse("s.yaml", []byte("self:\n  name: [unclosed\n"))
	if err == nil || !strings.HasPrefix(err.Error(), "s.yaml:") {
		t.Errorf("Parse(syntax error) = %v, want s.yaml:line: ...", err)
	}
}

// TestNoPartners: a configuration without partners yet (as "hl7mail
// init" writes it) is valid, with partners: left out or empty.
func TestNoPartners(t *testing.T) {
	for _, tail := range []string{"", "partners:\n", "partners: []\n"} {
		c, err := Parse("n.yaml", []byte(strings.Split(minimal, "partners:")[0]+tail))
		if err != nil || len(c.Partners) != 0 {
			t.Errorf("Parse(no partners, %q) = %v", tail, err)
		}
	}
}

func TestCheckFiles(t *testing.T) {
	dir := t.TempDir()
	cfg := strings.Replace(minimal, "self: {name: h, email: edi@h.test}",
		"self: {name: h, email: edi@h.test, pgp_key: keys/self.asc, passphrase_env: HL7MAIL_TEST_UNSET}", 1)
	cfg = strings.Replace(cfg, "tls: none}\nimap", "tls: none, username: u, password_file: keys/smtp}\nimap", 1)
	path := filepath.Join(dir, "partners.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	err = c.CheckFiles()
	if err == nil {
		t.Fatal("CheckFiles with missing files = nil")
	}
	for _, w := range []string{":1: self.pgp_key:", "keys/self.asc: no such file", "HL7MAIL_TEST_UNSET is not set", ":3: smtp.password_file:"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("CheckFiles = %v, want it to mention %q", err, w)
		}
	}
	os.MkdirAll(filepath.Join(dir, "keys"), 0o700)
	os.WriteFile(filepath.Join(dir, "keys/self.asc"), []byte("k"), 0o600)
	os.WriteFile(filepath.Join(dir, "keys/smtp"), []byte("p"), 0o600)
	t.Setenv("HL7MAIL_TEST_UNSET", "x")
	if err := c.CheckFiles(); err != nil {
		t.Errorf("CheckFiles with all files present = %v", err)
	}
	// A secret others can read is refused; a certificate may be read.
	os.Chmod(filepath.Join(dir, "keys/self.asc"), 0o644)
	os.Chmod(filepath.Join(dir, "keys/smtp"), 0o640)
	err = c.CheckFiles()
	for _, w := range []string{"self.pgp_key: " + filepath.Join(dir, "keys/self.asc") + " holds a secret but is readable by group or others (mode 0644)",
		"smtp.password_file:", "(mode 0640)", "chmod 600"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("CheckFiles with open secrets = %v, want it to mention %q", err, w)
		}
	}
}

func TestLocalAddresses(t *testing.T) {
	good := strings.Replace(minimal, "partners:\n", `local:
  - {address: lab@edi.h.test, router: 127.0.0.1:6671, imap: {addr: 127.0.0.1:1143, tls: none, username: lab@edi.h.test, password_env: LAB_PW}}
  - {address: adt@edi.h.test}
partners:
`, 1)
	good = strings.Replace(good, "allow_unencrypted: true}", "allow_unencrypted: true, local: LAB@edi.h.test}", 1)
	c, err := Parse("x.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	p := &c.Partners[0]
	if c.FromFor(p) != "LAB@edi.h.test" || c.RouterForMail(p, "lab@edi.h.test") != "127.0.0.1:6671" ||
		c.RouterForMail(p, "adt@edi.h.test") != "127.0.0.1:6661" || c.RouterForMail(p, "edi@h.test") != "127.0.0.1:6661" {
		t.Errorf("from %s, routers %s %s", c.FromFor(p), c.RouterForMail(p, "lab@edi.h.test"), c.RouterForMail(p, "adt@edi.h.test"))
	}
	if !c.IsOurs("adt@edi.h.test") || c.IsOurs("lab@p.test") || c.Local[0].IMAP.Mailbox != "INBOX" || c.Local[0].IMAP.Poll == 0 {
		t.Errorf("IsOurs or local IMAP defaults wrong: %+v", c.Local[0].IMAP)
	}
	bad := strings.Replace(good, "{address: adt@edi.h.test}", "{address: lab@edi.h.test}\n  - {address: edi@h.test}", 1)
	bad = strings.Replace(bad, "local: LAB@edi.h.test", "local: other@edi.h.test", 1)
	_, err = Parse("x.yaml", []byte(bad))
	for _, want := range []string{"local[1].address: lab@edi.h.test is listed already as local[0]", "local[2].address: edi@h.test is self.email already",
		"partners[0].local: other@edi.h.test is not one of our addresses"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(bad local) = %v; want %q", err, want)
		}
	}
}

func TestReturnRoutes(t *testing.T) {
	good := strings.Replace(minimal, "partners:\n", `return_routes:
  - {application: labapp, facility: tucker, partner: lab}
  - {application: ADT, partner: lab}
partners:
`, 1)
	c, err := Parse("x.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		app, facility string
		want          bool
	}{{"LABAPP", "TUCKER", true}, {"LABAPP", "ELSEWHERE", false}, {"ADT", "ANY", true}, {"ORU", "TUCKER", false}} {
		if got := c.ReturnRouteFor(tc.app, tc.facility) != nil; got != tc.want {
			t.Errorf("ReturnRouteFor(%s, %s) found %v, want %v", tc.app, tc.facility, got, tc.want)
		}
	}
	bad := strings.Replace(good, "{application: ADT, partner: lab}", "{application: '', partner: nobody}", 1)
	_, err = Parse("x.yaml", []byte(bad))
	for _, want := range []string{"return_routes[1].application: is required", `return_routes[1].partner: "nobody" is not a configured partner`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(bad return route) = %v; want %q", err, want)
		}
	}
}

// TestUnknownNestedKeys: an unknown key is found at any depth (a section
// within a section, a partner's TLS settings, a list of local addresses),
// with its line and the closest key; values that decode themselves
// (durations) are not walked into.
func TestUnknownNestedKeys(t *testing.T) {
	bad := strings.Replace(minimal, "partners:\n", `alerts: {webhook: {ur: https://x.test/hook}, digest: 2m}
local:
  - {address: adt@h.test, imap: {addr: 127.0.0.1:1143, tls: none, usename: adt}}
partners:
`, 1)
	bad = strings.Replace(bad, "allow_unencrypted: true}", "allow_unencrypted: true, listen_tls: {cert_fil: c.pem}, idle_timeout: 5m}", 1)
	_, err := Parse("x.yaml", []byte(bad))
	for _, want := range []string{`x.yaml:5: unknown key "ur" (did you mean "url"?)`, `x.yaml:7: unknown key "usename" (did you mean "username"?)`,
		`x.yaml:9: unknown key "cert_fil" (did you mean "cert_file"?)`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse = %v; want %q", err, want)
		}
	}
	if err != nil && strings.Contains(err.Error(), "idle_timeout") {
		t.Errorf("a duration reported: %v", err)
	}
}

// TestEnums: each setting of a few words takes exactly its own words; the
// validator asks the type.
func TestEnums(t *testing.T) {
	check := func(name string, ok, bad bool) {
		t.Helper()
		if !ok || bad {
			t.Errorf("%s: its words valid %v, a stranger valid %v", name, ok, bad)
		}
	}
	check("security", valid(PGP) && valid(SMIME) && valid(NoSecurity), valid(Suite("PGP")))
	check("mdn", valid(ReceiptSigned) && valid(ReceiptUnsigned) && valid(ReceiptNone), valid(Receipt("")))
	check("key_transport", valid(OAEP) && valid(PKCS1v15), valid(KeyTransport("rsa")))
	check("ack_mode", valid(AckImmediate) && valid(AckRendezvous), valid(AckMode("later")))
	check("accept_ack", valid(AcceptCA) && valid(AcceptAA), valid(AcceptAck("AE")))
	check("batch_ack", valid(BatchAckBatch) && valid(BatchAckEach), valid(BatchAck("all")))
	check("tls", valid(StartTLS) && valid(ImplicitTLS) && valid(NoTLS), valid(TLSMode("ssl")))
	if !PGP.Signs() || !SMIME.Signs() || NoSecurity.Signs() {
		t.Error("Signs")
	}
}

// TestKeyLists: a key field takes a file or a list; certificates and keys
// of ours pair by position; an S/MIME partner needs a pinned certificate or
// anchors; revocation.fail takes its words.
func TestKeyLists(t *testing.T) {
	base := `self: {name: h, email: edi@h.test, pgp_key: %s, smime_cert: %s, smime_key: %s}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
%s
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@p.test, security: pgp, pgp_key: [a.asc, b.asc, b.rev]}
  - {name: clinic, listen: 127.0.0.1:9013, email: c@c.test, security: smime, %s}
`
	c, err := Parse("x.yaml", []byte(fmt.Sprintf(base, "s.asc", "[a.crt, b.crt]", "[a.key, b.key]", "", "smime_trust: [ca.pem]")))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Self.PGPKey) != 1 || len(c.Self.SMIMECert) != 2 || len(c.Partners[0].PGPKey) != 3 ||
		len(c.Partners[1].SMIMETrust) != 1 || c.Revocation.Fail != FailClosed {
		t.Errorf("lists: %+v %+v, revocation %+v", c.Self, c.Partners, c.Revocation)
	}
	if f := c.Partners[0].PGPKey.Field("pgp_key", 2); f != "pgp_key[2]" {
		t.Errorf("Field of a list: %s", f)
	}
	if f := c.Self.PGPKey.Field("self.pgp_key", 0); f != "self.pgp_key" {
		t.Errorf("Field of one file: %s", f)
	}
	for _, bad := range []struct{ cfg, want string }{
		{fmt.Sprintf(base, "s.asc", "[a.crt, b.crt]", "[a.key]", "", "smime_cert: c.crt"), "2 certificates and self.smime_key 1 keys"},
		{fmt.Sprintf(base, "s.asc", "a.crt", "a.key", "", "listen_tls: null"), "required with security: smime"},
		{fmt.Sprintf(base, "s.asc", "a.crt", "a.key", "revocation: {fail: maybe}", "smime_cert: c.crt"), "revocation.fail"},
		{fmt.Sprintf(base, "{x: 1}", "a.crt", "a.key", "", "smime_cert: c.crt"), "a file name or a list"},
	} {
		if _, err := Parse("x.yaml", []byte(bad.cfg)); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%v, want %q", err, bad.want)
		}
	}
	// Anchors for every partner stand in for a pinned certificate.
	if _, err := Parse("x.yaml", []byte(fmt.Sprintf(base, "s.asc", "a.crt", "a.key", "trust_anchors: [ca.pem]", "listen_tls: null"))); err != nil {
		t.Errorf("trust_anchors without a pinned certificate: %v", err)
	}
}
