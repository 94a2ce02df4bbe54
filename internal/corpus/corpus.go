// Package corpus loads the sample HL7 v2 messages of the shared test data
// (../shared/testdata/hl7/simhospital-messages.hl7 beside the repository):
// messages whose segments end in CR, separated by blank lines.
//
// It imports, of this module, nothing.
package corpus

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// EnvPath names the environment variable that overrides the corpus path.
const EnvPath = "HL7MAIL_CORPUS"

const rel = "../shared/testdata/hl7/simhospital-messages.hl7"

// Path returns the corpus file: $HL7MAIL_CORPUS, or the shared test data
// found beside the first folder at or above the working directory that holds
// go.mod.
func Path() (string, error) {
	if p := os.Getenv(EnvPath); p != "" {
		return p, nil
	}
	p, err := SourceFile(rel)
	if err != nil {
		return "", fmt.Errorf("corpus: %w (set %s)", err, EnvPath)
	}
	return p, nil
}

// SourceFile returns the file rel names from the source tree: the first
// folder at or above the working directory that holds go.mod.
func SourceFile(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			p := filepath.Join(dir, rel)
			if _, err := os.Stat(p); err != nil {
				return "", err
			}
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Load reads the messages of the corpus at path, each ending in CR.
func Load(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("corpus: %w", err)
	}
	return Split(data), nil
}

// Split cuts data into messages at blank lines, trims white space around each
// and makes each end in one CR.
func Split(data []byte) [][]byte {
	var out [][]byte
	for _, m := range bytes.Split(data, []byte("\n\n")) {
		m = bytes.TrimSpace(m)
		if len(m) == 0 {
			continue
		}
		msg := make([]byte, len(m)+1)
		copy(msg, m)
		msg[len(m)] = '\r'
		out = append(out, msg)
	}
	return out
}

// Default loads the corpus at Path().
func Default() ([][]byte, error) {
	p, err := Path()
	if err != nil {
		return nil, err
	}
	return Load(p)
}

// PatientData returns the patient identifiers and names found in msgs, each
// once: the IDs of PID-3 and PID-2, the names of PID-5 and NK1-2, the street
// of PID-11 and the phone of PID-13. Tests look for them where they must
// never appear (logs, pages, API answers). Short values (under 4
// characters) are left out: they would match by chance.
func PatientData(msgs [][]byte) []string {
	seen := map[string]bool{}
	var out []string
	add := func(v string) {
		v = strings.TrimSpace(v)
		if len(v) >= 4 && !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	// Fields by segment, and whether their second component (a given
	// name) counts too.
	fields := map[string]map[int]bool{
		"PID": {2: false, 3: false, 5: true, 11: false, 13: false},
		"NK1": {2: true},
	}
	for _, m := range msgs {
		for _, seg := range strings.Split(string(m), "\r") {
			f := strings.Split(seg, "|")
			for i, given := range fields[f[0]] {
				if i >= len(f) {
					continue
				}
				for _, rep := range strings.Split(f[i], "~") {
					comps := strings.Split(rep, "^")
					add(comps[0])
					if given && len(comps) > 1 {
						add(comps[1])
					}
				}
			}
		}
	}
	return out
}
