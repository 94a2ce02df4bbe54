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
}
