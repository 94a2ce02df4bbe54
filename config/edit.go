package config

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

// NewPartner is what "hl7mail partner add" writes for a partner: the
// settings every partner needs, and its key or certificate.
type NewPartner struct {
	Name, Email, Listen string
	Security            Suite
	Key                 string // pgp_key or smime_cert, as a path relative to the file
	AllowUnencrypted    bool
}

// lines renders p as the lines of a block sequence item at indent
// (the column of its "-").
func (p NewPartner) lines(indent int) []string {
	pad := strings.Repeat(" ", indent)
	out := []string{pad + "- name: " + scalar(p.Name),
		pad + "  listen: " + scalar(p.Listen),
		pad + "  email: " + scalar(p.Email),
		pad + "  security: " + scalar(string(p.Security))}
	switch p.Security {
	case PGP:
		out = append(out, pad+"  pgp_key: "+scalar(p.Key))
	case SMIME:
		out = append(out, pad+"  smime_cert: "+scalar(p.Key))
	case NoSecurity:
		if p.AllowUnencrypted {
			out = append(out, pad+"  allow_unencrypted: true")
		}
	}
	return out
}

// AddPartner returns the configuration file data with partner p appended
// to partners:, every other byte as it was (comments, blank lines, the
// alignment of the comments): the new lines go after the last partner, or
// make the list when there is none.
func AddPartner(data []byte, p NewPartner) ([]byte, error) {
	doc, err := parseDoc(data)
	if err != nil {
		return nil, err
	}
	lines := splitLines(data)
	key, seq, next := doc.partners()
	switch {
	case key == nil:
		// No partners: key at all: a new list at the end.
		add := append([]string{"", "partners:"}, p.lines(2)...)
		return joinLines(append(trimTrailingBlank(lines), add...)), nil
	case seq.Kind != yaml.SequenceNode || seq.Style&yaml.FlowStyle != 0 || len(seq.Content) == 0:
		if seq.Kind == yaml.SequenceNode && len(seq.Content) > 0 {
			return nil, errors.New("partners is written as a flow list ([...]): write it as one partner a line (- name: ...) first")
		}
		// "partners:" or "partners: []": the list starts on the next line.
		i := key.Line - 1
		lines[i] = lines[i][:key.Column-1] + "partners:" + trailingComment(lines[i])
		out := append(append(append([]string{}, lines[:i+1]...), p.lines(key.Column-1+2)...), lines[i+1:]...)
		return joinLines(out), nil
	}
	indent := seq.Content[0].Column - 3 // "- " before the item's first key
	end := len(lines)
	if next != nil {
		// What is said of the next key stays with it; the last partner's
		// commented-out settings (indented as its keys) stay with it.
		end = next.Line - 1
		for end > 0 && isCommentOrBlank(lines[end-1]) && !strings.HasPrefix(lines[end-1], strings.Repeat(" ", indent+2)+"#") {
			end--
		}
	}
	for end > 0 && strings.TrimSpace(lines[end-1]) == "" {
		end--
	}
	out := append(append(append([]string{}, lines[:end]...), p.lines(indent)...), lines[end:]...)
	return joinLines(out), nil
}

// RemovePartner returns the configuration file data without the partner
// named name: its lines, with the comments that head it and those within
// it, go; every other byte stays.
func RemovePartner(data []byte, name string) ([]byte, error) {
	doc, err := parseDoc(data)
	if err != nil {
		return nil, err
	}
	_, seq, next := doc.partners()
	if seq == nil || seq.Kind != yaml.SequenceNode {
		return nil, fmt.Errorf("no partner %s: the configuration has no partners", name)
	}
	if seq.Style&yaml.FlowStyle != 0 {
		return nil, errors.New("partners is written as a flow list ([...]): remove the partner by hand")
	}
	lines := splitLines(data)
	for i, item := range seq.Content {
		if item.Kind != yaml.MappingNode || valueOf(item, "name") != name {
			continue
		}
		// Comment lines at the "-" column head an item; deeper ones
		// (commented-out settings) belong to the item above them.
		dash := item.Column - 3
		heads := func(line string) bool {
			return strings.HasPrefix(line, strings.Repeat(" ", dash)+"#")
		}
		start := item.Line - 1
		for start > 0 && heads(lines[start-1]) {
			start--
		}
		end := len(lines)
		switch {
		case i+1 < len(seq.Content):
			end = seq.Content[i+1].Line - 1
			for end > start && heads(lines[end-1]) {
				end-- // the next partner's heading stays with it
			}
		case next != nil:
			end = next.Line - 1
			for end > start && isCommentOrBlank(lines[end-1]) && !strings.HasPrefix(lines[end-1], strings.Repeat(" ", dash+2)+"#") {
				end--
			}
		}
		out := append(append([]string{}, lines[:start]...), lines[end:]...)
		if len(seq.Content) == 1 { // the last one: an empty list, still valid
			k := start - 1
			for k >= 0 && !strings.HasPrefix(strings.TrimSpace(out[k]), "partners:") {
				k--
			}
			if k >= 0 {
				out[k] = strings.Replace(out[k], "partners:", "partners: []", 1)
			}
		}
		return joinLines(out), nil
	}
	return nil, fmt.Errorf("no partner %s in the configuration", name)
}

// doc is a configuration file's YAML tree.
type doc struct{ root *yaml.Node }

func parseDoc(data []byte) (doc, error) {
	var n yaml.Node
	if err := yaml.Unmarshal(data, &n); err != nil {
		return doc{}, fmt.Errorf("configuration: %w", err)
	}
	if len(n.Content) != 1 || n.Content[0].Kind != yaml.MappingNode {
		return doc{}, errors.New("configuration: not a YAML mapping")
	}
	return doc{root: n.Content[0]}, nil
}

// partners returns the partners key, its value and the key after it (nil
// when partners is the last, or absent).
func (d doc) partners() (key, value, next *yaml.Node) {
	c := d.root.Content
	for i := 0; i+1 < len(c); i += 2 {
		if c[i].Value == "partners" {
			if i+2 < len(c) {
				next = c[i+2]
			}
			return c[i], c[i+1], next
		}
	}
	return nil, nil, nil
}

// valueOf returns the scalar value of key in mapping m.
func valueOf(m *yaml.Node, key string) string {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1].Value
		}
	}
	return ""
}

// scalar writes v as a YAML scalar: plain when it can be, quoted when it
// must (yaml.v3 decides, as for any value it writes).
func scalar(v string) string {
	b, err := yaml.Marshal(v)
	if err != nil {
		return fmt.Sprintf("%q", v)
	}
	return strings.TrimSuffix(string(b), "\n")
}

func splitLines(data []byte) []string {
	s := strings.TrimSuffix(string(data), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

func joinLines(lines []string) []byte {
	var b bytes.Buffer
	for _, l := range lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

func trimTrailingBlank(lines []string) []string {
	for len(lines) > 0 && strings.TrimSpace(lines[len(lines)-1]) == "" {
		lines = lines[:len(lines)-1]
	}
	return lines
}

func isCommentOrBlank(line string) bool {
	t := strings.TrimSpace(line)
	return t == "" || strings.HasPrefix(t, "#")
}

// trailingComment returns the " # …" that ends line, if any.
func trailingComment(line string) string {
	if i := strings.Index(line, " #"); i >= 0 {
		return line[i:]
	}
	return ""
}
