package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// partnerTools signs and encrypts a partner's receipts with the partner's
// own software: GnuPG for the lab (PGP/MIME, RFC 3156), OpenSSL's cms for
// the clinic (S/MIME, RFC 8551).
type partnerTools struct {
	t            *testing.T
	dir          string
	gpg, openssl string
	home         string // the lab's GnuPG home
}

func newPartnerTools(t *testing.T, dir string) *partnerTools {
	p := &partnerTools{t: t, dir: dir, gpg: requireTool(t, "/usr/bin/gpg"), openssl: requireTool(t, "/usr/bin/openssl")}
	home, err := os.MkdirTemp("", "gpg") // short: the agent's socket path is limited
	if err != nil {
		t.Fatal(err)
	}
	p.home = home
	t.Cleanup(func() {
		exec.Command("gpgconf", "--homedir", home, "--kill", "all").Run()
		os.RemoveAll(home)
	})
	p.run(nil, p.gpg, p.gpgArgs("--import", filepath.Join(dir, "lab", "private.asc"), filepath.Join(dir, "hospital", "public.asc"))...)
	return p
}

func (p *partnerTools) gpgArgs(args ...string) []string {
	return append([]string{"--homedir", p.home, "--batch", "--yes", "--no-tty", "--pinentry-mode", "loopback",
		"--passphrase", "", "--trust-model", "always"}, args...)
}

func (p *partnerTools) run(stdin []byte, bin string, args ...string) []byte {
	p.t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		p.t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, errb.String())
	}
	return out.Bytes()
}

func (p *partnerTools) file(name string, data []byte) string {
	f := filepath.Join(p.dir, name)
	if err := os.WriteFile(f, data, 0o600); err != nil {
		p.t.Fatal(err)
	}
	return f
}

// labMail is entity signed by GnuPG with the lab's key and encrypted to the
// hospital's, as PGP/MIME layers, in a mail from the lab.
func (p *partnerTools) labMail(entity []byte, msgID string) []byte {
	sig := p.run(nil, p.gpg, p.gpgArgs("--armor", "--detach-sign", "--digest-algo", "SHA256", "--local-user", "lab@partner.test",
		"--output", "-", p.file("entity.eml", entity))...)
	signed := "Content-Type: multipart/signed; micalg=pgp-sha256; protocol=\"application/pgp-signature\"; boundary=\"S1\"\r\n\r\n" +
		"--S1\r\n" + string(entity) + "\r\n--S1\r\nContent-Type: application/pgp-signature\r\n\r\n" + string(sig) + "\r\n--S1--\r\n"
	enc := p.run(nil, p.gpg, p.gpgArgs("--armor", "--encrypt", "--recipient", "edi@hospital.test", "--output", "-",
		p.file("signed.eml", []byte(signed)))...)
	return []byte("From: lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: " + msgID + "\r\nSubject: receipt\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=\"E1\"\r\n\r\n" +
		"--E1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--E1\r\nContent-Type: application/octet-stream\r\n\r\n" +
		string(enc) + "\r\n--E1--\r\n")
}

// clinicMail is entity signed by openssl cms with the clinic's certificate
// and encrypted to the hospital's, in a mail from the clinic.
func (p *partnerTools) clinicMail(entity []byte, msgID string) []byte {
	in, signed, enc := p.file("entity.eml", entity), filepath.Join(p.dir, "signed.eml"), filepath.Join(p.dir, "enc.eml")
	p.run(nil, p.openssl, "cms", "-sign", "-in", in, "-signer", filepath.Join(p.dir, "clinic", "cert.pem"),
		"-inkey", filepath.Join(p.dir, "clinic", "key.pem"), "-md", "sha256", "-binary", "-out", signed)
	p.run(nil, p.openssl, "cms", "-encrypt", "-binary", "-aes-256-cbc", "-in", signed, "-out", enc,
		"-recip", filepath.Join(p.dir, "hospital", "cert.pem"))
	body, err := os.ReadFile(enc)
	if err != nil {
		p.t.Fatal(err)
	}
	return append([]byte("From: edi@clinic.test\r\nTo: edi@hospital.test\r\nMessage-ID: "+msgID+"\r\nSubject: receipt\r\n"), body...)
}

// TestReceiptDispositions: receipts signed by the partners' own software
// (GnuPG, OpenSSL), handed to the running instance by "hl7mail receive":
// a processed then a dispatched MDN (Direct's final-destination flag) are
// both recorded on the message; failed and denied ones raise an alert
// each; a signed receipt that names nothing of ours is recorded too, and
// "hl7mail journal verify" stays green.
func TestReceiptDispositions(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	smtpSrv, smtpAddr := startSMTP(t)
	dir := t.TempDir()
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp", "smime")
	siteKeys(t, dir, "lab", "lab@partner.test", "pgp")
	siteKeys(t, dir, "clinic", "edi@clinic.test", "smime")
	tools := newPartnerTools(t, dir)
	in := &instance{t: t, dir: dir, config: filepath.Join(dir, "partners.yaml"), dash: freePort(t),
		listen: map[string]string{"lab": freePort(t), "clinic": freePort(t)}}
	os.WriteFile(in.config, []byte(fmt.Sprintf(`self: {name: hospital, email: edi@hospital.test, pgp_key: hospital/private.asc, smime_cert: hospital/cert.pem, smime_key: hospital/key.pem}
store: var
router: {addr: %s}
smtp: {addr: %s, tls: none, retry: 200ms}
imap: {addr: %s, tls: none}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: lab/public.asc}
  - {name: clinic, listen: %s, email: edi@clinic.test, security: smime, smime_cert: clinic/cert.pem}
`, freePort(t), smtpAddr, freePort(t), in.dash, in.listen["lab"], in.listen["clinic"])), 0o600)
	in.start()
	defer in.stop()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	labIDs := mllpSendAll(t, mllpSend, dir, in.listen["lab"], msgs[300:302])
	clinicIDs := mllpSendAll(t, mllpSend, dir, in.listen["clinic"], msgs[302:304])
	deadline := time.Now().Add(30 * time.Second)
	for smtpSrv.Count() < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("%d mails sent after 30s, want 4\n%s", smtpSrv.Count(), in.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// What each partner computes over the bytes it received: the hospital
	// recorded it when it sent them.
	ro, err := store.OpenReadOnly(filepath.Join(dir, "var"))
	if err != nil {
		t.Fatal(err)
	}
	sent := map[string]store.Pending{}
	ctx := context.Background()
	for _, id := range append(append([]string{}, labIDs...), clinicIDs...) {
		list, err := ro.List(ctx, store.Filter{ControlID: id, Direction: store.Outbound})
		if err != nil || len(list) != 1 {
			t.Fatalf("message %s: %+v, %v", id, list, err)
		}
		if sent[id], err = ro.PendingByMessageID(ctx, list[0].MessageID); err != nil {
			t.Fatal(err)
		}
	}
	ro.Close()
	mdn := func(p store.Pending, final string, d security.Disposition, withMIC, finalDelivery bool, reason string) []byte {
		m := &security.MDN{ReportingUA: "partner.test; their software", FinalRecipient: final, OriginalMessageID: p.MessageID,
			Disposition: d, FinalDelivery: finalDelivery}
		if withMIC {
			mic, err := security.ParseMIC(p.MIC)
			if err != nil {
				t.Fatal(err)
			}
			m.MIC = &mic
		}
		if d.Type == security.Failed {
			m.Failure = reason
		} else {
			m.Error = reason
		}
		e, err := m.Entity()
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	processed := security.Disposition{Type: security.Processed}
	dispatched := security.Disposition{Type: security.Dispatched}
	a, b := sent[labIDs[0]], sent[labIDs[1]]
	c, d := sent[clinicIDs[0]], sent[clinicIDs[1]]
	nowhere := store.Pending{MessageID: "<never-sent@hospital.test>", MIC: a.MIC}
	mails := [][]byte{
		tools.labMail(mdn(a, "lab@partner.test", processed, true, false, ""), "<r1@partner.test>"),
		tools.labMail(mdn(a, "lab@partner.test", dispatched, false, true, ""), "<r2@partner.test>"),
		tools.labMail(mdn(b, "lab@partner.test", security.Disposition{Type: security.Failed}, false, false, "unsupported format"), "<r3@partner.test>"),
		tools.clinicMail(mdn(c, "edi@clinic.test", processed, true, false, ""), "<r4@clinic.test>"),
		tools.clinicMail(mdn(c, "edi@clinic.test", dispatched, true, false, ""), "<r5@clinic.test>"),
		tools.clinicMail(mdn(d, "edi@clinic.test", security.Disposition{Type: security.Denied}, false, false, ""), "<r6@clinic.test>"),
		tools.labMail(mdn(nowhere, "lab@partner.test", processed, true, false, ""), "<r7@partner.test>"),
	}
	for i, m := range mails {
		cmd := exec.Command(binary, "receive", "-config", in.config)
		cmd.Stdin = bytes.NewReader(m)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("hl7mail receive of receipt %d: %v\n%s\n%s", i+1, err, out, in.log)
		}
	}
	out, code := in.run("reports", "-config", in.config, "-json")
	var reports []store.Report
	if code != 0 || json.Unmarshal([]byte(out), &reports) != nil {
		t.Fatalf("hl7mail reports: exit %d\n%s", code, out)
	}
	got := map[string][]string{}
	for _, r := range reports {
		got[r.OriginalMessageID] = append([]string{fmt.Sprintf("%s:%s:%v", r.Disposition, r.Outcome, r.FinalDelivery)}, got[r.OriginalMessageID]...)
	}
	want := map[string][]string{
		a.MessageID:       {"processed:matched:false", "dispatched:dispatched:true"},
		b.MessageID:       {"failed:error-disposition:false"},
		c.MessageID:       {"processed:matched:false", "dispatched:matched:false"},
		d.MessageID:       {"denied:error-disposition:false"},
		nowhere.MessageID: {"processed:unknown:false"},
	}
	for id, w := range want {
		if fmt.Sprint(got[id]) != fmt.Sprint(w) {
			t.Errorf("reports for %s: %v, want %v", id, got[id], w)
		}
	}
	kinds := map[string][]string{}
	for _, al := range in.alerts(false) {
		kinds[al.Kind] = append(kinds[al.Kind], al.Text)
	}
	if errs := kinds["receipt-error"]; len(errs) != 2 || !strings.Contains(strings.Join(errs, "|"), "receipt reports failed (unsupported format)") ||
		!strings.Contains(strings.Join(errs, "|"), "receipt reports denied") {
		t.Errorf("receipt-error alerts %q, want one for failed (with its reason) and one for denied", errs)
	}
	if len(kinds["receipt-mismatch"]) != 1 || len(kinds["quarantined"]) != 0 {
		t.Errorf("alerts %v, want one for the receipt that matches nothing, none quarantined", kinds)
	}
	for _, m := range in.messages() {
		if m.ControlID == labIDs[0] && m.State != "acknowledged" {
			t.Errorf("message %s is %s after processed and dispatched, want acknowledged", m.ControlID, m.State)
		}
	}
	if out, code := in.run("journal", "verify", "-config", in.config); code != 0 {
		t.Errorf("hl7mail journal verify: exit %d\n%s", code, out)
	}
}
