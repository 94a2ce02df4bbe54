package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
)

// TestRoutingRealMail runs routing by recipient (draft-ietf-ediint-hl7-02
// §6.3) over real Postfix and Dovecot: the hospital's lab system and ADT
// system have addresses, Dovecot accounts and routers of their own; the
// lab company talks to the first, the ADT partner to the second. Each
// order's answer comes back to the router of the address it went out
// from, and a message the lab company starts reaches the lab system.
func TestRoutingRealMail(t *testing.T) {
	requireMailServers(t)
	dir := sharedDir(t, "hl7mail-routing")
	ms := startMailServers(t, dir, nil,
		"edi@hospital.test", "lab@edi.hospital", "adt@edi.hospital", "labco@partner.test", "adtco@partner.test")
	smtpPort, imapPort := ms.smtp, ms.imap

	siteKeys(t, dir, "hospital", "edi@hospital.test,lab@edi.hospital,adt@edi.hospital", "pgp")
	siteKeys(t, dir, "labco", "labco@partner.test", "pgp")
	siteKeys(t, dir, "adtco", "adtco@partner.test", "pgp")
	routers := map[string]*embedded.Router{}
	for _, n := range []string{"default", "lab", "adt", "labco", "adtco"} {
		r, err := embedded.StartRouter("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		routers[n] = r
	}
	imap := func(user string) string {
		return fmt.Sprintf("{addr: 127.0.0.1:%s, tls: none, username: %s, password_file: imap-password, poll: 1s}", imapPort, user)
	}
	write := func(name, email, router, extra, partners string, listen map[string]string) *instance {
		p := filepath.Join(dir, name, "partners.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf(`self: {name: %s, email: %s, pgp_key: private.asc}
store: var
router: {addr: %s, ack_timeout: 10s}
smtp: {addr: 127.0.0.1:%s, tls: none, retry: 1s}
imap: %s
dashboard: {addr: %s}
%spartners:
%s`, name, email, router, smtpPort, imap(email), freePort(t), extra, partners)), 0o600)
		in := &instance{t: t, dir: filepath.Join(dir, name), config: p, listen: listen}
		t.Cleanup(in.stop)
		return in
	}
	toLabco, toAdtco, fromLabco := freePort(t), freePort(t), freePort(t)
	hospital := write("hospital", "edi@hospital.test", routers["default"].Addr, fmt.Sprintf(`local:
  - {address: lab@edi.hospital, router: %s, imap: %s}
  - {address: adt@edi.hospital, router: %s, imap: %s}
`, routers["lab"].Addr, imap("lab@edi.hospital"), routers["adt"].Addr, imap("adt@edi.hospital")), fmt.Sprintf(
		"  - {name: labco, listen: %s, email: labco@partner.test, security: pgp, pgp_key: ../labco/public.asc, local: lab@edi.hospital}\n"+
			"  - {name: adtco, listen: %s, email: adtco@partner.test, security: pgp, pgp_key: ../adtco/public.asc, local: adt@edi.hospital}\n",
		toLabco, toAdtco), map[string]string{"labco": toLabco, "adtco": toAdtco})
	labco := write("labco", "labco@partner.test", routers["labco"].Addr, "", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: lab@edi.hospital, security: pgp, pgp_key: ../hospital/public.asc}\n", fromLabco),
		map[string]string{"hospital": fromLabco})
	adtco := write("adtco", "adtco@partner.test", routers["adtco"].Addr, "", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: adt@edi.hospital, security: pgp, pgp_key: ../hospital/public.asc}\n", freePort(t)),
		map[string]string{})
	for _, in := range []*instance{hospital, labco, adtco} {
		in.start()
	}
	for addr, msg := range map[string]string{
		toLabco:   "MSH|^~\\&|OE|GH|LAB|LC|20261123||ORM^O01|RR-LAB-1|P|2.3|||AL\rPID|1\rORC|NW|1\r",
		toAdtco:   "MSH|^~\\&|ADT|GH|ADT|AC|20261123||ADT^A01|RR-ADT-1|P|2.3|||AL\rPID|1\r",
		fromLabco: "MSH|^~\\&|LIS|LC|OE|GH|20261123||ORU^R01|RR-ORU-1|P|2.3|||AL\rPID|1\rOBX|1|NM|x||5\r",
	} {
		if code := sendOne(t, addr, []byte(msg)); code != hl7.CommitAccept {
			t.Fatalf("surrogate %s answered %s", addr, code)
		}
	}
	deadline := time.Now().Add(90 * time.Second)
	for len(routers["lab"].Received()) < 2 || len(routers["adt"].Received()) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("after 90s: lab system %v, ADT system %v, default %v\nhospital:\n%s", routers["lab"].Received(), routers["adt"].Received(),
				routers["default"].Received(), hospital.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if g := routers["lab"].Received(); len(g) != 2 || !g["answer to RR-LAB-1"] || !g["RR-ORU-1"] {
		t.Errorf("the lab system's router got %v", g)
	}
	if g := routers["adt"].Received(); len(g) != 1 || !g["answer to RR-ADT-1"] {
		t.Errorf("the ADT system's router got %v", g)
	}
	if g := routers["default"].Received(); len(g) != 0 {
		t.Errorf("the default router got %v; want nothing", g)
	}
	// Dovecot holds each mail in the account of the address it was sent to.
	for _, account := range []string{"lab@edi.hospital", "adt@edi.hospital"} {
		storedMail(t, dir, account)
	}
}
