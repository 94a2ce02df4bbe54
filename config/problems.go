package config

import (
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Problem is one thing wrong with a configuration.
type Problem struct {
	Line    int    // 1-based line in the file, 0 when unknown
	Partner string // the partner concerned, if any
	Field   string // e.g. "partners[1].listen"
	Msg     string
	Hint    string // a likely fix, if any
}

func (p Problem) String() string {
	var b strings.Builder
	if p.Partner != "" {
		fmt.Fprintf(&b, "partner %s: ", p.Partner)
	}
	if p.Field != "" {
		fmt.Fprintf(&b, "%s: ", p.Field)
	}
	b.WriteString(p.Msg)
	if p.Hint != "" {
		fmt.Fprintf(&b, " (%s)", p.Hint)
	}
	return b.String()
}

// Error lists every problem found in a configuration file.
type Error struct {
	File     string
	Problems []Problem
	lines    map[string]int
}

func (e *Error) add(p Problem) { e.Problems = append(e.Problems, p) }

// Error prints one problem a line, as file:line: text, in line order.
func (e *Error) Error() string {
	ps := append([]Problem(nil), e.Problems...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Line < ps[j].Line })
	lines := make([]string, len(ps))
	for i, p := range ps {
		if p.Line > 0 {
			lines[i] = fmt.Sprintf("%s:%d: %s", e.File, p.Line, p)
		} else {
			lines[i] = fmt.Sprintf("%s: %s", e.File, p)
		}
	}
	return strings.Join(lines, "\n")
}

var yamlLine = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// keysOf returns the YAML keys of struct type t: the yaml tags of its
// fields, those of inline fields included.
func keysOf(t reflect.Type) map[string]reflect.Type {
	keys := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if opts == "inline" {
			for k, ft := range keysOf(f.Type) {
				keys[k] = ft
			}
			continue
		}
		if tag != "" && tag != "-" {
			keys[tag] = f.Type
		}
	}
	return keys
}

var unmarshaler = reflect.TypeFor[yaml.Unmarshaler]()

// unknownKeys walks the YAML tree n beside the Go type t it decodes into
// and reports every mapping key that names no field, at its line, with
// the closest known key as a hint (or the known keys).
func unknownKeys(n *yaml.Node, t reflect.Type, path string) []Problem {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshaler) {
		return nil // decodes itself (Duration)
	}
	var out []Problem
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			out = append(out, unknownKeys(c, t, path)...)
		}
	case yaml.MappingNode:
		switch t.Kind() {
		case reflect.Struct:
			keys := keysOf(t)
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := n.Content[i]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				ft, ok := keys[k.Value]
				if !ok {
					out = append(out, unknownKey(k, keys))
					continue
				}
				out = append(out, unknownKeys(n.Content[i+1], ft, p)...)
			}
		case reflect.Map:
			for i := 0; i+1 < len(n.Content); i += 2 {
				out = append(out, unknownKeys(n.Content[i+1], t.Elem(), path+"."+n.Content[i].Value)...)
			}
		}
	case yaml.SequenceNode:
		if t.Kind() == reflect.Slice || t.Kind() == reflect.Array {
			for i, c := range n.Content {
				out = append(out, unknownKeys(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i))...)
			}
		}
	}
	return out
}

func unknownKey(k *yaml.Node, keys map[string]reflect.Type) Problem {
	names := make([]string, 0, len(keys))
	for name := range keys {
		names = append(names, name)
	}
	sort.Strings(names)
	p := Problem{Line: k.Line, Msg: fmt.Sprintf("unknown key %q", k.Value)}
	if best := closest(k.Value, names); best != "" {
		p.Hint = fmt.Sprintf("did you mean %q?", best)
	} else {
		p.Hint = "known keys: " + strings.Join(names, ", ")
	}
	return p
}

// problemFromYAML turns a yaml error ("line 5: cannot unmarshal ...") into
// a Problem with its line.
func problemFromYAML(err error) Problem {
	msg := err.Error()
	p := Problem{Msg: msg}
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		p.Line, _ = strconv.Atoi(m[1])
		p.Msg = m[2]
	}
	return p
}

// closest returns the key within edit distance 2 of s, if any.
func closest(s string, keys []string) string {
	best, bestD := "", 3
	for _, k := range keys {
		if d := editDistance(s, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// nodeLines maps field paths ("partners[1].listen") to their lines.
func nodeLines(root *yaml.Node) map[string]int {
	lines := map[string]int{}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		switch n.Kind {
		case yaml.DocumentNode:
			for _, c := range n.Content {
				walk(c, path)
			}
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k := n.Content[i]
				p := k.Value
				if path != "" {
					p = path + "." + k.Value
				}
				lines[p] = k.Line
				walk(n.Content[i+1], p)
			}
		case yaml.SequenceNode:
			for i, c := range n.Content {
				p := fmt.Sprintf("%s[%d]", path, i)
				lines[p] = c.Line
				walk(c, p)
			}
		}
	}
	walk(root, "")
	return lines
}

// Problems returns an empty problem list for this configuration, to which
// checks made outside this package (loading keys) add problems that carry
// the line of their field.
func (c *Config) Problems() *Error {
	return &Error{File: c.File, lines: c.lines}
}

// Addf adds a problem of field (e.g. "partners[1].pgp_key") for partner.
func (e *Error) Addf(field, partner, hint, format string, args ...any) {
	v := validator{e: e, lines: e.lines}
	v.addf(field, partner, hint, format, args...)
}

// Err returns e when it holds problems, and nil otherwise.
func (e *Error) Err() error {
	if len(e.Problems) == 0 {
		return nil
	}
	return e
}
