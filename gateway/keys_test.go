package gateway

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"

	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/security"
)

// keyDir writes keys for a PGP and an S/MIME partner and returns a
// configuration file using them.
func keyDir(t *testing.T, partnerCertLifetime time.Duration, pgpEmail string) string {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	self, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@h.test"})
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := security.ArmorPGPPrivate(self, []byte("secret"))
	write("self.asc", priv)
	write("passphrase", []byte("secret\n"))
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: pgpEmail})
	pub, _ := security.ArmorPGPPublic(lab)
	write("lab.asc", pub)
	key, cert, err := security.GenerateCert(security.CertOptions{Name: "H", Email: "edi@h.test", RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ := security.PEMKey(key)
	write("self.key", keyPEM)
	write("self.crt", security.PEMCert(cert))
	_, ccert, err := security.GenerateCert(security.CertOptions{Name: "Clinic", Email: "edi@clinic.test", RSABits: 2048,
		NotBefore: time.Now().Add(-time.Hour), Lifetime: partnerCertLifetime})
	if err != nil {
		t.Fatal(err)
	}
	write("clinic.crt", security.PEMCert(ccert))
	cfg := `self: {name: h, email: edi@h.test, pgp_key: self.asc, smime_cert: self.crt, smime_key: self.key, passphrase_file: passphrase}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@p.test, security: pgp, pgp_key: lab.asc}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: smime, smime_cert: clinic.crt}
`
	write("partners.yaml", []byte(cfg))
	return filepath.Join(dir, "partners.yaml")
}

func load(t *testing.T, path string) (*Keys, error) {
	t.Helper()
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return LoadKeys(cfg, time.Now())
}

func TestLoadKeys(t *testing.T) {
	k, err := load(t, keyDir(t, 365*24*time.Hour, "lab@p.test"))
	if err != nil {
		t.Fatal(err)
	}
	if len(k.PGPSelf) != 1 || k.PGPSelf[0].PrivateKey == nil || k.PGPSelf[0].PrivateKey.Encrypted || len(k.SMIMESelf) != 1 ||
		k.PGPPartners["lab"] == nil || k.SMIMEPartners["clinic"] == nil || len(k.Warnings) != 0 {
		t.Errorf("LoadKeys = %+v", k)
	}
}

func TestLoadKeysProblems(t *testing.T) {
	// The clinic's certificate expires in 10 days: a warning, not a problem.
	k, err := load(t, keyDir(t, 10*24*time.Hour, "lab@p.test"))
	if err != nil || len(k.Warnings) != 1 || !strings.Contains(k.Warnings[0], "partner clinic: partners[1].smime_cert") {
		t.Errorf("soon-expiring certificate: %+v, %v", k, err)
	}
	// A running instance looks again: later the certificate has expired;
	// a year before, nothing is due.
	if w := k.Expiring(time.Now().Add(11 * 24 * time.Hour)); len(w) != 1 || !strings.Contains(w[0], "expired on") {
		t.Errorf("Expiring(in 11 days) = %q", w)
	}
	if w := k.Expiring(time.Now().Add(-365 * 24 * time.Hour)); len(w) != 0 {
		t.Errorf("Expiring(a year ago) = %q", w)
	}
	// Wrong address in the lab's key, the clinic's certificate valid an hour ago
	// for one minute, and no passphrase for our protected key.
	path := keyDir(t, time.Minute, "someone@else.test")
	cfgText, _ := os.ReadFile(path)
	os.WriteFile(path, []byte(strings.Replace(string(cfgText), ", passphrase_file: passphrase", "", 1)), 0o600)
	_, err = load(t, path)
	if err == nil {
		t.Fatal("LoadKeys with bad keys = nil")
	}
	for _, want := range []string{
		":1: self.pgp_key:", "protected and no passphrase",
		":6: partner lab: partners[0].pgp_key: no user ID of the key names lab@p.test",
		":7: partner clinic: partners[1].smime_cert: certificate CN=Clinic expired",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("LoadKeys error lacks %q:\n%v", want, err)
		}
	}
}

// TestKeyRollover: lists of keys load, each key gets its state and role in
// the report, a revocation file revokes the key it names, and expiry is
// reported only for a party's last valid key: at 30 days and again at 7.
func TestKeyRollover(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	day := 24 * time.Hour
	pgp := func(name, email string, created time.Time, life time.Duration, private bool) *openpgp.Entity {
		e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: email, Email: email, Now: created, Lifetime: life})
		if err != nil {
			t.Fatal(err)
		}
		var b []byte
		if private {
			b, _ = security.ArmorPGPPrivate(e, nil)
		} else {
			b, _ = security.ArmorPGPPublic(e)
		}
		write(name, b)
		return e
	}
	pgp("self-old.asc", "edi@h.test", now.Add(-400*day), 0, true)
	pgp("self-new.asc", "edi@h.test", now.Add(-time.Hour), 0, true)
	pgp("self-next.asc", "edi@h.test", now.Add(10*day), 0, true)
	pgp("lab-a.asc", "lab@p.test", now.Add(-300*day), 320*day, false)
	pgp("lab-b.asc", "lab@p.test", now.Add(-time.Hour), 0, false)
	pgp("lab-c.asc", "lab@p.test", now.Add(-800*day), 100*day, false)
	d := pgp("lab-d.asc", "lab@p.test", now.Add(-2*time.Hour), 0, false)
	// Revoked as of now, not of the clock a moment later: a revocation
	// signed after now is not in force at now.
	if err := d.RevokeKey(packet.KeySuperseded, "", &packet.Config{Time: func() time.Time { return now }}); err != nil {
		t.Fatal(err)
	}
	var rev bytes.Buffer
	aw, _ := armor.Encode(&rev, openpgp.PublicKeyType, nil)
	d.Revocations[0].Serialize(aw)
	aw.Close()
	write("lab-d.rev", append([]byte(":"), rev.Bytes()...)) // as GnuPG guards it in openpgp-revocs.d
	key, cert, _ := security.GenerateCert(security.CertOptions{Name: "H", Email: "edi@h.test", RSABits: 2048,
		NotBefore: now.Add(-time.Hour), Lifetime: 20 * day})
	keyPEM, _ := security.PEMKey(key)
	write("self.key", keyPEM)
	write("self.crt", security.PEMCert(cert))
	_, ccert, _ := security.GenerateCert(security.CertOptions{Name: "C", Email: "edi@clinic.test", RSABits: 2048})
	write("clinic.crt", security.PEMCert(ccert))
	write("partners.yaml", []byte(`self: {name: h, email: edi@h.test, pgp_key: [self-old.asc, self-new.asc, self-next.asc], smime_cert: [self.crt], smime_key: [self.key]}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@p.test, security: pgp, pgp_key: [lab-a.asc, lab-b.asc, lab-c.asc, lab-d.asc, lab-d.rev]}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: smime, smime_cert: clinic.crt}
`))
	cfg, k, err := Load(filepath.Join(dir, "partners.yaml"), now)
	if err != nil {
		t.Fatal(err)
	}
	rows := KeyReport(cfg, k, now, true)
	want := map[string]string{ // field → state and roles
		"self.pgp_key[0]":        "retiring decrypt",
		"self.pgp_key[1]":        "active sign,decrypt",
		"self.pgp_key[2]":        "next decrypt",
		"self.smime_cert":        "active sign,decrypt",
		"partners[0].pgp_key[0]": "retiring encrypt-to,verify",
		"partners[0].pgp_key[1]": "active encrypt-to,verify",
		"partners[0].pgp_key[2]": "expired ",
		"partners[0].pgp_key[3]": "revoked ",
		"partners[1].smime_cert": "active encrypt-to,verify",
	}
	for _, r := range rows {
		got := r.Status + " " + strings.Join(r.Roles, ",")
		if w, ok := want[r.Field]; !ok || w != got {
			t.Errorf("%s (%s): %q, want %q", r.Field, r.Party, got, w)
		}
		delete(want, r.Field)
	}
	for f := range want {
		t.Errorf("%s: no row", f)
	}
	// Mail to the lab goes to A and B, not to C (expired) or D (revoked).
	if to := security.PGPEncryptTo(k.PGPPartners["lab"], now); len(to) != 2 {
		t.Errorf("encrypted to %d keys, want 2", len(to))
	}
	// The lab's A expires in 20 days, but B replaces it: no warning. Our
	// certificate has nothing beside it: warned at 30 days, again at 7.
	w30, w7 := k.Expiring(now), k.Expiring(now.Add(15*day))
	if len(w30) != 1 || !strings.Contains(w30[0], "self.smime_cert") || !strings.Contains(w30[0], "within 30 days") {
		t.Errorf("Expiring(now) = %q", w30)
	}
	if len(w7) != 1 || !strings.Contains(w7[0], "within 7 days") {
		t.Errorf("Expiring(in 15 days) = %q", w7)
	}
}

// TestRevocationWarnings: with revocation configured and failing closed, a
// pinned partner certificate from a CA no CRL file is of, and that names
// nothing to fetch, is warned of; one whose CA's CRL is there is not.
func TestRevocationWarnings(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ca := func(name string) (*x509.Certificate, crypto.Signer) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true,
			BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(400 * 24 * time.Hour)}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
		c, _ := x509.ParseCertificate(der)
		return c, key
	}
	leaf := func(file, email string, caCert *x509.Certificate, caKey crypto.Signer) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: email},
			EmailAddresses: []string{email}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(365 * 24 * time.Hour)}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
		c, _ := x509.ParseCertificate(der)
		write(file, append(security.PEMCert(c), security.PEMCert(caCert)...)) // the chain, leaf first
	}
	aCert, aKey := ca("A CA")
	bCert, bKey := ca("B CA")
	leaf("a.crt", "a@a.test", aCert, aKey)
	leaf("b.crt", "b@b.test", bCert, bKey)
	crl, _ := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1),
		ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(time.Hour)}, aCert, aKey)
	write("a.crl", crl)
	key, cert, _ := security.GenerateCert(security.CertOptions{Name: "H", Email: "edi@h.test", RSABits: 2048})
	keyPEM, _ := security.PEMKey(key)
	write("self.key", keyPEM)
	write("self.crt", security.PEMCert(cert))
	write("partners.yaml", []byte(`self: {name: h, email: edi@h.test, smime_cert: self.crt, smime_key: self.key}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
revocation: {crl_files: [a.crl]}
partners:
  - {name: a, listen: 127.0.0.1:9012, email: a@a.test, security: smime, smime_cert: a.crt}
  - {name: b, listen: 127.0.0.1:9013, email: b@b.test, security: smime, smime_cert: b.crt}
`))
	_, k, err := Load(filepath.Join(dir, "partners.yaml"), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(k.Warnings) != 1 || !strings.Contains(k.Warnings[0], "partner b: partners[1].smime_cert: nothing can tell") {
		t.Errorf("warnings %q, want one for partner b", k.Warnings)
	}
	// The answer itself: a's certificate is not revoked, b's cannot be told.
	if err := k.Suite(security.SuiteSMIME, "a", "").Usable(time.Now()); err != nil {
		t.Errorf("partner a: %v", err)
	}
	if err := k.Suite(security.SuiteSMIME, "b", "").Usable(time.Now()); err == nil || !strings.Contains(err.Error(), "revocation status unknown") {
		t.Errorf("partner b: %v, want its mail held: revocation unknown", err)
	}
}
