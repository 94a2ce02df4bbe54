package security

import (
	"bytes"
	"fmt"
	"strings"
)

// Errors of this package reach logs, quarantine reasons, the dashboard and
// MDNs. They are built from our own words and bounded facts (lengths, line
// numbers, offsets), never from what a mail carries: a header running into
// HL7, or a value holding part of a message, would put patient data there.

// HeaderFault describes, in bounded facts, why the header of raw could not
// be read: the first line that is neither a header field nor its
// continuation, or a header with no end. It wraps ErrMalformed.
func HeaderFault(raw []byte) error {
	line := 0
	for len(raw) > 0 {
		line++
		var l []byte
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			l, raw = raw[:i], raw[i+1:]
		} else {
			l, raw = raw, nil
		}
		l = bytes.TrimSuffix(l, []byte("\r"))
		switch {
		case len(l) == 0:
			return malformed("MIME header unreadable")
		case l[0] == ' ' || l[0] == '\t':
			if line == 1 {
				return malformed("MIME header starts with a continuation line")
			}
		case !validField(l):
			return malformed("MIME header line %d (%d bytes) is not a header field", line, len(l))
		}
	}
	return malformed("MIME header has no end (no empty line after %d lines)", line)
}

// validField reports whether l starts with a field name and a colon
// (RFC 5322 §2.2: printable ASCII but colon, then ':').
func validField(l []byte) bool {
	i := bytes.IndexByte(l, ':')
	if i <= 0 {
		return false
	}
	for _, c := range l[:i] {
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// token shows a header value in an error when it is a short protocol value
// (at most 64 bytes, no control characters and none of HL7's delimiters),
// and only its length otherwise.
func token(s string) string {
	if plain(s, 64) {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("(%d bytes)", len(s))
}

// Bounded keeps a mail server's words for a log or an alert, its white
// space folded, when they are at most max bytes of printable ASCII without
// HL7's delimiters (a server's diagnostic does not quote the message);
// else only their length.
func Bounded(s string, max int) string {
	s = strings.Join(strings.Fields(s), " ")
	if plain(s, max) {
		return s
	}
	return fmt.Sprintf("(%d bytes)", len(s))
}

// plain reports whether s is at most max bytes of printable ASCII (space
// included) with none of HL7's delimiters.
func plain(s string, max int) bool {
	if len(s) > max || strings.ContainsAny(s, "|^~\\&") {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// SuiteOf names the security suite a mail's outer entity uses: "pgp"
// (PGP/MIME, RFC 3156), "smime" (RFC 8551) or "" (neither, or unreadable).
func SuiteOf(mail []byte) string {
	e, err := parseEntity(mail)
	if err != nil {
		return ""
	}
	proto := strings.ToLower(e.params["protocol"])
	switch {
	case e.typ == typeMultipartEncrypted && proto == protoPGPEncrypted,
		e.typ == typeMultipartSigned && proto == protoPGPSignature:
		return "pgp"
	case e.typ == typePKCS7MIME || e.typ == typeXPKCS7MIME,
		e.typ == typeMultipartSigned && (proto == typePKCS7Signature || proto == "application/x-pkcs7-signature"):
		return "smime"
	}
	return ""
}
