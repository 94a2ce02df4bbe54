package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/corpus"
)

// TestPostfixBounce: a message to a partner address that does not exist in
// the partner's domain, submitted through Postfix's submission port (SASL
// through Dovecot, STARTTLS) with a DSN request, comes back as Postfix's
// own bounce. hl7mail fetches it over IMAP, finds the message by its ENVID,
// marks it bounced with Postfix's Status (5.1.1) and raises one alert; no
// quarantine entry, and the journals still verify.
func TestPostfixBounce(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	requireMailServers(t)
	dir := sharedDir(t, "hl7mail-bounce")
	port := func() string { _, p, _ := net.SplitHostPort(freePort(t)); return p }
	subPort, authPort := port(), port()
	ms := startMailServers(t, dir, []string{"SUBMISSION_PORT=" + subPort, "AUTH_PORT=" + authPort},
		"edi@hospital.test", "lab@partner.test")
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp")
	siteKeys(t, dir, "ghost", "ghost@partner.test", "pgp") // a key for the address, no mailbox behind it
	hdir := filepath.Join(dir, "hospital")
	// The account's password (siteKeys wrote it for IMAP) logs in to
	// submission too, through Dovecot's SASL.
	pw, err := os.ReadFile(filepath.Join(hdir, "imap-password"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(hdir, "smtp-password"), pw, 0o600)
	toLab := freePort(t)
	cfg := filepath.Join(hdir, "partners.yaml")
	// The partner's domain is the lab's (lab@partner.test has a mailbox
	// there); ghost@partner.test has none.
	os.WriteFile(cfg, []byte(fmt.Sprintf(`self: {name: General Hospital, email: edi@hospital.test, pgp_key: private.asc}
store: var
router: {addr: %s}
smtp: {addr: 127.0.0.1:%s, tls: starttls, ca_file: ../servers/tls/ca.pem, username: edi@hospital.test, password_file: smtp-password}
imap: {addr: 127.0.0.1:%s, tls: none, username: edi@hospital.test, password_file: imap-password, poll: 1s}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: %s, email: ghost@partner.test, security: pgp, pgp_key: ../ghost/public.asc}
`, freePort(t), subPort, ms.imap, freePort(t), toLab)), 0o600)
	in := &instance{t: t, dir: hdir, config: cfg, listen: map[string]string{"lab": toLab}}
	in.start()
	defer in.stop()

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	mllpSendAll(t, mllpSend, dir, toLab, msgs[:1]) // it checks the answer is CA
	deadline := time.Now().Add(60 * time.Second)
	for {
		list := in.messages()
		if len(list) == 1 && list[0].State == "bounced" {
			break
		}
		if time.Now().After(deadline) {
			postfixLog, _ := os.ReadFile(filepath.Join(ms.dir, "postfix", "log"))
			t.Fatalf("after 60s the message is %+v, want bounced\nhospital log:\n%s\nPostfix log:\n%s", list, in.log, postfixLog)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // another poll: still one alert, nothing quarantined
	alerts := in.alerts(true)
	if len(alerts) != 1 || alerts[0].Kind != "bounced" || !strings.Contains(alerts[0].Text, "5.1.1") {
		t.Errorf("alerts %+v, want one bounced alert with Postfix's 5.1.1", alerts)
	}
	out, code := in.run("reports", "-config", cfg, "-json")
	var reports []struct {
		Type, Disposition, Outcome, Detail string
		MatchedBy                          string `json:"matched_by"`
		Message                            int64
	}
	if code != 0 || json.Unmarshal([]byte(out), &reports) != nil {
		t.Fatalf("hl7mail reports: exit %d\n%s", code, out)
	}
	// matched by envid: the server took our DSN request (ENVID, RET=HDRS)
	// and gave the envelope id back.
	if len(reports) != 1 || reports[0].Type != "dsn" || reports[0].Disposition != "failed" || reports[0].Outcome != "bounced" ||
		!strings.HasPrefix(reports[0].Detail, "5.1.1") || reports[0].Message == 0 || reports[0].MatchedBy != "envid" {
		t.Errorf("reports %s, want one DSN: failed, bounced, 5.1.1, matched by envid", out)
	}
	if out, code := in.run("journal", "verify", "-config", cfg); code != 0 {
		t.Errorf("hl7mail journal verify: exit %d\n%s", code, out)
	}
}
