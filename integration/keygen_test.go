package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestKeygenCommand runs "hl7mail keygen" for both kinds: the private files
// are 0600, GnuPG imports the public key, OpenSSL accepts the certificate
// for S/MIME, and an existing key is never overwritten.
func TestKeygenCommand(t *testing.T) {
	gpg := requireTool(t, "/usr/bin/gpg")
	openssl := requireTool(t, "/usr/bin/openssl")
	dir := t.TempDir()
	for _, kind := range []string{"pgp", "smime"} {
		out, err := exec.Command(binary, "keygen", "-kind", kind, "-name", "General Hospital",
			"-email", "edi@hospital.test", "-out", filepath.Join(dir, kind)).CombinedOutput()
		if err != nil {
			t.Fatalf("keygen -kind %s: %v\n%s", kind, err, out)
		}
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{{"pgp/private.asc", 0o600}, {"pgp/public.asc", 0o644}, {"smime/key.pem", 0o600}, {"smime/cert.pem", 0o644}} {
		st, err := os.Stat(filepath.Join(dir, f.path))
		if err != nil || st.Mode().Perm() != f.mode {
			t.Errorf("%s: %v, mode %v; want %v", f.path, err, st.Mode().Perm(), f.mode)
		}
	}
	home, _ := os.MkdirTemp("", "gpg")
	defer os.RemoveAll(home)
	out, err := exec.Command(gpg, "--homedir", home, "--batch", "--status-fd", "1", "--import", filepath.Join(dir, "pgp/public.asc")).Output()
	if err != nil || !strings.Contains(string(out), "IMPORT_OK") {
		t.Errorf("gpg --import public.asc: %v\n%s", err, out)
	}
	exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
	out, err = exec.Command(openssl, "x509", "-in", filepath.Join(dir, "smime/cert.pem"), "-noout", "-purpose", "-ext", "subjectAltName").Output()
	if err != nil || !strings.Contains(string(out), "S/MIME signing : Yes") || !strings.Contains(string(out), "email:edi@hospital.test") {
		t.Errorf("openssl x509 -purpose: %v\n%s", err, out)
	}
	out, err = exec.Command(binary, "keygen", "-kind", "pgp", "-name", "x", "-email", "x@y.test", "-out", filepath.Join(dir, "pgp")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "file exists") {
		t.Errorf("keygen over an existing key: %v\n%s", err, out)
	}

	// A configuration using the new keys, with partners' keys made the
	// same way, passes hl7mail check.
	for _, p := range []struct{ kind, email, out string }{
		{"pgp", "lab@partner.test", "lab"}, {"smime", "edi@clinic.test", "clinic"}} {
		if out, err := exec.Command(binary, "keygen", "-kind", p.kind, "-name", p.out, "-email", p.email,
			"-out", filepath.Join(dir, p.out)).CombinedOutput(); err != nil {
			t.Fatalf("keygen %s: %v\n%s", p.out, err, out)
		}
	}
	cfg := filepath.Join(dir, "partners.yaml")
	os.WriteFile(cfg, []byte(`self: {name: h, email: edi@hospital.test, pgp_key: pgp/private.asc, smime_cert: smime/cert.pem, smime_key: smime/key.pem}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: pgp, pgp_key: lab/public.asc}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: smime, smime_cert: clinic/cert.pem}
`), 0o600)
	out, err = exec.Command(binary, "check", "-config", cfg).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "OK, 2 partners") {
		t.Errorf("hl7mail check with generated keys: %v\n%s", err, out)
	}
	// Handing our own public key in place of the lab's is caught.
	os.WriteFile(cfg, []byte(strings.Replace(mustRead(t, cfg), "pgp_key: lab/public.asc", "pgp_key: pgp/public.asc", 1)), 0o600)
	out, err = exec.Command(binary, "check", "-config", cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), ":6: partner lab: partners[0].pgp_key: no user ID of the key names lab@partner.test") {
		t.Errorf("hl7mail check with the wrong partner key: %v\n%s", err, out)
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
