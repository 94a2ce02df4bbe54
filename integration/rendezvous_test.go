package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
)

// TestRendezvousMLLPSend: Debian's mllp_send (python3-hl7) is the hospital's
// router, the lab partner is in ack_mode rendezvous. It receives the lab
// router's AA on the connection it sent on; with the lab stopped it
// receives CE saying the wait timed out, and the order reaches the lab's
// router once the lab runs again, its answer the hospital's router.
func TestRendezvousMLLPSend(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	dir := t.TempDir()
	for _, s := range []struct{ name, email string }{{"hospital", "edi@hospital.test"}, {"lab", "lab@partner.test"}} {
		siteKeys(t, dir, s.name, s.email, "pgp")
	}
	hRouter, _ := embedded.StartRouter("127.0.0.1:0")
	defer hRouter.Close()
	labRouter, _ := embedded.StartRouter("127.0.0.1:0")
	defer labRouter.Close()
	toLab := freePort(t)
	site := func(name, email, router, partners string, listen map[string]string) *instance {
		return worldSite(t, w, dir, name, email, router, partners, listen)
	}
	hospital := site("hospital", "edi@hospital.test", hRouter.Addr, fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc, ack_mode: rendezvous, rendezvous_timeout: 3s}\n",
		toLab), map[string]string{"lab": toLab})
	lab := site("lab", "lab@partner.test", labRouter.Addr, fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n", freePort(t)),
		map[string]string{})
	hospital.start()
	lab.start()

	send := func(id string) string {
		t.Helper()
		file := filepath.Join(dir, id+".mllp")
		os.WriteFile(file, mllp.AppendFrame(nil, []byte("MSH|^~\\&|OE|GH|LAB|TL|20261123||ORM^O01|"+id+"|P|2.3|||AL\rPID|1\rORC|NW|"+id+"\r")), 0o600)
		host, port, _ := net.SplitHostPort(toLab)
		out, err := exec.Command(mllpSend, "-p", port, "-f", file, host).Output()
		if err != nil {
			t.Fatalf("mllp_send: %v", err)
		}
		return string(out)
	}
	if out := send("RDV-1"); !strings.Contains(out, "\rMSA|AA|RDV-1") || !strings.Contains(out, "|RT") {
		t.Fatalf("mllp_send got %q; want the lab router's AA for RDV-1", out)
	}
	lab.stop()
	start := time.Now()
	if out := send("RDV-2"); !strings.Contains(out, "\rMSA|CE|RDV-2") || !strings.Contains(out, "timed out") {
		t.Fatalf("mllp_send with the lab down got %q; want CE, timed out", out)
	}
	if waited := time.Since(start); waited < 3*time.Second {
		t.Errorf("the timeout answer came after %s, before rendezvous_timeout", waited)
	}
	lab.start()
	deadline := time.Now().Add(60 * time.Second)
	for {
		late := 0
		for _, m := range hRouter.Messages() {
			if a, err := hl7.ParseAck(m); err == nil && a.ControlID == "RDV-2" && a.Code == hl7.ApplicationAccept {
				late++
			}
		}
		if len(labRouter.Messages()) == 2 && late == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %d at the lab's router, %d late answers at the hospital's router\n%s", len(labRouter.Messages()), late, hospital.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := len(hRouter.Messages()); n != 1 {
		t.Errorf("the hospital's router got %d messages, want only the late answer to RDV-2\n%q\n%s", n, hRouter.Messages(), hospital.log)
	}
}
