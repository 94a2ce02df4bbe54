package hl7

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Batches (HL7 v2.5 §2.10.3): a file header (FHS) optionally, a batch
// header (BHS), the messages, the batch trailer (BTS) with their count, and
// a file trailer (FTS). A router sends one as a single MLLP frame.

// BatchType is the message type a batch is stored under.
const BatchType = "BATCH"

// ErrBadBatch means a batch is not well formed: its segments out of order,
// a message in it unreadable, or its count wrong.
var ErrBadBatch = errors.New("not a well-formed HL7 batch")

// Batch is a parsed batch.
type Batch struct {
	// Header is the batch header read as a message header: BHS-3 to BHS-8
	// where MSH-3 to MSH-8 are, ControlID the batch control ID (BHS-11,
	// else that of the first message), and MessageType, ProcessingID,
	// Version and the acknowledgement types those of the first message, so
	// that an acknowledgement can be built for the batch.
	Header *Header
	// Reference is BHS-12, the batch a batch acknowledgement answers.
	Reference string
	// Messages are the batch's messages, each ending in CR.
	Messages [][]byte
	// Headers are their MSH segments, parsed.
	Headers []*Header
}

// IsBatch reports whether data starts with a file or batch header.
func IsBatch(data []byte) bool {
	return bytes.HasPrefix(data, []byte("FHS")) || bytes.HasPrefix(data, []byte("BHS"))
}

// ParseBatch reads a batch of one BHS … BTS, with or without FHS and FTS.
// Its errors wrap ErrBadBatch (or the ParseHeader error of a message) and
// name segments, counts and positions, never what the batch holds.
func ParseBatch(data []byte) (*Batch, error) { return parseBatch(data, false) }

func parseBatch(data []byte, allowEmpty bool) (*Batch, error) {
	if !IsBatch(data) {
		return nil, fmt.Errorf("%w: it starts with neither FHS nor BHS", ErrBadBatch)
	}
	segs := bytes.FieldsFunc(data, func(r rune) bool { return r == '\r' || r == '\n' })
	b := &Batch{}
	var bhs []byte
	count, trailer, cur := -1, false, -1
	for i, seg := range segs {
		name := string(seg[:min(3, len(seg))])
		switch {
		case name == "FHS" && i == 0:
		case name == "BHS" && bhs == nil && (i == 0 || i == 1 && bytes.HasPrefix(segs[0], []byte("FHS"))):
			bhs = seg
		case name == "MSH" && bhs != nil && !trailer:
			b.Messages = append(b.Messages, nil)
			cur = len(b.Messages) - 1
			b.Messages[cur] = append(append(b.Messages[cur], seg...), '\r')
		case name == "BTS" && bhs != nil && !trailer:
			trailer = true
			if len(seg) > 4 {
				v := string(seg[4:])
				if j := strings.IndexByte(v, seg[3]); j >= 0 {
					v = v[:j]
				}
				if v != "" {
					n, err := strconv.Atoi(v)
					if err != nil {
						return nil, fmt.Errorf("%w: BTS-1 (%d characters) is not a number", ErrBadBatch, len(v))
					}
					count = n
				}
			}
		case name == "FTS" && trailer && i == len(segs)-1:
		case name != "FHS" && name != "BHS" && name != "BTS" && name != "FTS" && cur >= 0 && !trailer:
			b.Messages[cur] = append(append(b.Messages[cur], seg...), '\r')
		default:
			return nil, fmt.Errorf("%w: segment %d (%s) out of place", ErrBadBatch, i+1, segmentName(name))
		}
	}
	if bhs == nil {
		return nil, fmt.Errorf("%w: no BHS segment", ErrBadBatch)
	}
	if !trailer {
		return nil, fmt.Errorf("%w: no BTS segment", ErrBadBatch)
	}
	if len(b.Messages) == 0 && !allowEmpty {
		return nil, fmt.Errorf("%w: no message in the batch", ErrBadBatch)
	}
	if count >= 0 && count != len(b.Messages) {
		return nil, fmt.Errorf("%w: BTS-1 says %d messages, the batch holds %d", ErrBadBatch, count, len(b.Messages))
	}
	for i, m := range b.Messages {
		h, err := ParseHeader(m)
		if err != nil {
			return nil, fmt.Errorf("message %d of the batch: %w", i+1, err)
		}
		b.Headers = append(b.Headers, h)
	}
	// BHS-1 and BHS-2 declare delimiters as MSH-1 and MSH-2 do.
	h, err := ParseHeader(append([]byte("MSH"), bhs[3:]...))
	if err != nil && !errors.Is(err, ErrMissingField) {
		return nil, fmt.Errorf("%w: BHS: %v", ErrBadBatch, err)
	}
	fields := strings.Split(string(bhs), string(h.Delims.Field))
	get := func(n int) string { // BHS-n is fields[n-1]
		if n-1 < len(fields) {
			return fields[n-1]
		}
		return ""
	}
	first := &fallbackHeader
	if len(b.Headers) > 0 {
		first = b.Headers[0]
	}
	h.MessageType, h.ProcessingID, h.Version = first.MessageType, first.ProcessingID, first.Version
	h.AcceptAckType, h.AppAckType, h.SequenceNumber = first.AcceptAckType, first.AppAckType, ""
	h.ControlID, b.Reference = get(11), get(12)
	if h.ControlID == "" {
		h.ControlID = first.ControlID
	}
	if h.ControlID == "" && !allowEmpty {
		return nil, fmt.Errorf("%w: no batch control ID (BHS-11) and none in its first message", ErrBadBatch)
	}
	if len(h.ControlID) > MaxControlID {
		return nil, fmt.Errorf("%w: BHS-11 holds %d characters, at most %d", ErrFieldTooLong, len(h.ControlID), MaxControlID)
	}
	b.Header = h
	return b, nil
}

// segmentName names a segment in an error when it is one of the batch's
// own (FHS, BHS, BTS, FTS, MSH); any other three letters might be the
// start of a patient's name on a broken line, and are not shown.
func segmentName(s string) string {
	switch s {
	case "FHS", "BHS", "BTS", "FTS", "MSH":
		return s
	}
	return "a segment of a message"
}

// BuildBatchAck returns the batch acknowledgement of b (HL7 v2.5
// §2.10.3.2): a BHS with the application and facility fields swapped,
// BHS-11 controlID and BHS-12 the control ID of b, the acknowledgements
// acks, and a BTS with their count.
func BuildBatchAck(b *Batch, controlID string, acks [][]byte, t time.Time) []byte {
	h := b.Header
	d := h.Delims
	f := string(d.Field)
	if t.IsZero() {
		t = time.Now()
	}
	var out []byte
	out = append(out, strings.Join([]string{"BHS", d.encodingChars(), h.ReceivingApp, h.ReceivingFacility,
		h.SendingApp, h.SendingFacility, timestamp(t, d), "", "", "", controlID, h.ControlID}, f)...)
	out = append(out, '\r')
	for _, a := range acks {
		out = append(out, bytes.TrimRight(a, "\r\n")...)
		out = append(out, '\r')
	}
	out = append(out, "BTS"+f+strconv.Itoa(len(acks))+"\r"...)
	return out
}

// BatchAckResult is what a batch acknowledgement says.
type BatchAckResult struct {
	Reference string      // BHS-12: the control ID of the batch answered
	ControlID string      // BHS-11
	Acks      []AckResult // the acknowledgements it holds
}

// Accepted reports whether no acknowledgement in it refuses or errs (HL7
// allows a batch acknowledgement to list only the messages in error).
func (r BatchAckResult) Accepted() bool {
	for _, a := range r.Acks {
		if !a.Accepted() {
			return false
		}
	}
	return true
}

// Code is the batch's answer as one code: the first code that is not an
// accept, else that of the first acknowledgement, else AA (an empty batch
// acknowledgement accepts every message).
func (r BatchAckResult) Code() AckCode {
	for _, a := range r.Acks {
		if !a.Accepted() {
			return a.Code
		}
	}
	if len(r.Acks) > 0 {
		return r.Acks[0].Code
	}
	return ApplicationAccept
}

// ParseBatchAck reads a batch acknowledgement; it may hold no
// acknowledgement at all.
func ParseBatchAck(data []byte) (BatchAckResult, error) {
	b, err := parseBatch(data, true)
	if err != nil {
		return BatchAckResult{}, err
	}
	r := BatchAckResult{Reference: b.Reference, ControlID: b.Header.ControlID}
	for i, m := range b.Messages {
		a, err := ParseAck(m)
		if err != nil {
			return BatchAckResult{}, fmt.Errorf("message %d of the batch acknowledgement: %w", i+1, err)
		}
		r.Acks = append(r.Acks, a)
	}
	return r, nil
}
