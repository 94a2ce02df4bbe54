package config

import (
	"os"
	"strings"
	"testing"
)

// TestAddRemovePartner: a partner added to the shipped partners.yaml is
// one more item of partners:, every other line as it was, comments and
// their alignment included; the result parses; removing it gives back the
// file as it was. A file without partners gets its first.
func TestAddRemovePartner(t *testing.T) {
	shipped, err := os.ReadFile("../partners.yaml")
	if err != nil {
		t.Fatal(err)
	}
	np := NewPartner{Name: "eastside-clinic", Email: "edi@eastside.test", Listen: "127.0.0.1:9019", Security: SMIME,
		Key: "keys/eastside clinic.crt"}
	added, err := AddPartner(shipped, np)
	if err != nil {
		t.Fatal(err)
	}
	before, after := splitLines(shipped), splitLines(added)
	if len(after) != len(before)+5 {
		t.Fatalf("%d lines after adding, want %d", len(after), len(before)+5)
	}
	// Every line of the original is there, in order.
	j := 0
	for _, l := range after {
		if j < len(before) && l == before[j] {
			j++
		}
	}
	if j != len(before) {
		t.Errorf("line %d of the original (%q) is changed or gone", j+1, before[j])
	}
	c, err := Parse("p.yaml", added)
	if err != nil {
		// The shipped file's keys are not there: only parsing is checked.
		t.Fatal(err)
	}
	p := c.Partner("eastside-clinic")
	if p == nil || p.Email != np.Email || p.Listen != np.Listen || p.Security != SMIME || len(p.SMIMECert) != 1 || p.SMIMECert[0] != np.Key {
		t.Fatalf("added partner = %+v", p)
	}
	if len(c.Partners) != 3 || c.Partners[2].Name != "eastside-clinic" {
		t.Errorf("partners: %d, the new one last: %v", len(c.Partners), c.Partners[len(c.Partners)-1].Name)
	}
	removed, err := RemovePartner(added, "eastside-clinic")
	if err != nil {
		t.Fatal(err)
	}
	if string(removed) != string(shipped) {
		t.Errorf("adding and removing a partner changed the file")
	}
	if _, err := RemovePartner(shipped, "nobody"); err == nil || !strings.Contains(err.Error(), "no partner nobody") {
		t.Errorf("removing a partner that is not there: %v", err)
	}

	// partners: followed by another key, its last partner with commented
	// settings: the new partner goes after those, before the next key's
	// comment.
	moved := strings.Replace(string(shipped), "\npartners:\n", "\n# Partners.\npartners:\n", 1) + "\n# The end.\nstore: var/x\n"
	moved = strings.Replace(moved, "\nstore: var/hl7mail\n", "\n", 1)
	added, err = AddPartner([]byte(moved), np)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(added), "require_tls: true             # only over verified TLS with REQUIRETLS (RFC 8689)\n  - name: eastside-clinic\n") ||
		!strings.Contains(string(added), "smime_cert: keys/eastside clinic.crt\n\n# The end.\nstore: var/x\n") {
		t.Errorf("added before another key:\n%s", added[len(added)-600:])
	}
	if removed, err := RemovePartner(added, "eastside-clinic"); err != nil || string(removed) != moved {
		t.Errorf("removing it again: %v", err)
	}

	// A file with no partners yet, as init writes it; then none again.
	base := strings.Split(minimal, "partners:")[0]
	for _, tail := range []string{"", "partners:\n", "partners: [] # none yet\n"} {
		first, err := AddPartner([]byte(base+tail), NewPartner{Name: "lab", Email: "lab@partner.test",
			Listen: "127.0.0.1:9020", Security: NoSecurity, AllowUnencrypted: true})
		if err != nil {
			t.Fatalf("%q: %v", tail, err)
		}
		c, err := Parse("p.yaml", first)
		if err != nil || len(c.Partners) != 1 || c.Partners[0].Name != "lab" || !c.Partners[0].AllowUnencrypted {
			t.Fatalf("first partner into %q: %v\n%s", tail, err, first)
		}
		none, err := RemovePartner(first, "lab")
		if err != nil {
			t.Fatal(err)
		}
		if c, err := Parse("p.yaml", none); err != nil || len(c.Partners) != 0 {
			t.Errorf("the last partner removed: %v\n%s", err, none)
		}
	}
}
