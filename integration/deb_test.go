package integration

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDebianPackage builds the package with "make deb" and installs it
// with dpkg as an operator would: the binary, both systemd units (which
// systemd-analyze accepts), the configuration as a conffile only root
// writes and hl7mail reads, the user hl7mail and its private store folder.
// "hl7mail init" replaces the packaged example, and check passes on what
// it wrote, also as the service's user. Removing keeps the store and the
// configuration; purging removes the configuration and keeps the keys, the
// store and the user, unless HL7MAIL_PURGE_DATA=yes asks for them too.
func TestDebianPackage(t *testing.T) {
	if os.Getuid() != 0 {
		unavailable(t, "root, to install a package with dpkg")
	}
	for _, tool := range []string{"dpkg", "systemd-analyze", "getent"} {
		if _, err := exec.LookPath(tool); err != nil {
			unavailable(t, tool)
		}
	}
	run := func(env []string, name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	if exec.Command("dpkg-query", "-W", "hl7mail").Run() == nil {
		t.Fatal("a package hl7mail is installed on this machine already; this test installs and purges its own")
	}
	purgeAll := func() { // whatever state the test stopped in
		cmd := exec.Command("dpkg", "--purge", "hl7mail")
		cmd.Env = append(os.Environ(), "HL7MAIL_PURGE_DATA=yes")
		cmd.Run()
		exec.Command("userdel", "hl7mail").Run()
		exec.Command("groupdel", "hl7mail").Run()
		os.RemoveAll("/var/lib/hl7mail")
		os.RemoveAll("/etc/hl7mail")
	}
	t.Cleanup(purgeAll)

	build := exec.Command("make", "deb")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob("../dist/hl7mail_*_amd64.deb")
	if len(debs) != 1 {
		t.Fatalf("make deb made %v, want one dist/hl7mail_<version>_amd64.deb", debs)
	}
	version := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(debs[0]), "hl7mail_"), "_amd64.deb")
	run(nil, "dpkg", "-i", debs[0])
	if out := run(nil, "/usr/bin/hl7mail", "version"); !strings.HasPrefix(out, "hl7mail "+version+" ") {
		t.Errorf("hl7mail version = %q, want the package's %s", out, version)
	}
	if out := run(nil, "dpkg-query", "-W", "-f=${Conffiles}", "hl7mail"); !strings.Contains(out, "/etc/hl7mail/partners.yaml") {
		t.Errorf("conffiles: %q", out)
	}
	uid := strings.Split(strings.TrimSpace(run(nil, "getent", "passwd", "hl7mail")), ":")
	if len(uid) < 7 || uid[5] != "/var/lib/hl7mail" || uid[6] != "/usr/sbin/nologin" {
		t.Errorf("user hl7mail: %v", uid)
	}
	for path, want := range map[string]string{
		"/var/lib/hl7mail":                    "700 hl7mail:hl7mail",
		"/etc/hl7mail":                        "750 root:hl7mail",
		"/etc/hl7mail/partners.yaml":          "640 root:hl7mail",
		"/usr/bin/hl7mail":                    "755 root:root",
		"/lib/systemd/system/hl7mail.service": "644 root:root",
	} {
		if got := strings.TrimSpace(run(nil, "stat", "-c", "%a %U:%G", path)); got != want {
			t.Errorf("%s: %s, want %s", path, got, want)
		}
	}
	// The packaged partners.yaml keeps its store where the unit may write.
	if data, err := os.ReadFile("/etc/hl7mail/partners.yaml"); err != nil || !strings.Contains(string(data), "\nstore: /var/lib/hl7mail\n") {
		t.Errorf("/etc/hl7mail/partners.yaml: store is not /var/lib/hl7mail (%v)", err)
	}
	// init replaces the example the package installed, and check passes
	// on what it wrote; the service's user gets the keys.
	if out := run(nil, "/usr/bin/hl7mail", "init", "-dir", "/etc/hl7mail", "-name", "general-hospital",
		"-email", "edi@hospital.test"); !strings.Contains(out, "fingerprint: ") {
		t.Errorf("init printed no fingerprint:\n%s", out)
	}
	if out := run(nil, "/usr/bin/hl7mail", "check", "-offline", "-config", "/etc/hl7mail/partners.yaml"); !strings.Contains(out, "OK, 0 partners") {
		t.Errorf("check on what init wrote:\n%s", out)
	}
	for path, want := range map[string]string{
		"/etc/hl7mail/partners.yaml": "640 root:hl7mail",
		"/etc/hl7mail/keys":          "700 hl7mail:hl7mail",
		"/etc/hl7mail/keys/self.asc": "600 hl7mail:hl7mail",
	} {
		if got := strings.TrimSpace(run(nil, "stat", "-c", "%a %U:%G", path)); got != want {
			t.Errorf("after init, %s: %s, want %s", path, got, want)
		}
	}
	// The service's user reads its configuration and keys as serve does.
	if out, err := exec.Command("setpriv", "--reuid=hl7mail", "--regid=hl7mail", "--init-groups", "/usr/bin/hl7mail",
		"check", "-offline", "-config", "/etc/hl7mail/partners.yaml").CombinedOutput(); err != nil {
		t.Errorf("check as the user hl7mail: %v\n%s", err, out)
	}
	for _, unit := range []string{"/lib/systemd/system/hl7mail.service", "hl7mail@north.service"} {
		out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
		if err != nil || strings.Contains(string(out), "hl7mail") {
			t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
		}
	}

	// Removed: the binary goes; the configuration, the store and the user stay.
	os.WriteFile("/var/lib/hl7mail/evidence", []byte("journals"), 0o600)
	run(nil, "dpkg", "-r", "hl7mail")
	for path, kept := range map[string]bool{"/usr/bin/hl7mail": false, "/lib/systemd/system/hl7mail.service": false,
		"/etc/hl7mail/partners.yaml": true, "/var/lib/hl7mail/evidence": true} {
		if _, err := os.Stat(path); (err == nil) != kept {
			t.Errorf("after dpkg -r, %s present: %v, want %v", path, err == nil, kept)
		}
	}
	// Purged: the configuration goes; the keys, the store and the user
	// stay, as evidence (our key reads the journals), until asked for.
	run(nil, "dpkg", "--purge", "hl7mail")
	if _, err := os.Stat("/etc/hl7mail/partners.yaml"); err == nil {
		t.Error("/etc/hl7mail/partners.yaml is left after dpkg --purge")
	}
	if _, err := os.Stat("/etc/hl7mail/keys/self.asc"); err != nil {
		t.Errorf("our key is gone after a plain purge: %v", err)
	}
	if _, err := os.Stat("/var/lib/hl7mail/evidence"); err != nil {
		t.Errorf("the store is gone after a plain purge: %v", err)
	}
	if exec.Command("getent", "passwd", "hl7mail").Run() != nil {
		t.Error("the user hl7mail is gone after a plain purge, while its store is kept")
	}
	// Installed again and purged with the data: nothing is left.
	run(nil, "dpkg", "-i", debs[0])
	run([]string{"HL7MAIL_PURGE_DATA=yes"}, "dpkg", "--purge", "hl7mail")
	for _, path := range []string{"/etc/hl7mail", "/var/lib/hl7mail", "/usr/bin/hl7mail", "/lib/systemd/system/hl7mail@.service"} {
		if _, err := os.Stat(path); err == nil {
			t.Errorf("%s is left after a purge with HL7MAIL_PURGE_DATA=yes", path)
		}
	}
	if exec.Command("getent", "passwd", "hl7mail").Run() == nil || exec.Command("getent", "group", "hl7mail").Run() == nil {
		t.Error("the user or group hl7mail is left after a purge with HL7MAIL_PURGE_DATA=yes")
	}
}
