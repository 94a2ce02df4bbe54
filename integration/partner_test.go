package integration

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
)

// TestPartnerAddReloads: "hl7mail partner add" against a running serve
// writes the partner and has the instance reload: the new partner's
// surrogate takes a message (CA) without a restart; "partner remove" has
// it stop listening, and partners.yaml is as it was.
func TestPartnerAddReloads(t *testing.T) {
	in := newInstance(t, "tucker-lab")
	in.start()
	original, err := os.ReadFile(in.config)
	if err != nil {
		t.Fatal(err)
	}
	addr := freePort(t)
	out, code := in.run("partner", "add", "-config", in.config, "-name", "north", "-email", "edi@north.test",
		"-listen", addr, "-security", "none", "-allow-unencrypted")
	if code != 0 || !strings.Contains(out, "the running instance reloaded it") {
		t.Fatalf("partner add = %d\n%s", code, out)
	}
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	if got := sendOne(t, addr, msgs[0]); got != hl7.CommitAccept {
		t.Fatalf("the new partner's surrogate answered %s, want CA", got)
	}
	out, code = in.run("partner", "remove", "-config", in.config, "-name", "north")
	if code != 0 || !strings.Contains(out, "the running instance reloaded it") {
		t.Fatalf("partner remove = %d\n%s", code, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the removed partner's surrogate still listens")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if now, _ := os.ReadFile(in.config); string(now) != string(original) {
		t.Errorf("partners.yaml after add and remove:\n%s", now)
	}
}
