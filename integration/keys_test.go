package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/security"
)

// opensslCA is a certification authority run with OpenSSL as partners'
// CAs are: a self-signed root, an intermediate that issues with "openssl
// ca" (its index.txt is what "openssl ocsp" answers from and "openssl ca
// -gencrl" lists).
type opensslCA struct {
	t        *testing.T
	dir, bin string
	ocspURL  string // named in every certificate issued, when set
}

func (ca *opensslCA) run(args ...string) string {
	ca.t.Helper()
	cmd := exec.Command(ca.bin, args...)
	cmd.Dir = ca.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		ca.t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (ca *opensslCA) file(name, text string) string {
	ca.t.Helper()
	if err := os.WriteFile(filepath.Join(ca.dir, name), []byte(text), 0o600); err != nil {
		ca.t.Fatal(err)
	}
	return name
}

// newOpenSSLCA makes, in dir, root.crt (CN name Root CA) and inter.crt
// (name Issuing CA), both with their keys, and the intermediate's
// database.
func newOpenSSLCA(t *testing.T, dir, name, ocspURL string) *opensslCA {
	ca := &opensslCA{t: t, dir: dir, bin: requireTool(t, "/usr/bin/openssl"), ocspURL: ocspURL}
	os.MkdirAll(filepath.Join(dir, "newcerts"), 0o700)
	ca.file("index.txt", "")
	ca.file("serial", "1000\n")
	ca.file("crlnumber", "1000\n")
	ca.file("ca.cnf", `[ ca ]
default_ca = inter
[ inter ]
dir = .
database = ./index.txt
new_certs_dir = ./newcerts
serial = ./serial
crlnumber = ./crlnumber
certificate = ./inter.crt
private_key = ./inter.key
default_md = sha256
default_days = 30
default_crl_days = 7
policy = any
unique_subject = no
email_in_dn = no
[ any ]
commonName = supplied
`)
	ca.file("v3ca.cnf", "[ v3 ]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n")
	ca.run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key", "-out", "root.crt", "-days", "60",
		"-subj", "/O="+name+"/CN="+name+" Root CA", "-addext", "basicConstraints=critical,CA:TRUE",
		"-addext", "keyUsage=critical,keyCertSign,cRLSign")
	ca.run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "inter.key", "-out", "inter.csr", "-subj", "/O="+name+"/CN="+name+" Issuing CA")
	ca.run("x509", "-req", "-in", "inter.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial", "-days", "60",
		"-extfile", "v3ca.cnf", "-extensions", "v3", "-out", "inter.crt")
	return ca
}

// issue makes name.key and name.crt for email, issued by the intermediate
// with "openssl ca", valid from start to end (openssl's YYYYMMDDHHMMSSZ;
// empty: from now for 30 days).
func (ca *opensslCA) issue(name, email, start, end string) {
	ca.t.Helper()
	ext := "[ smime ]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n" +
		"extendedKeyUsage = emailProtection\nsubjectAltName = email:" + email + "\n"
	if ca.ocspURL != "" {
		ext += "authorityInfoAccess = OCSP;URI:" + ca.ocspURL + "\n"
	}
	ca.file(name+".ext", ext)
	ca.run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", name+".key", "-out", name+".csr", "-subj", "/CN="+name)
	args := []string{"ca", "-config", "ca.cnf", "-batch", "-notext", "-in", name + ".csr", "-out", name + ".crt",
		"-extfile", name + ".ext", "-extensions", "smime"}
	if start != "" {
		args = append(args, "-startdate", start, "-enddate", end)
	}
	ca.run(args...)
}

// smimeMail is an HL7 message signed by openssl cms with name's
// certificate (carrying the intermediate) and encrypted to the hospital, in
// a mail from the partner.
func (ca *opensslCA) smimeMail(name, from, hospitalCert, msgID string, hl7msg []byte) []byte {
	ca.t.Helper()
	edi, err := security.EncodeEDI(hl7msg, security.EDIOptions{})
	if err != nil {
		ca.t.Fatal(err)
	}
	ca.file("edi.eml", string(edi))
	ca.run("cms", "-sign", "-in", "edi.eml", "-signer", name+".crt", "-inkey", name+".key", "-certfile", "inter.crt",
		"-md", "sha256", "-binary", "-out", "signed.eml")
	ca.run("cms", "-encrypt", "-binary", "-aes-256-cbc", "-in", "signed.eml", "-out", "enc.eml", "-recip", hospitalCert)
	body, err := os.ReadFile(filepath.Join(ca.dir, "enc.eml"))
	if err != nil {
		ca.t.Fatal(err)
	}
	return append([]byte("From: "+from+"\r\nTo: edi@hospital.test\r\nMessage-ID: "+msgID+"\r\nSubject: HL7\r\n"), body...)
}

// receive hands mail to "hl7mail receive" (the running instance's, or
// stored for the next start) and returns what it says: "stored as message
// N" or "quarantined: REASON".
func receive(t *testing.T, config string, mail []byte) string {
	t.Helper()
	cmd := exec.Command(binary, "receive", "-config", config)
	cmd.Stdin = bytes.NewReader(mail)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("hl7mail receive: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	last := lines[len(lines)-1] // after the log lines of a receive with the instance stopped
	if len(lines) > 1 {
		t.Log(strings.Join(lines[:len(lines)-1], "\n"))
	}
	return last
}

// smimeSite writes the hospital's keys and a configuration with one S/MIME
// partner, northside, whose partner section is partner.
func smimeSite(t *testing.T, dir, partner, extra string) string {
	siteKeys(t, dir, "hospital", "edi@hospital.test", "smime")
	config := filepath.Join(dir, "partners.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, smime_cert: hospital/cert.pem, smime_key: hospital/key.pem}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none}
dashboard: {addr: %s}
%s
partners:
  - {name: northside, listen: %s, email: edi@northside.test, security: smime, %s}
`, freePort(t), freePort(t), freePort(t), freePort(t), extra, freePort(t), partner)), 0o600); err != nil {
		t.Fatal(err)
	}
	return config
}

// TestSMIMETrustAnchors: an OpenSSL CA with an intermediate issues the
// partner's certificate. With smime_trust naming the CA's root, mail signed
// with it is taken (the intermediate came in the signature); pinned to
// another certificate instead, it is refused. A certificate for another
// address, an expired one and one from another CA are each refused with
// their own reason.
func TestSMIMETrustAnchors(t *testing.T) {
	dir := t.TempDir()
	caDir, otherDir := filepath.Join(dir, "ca"), filepath.Join(dir, "other")
	os.MkdirAll(caDir, 0o700)
	os.MkdirAll(otherDir, 0o700)
	ca := newOpenSSLCA(t, caDir, "Northside", "")
	ca.issue("clinic", "edi@northside.test", "", "")
	ca.issue("someone", "someone@northside.test", "", "")
	ca.issue("old", "edi@northside.test", "20240101000000Z", "20240201000000Z")
	other := newOpenSSLCA(t, otherDir, "Elsewhere", "")
	other.issue("clinic", "edi@northside.test", "", "")
	config := smimeSite(t, dir, "smime_trust: [ca/root.crt]", "")
	hospital := filepath.Join(dir, "hospital", "cert.pem")
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		ca         *opensslCA
		name, want string
	}{
		{ca, "clinic", "stored as message"},
		{ca, "someone", "quarantined: wrong-signer"},
		{ca, "old", "quarantined: expired-key"},
		{other, "clinic", "quarantined: untrusted"},
	}
	for i, c := range cases {
		mail := c.ca.smimeMail(c.name, "edi@northside.test", hospital, fmt.Sprintf("<t%d@northside.test>", i), msgs[400+i])
		if got := receive(t, config, mail); !strings.HasPrefix(got, c.want) {
			t.Errorf("%s of %s: %q, want %q", c.name, filepath.Base(c.ca.dir), got, c.want)
		}
	}
	// Pinned to another certificate, without smime_trust: the CA's
	// certificate is a stranger's.
	data, _ := os.ReadFile(config)
	os.WriteFile(config, bytes.Replace(data, []byte("smime_trust: [ca/root.crt]"), []byte("smime_cert: other/clinic.crt"), 1), 0o600)
	mail := ca.smimeMail("clinic", "edi@northside.test", hospital, "<t9@northside.test>", msgs[409])
	if got := receive(t, config, mail); !strings.HasPrefix(got, "quarantined: unknown-signer") {
		t.Errorf("without smime_trust: %q, want unknown-signer", got)
	}
}

// TestSMIMERevocation: the partner's CA revokes a certificate. Listed in a
// CRL made by "openssl ca -gencrl" and named in revocation.crl_files, or
// answered by a running "openssl ocsp" responder (revocation.fetch), the
// revoked certificate's mail is quarantined as revoked and the other's is
// taken. With the responder down and fail closed, a cached answer holds
// until its next update, then the mail is quarantined as
// revocation-unknown (at once, for a new receive, which has no cache);
// with fail open, it is taken.
func TestSMIMERevocation(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	os.MkdirAll(caDir, 0o700)
	port := freePort(t)
	_, p, _ := net.SplitHostPort(port)
	ca := newOpenSSLCA(t, caDir, "Northside", "http://127.0.0.1:"+p)
	ca.issue("good", "edi@northside.test", "", "")
	ca.issue("stolen", "edi@northside.test", "", "")
	ca.run("ca", "-config", "ca.cnf", "-revoke", "stolen.crt", "-crl_reason", "keyCompromise")
	ca.run("ca", "-config", "ca.cnf", "-gencrl", "-out", "ca.crl")
	config := smimeSite(t, dir, "smime_trust: [ca/root.crt]", "revocation: {crl_files: [ca/ca.crl]}")
	hospital := filepath.Join(dir, "hospital", "cert.pem")
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	check := func(what, name, want string) {
		t.Helper()
		n++
		mail := ca.smimeMail(name, "edi@northside.test", hospital, fmt.Sprintf("<r%d@northside.test>", n), msgs[420+n])
		if got := receive(t, config, mail); !strings.HasPrefix(got, want) {
			t.Errorf("%s, %s: %q, want %q", what, name, got, want)
		}
	}
	check("CRL file", "good", "stored as message")
	check("CRL file", "stolen", "quarantined: revoked")

	setRevocation := func(r string) {
		data, _ := os.ReadFile(config)
		i := bytes.Index(data, []byte("revocation: "))
		j := i + bytes.IndexByte(data[i:], '\n')
		os.WriteFile(config, append(append(append([]byte{}, data[:i]...), "revocation: "+r...), data[j:]...), 0o600)
	}
	setRevocation("{fetch: true}")
	ocsp := exec.Command(ca.bin, "ocsp", "-index", "index.txt", "-port", p, "-rsigner", "inter.crt", "-rkey", "inter.key",
		"-CA", "inter.crt", "-nmin", "1", "-ignore_err")
	ocsp.Dir = caDir
	var ocspLog bytes.Buffer
	ocsp.Stdout, ocsp.Stderr = &ocspLog, &ocspLog
	if err := ocsp.Start(); err != nil {
		t.Fatal(err)
	}
	stopOCSP := func() {
		if ocsp.Process != nil {
			ocsp.Process.Kill()
			ocsp.Wait()
			ocsp.Process = nil
		}
	}
	defer stopOCSP()
	// Ready when it answers: a connection that closes without a request
	// would leave "openssl ocsp" waiting on it for good.
	deadline := time.Now().Add(10 * time.Second)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := client.Post("http://"+port+"/", "application/ocsp-request", strings.NewReader("x"))
		if err == nil {
			resp.Body.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("openssl ocsp does not listen\n%s", ocspLog.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	check("OCSP", "good", "stored as message")
	check("OCSP", "stolen", "quarantined: revoked")

	// The cache: the gateway's own mail opener, with the same keys, asks
	// the responder once; with it down, the answer (next update in one
	// minute, -nmin 1) holds until it runs out, then the mail is refused.
	cfg, keys, err := gateway.Load(config, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	clock := time.Now()
	opener := &inbound.Opener{Config: cfg, Keys: &keys.Keyring, Now: func() time.Time { return clock }}
	open := func(what string, at time.Duration, want inbound.Reason) {
		t.Helper()
		n++
		clock = time.Now().Add(at)
		_, err := opener.Open(ca.smimeMail("good", "edi@northside.test", hospital, fmt.Sprintf("<r%d@northside.test>", n), msgs[420+n]))
		var q *inbound.QuarantineError
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", what, err)
		case want != "" && (!errors.As(err, &q) || q.Reason != want):
			t.Errorf("%s: %v, want %s", what, err, want)
		}
	}
	open("answered by the responder", 0, "")
	stopOCSP()
	open("responder down, the answer cached", 30*time.Second, "")
	open("responder down, the answer ran out", 2*time.Minute, inbound.ReasonRevocation)

	check("OCSP responder down, fail closed", "good", "quarantined: revocation-unknown")
	setRevocation("{fetch: true, fail: open}")
	check("OCSP responder down, fail open", "good", "stored as message")
}

// gpgHome is a partner's GnuPG home.
type gpgHome struct {
	t         *testing.T
	gpg, home string
}

func newGPGHome(t *testing.T) *gpgHome {
	home, err := os.MkdirTemp("", "gpg") // short: the agent's socket path is limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
		os.RemoveAll(home)
	})
	return &gpgHome{t: t, gpg: requireTool(t, "/usr/bin/gpg"), home: home}
}

func (g *gpgHome) run(args ...string) []byte {
	g.t.Helper()
	base := []string{"--homedir", g.home, "--batch", "--yes", "--no-tty", "--pinentry-mode", "loopback", "--passphrase", "",
		"--trust-model", "always"}
	cmd := exec.Command(g.gpg, append(base, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		g.t.Fatalf("gpg %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.Bytes()
}

// newKey makes a key for uid and returns its fingerprint.
func (g *gpgHome) newKey(uid string) string {
	g.t.Helper()
	g.run("--quick-gen-key", uid, "future-default", "default", "never") // Ed25519 and a Cv25519 encryption subkey
	fpr, primary := "", false
	for _, line := range strings.Split(string(g.run("--with-colons", "--list-keys", uid)), "\n") {
		switch f := strings.Split(line, ":"); {
		case f[0] == "pub":
			primary = true
		case f[0] == "fpr" && primary:
			fpr, primary = f[9], false // the last key listed with this uid: the new one
		}
	}
	return fpr
}

// mail is an HL7 message signed by key signer and encrypted to recipient,
// as PGP/MIME layers, in a mail from the lab.
func (g *gpgHome) mail(dir, signer, recipient, msgID string, hl7msg []byte) []byte {
	g.t.Helper()
	entity, err := security.EncodeEDI(hl7msg, security.EDIOptions{})
	if err != nil {
		g.t.Fatal(err)
	}
	in := filepath.Join(dir, "entity.eml")
	os.WriteFile(in, entity, 0o600)
	sig := g.run("--armor", "--detach-sign", "--digest-algo", "SHA256", "--local-user", signer+"!", "--output", "-", in)
	signed := "Content-Type: multipart/signed; micalg=pgp-sha256; protocol=\"application/pgp-signature\"; boundary=\"S1\"\r\n\r\n" +
		"--S1\r\n" + string(entity) + "\r\n--S1\r\nContent-Type: application/pgp-signature\r\n\r\n" + string(sig) + "\r\n--S1--\r\n"
	os.WriteFile(in, []byte(signed), 0o600)
	enc := g.run("--armor", "--encrypt", "--recipient", recipient, "--output", "-", in)
	return []byte("From: lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: " + msgID + "\r\nSubject: HL7\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=\"E1\"\r\n\r\n" +
		"--E1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--E1\r\nContent-Type: application/octet-stream\r\n\r\n" +
		string(enc) + "\r\n--E1--\r\n")
}

// keyRow is one entry of "hl7mail keys -json".
type keyRow struct {
	Party, Field, Kind, Fingerprint, Status string
	Roles                                   []string
}

// TestGnuPGRollover: a partner signs with its GnuPG key A, then with its
// new key B; with both listed, both are taken. A is removed and SIGHUP
// sent: A's mail is refused. We move to a new key of our own, and mail the
// partner's gpg still encrypts to our old one opens. The partner's gpg
// revokes B (the certificate GnuPG made with the key), listed beside it
// and SIGHUP sent: B's mail is refused as revoked. "hl7mail keys" shows
// each key's state on the way, and the dashboard's key table (headless
// Chromium) at the end.
func TestGnuPGRollover(t *testing.T) {
	dir := t.TempDir()
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp")
	lab := newGPGHome(t)
	a := lab.newKey("Lab <lab@partner.test>")
	b := lab.newKey("Lab 2027 <lab@partner.test>")
	lab.run("--import", filepath.Join(dir, "hospital", "public.asc"))
	os.WriteFile(filepath.Join(dir, "lab-a.asc"), lab.run("--armor", "--export", a), 0o600)
	os.WriteFile(filepath.Join(dir, "lab-b.asc"), lab.run("--armor", "--export", b), 0o600)
	rev, err := os.ReadFile(filepath.Join(lab.home, "openpgp-revocs.d", b+".rev"))
	if err != nil {
		t.Fatal(err)
	}
	in := &instance{t: t, dir: dir, config: filepath.Join(dir, "partners.yaml"), dash: freePort(t),
		listen: map[string]string{"lab": freePort(t)}}
	os.WriteFile(in.config, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: [hospital/private.asc]}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: [lab-a.asc, lab-b.asc], mdn: none}
`, freePort(t), freePort(t), freePort(t), in.dash, in.listen["lab"])), 0o600)
	in.start()
	defer in.stop()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	send := func(what, signer, want string) {
		t.Helper()
		n++
		mail := lab.mail(dir, signer, "edi@hospital.test", fmt.Sprintf("<g%d@partner.test>", n), msgs[440+n])
		if got := receive(t, in.config, mail); !strings.HasPrefix(got, want) {
			t.Errorf("%s: %q, want %q\n%s", what, got, want, in.log)
		}
	}
	reloads := 0
	reload := func(old, new string) {
		t.Helper()
		in.edit(old, new)
		in.reload()
		reloads++
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(in.log.String(), "configuration reloaded") < reloads {
			if time.Now().After(deadline) {
				t.Fatalf("no reload after SIGHUP\n%s", in.log)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	keys := func() map[string]keyRow {
		t.Helper()
		out, code := in.run("keys", "-config", in.config, "-json")
		var rows []keyRow
		// Exit 1 says a party has no key that serves: the lab, at the end.
		if code > 1 || json.Unmarshal([]byte(out[:strings.LastIndexByte(out, ']')+1]), &rows) != nil {
			t.Fatalf("hl7mail keys: exit %d\n%s", code, out)
		}
		m := map[string]keyRow{}
		for _, r := range rows {
			m[r.Fingerprint] = r
		}
		return m
	}
	send("signed with A, both listed", a, "stored as message")
	send("signed with B, both listed", b, "stored as message")
	if k := keys(); k[a].Status != "retiring" || k[b].Status != "active" || strings.Join(k[b].Roles, ",") != "encrypt-to,verify" {
		t.Errorf("keys with A and B listed: A %+v, B %+v", k[a], k[b])
	}

	reload("pgp_key: [lab-a.asc, lab-b.asc]", "pgp_key: [lab-b.asc]")
	send("signed with A, A removed", a, "quarantined: unknown-signer")
	send("signed with B, A removed", b, "stored as message")

	// Our new key, listed after the old one: it signs from now on; the
	// partner has not imported it yet and still encrypts to the old one.
	siteKeys(t, dir, "hospital-new", "edi@hospital.test", "pgp")
	reload("pgp_key: [hospital/private.asc]", "pgp_key: [hospital/private.asc, hospital-new/private.asc]")
	send("encrypted to our old key after the move", b, "stored as message")
	k := keys()
	var roles []string
	for _, r := range k {
		if r.Party == "self" {
			roles = append(roles, r.Field+" "+r.Status+" "+strings.Join(r.Roles, ","))
		}
	}
	if got := strings.Join(roles, "; "); !strings.Contains(got, "self.pgp_key[0] retiring decrypt") ||
		!strings.Contains(got, "self.pgp_key[1] active sign,decrypt") {
		t.Errorf("our keys after the move: %s", got)
	}

	// The partner revokes B with the certificate GnuPG made beside it.
	os.WriteFile(filepath.Join(dir, "lab-b.rev"), rev, 0o600)
	reload("pgp_key: [lab-b.asc]", "pgp_key: [lab-b.asc, lab-b.rev]")
	send("signed with B, B revoked", b, "quarantined: revoked")
	if k := keys(); k[b].Status != "revoked" || len(k[b].Roles) != 0 {
		t.Errorf("B after its revocation: %+v", k[b])
	}

	// The dashboard's key table shows the same, in headless Chromium.
	br := startBrowser(t)
	in.waitReady("")
	br.open("http://" + in.dash + "/")
	br.waitFor("the key table", fmt.Sprintf(`
		const state = (f) => document.querySelector('#keys tbody tr[data-fingerprint="' + f + '"]')?.dataset.state;
		return state(%q) === 'revoked' && document.querySelectorAll('#keys tbody tr[data-state="active"]').length === 1 &&
			document.querySelectorAll('#keys tbody tr[data-state="retiring"]').length === 1;`, b), 10*time.Second)
}
