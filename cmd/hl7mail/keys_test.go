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

// TestKeygenNotBefore: an S/MIME certificate made to start on a switch
// date, listed after the current one, is "next" until then; a bad date is
// refused.
func TestKeygenNotBefore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "site")
	hl7mail := func(args ...string) (int, string) {
		var out bytes.Buffer
		code := run(args, &out, &out)
		return code, out.String()
	}
	if code, out := hl7mail("init", "-dir", dir, "-name", "general-hospital", "-email", "edi@hospital.test", "-smime"); code != 0 {
		t.Fatalf("init = %d\n%s", code, out)
	}
	day := time.Now().UTC().AddDate(0, 0, 30).Format(time.DateOnly)
	code, out := hl7mail("keygen", "-kind", "smime", "-name", "General Hospital", "-email", "edi@hospital.test",
		"-not-before", day, "-out", filepath.Join(dir, "keys", "next"))
	if code != 0 || !strings.Contains(out, "valid: "+day+" to ") {
		t.Fatalf("keygen -not-before = %d\n%s", code, out)
	}
	if code, _ := hl7mail("keygen", "-kind", "pgp", "-name", "x", "-email", "x@x.test", "-not-before", day, "-out", t.TempDir()); code != 2 {
		t.Errorf("-not-before with pgp = %d, want 2", code)
	}
	path := filepath.Join(dir, "partners.yaml")
	cfg, _ := os.ReadFile(path)
	cfg = bytes.Replace(cfg, []byte("smime_cert: keys/self.crt"), []byte("smime_cert: [keys/self.crt, keys/next/cert.pem]"), 1)
	cfg = bytes.Replace(cfg, []byte("smime_key: keys/self.key"), []byte("smime_key: [keys/self.key, keys/next/key.pem]"), 1)
	os.WriteFile(path, cfg, 0o640)
	code, out = hl7mail("keys", "-config", path)
	if code != 0 || !regexp.MustCompile(`(?m)^self +smime .* sign,decrypt +active .*self.smime_cert\[0\]$`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^self +smime +[0-9A-F]{16} +`+day+` .* decrypt +next .*self.smime_cert\[1\]$`).MatchString(out) {
		t.Errorf("keys = %d\n%s", code, out)
	}
}
