package hl7

import (
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"
)

// AckCode is MSA-1, the acknowledgement code (HL7 table 0008).
type AckCode string

// Acknowledgement codes. The C codes answer in enhanced mode (accept
// acknowledgements), the A codes in original mode (HL7 v2.5 §2.9).
const (
	ApplicationAccept AckCode = "AA"
	ApplicationError  AckCode = "AE"
	ApplicationReject AckCode = "AR"
	CommitAccept      AckCode = "CA"
	CommitError       AckCode = "CE"
	CommitReject      AckCode = "CR"
)

// AcceptCode returns the original-mode counterpart of commit code c (AA,
// AE or AR for CA, CE or CR) when the sender uses original mode, and c
// otherwise: for receivers whose senders take no other answer in original
// mode.
func (h *Header) AcceptCode(c AckCode) AckCode {
	if !h.OriginalMode() {
		return c
	}
	switch c {
	case CommitAccept:
		return ApplicationAccept
	case CommitError:
		return ApplicationError
	case CommitReject:
		return ApplicationReject
	}
	return c
}

// AckWanted reports whether an accept acknowledgement with code c is to be
// sent, honouring MSH-15 (HL7 table 0155): AL always, NE never, ER only on
// error or reject, SU only on success. An empty MSH-15 means original mode,
// which always answers. Acknowledgements are never acknowledged.
func (h *Header) AckWanted(c AckCode) bool {
	if h.IsAck() {
		return false
	}
	ok := c == CommitAccept || c == ApplicationAccept
	switch h.AcceptAckType {
	case "NE":
		return false
	case "ER":
		return !ok
	case "SU":
		return ok
	}
	return true
}

// HL7 error codes (HL7 table 0357) used in ERR-3.
const (
	ErrSegmentSequence   = "100"
	ErrRequiredField     = "101"
	ErrDataType          = "102"
	ErrUnsupportedType   = "200"
	ErrApplicationIntern = "207"
)

var errorCodeText = map[string]string{
	ErrSegmentSequence:   "Segment sequence error",
	ErrRequiredField:     "Required field missing",
	ErrDataType:          "Data type error",
	ErrUnsupportedType:   "Unsupported message type",
	ErrApplicationIntern: "Application internal error",
}

// Ack describes an acknowledgement to build for a request header.
type Ack struct {
	Code      AckCode   // MSA-1; required
	ControlID string    // MSH-10 of the acknowledgement; required, see IDGen
	Time      time.Time // MSH-7
	// Text is the reason given with an error or reject: in an ERR segment
	// from v2.5 on, in MSA-3 before. It must hold no patient data.
	Text string
	// ErrorCode is ERR-3.1 from HL7 table 0357 (default 207).
	ErrorCode string
}

// fallbackHeader addresses acknowledgements of input whose MSH could not be
// read at all.
var fallbackHeader = Header{Delims: DefaultDelimiters, ProcessingID: "P", Version: "2.3", MessageType: "ACK"}

// BuildAck returns the acknowledgement of the message with header req (nil
// when the MSH was unreadable) as CR-terminated segments, using the
// request's delimiters. MSH-3/4 and MSH-5/6 are swapped, MSH-11, MSH-12 and
// MSH-18 copied, MSH-9 is ACK^event^ACK from v2.4 on and plain ACK before,
// and MSA-2 is the request's control ID.
func BuildAck(req *Header, a Ack) []byte {
	if req == nil {
		req = &fallbackHeader
	}
	d := req.Delims
	f := string(d.Field)
	var b strings.Builder
	b.Grow(256)
	msgType := "ACK"
	if req.VersionAtLeast(2, 4) {
		msgType = "ACK" + string(d.Component) + req.TriggerEvent() + string(d.Component) + "ACK"
	}
	ts := a.Time
	if ts.IsZero() {
		ts = time.Now()
	}
	procID, version := req.ProcessingID, req.Version
	if procID == "" {
		procID = fallbackHeader.ProcessingID
	}
	if req.VersionID() == "" {
		version = fallbackHeader.Version
	}
	msh := []string{"MSH", d.encodingChars(), req.ReceivingApp, req.ReceivingFacility,
		req.SendingApp, req.SendingFacility, timestamp(ts, d), "",
		msgType, a.ControlID, procID, version}
	if req.CharacterSet != "" {
		msh = append(msh, "", "", "", "", "", req.CharacterSet)
	}
	b.WriteString(strings.Join(msh, f))
	b.WriteByte('\r')

	failed := a.Code != CommitAccept && a.Code != ApplicationAccept
	useERR := failed && req.VersionAtLeast(2, 5)
	b.WriteString("MSA" + f + string(a.Code) + f + req.ControlID)
	if failed && !useERR && a.Text != "" {
		b.WriteString(f + Escape(a.Text, d))
	}
	b.WriteByte('\r')
	if useERR {
		code := a.ErrorCode
		if code == "" {
			code = ErrApplicationIntern
		}
		c := string(d.Component)
		severity := "E"
		// ERR-1 and ERR-2 empty, ERR-3 code^text^HL70357, ERR-4 severity,
		// ERR-8 user message.
		b.WriteString("ERR" + f + f + f + code + c + errorCodeText[code] + c + "HL70357" + f + severity +
			f + f + f + f + Escape(a.Text, d))
		b.WriteByte('\r')
	}
	return []byte(b.String())
}

// timestamp formats t as an HL7 TS (YYYYMMDDHHMMSS.SSS+ZZZZ), leaving out the
// fraction or the offset where '.', '+' or '-' serve as delimiters.
func timestamp(t time.Time, d Delimiters) string {
	uses := func(c byte) bool {
		return c == d.Field || c == d.Component || c == d.Repetition || c == d.Escape || c == d.Subcomponent || c == d.Truncation
	}
	layout := "20060102150405"
	if !uses('.') {
		layout += ".000"
	}
	if !uses('+') && !uses('-') {
		layout += "-0700"
	}
	return t.Format(layout)
}

// IDGen hands out control IDs for generated messages that are unique across
// restarts: a prefix, the start time in base 36 and a counter. The zero
// value is not usable; call NewIDGen. It is safe for concurrent use.
type IDGen struct {
	mu     sync.Mutex
	prefix string
	n      uint64
}

// NewIDGen returns a generator whose IDs start with prefix (at most 4
// characters, so that IDs fit the 20 characters of MSH-10).
func NewIDGen(prefix string, start time.Time) *IDGen {
	if len(prefix) > 4 {
		prefix = prefix[:4]
	}
	return &IDGen{prefix: prefix + strconv.FormatInt(start.UnixMilli(), 36)}
}

// Next returns a fresh control ID.
func (g *IDGen) Next() string {
	g.mu.Lock()
	g.n++
	n := g.n
	g.mu.Unlock()
	return g.prefix + strconv.FormatUint(n, 36)
}

// AckResult is what an acknowledgement says.
type AckResult struct {
	Header    *Header
	Code      AckCode // MSA-1
	ControlID string  // MSA-2: the control ID of the message acknowledged
	Text      string  // MSA-3, if any
}

// Accepted reports whether the code is CA or AA.
func (r AckResult) Accepted() bool { return r.Code == CommitAccept || r.Code == ApplicationAccept }

// ErrNotAck means a message is not an acknowledgement with an MSA segment.
var ErrNotAck = errors.New("not an acknowledgement (no MSA segment)")

// ParseAck reads the MSH and MSA segments of an acknowledgement.
func ParseAck(msg []byte) (AckResult, error) {
	h, err := ParseHeader(msg)
	if err != nil {
		return AckResult{}, err
	}
	f := string(h.Delims.Field)
	for _, seg := range strings.FieldsFunc(string(msg), func(r rune) bool { return r == '\r' || r == '\n' }) {
		rest, ok := strings.CutPrefix(seg, "MSA"+f)
		if !ok {
			continue
		}
		fields := strings.Split(rest, f)
		r := AckResult{Header: h, Code: AckCode(fields[0])}
		if len(fields) > 1 {
			r.ControlID = fields[1]
		}
		if len(fields) > 2 {
			r.Text = fields[2]
		}
		return r, nil
	}
	return AckResult{}, ErrNotAck
}
