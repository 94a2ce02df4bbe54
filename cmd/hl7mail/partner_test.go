package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hl7mail/hl7mail/security"
)

// TestPartnerCommands, with no instance running: add copies the partner's
// key beside the configuration and appends the partner, keeping the file's
// comments; list shows it; an add that would not pass the check (a port
// taken) changes nothing and leaves no key behind; remove gives the file
// back as it was.
func TestPartnerCommands(t *testing.T) {
	dir := t.TempDir()
	self, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	priv, _ := security.ArmorPGPPrivate(self, nil)
	os.WriteFile(filepath.Join(dir, "self.asc"), priv, 0o600)
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "L", Email: "lab@partner.test"})
	pub, _ := security.ArmorPGPPublic(lab)
	labKey := filepath.Join(t.TempDir(), "from-the-lab.asc")
	os.WriteFile(labKey, pub, 0o644)
	path := filepath.Join(dir, "partners.yaml")
	original := `# Our site.
self: {name: h, email: edi@hospital.test, pgp_key: self.asc}   # who we are
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}

# Partners come here.
partners:
  - name: clinic                    # the first
    listen: 127.0.0.1:9011
    email: edi@clinic.test
    security: none
    allow_unencrypted: true
`
	os.WriteFile(path, []byte(original), 0o640)
	hl7mail := func(args ...string) (int, string) {
		var out bytes.Buffer
		code := run(args, &out, &out)
		return code, out.String()
	}
	code, out := hl7mail("partner", "add", "-config", path, "-name", "tucker-lab", "-email", "lab@partner.test",
		"-listen", "127.0.0.1:9012", "-key", labKey)
	if code != 0 || !strings.Contains(out, "partner tucker-lab added") || !strings.Contains(out, "not running") {
		t.Fatalf("partner add = %d\n%s", code, out)
	}
	data, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(data), original) || !strings.Contains(string(data), "    pgp_key: keys/tucker-lab.asc\n") {
		t.Errorf("partners.yaml after add:\n%s", data)
	}
	if copied, err := os.ReadFile(filepath.Join(dir, "keys", "tucker-lab.asc")); err != nil || !bytes.Equal(copied, pub) {
		t.Errorf("the partner's key was not copied beside the configuration: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("partners.yaml mode %v after the edit, want 0640 as before", fi.Mode().Perm())
	}
	if code, out := hl7mail("partner", "list", "-config", path); code != 0 || !strings.Contains(out, "tucker-lab") ||
		!strings.Contains(out, "127.0.0.1:9012") || !strings.Contains(out, "clinic") {
		t.Errorf("partner list = %d\n%s", code, out)
	}
	before, _ := os.ReadFile(path)
	code, out = hl7mail("partner", "add", "-config", path, "-name", "north", "-email", "edi@north.test",
		"-listen", "127.0.0.1:9012", "-key", labKey)
	if code != 1 || !strings.Contains(out, "port 9012 is already used") || !strings.Contains(out, "is unchanged") {
		t.Errorf("partner add on a taken port = %d\n%s", code, out)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, before) {
		t.Error("a refused add changed partners.yaml")
	}
	if _, err := os.Stat(filepath.Join(dir, "keys", "north.asc")); err == nil {
		t.Error("a refused add left its key behind")
	}
	if code, out := hl7mail("partner", "add", "-config", path, "-name", "clinic", "-email", "x@clinic.test",
		"-listen", "127.0.0.1:9013", "-security", "none", "-allow-unencrypted"); code != 1 || !strings.Contains(out, "configured already") {
		t.Errorf("adding a partner twice = %d\n%s", code, out)
	}
	if code, out := hl7mail("partner", "remove", "-config", path, "-name", "tucker-lab"); code != 0 {
		t.Fatalf("partner remove = %d\n%s", code, out)
	}
	if data, _ := os.ReadFile(path); string(data) != original {
		t.Errorf("after add and remove:\n%s", data)
	}
}
