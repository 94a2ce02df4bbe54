package integration

import (
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// layers is the data path, bottom up, as the README's layout table gives
// it: a package may import only packages of lower layers (and, in the
// same layer, none).
var layers = [][]string{
	{"hl7", "mllp", "config", "internal/safefile", "security", "link", "internal/corpus", "internal/testlog", "internal/pgtest"},
	{"journal", "spool", "internal/embedded", "revocation", "roles"},
	{"store", "surrogate"},
	{"notify", "internal/partnerq", "pgstore"},
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
			Dir         string
			GoFiles     []string
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
		if name != "integration" && name != "cmd/hl7mail" {
			checkDoc(t, name, p.Dir, p.GoFiles, p.Imports, rank)
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

// checkDoc: the package doc's "It imports, of this module, …" sentence
// names exactly the packages of ours the package imports.
func checkDoc(t *testing.T, name, dir string, files, imports []string, rank map[string]int) {
	t.Helper()
	const mod = "github.com/hl7mail/hl7mail/"
	var sentence string
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		src := string(b)
		pkg := strings.Index(src, "\npackage ")
		i := strings.Index(src, "// It imports")
		if i < 0 || pkg < 0 || i > pkg {
			continue
		}
		sentence = strings.ReplaceAll(src[i:pkg], "\n// ", " ")
		if end := strings.IndexAny(sentence, ".:"); end >= 0 {
			sentence = sentence[:end]
		}
		break
	}
	if sentence == "" {
		t.Errorf("package %s: its doc does not say what it imports of this module", name)
		return
	}
	named := map[string]bool{}
	for _, w := range strings.FieldsFunc(sentence, func(r rune) bool { return r == ' ' || r == ',' || r == ';' || r == '(' || r == ')' }) {
		if _, ok := rank[w]; ok {
			named[w] = true
		}
	}
	got := map[string]bool{}
	for _, imp := range imports {
		if dep, ours := strings.CutPrefix(imp, mod); ours {
			got[dep] = true
		}
	}
	for dep := range got {
		if !named[dep] {
			t.Errorf("package %s imports %s; its doc does not say so (%q)", name, dep, sentence)
		}
	}
	for dep := range named {
		if !got[dep] {
			t.Errorf("package %s's doc says it imports %s; it does not (%q)", name, dep, sentence)
		}
	}
}
