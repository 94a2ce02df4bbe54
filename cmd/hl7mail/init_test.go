package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/hl7mail/hl7mail/security"
)

// TestInit: init writes a site's keys (0600) and a partners.yaml that
// check passes with no partners yet; it refuses to overwrite that file
// once it exists (it is not the packaged example), and with -force it
// writes it again and keeps the keys; partner add then adds the first
// partner to what init wrote.
func TestInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "site")
	hl7mail := func(args ...string) (int, string) {
		var out bytes.Buffer
		code := run(args, &out, &out)
		return code, out.String()
	}
	code, out := hl7mail("init", "-dir", dir, "-name", "general-hospital", "-email", "edi@hospital.test", "-pgp", "-smime")
	if code != 0 {
		t.Fatalf("init = %d\n%s", code, out)
	}
	fps := regexp.MustCompile(`fingerprint: ([0-9A-F]{40})\n(?s:.*)fingerprint: (SHA-256 [0-9A-F]{64})`).FindStringSubmatch(out)
	if fps == nil {
		t.Fatalf("init printed no fingerprints:\n%s", out)
	}
	for f, mode := range map[string]os.FileMode{"keys/self.asc": 0o600, "keys/self.key": 0o600, "keys/self.pub.asc": 0o644,
		"keys/self.crt": 0o644, "partners.yaml": 0o640} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: %v, want mode %o", f, err, mode)
		}
	}
	path := filepath.Join(dir, "partners.yaml")
	if code, out := hl7mail("check", "-offline", "-config", path); code != 0 || !strings.Contains(out, "OK, 0 partners") {
		t.Fatalf("check on what init wrote = %d\n%s", code, out)
	}
	written, _ := os.ReadFile(path)
	os.WriteFile(path, append(written, "# an operator's note\n"...), 0o640)
	if code, out := hl7mail("init", "-dir", dir, "-name", "other", "-email", "edi@hospital.test"); code != 1 || !strings.Contains(out, "-force overwrites it") {
		t.Errorf("init over an edited partners.yaml = %d\n%s", code, out)
	}
	if now, _ := os.ReadFile(path); !strings.HasSuffix(string(now), "# an operator's note\n") {
		t.Error("init changed an edited partners.yaml")
	}
	code, out = hl7mail("init", "-dir", dir, "-name", "general-hospital", "-email", "edi@hospital.test", "-pgp", "-smime", "-force")
	if code != 0 || !strings.Contains(out, fps[1]+" (the key made before, kept)") || !strings.Contains(out, fps[2]+" (the key made before, kept)") {
		t.Errorf("init -force = %d, the keys not kept:\n%s", code, out)
	}
	// Our own public key is no key for the lab: refused, as check would.
	if code, out := hl7mail("partner", "add", "-config", path, "-name", "lab", "-email", "lab@partner.test",
		"-listen", "127.0.0.1:9012", "-key", filepath.Join(dir, "keys", "self.pub.asc")); code != 1 ||
		!strings.Contains(out, "no user ID of the key names lab@partner.test") {
		t.Errorf("partner add with another's key = %d\n%s", code, out)
	}
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "L", Email: "lab@partner.test"})
	pub, _ := security.ArmorPGPPublic(lab)
	labKey := filepath.Join(t.TempDir(), "lab.asc")
	os.WriteFile(labKey, pub, 0o644)
	if code, out := hl7mail("partner", "add", "-config", path, "-name", "lab", "-email", "lab@partner.test",
		"-listen", "127.0.0.1:9012", "-key", labKey); code != 0 {
		t.Errorf("partner add to what init wrote = %d\n%s", code, out)
	}
	if code, out := hl7mail("check", "-offline", "-config", path); code != 0 || !strings.Contains(out, "OK, 1 partner") {
		t.Errorf("check after partner add = %d\n%s", code, out)
	}
}
