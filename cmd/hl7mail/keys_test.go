package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/security"
)

// TestKeysCommand: "hl7mail keys" on a site made by init, with a partner
// whose old key expired beside its current one: a line per key with its
// role and state, JSON with -json, exit 1 once a party has no key left
// that serves.
func TestKeysCommand(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "site")
	hl7mail := func(args ...string) (int, string) {
		var out bytes.Buffer
		code := run(args, &out, &out)
		return code, out.String()
	}
	if code, out := hl7mail("init", "-dir", dir, "-name", "general-hospital", "-email", "edi@hospital.test", "-pgp"); code != 0 {
		t.Fatalf("init = %d\n%s", code, out)
	}
	key := func(name string, created time.Time, life time.Duration) {
		e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test", Now: created, Lifetime: life})
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := security.ArmorPGPPublic(e)
		os.WriteFile(filepath.Join(dir, "keys", name), pub, 0o644)
	}
	key("lab-old.asc", time.Now().Add(-400*24*time.Hour), 30*24*time.Hour)
	key("lab.asc", time.Now().Add(-time.Hour), 0)
	path := filepath.Join(dir, "partners.yaml")
	cfg, _ := os.ReadFile(path)
	cfg = regexp.MustCompile(`(?m)^partners:.*$`).ReplaceAll(cfg, []byte("partners:\n"+
		"  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: pgp, pgp_key: [keys/lab-old.asc, keys/lab.asc]}"))
	os.WriteFile(path, cfg, 0o640)

	code, out := hl7mail("keys", "-config", path)
	if code != 0 {
		t.Fatalf("keys = %d\n%s", code, out)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^self +pgp +[0-9A-F]{16} +\S+ +never +sign,decrypt +active +- +self.pgp_key$`),
		regexp.MustCompile(`(?m)^lab +pgp +[0-9A-F]{16} +\S+ +\S+ +- +expired +- +partners\[0\].pgp_key\[0\]$`),
		regexp.MustCompile(`(?m)^lab +pgp +[0-9A-F]{16} +\S+ +never +encrypt-to,verify +active +- +partners\[0\].pgp_key\[1\]$`),
	} {
		if !want.MatchString(out) {
			t.Errorf("keys lacks a line matching %s:\n%s", want, out)
		}
	}
	if code, out := hl7mail("keys", "-config", path, "-json"); code != 0 || !strings.Contains(out, `"status": "expired"`) {
		t.Errorf("keys -json = %d\n%s", code, out)
	}
	// The current key taken out: the lab has none that serves.
	os.WriteFile(path, bytes.Replace(cfg, []byte("[keys/lab-old.asc, keys/lab.asc]"), []byte("[keys/lab-old.asc]"), 1), 0o640)
	if code, out := hl7mail("keys", "-config", path); code != 1 || !strings.Contains(out, "lab (pgp) has no key that serves now") {
		t.Errorf("keys with only an expired key = %d\n%s", code, out)
	}
}
