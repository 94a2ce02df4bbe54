// Package hl7 reads the message header (MSH) of HL7 version 2 messages and
// builds the acknowledgements that answer them, as HL7 v2.5 chapter 2
// ("Control") defines them: §2.5 message delimiters, §2.14.9 the MSH
// segment, §2.14.8 the MSA segment, §2.14.5 the ERR segment and §2.9 the
// original and enhanced acknowledgement modes.
//
// Only the header is parsed; the rest of a message is carried as opaque bytes.
//
// It imports, of this module, nothing.
package hl7

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Sentinel errors returned (wrapped) by ParseHeader.
var (
	// ErrNotHL7 means the bytes do not start with an MSH segment.
	ErrNotHL7 = errors.New("not an HL7 v2 message: no MSH segment")
	// ErrBadDelimiters means MSH-1 or MSH-2 do not define usable delimiters.
	ErrBadDelimiters = errors.New("bad MSH-1/MSH-2 delimiters")
	// ErrMissingField means a required MSH field is empty.
	ErrMissingField = errors.New("required MSH field missing")
	// ErrFieldTooLong: a field of MSH is longer than any HL7 version
	// allows (MSH-10, the control ID, at most MaxControlID characters).
	ErrFieldTooLong = errors.New("MSH field too long")
)

// Delimiters are the separators a message declares in MSH-1 and MSH-2
// (HL7 v2.5 §2.5.4). Truncation is zero before v2.7.
type Delimiters struct {
	Field, Component, Repetition, Escape, Subcomponent, Truncation byte
}

// DefaultDelimiters are the recommended delimiters |^~\&.
var DefaultDelimiters = Delimiters{Field: '|', Component: '^', Repetition: '~', Escape: '\\', Subcomponent: '&'}

// encodingChars returns MSH-2 as the message wrote it.
func (d Delimiters) encodingChars() string {
	b := []byte{d.Component, d.Repetition, d.Escape, d.Subcomponent, d.Truncation}
	n := 0
	for _, c := range b {
		if c == 0 {
			break
		}
		n++
	}
	return string(b[:n])
}

// Header is the parsed MSH segment. Fields hold the raw text of each field,
// components included; accessors split components.
type Header struct {
	Delims            Delimiters
	SendingApp        string // MSH-3
	SendingFacility   string // MSH-4
	ReceivingApp      string // MSH-5
	ReceivingFacility string // MSH-6
	DateTime          string // MSH-7
	Security          string // MSH-8
	MessageType       string // MSH-9, e.g. "ORU^R01^ORU_R01"
	ControlID         string // MSH-10
	ProcessingID      string // MSH-11
	Version           string // MSH-12
	SequenceNumber    string // MSH-13
	AcceptAckType     string // MSH-15: AL, NE, ER, SU or empty
	AppAckType        string // MSH-16
	CharacterSet      string // MSH-18
}

// component returns the 1-based component n of field.
func (h *Header) component(field string, n int) string {
	for i := 1; i < n; i++ {
		j := strings.IndexByte(field, h.Delims.Component)
		if j < 0 {
			return ""
		}
		field = field[j+1:]
	}
	if j := strings.IndexByte(field, h.Delims.Component); j >= 0 {
		field = field[:j]
	}
	return field
}

// MessageCode is MSH-9.1, e.g. "ORU".
func (h *Header) MessageCode() string { return h.component(h.MessageType, 1) }

// SendingAppID and SendingFacilityID are the first components of MSH-3
// and MSH-4 (the namespace IDs), with the message's own delimiters.
func (h *Header) SendingAppID() string      { return h.component(h.SendingApp, 1) }
func (h *Header) SendingFacilityID() string { return h.component(h.SendingFacility, 1) }

// TriggerEvent is MSH-9.2, e.g. "R01".
func (h *Header) TriggerEvent() string { return h.component(h.MessageType, 2) }

// VersionID is MSH-12.1, e.g. "2.3".
func (h *Header) VersionID() string { return h.component(h.Version, 1) }

// IsAck reports whether the message is itself an acknowledgement (MSH-9.1
// "ACK"); an acknowledgement is never acknowledged (HL7 v2.5 §2.9.2).
func (h *Header) IsAck() bool { return strings.EqualFold(h.MessageCode(), "ACK") }

// OriginalMode reports whether the sender uses the original acknowledgement
// mode (HL7 v2.5 §2.9.2): neither MSH-15 nor MSH-16 is valued. Such a sender
// expects AA/AE/AR rather than CA/CE/CR.
func (h *Header) OriginalMode() bool { return h.AcceptAckType == "" && h.AppAckType == "" }

// VersionAtLeast reports whether MSH-12.1 is major.minor or later. An
// unparsable version counts as older.
func (h *Header) VersionAtLeast(major, minor int) bool {
	v := h.VersionID()
	maj, rest, _ := strings.Cut(v, ".")
	mn, _, _ := strings.Cut(rest, ".")
	a, err1 := strconv.Atoi(maj)
	b, err2 := strconv.Atoi(mn)
	if err1 != nil || err2 != nil {
		return false
	}
	return a > major || a == major && b >= minor
}

// MaxControlID is the longest MSH-10 accepted: the length HL7 v2.7 and
// later allow (ST 199); earlier versions allow 20.
const MaxControlID = 199

// ParseHeader parses the MSH segment at the start of msg. Segments may end in
// CR (the standard), LF or CRLF. When the delimiters are usable but a required
// field is missing or too long, the partly filled header is returned together
// with an error wrapping ErrMissingField or ErrFieldTooLong, so that a
// rejecting ACK can still be addressed to the sender. Errors name fields,
// lengths and positions, never what the message holds.
func ParseHeader(msg []byte) (*Header, error) {
	if len(msg) < 4 || !bytes.HasPrefix(msg, []byte("MSH")) {
		return nil, ErrNotHL7
	}
	seg := msg
	if i := bytes.IndexAny(seg, "\r\n"); i >= 0 {
		seg = seg[:i]
	}
	if len(seg) < 4 {
		return nil, fmt.Errorf("%w: MSH segment ends before MSH-1", ErrBadDelimiters)
	}
	fs := seg[3]
	if !isDelimiter(fs) {
		return nil, fmt.Errorf("%w: MSH-1 is byte 0x%02X, not a printable delimiter", ErrBadDelimiters, fs)
	}
	fields := strings.Split(string(seg), string(fs))
	// fields[0] is "MSH", fields[1] is MSH-2; fields[n-1] is MSH-n for n >= 2.
	if len(fields) < 2 {
		return nil, fmt.Errorf("%w: no MSH-2", ErrBadDelimiters)
	}
	enc := fields[1]
	if len(enc) < 1 || len(enc) > 5 {
		return nil, fmt.Errorf("%w: MSH-2 holds %d characters, must hold 1 to 5 (does MSH-1 recur?)", ErrBadDelimiters, len(enc))
	}
	d := DefaultDelimiters
	d.Field = fs
	slots := []*byte{&d.Component, &d.Repetition, &d.Escape, &d.Subcomponent, &d.Truncation}
	seen := map[byte]bool{fs: true}
	for i := 0; i < len(enc); i++ {
		c := enc[i]
		if !isDelimiter(c) || seen[c] {
			return nil, fmt.Errorf("%w: MSH-2 character %d is not a usable delimiter", ErrBadDelimiters, i+1)
		}
		seen[c] = true
		*slots[i] = c
	}
	// Delimiters the message does not declare must not collide with declared ones.
	for i := len(enc); i < 4; i++ {
		if seen[*slots[i]] {
			*slots[i] = 0
		}
	}
	get := func(n int) string {
		if n-1 < len(fields) {
			return fields[n-1]
		}
		return ""
	}
	h := &Header{
		Delims:            d,
		SendingApp:        get(3),
		SendingFacility:   get(4),
		ReceivingApp:      get(5),
		ReceivingFacility: get(6),
		DateTime:          get(7),
		Security:          get(8),
		MessageType:       get(9),
		ControlID:         get(10),
		ProcessingID:      get(11),
		Version:           get(12),
		SequenceNumber:    get(13),
		AcceptAckType:     strings.ToUpper(get(15)),
		AppAckType:        strings.ToUpper(get(16)),
		CharacterSet:      get(18),
	}
	var missing []string
	if h.MessageCode() == "" {
		missing = append(missing, "MSH-9 (message type)")
	}
	if h.ControlID == "" {
		missing = append(missing, "MSH-10 (message control ID)")
	}
	if h.VersionID() == "" {
		missing = append(missing, "MSH-12 (version ID)")
	}
	if len(missing) > 0 {
		return h, fmt.Errorf("%w: %s", ErrMissingField, strings.Join(missing, ", "))
	}
	if n := len(h.ControlID); n > MaxControlID {
		// The ACK that refuses it echoes no more than the limit.
		h.ControlID = h.ControlID[:MaxControlID]
		return h, fmt.Errorf("%w: MSH-10 holds %d characters, at most %d", ErrFieldTooLong, n, MaxControlID)
	}
	switch h.AcceptAckType {
	case "", "AL", "NE", "ER", "SU":
	default:
		// Errors name fields, never their contents: they reach logs and ACKs.
		return h, fmt.Errorf("%w: MSH-15 (%d characters) is not AL, NE, ER or SU", ErrMissingField, len(h.AcceptAckType))
	}
	return h, nil
}

// isDelimiter reports whether c may serve as a delimiter: printable, not a
// letter or digit, not a space.
func isDelimiter(c byte) bool {
	if c <= ' ' || c >= 0x7f {
		return false
	}
	return !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z')
}

// Escape replaces the delimiters in s by HL7 escape sequences (HL7 v2.5
// §2.7) and line breaks by spaces, so that free text can stand in a field.
func Escape(s string, d Delimiters) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\r' || c == '\n':
			b.WriteByte(' ')
		case d.Escape == 0 && (c == d.Field || c == d.Component || c == d.Repetition || c == d.Subcomponent):
			// Without an escape character delimiters cannot be escaped.
			b.WriteByte(' ')
		case c == d.Field:
			b.WriteString(string(d.Escape) + "F" + string(d.Escape))
		case c == d.Component:
			b.WriteString(string(d.Escape) + "S" + string(d.Escape))
		case c == d.Subcomponent && d.Subcomponent != 0:
			b.WriteString(string(d.Escape) + "T" + string(d.Escape))
		case c == d.Repetition && d.Repetition != 0:
			b.WriteString(string(d.Escape) + "R" + string(d.Escape))
		case c == d.Escape:
			b.WriteString(string(d.Escape) + "E" + string(d.Escape))
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
