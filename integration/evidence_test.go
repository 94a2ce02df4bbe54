package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
)

// TestEvidence: an order from the hospital to the lab (PGP) and one to the
// clinic (S/MIME), each answered. Then "hl7mail evidence" on both sides
// re-verifies the chain from the journals and exits 0, and the files it
// exports verify with gpg --verify and openssl cms -verify. After one byte
// of the hospital's incoming journal is altered, it exits non-zero and
// names the receipt as the broken link.
func TestEvidence(t *testing.T) {
	gpg := requireTool(t, "/usr/bin/gpg")
	openssl := requireTool(t, "/usr/bin/openssl")
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test", "edi@clinic.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	dir := t.TempDir()
	type site struct {
		name, email string
		router      *embedded.Router
		in          *instance
	}
	hospital := &site{name: "hospital", email: "edi@hospital.test"}
	lab := &site{name: "lab", email: "lab@partner.test"}
	clinic := &site{name: "clinic", email: "edi@clinic.test"}
	for _, s := range []*site{hospital, lab, clinic} {
		siteKeys(t, dir, s.name, s.email, "pgp", "smime")
		if s.router, err = embedded.StartRouter("127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		defer s.router.Close()
	}
	toLab, toClinic := freePort(t), freePort(t)
	write := func(s *site, partners string, listen map[string]string) {
		p := filepath.Join(dir, s.name, "partners.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc, smime_cert: cert.pem, smime_key: key.pem}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: %s, tls: none}
imap: {addr: %s, tls: none, username: %s, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
%s`, s.name, s.email, s.router.Addr, w.SMTPAddr, w.IMAPAddr, s.email, freePort(t), partners)), 0o600)
		s.in = &instance{t: t, dir: filepath.Join(dir, s.name), config: p, listen: listen}
	}
	write(hospital, fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}\n"+
			"  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: ../clinic/cert.pem}\n",
		toLab, toClinic), map[string]string{"lab": toLab, "clinic": toClinic})
	write(lab, fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n",
		freePort(t)), map[string]string{})
	write(clinic, fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: smime, smime_cert: ../hospital/cert.pem}\n",
		freePort(t)), map[string]string{})
	for _, s := range []*site{hospital, lab, clinic} {
		s.in.start()
		defer s.in.stop()
	}
	// The order of the draft's §5 example, to each partner.
	for partner, id := range map[string]string{"lab": "ORM-LAB-1", "clinic": "ORM-CLIN-1"} {
		orm := "MSH|^~\\&|OE|DR.SCHADOW|LAB|TUCKER-GENERAL|19971226175948||ORM^O01|" + id + "|P|2.3|||AL\r" +
			"PID|||08157411||Doe^John\rORC|NW|12345\rOBR|1|12345||CBC^COMPLETE BLOOD COUNT\r"
		if code := sendOne(t, hospital.in.listen[partner], []byte(orm)); code != hl7.CommitAccept {
			t.Fatalf("surrogate answered %s", code)
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, _ := exec.Command(binary, "messages", "-config", hospital.in.config, "-json", "-state", "acknowledged").Output()
		var list []storedMessage
		json.Unmarshal(out, &list)
		if len(list) == 2 && len(hospital.router.Messages()) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %d acknowledged, %d responses at the hospital's router\n%s", len(list), len(hospital.router.Messages()), hospital.in.log)
		}
		time.Sleep(100 * time.Millisecond)
	}

	evidence := func(s *site, id, out string) (string, int) {
		t.Helper()
		args := []string{"evidence", "-config", s.in.config}
		if out != "" {
			args = append(args, "-out", out)
		}
		return s.in.run(append(args, id)...)
	}
	home, _ := os.MkdirTemp("", "gpg")
	defer os.RemoveAll(home)
	defer exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
	gpgVerify := func(d, prefix string) {
		t.Helper()
		for _, key := range []string{"our-key.asc", "partner-key.asc"} {
			if out, err := exec.Command(gpg, "--homedir", home, "--batch", "--import", filepath.Join(d, key)).CombinedOutput(); err != nil {
				t.Fatalf("gpg --import %s: %v\n%s", key, err, out)
			}
		}
		out, err := exec.Command(gpg, "--homedir", home, "--batch", "--verify", filepath.Join(d, prefix+"-signature.asc"),
			filepath.Join(d, prefix+"-content.mime")).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Good signature") {
			t.Errorf("gpg --verify %s: %v\n%s", prefix, err, out)
		}
	}
	opensslVerify := func(d, prefix, cert string) {
		t.Helper()
		out, err := exec.Command(openssl, "cms", "-verify", "-in", filepath.Join(d, prefix+"-signed.eml"), "-CAfile",
			filepath.Join(d, cert), "-purpose", "any", "-out", os.DevNull).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Verification successful") {
			t.Errorf("openssl cms -verify %s: %v\n%s", prefix, err, out)
		}
	}

	// The hospital's side: sent, receipt, commitment, for each partner.
	d := filepath.Join(dir, "evidence-lab")
	out, code := evidence(hospital, "ORM-LAB-1", d)
	if code != 0 || !strings.Contains(out, "The chain holds.") || !strings.Contains(out, "MSA-1 AA for ORM-LAB-1") ||
		!strings.Contains(out, "Received-Content-MIC") {
		t.Fatalf("evidence ORM-LAB-1 at the hospital: %d\n%s", code, out)
	}
	t.Logf("hospital, lab order:\n%s", out)
	gpgVerify(d, "1-sent")
	gpgVerify(d, "2-receipt")
	if report, err := os.ReadFile(filepath.Join(d, "report.txt")); err != nil || !bytes.Contains(report, []byte("gpg --verify")) {
		t.Errorf("report.txt: %v\n%s", err, report)
	}
	d = filepath.Join(dir, "evidence-clinic")
	if out, code := evidence(hospital, "ORM-CLIN-1", d); code != 0 || !strings.Contains(out, "The chain holds.") {
		t.Fatalf("evidence ORM-CLIN-1 at the hospital: %d\n%s", code, out)
	}
	opensslVerify(d, "1-sent", "our-cert.pem")
	opensslVerify(d, "2-receipt", "partner-cert.pem")

	// The partners' side: received, receipt sent, commitment sent.
	d = filepath.Join(dir, "evidence-at-lab")
	if out, code := evidence(lab, "ORM-LAB-1", d); code != 0 || !strings.Contains(out, "received: verified") ||
		!strings.Contains(out, "receipt sent: verified") || !strings.Contains(out, "commitment sent: verified") {
		t.Fatalf("evidence ORM-LAB-1 at the lab: %d\n%s", code, out)
	}
	gpgVerify(d, "1-received")
	gpgVerify(d, "2-receipt-sent")
	d = filepath.Join(dir, "evidence-at-clinic")
	if out, code := evidence(clinic, "ORM-CLIN-1", d); code != 0 {
		t.Fatalf("evidence ORM-CLIN-1 at the clinic: %d\n%s", code, out)
	}
	opensslVerify(d, "1-received", "partner-cert.pem")
	opensslVerify(d, "2-receipt-sent", "our-cert.pem")

	// Planted by another user (nobody): a folder of theirs with a link to
	// one of root's files inside, and an empty folder of theirs. Neither is
	// written into, and root's file stays as it was.
	planted, err := os.MkdirTemp("", "hl7mail-planted")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(planted)
	os.Chmod(planted, 0o777)
	rootFile := filepath.Join(dir, "root-owned.txt")
	os.WriteFile(rootFile, []byte("root's\n"), 0o600)
	if out, ok := asNobody(t, "/bin/sh", "-c", "mkdir "+planted+"/theirs "+planted+"/empty && ln -s "+rootFile+" "+planted+"/theirs/1-sent.eml"); !ok {
		t.Fatalf("nobody could not prepare the folders: %s", out)
	}
	for _, d := range []string{filepath.Join(planted, "theirs"), filepath.Join(planted, "empty")} {
		if out, code := evidence(hospital, "ORM-LAB-1", d); code == 0 || !strings.Contains(out, "belongs to user") {
			t.Errorf("evidence -out %s, a folder nobody prepared: %d\n%s", d, code, out)
		}
	}
	if b, _ := os.ReadFile(rootFile); string(b) != "root's\n" {
		t.Errorf("root's file was written through the planted link: %q", b)
	}
	if entries, _ := os.ReadDir(filepath.Join(planted, "empty")); len(entries) != 0 {
		t.Errorf("evidence wrote into the folder nobody prepared")
	}

	for _, s := range []*site{hospital, lab, clinic} {
		if out, code := s.in.run("journal", "verify", "-config", s.in.config); code != 0 ||
			!strings.Contains(out, "Every journal entry verifies and has its counterpart in the store.") {
			t.Errorf("journal verify at the %s: %d\n%s", s.name, code, out)
		}
	}

	// One byte of the hospital's incoming journal altered, inside the lab's
	// encrypted receipt.
	hospital.in.stop()
	jpath := filepath.Join(hospital.in.dir, "var", "incoming.mbox")
	data, _ := os.ReadFile(jpath)
	at := bytes.Index(data, []byte("-----BEGIN PGP MESSAGE-----"))
	if at < 0 {
		t.Fatal("no PGP mail in the hospital's incoming journal")
	}
	at += 200
	if data[at] == 'A' {
		data[at] = 'B'
	} else {
		data[at] = 'A'
	}
	os.WriteFile(jpath, data, 0o600)
	out, code = evidence(hospital, "ORM-LAB-1", "")
	if code == 0 || !strings.Contains(out, "receipt: BROKEN") || !strings.Contains(out, "The chain is broken at: receipt") {
		t.Errorf("evidence after the journal was altered: %d\n%s", code, out)
	}
	if out, code := evidence(hospital, "ORM-CLIN-1", ""); code != 0 {
		t.Errorf("the clinic's chain, untouched, after the lab's was altered: %d\n%s", code, out)
	}
	if out, code := hospital.in.run("journal", "verify", "-config", hospital.in.config); code == 0 ||
		!strings.Contains(out, "PROBLEM: incoming.mbox offset") || !strings.Contains(out, "altered after it was written") {
		t.Errorf("journal verify after the journal was altered: %d\n%s", code, out)
	}
}
