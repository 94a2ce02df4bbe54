package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
