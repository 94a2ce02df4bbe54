package integration

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// layers is the data path, bottom up, as the README's layout table gives
// it: a package may import only packages of lower layers (and, in the
// same layer, none).
var layers = [][]string{
	{"hl7", "mllp", "config", "internal/safefile", "security", "link", "internal/corpus", "internal/testlog"},
	{"journal", "spool", "internal/embedded"},
	{"store", "surrogate"},
	{"notify", "internal/partnerq"},
	{"outbound", "deliver", "inbound", "internal/mailtest"},
	{"evidence", "dashboard"},
	{"gateway"},
	{"internal/demo"},
	{"internal/bench"},
	{"cmd/hl7mail", "integration"},
}

// TestLayout: no package imports one above it in the data path.
func TestLayout(t *testing.T) {
	out, err := exec.Command("go", "list", "-json", "../...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const mod = "github.com/hl7mail/hl7mail/"
	rank := map[string]int{}
	for i, l := range layers {
		for _, p := range l {
			rank[p] = i
		}
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p struct {
			ImportPath  string
			Imports     []string
			TestImports []string
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(p.ImportPath, mod)
		r, ok := rank[name]
		if !ok {
			t.Errorf("package %s is in no layer of the layout: add it to the README's table and to layers", name)
			continue
		}
		for _, imp := range p.Imports {
			dep, ours := strings.CutPrefix(imp, mod)
			if !ours {
				continue
			}
			if rank[dep] >= r && !slices.Contains([]string{"integration"}, name) {
				t.Errorf("%s imports %s, which is not below it in the data path", name, dep)
			}
		}
		// Evidence re-verifies from the journals alone: it shares no code
		// with the mail side that made them, not even in its tests.
		if name == "evidence" {
			for _, imp := range append(p.Imports, p.TestImports...) {
				if dep, _ := strings.CutPrefix(imp, mod); slices.Contains([]string{"outbound", "inbound", "deliver"}, dep) {
					t.Errorf("evidence imports %s", dep)
				}
			}
		}
	}
}
