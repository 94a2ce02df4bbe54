package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
)

// gpgExpiredKeys makes, with GnuPG and a faked clock a month back, a key
// for late@partner.test that expired after a day, and one for
// sub@partner.test whose own key never expires but whose encryption subkey
// did; it writes their armored public keys to dir/late.asc and dir/sub.asc.
func gpgExpiredKeys(t *testing.T, gpg, dir string) {
	t.Helper()
	home, err := os.MkdirTemp("", "gpg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
		os.RemoveAll(home)
	})
	month := time.Now().AddDate(0, -1, 0).UTC().Format("20060102T150405")
	twoMonths := time.Now().AddDate(0, -2, 0).UTC().Format("20060102T150405")
	run := func(args ...string) string {
		t.Helper()
		base := []string{"--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", ""}
		out, err := exec.Command(gpg, append(base, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("gpg %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	run("--faked-system-time", month, "--quick-gen-key", "Late Lab <late@partner.test>", "ed25519", "default", "1d")
	run("--faked-system-time", twoMonths, "--quick-gen-key", "Sub Lab <sub@partner.test>", "ed25519", "sign", "never")
	fpr := ""
	for _, line := range strings.Split(run("--with-colons", "--list-keys", "sub@partner.test"), "\n") {
		if f := strings.Split(line, ":"); f[0] == "fpr" && fpr == "" {
			fpr = f[9]
		}
	}
	run("--faked-system-time", month, "--quick-add-key", fpr, "cv25519", "encr", "1d")
	for _, who := range []string{"late", "sub"} {
		run("--armor", "--output", filepath.Join(dir, who+".asc"), "--export", who+"@partner.test")
	}
}

// TestExpiredPartnerKeys: a configuration whose second partner's key
// expired, and whose third partner's encryption subkey expired (both made
// by GnuPG): "hl7mail serve" starts, the first partner's mail flows, the
// others' messages get CA and wait with one alert each. Their new keys are
// put in place and SIGHUP sent: they are mailed, in order, and the alerts
// clear.
func TestExpiredPartnerKeys(t *testing.T) {
	gpg := requireTool(t, "/usr/bin/gpg")
	smtpSrv, smtpAddr := startSMTP(t)
	dir := t.TempDir()
	for _, s := range [][2]string{{"hospital", "edi@hospital.test"}, {"lab", "lab@partner.test"}} {
		siteKeys(t, dir, s[0], s[1], "pgp")
	}
	gpgExpiredKeys(t, gpg, dir)
	in := &instance{t: t, dir: dir, config: filepath.Join(dir, "partners.yaml"), dash: freePort(t),
		listen: map[string]string{"lab": freePort(t), "late": freePort(t), "sub": freePort(t)}}
	os.WriteFile(in.config, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: hospital/private.asc}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none, retry: 200ms}
imap: {addr: %s, tls: none}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: lab/public.asc, mdn: none}
  - {name: late, listen: %s, email: late@partner.test, security: pgp, pgp_key: late.asc, mdn: none}
  - {name: sub, listen: %s, email: sub@partner.test, security: pgp, pgp_key: sub.asc, mdn: none}
`, freePort(t), smtpAddr, freePort(t), in.dash, in.listen["lab"], in.listen["late"], in.listen["sub"])), 0o600)
	if out, code := in.run("check", "-offline", "-config", in.config); code != 1 ||
		!strings.Contains(out, "partner late") || !strings.Contains(out, "partner sub") || !strings.Contains(out, "subkey expired") {
		t.Errorf("check: exit %d, want 1 naming both partners' keys:\n%s", code, out)
	}
	in.start()
	defer in.stop()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{}
	for i, p := range []string{"lab", "late", "sub"} {
		for _, m := range msgs[200+3*i : 203+3*i] {
			if code := sendOne(t, in.listen[p], m); code != hl7.CommitAccept {
				t.Fatalf("%s's surrogate answered %s", p, code)
			}
			h, _ := hl7.ParseHeader(m)
			want[p+"@partner.test"] = append(want[p+"@partner.test"], h.ControlID)
		}
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s\n%s", what, in.log)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	held := func() map[string]string {
		out := map[string]string{}
		for _, a := range in.alerts(false) {
			if a.Kind == "partner-held" {
				out[a.Partner] = a.Text
			}
		}
		return out
	}
	wait("the lab's three mails and a held alert for each of the others", func() bool {
		return smtpSrv.Count() == 3 && len(held()) == 2
	})
	time.Sleep(time.Second) // more attempts: still one alert each, nothing sent, nothing failed
	h := held()
	if smtpSrv.Count() != 3 || !strings.Contains(h["late"], "key expired on") || !strings.Contains(h["sub"], "encryption subkey expired on") {
		t.Errorf("%d mails; held alerts %q", smtpSrv.Count(), h)
	}
	n := 0
	for _, a := range in.alerts(false) {
		if a.Kind == "partner-held" {
			n++
		}
	}
	if n != 2 {
		t.Errorf("%d held alerts open, want 2", n)
	}
	for _, m := range in.messages() {
		if m.State == "failed" {
			t.Errorf("message %s failed", m.ControlID)
		}
	}
	// The partners' renewed keys; SIGHUP.
	for _, p := range []string{"late", "sub"} {
		siteKeys(t, dir, p, p+"@partner.test", "pgp")
		os.Rename(filepath.Join(dir, p, "public.asc"), filepath.Join(dir, p+".asc"))
	}
	in.reload()
	wait("all nine mails", func() bool { return smtpSrv.Count() == 9 })
	got := map[string][]string{}
	for _, m := range smtpSrv.Mails() {
		got[m.To[0]] = append(got[m.To[0]], subjectControlID(string(m.Data)))
	}
	for addr, ids := range want {
		if strings.Join(got[addr], " ") != strings.Join(ids, " ") {
			t.Errorf("mails to %s: %v, want in order %v", addr, got[addr], ids)
		}
	}
	wait("the held alerts cleared", func() bool { return len(held()) == 0 })
}
