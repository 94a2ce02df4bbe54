package hl7

import (
	"errors"
	"strings"
	"testing"
	"time"
)

const oru = "MSH|^~\\&|SIMHOSP|SFAC|RAPP|RFAC|20200501140643||ORU^R01|1|T|2.3|||AL||44|ASCII\rPID|1|2590157853\rOBX|1|NM|x||98.00\r"

func TestParseHeader(t *testing.T) {
	tests := []struct {
		in      string
		wantErr error
		check   func(*Header) string
	}{
		{oru, nil, func(h *Header) string {
			if h.SendingApp != "SIMHOSP" || h.ReceivingFacility != "RFAC" || h.ControlID != "1" ||
				h.MessageCode() != "ORU" || h.TriggerEvent() != "R01" || h.VersionID() != "2.3" ||
				h.AcceptAckType != "AL" || h.CharacterSet != "ASCII" || h.ProcessingID != "T" {
				return "fields"
			}
			return ""
		}},
		// Other delimiters than |^~\&, LF segment ends, lower-case MSH-15.
		{"MSH#$*@%#A#B#C#D#202001##ADT$A01$ADT_A01#c9#P#2.5$$1###ne\nEVN#A01\n", nil, func(h *Header) string {
			if h.Delims.Field != '#' || h.Delims.Component != '$' || h.Delims.Repetition != '*' ||
				h.Delims.Escape != '@' || h.Delims.Subcomponent != '%' || h.MessageCode() != "ADT" ||
				h.TriggerEvent() != "A01" || h.ControlID != "c9" || h.VersionID() != "2.5" || h.AcceptAckType != "NE" {
				return "fields"
			}
			return ""
		}},
		// v2.7 truncation character.
		{"MSH|^~\\&#|A||||||ADT^A04|7|P|2.7\r", nil, func(h *Header) string {
			if h.Delims.Truncation != '#' || h.Delims.encodingChars() != "^~\\&#" {
				return "truncation"
			}
			return ""
		}},
		// Only MSH-9..12 given, everything else empty.
		{"MSH|^~\\&|||||||ACK|2|P|2.3", nil, func(h *Header) string {
			if !h.IsAck() || !h.OriginalMode() {
				return "ack/original mode"
			}
			return ""
		}},
		{"", ErrNotHL7, nil},
		{"PID|1\r", ErrNotHL7, nil},
		{"MSH", ErrNotHL7, nil},
		{" MSH|^~\\&|", ErrNotHL7, nil},
		{"MSHA^~\\&|", ErrBadDelimiters, nil},
		{"MSH|^^\\&|A", ErrBadDelimiters, nil},
		{"MSH||A", ErrBadDelimiters, nil},
		{"MSH|^~\\&x&|A", ErrBadDelimiters, nil},
		{"MSH|^~a&|A", ErrBadDelimiters, nil},
		{"MSH|^~\\&|A|B|C|D|2020||ORU^R01||P|2.3\r", ErrMissingField, nil},
		{"MSH|^~\\&|A|B|C|D|2020||^R01|5|P|2.3\r", ErrMissingField, nil},
		{"MSH|^~\\&|A|B|C|D|2020||ORU^R01|5|P|\r", ErrMissingField, nil},
		{"MSH|^~\\&|A|B|C|D|2020||ORU^R01|5|P|2.3|||XX\r", ErrMissingField, nil},
	}
	for _, tt := range tests {
		h, err := ParseHeader([]byte(tt.in))
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("ParseHeader(%q) error = %v, want %v", tt.in, err, tt.wantErr)
			continue
		}
		if tt.check != nil {
			if what := tt.check(h); what != "" {
				t.Errorf("ParseHeader(%q) = %+v: wrong %s", tt.in, h, what)
			}
		}
	}
}

func TestParseHeaderPartial(t *testing.T) {
	h, err := ParseHeader([]byte("MSH|^~\\&|LAB|F1|HIS|F2|2020||ORU^R01||P|2.4\r"))
	if !errors.Is(err, ErrMissingField) || h == nil || h.SendingApp != "LAB" {
		t.Fatalf("ParseHeader = %+v, %v; want partial header and ErrMissingField", h, err)
	}
	ack := string(BuildAck(h, Ack{Code: CommitReject, ControlID: "X1", Text: err.Error()}))
	if !strings.HasPrefix(ack, "MSH|^~\\&|HIS|F2|LAB|F1|") || !strings.Contains(ack, "\rMSA|CR||") {
		t.Errorf("BuildAck(partial) = %q", ack)
	}
}

func segments(ack []byte) [][]string {
	var out [][]string
	for _, s := range strings.Split(strings.TrimSuffix(string(ack), "\r"), "\r") {
		out = append(out, strings.Split(s, "|"))
	}
	return out
}

func TestBuildAck(t *testing.T) {
	at := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	tests := []struct {
		req, wantType, wantMSA string
		code                   AckCode
		text                   string
		wantERR                string
	}{
		{oru, "ACK", "MSA|CA|1", CommitAccept, "", ""},
		{oru, "ACK", "MSA|CE|1|disk full", CommitError, "disk full", ""},
		{"MSH|^~\\&|A|B|C|D|2020||ADT^A01^ADT_A01|99|P|2.4|||AL\r", "ACK^A01^ACK", "MSA|CR|99|bad \\F\\ text \\S\\ here", CommitReject, "bad | text ^ here", ""},
		{"MSH|^~\\&|A|B|C|D|2020||ADT^A01^ADT_A01|99|P|2.5.1|||AL\r", "ACK^A01^ACK", "MSA|CE|99", CommitError, "store unavailable",
			"ERR|||207^Application internal error^HL70357|E||||store unavailable"},
		{"MSH|^~\\&|A|B|C|D|2020||ADT^A01^ADT_A01|99|P|2.5.1|||AL\r", "ACK^A01^ACK", "MSA|CA|99", CommitAccept, "", ""},
	}
	for _, tt := range tests {
		h, err := ParseHeader([]byte(tt.req))
		if err != nil {
			t.Fatal(err)
		}
		ack := BuildAck(h, Ack{Code: tt.code, ControlID: "ACK1", Time: at, Text: tt.text})
		segs := segments(ack)
		msh := segs[0]
		if msh[2] != h.ReceivingApp || msh[3] != h.ReceivingFacility || msh[4] != h.SendingApp || msh[5] != h.SendingFacility {
			t.Errorf("BuildAck(%q) MSH-3..6 = %v, want swapped", tt.req, msh[2:6])
		}
		if msh[8] != tt.wantType || msh[9] != "ACK1" || msh[10] != h.ProcessingID || msh[11] != h.Version {
			t.Errorf("BuildAck(%q) MSH-9..12 = %v", tt.req, msh[8:12])
		}
		if msh[6] != "20261123100000.000+0000" {
			t.Errorf("BuildAck MSH-7 = %q", msh[6])
		}
		if got := strings.Join(segs[1], "|"); got != tt.wantMSA {
			t.Errorf("BuildAck(%q) MSA = %q, want %q", tt.req, got, tt.wantMSA)
		}
		gotERR := ""
		if len(segs) > 2 {
			gotERR = strings.Join(segs[2], "|")
		}
		if gotERR != tt.wantERR {
			t.Errorf("BuildAck(%q) ERR = %q, want %q", tt.req, gotERR, tt.wantERR)
		}
		if h.CharacterSet != "" && (len(msh) != 18 || msh[17] != h.CharacterSet) {
			t.Errorf("BuildAck(%q) MSH-18 not copied: %q", tt.req, msh)
		}
	}
}

func TestBuildAckKeepsDelimiters(t *testing.T) {
	h, err := ParseHeader([]byte("MSH#$*@%#A#B#C#D#202001##ADT$A01#c9#P#2.3\r"))
	if err != nil {
		t.Fatal(err)
	}
	ack := string(BuildAck(h, Ack{Code: CommitReject, ControlID: "z", Text: "a#b$c"}))
	want := "MSA#CR#c9#a@F@b@S@c\r"
	if !strings.HasPrefix(ack, "MSH#$*@%#C#D#A#B#") || !strings.HasSuffix(ack, want) {
		t.Errorf("BuildAck = %q, want other delimiters kept and %q", ack, want)
	}
	back, err := ParseHeader([]byte(ack))
	if err != nil || back.Delims != h.Delims || !back.IsAck() || back.ControlID != "z" {
		t.Errorf("ParseHeader(BuildAck) = %+v, %v", back, err)
	}
}

func TestBuildAckUnreadable(t *testing.T) {
	ack := BuildAck(nil, Ack{Code: CommitReject, ControlID: "n1", Text: "not an HL7 v2 message"})
	h, err := ParseHeader(ack)
	if err != nil || !h.IsAck() {
		t.Fatalf("ParseHeader(BuildAck(nil)) = %v, %v", h, err)
	}
	if !strings.Contains(string(ack), "\rMSA|CR||not an HL7 v2 message\r") {
		t.Errorf("BuildAck(nil) = %q", ack)
	}
}

func TestAckPolicy(t *testing.T) {
	tests := []struct {
		msh15, msh16, msh9 string
		code               AckCode
		want               bool
		wantCode           AckCode
	}{
		{"AL", "", "ORU^R01", CommitAccept, true, CommitAccept},
		{"AL", "", "ORU^R01", CommitError, true, CommitError},
		{"NE", "AL", "ORU^R01", CommitAccept, false, CommitAccept},
		{"NE", "", "ORU^R01", CommitReject, false, CommitReject},
		{"ER", "", "ORU^R01", CommitAccept, false, CommitAccept},
		{"ER", "", "ORU^R01", CommitError, true, CommitError},
		{"SU", "", "ORU^R01", CommitAccept, true, CommitAccept},
		{"SU", "", "ORU^R01", CommitReject, false, CommitReject},
		{"", "", "ORU^R01", CommitAccept, true, ApplicationAccept},
		{"", "", "ORU^R01", CommitError, true, ApplicationError},
		{"", "", "ORU^R01", CommitReject, true, ApplicationReject},
		{"", "AL", "ORU^R01", CommitAccept, true, CommitAccept},
		{"AL", "", "ACK^R01", CommitAccept, false, CommitAccept},
		{"", "", "ACK", CommitReject, false, ApplicationReject},
	}
	for _, tt := range tests {
		msg := "MSH|^~\\&|A|B|C|D|2020||" + tt.msh9 + "|1|P|2.3|||" + tt.msh15 + "|" + tt.msh16 + "\r"
		h, err := ParseHeader([]byte(msg))
		if err != nil {
			t.Fatal(err)
		}
		code := h.AcceptCode(tt.code)
		if code != tt.wantCode {
			t.Errorf("AcceptCode(%s) for MSH-15=%q MSH-16=%q = %s, want %s", tt.code, tt.msh15, tt.msh16, code, tt.wantCode)
		}
		if got := h.AckWanted(code); got != tt.want {
			t.Errorf("AckWanted(%s) for MSH-15=%q MSH-9=%q = %v, want %v", code, tt.msh15, tt.msh9, got, tt.want)
		}
	}
}

func TestIDGen(t *testing.T) {
	start := time.Now()
	a, b := NewIDGen("HM", start), NewIDGen("HM", start.Add(time.Millisecond))
	seen := map[string]bool{}
	for i := 0; i < 10000; i++ {
		for _, id := range []string{a.Next(), b.Next()} {
			if seen[id] {
				t.Fatalf("IDGen repeated %q", id)
			}
			if len(id) > 20 {
				t.Fatalf("IDGen id %q longer than 20", id)
			}
			seen[id] = true
		}
	}
}

func FuzzParseHeader(f *testing.F) {
	f.Add([]byte(oru))
	f.Add([]byte("MSH#$*@%#A#B#C#D#202001##ADT$A01#c9#P#2.5\n"))
	f.Add([]byte("MSH|^~\\&#|A||||||ADT^A04|7|P|2.7"))
	f.Add([]byte("MSH|"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		h, err := ParseHeader(msg)
		if h == nil {
			if err == nil {
				t.Fatal("nil header without error")
			}
			return
		}
		// Whatever was read, an acknowledgement can be built and read back
		// with the same delimiters and control ID reference.
		ack := BuildAck(h, Ack{Code: CommitReject, ControlID: "F1", Text: "reason"})
		back, err := ParseHeader(ack)
		if err != nil {
			t.Fatalf("ParseHeader(BuildAck(%q)) = %v; ack %q", msg, err, ack)
		}
		if back.Delims.Field != h.Delims.Field || back.Delims.Component != h.Delims.Component {
			t.Fatalf("delimiters changed: %+v -> %+v", h.Delims, back.Delims)
		}
	})
}

func TestSplit(t *testing.T) {
	a := "MSH|^~\\&|A||||||ORU^R01|1|P|2.3\rPID|1\r"
	b := "MSH|^~\\&|B||||||ADT^A01|2|P|2.3\rEVN|A01 \r"
	tests := []struct {
		in   string
		want []string
	}{
		{a + b, []string{a, b}},
		{strings.ReplaceAll(a+b, "\r", "\n"), []string{a, b}},
		{strings.ReplaceAll(a, "\r", "\r\n") + "\r\n\r\n" + strings.ReplaceAll(b, "\r", "\r\n"), []string{a, b}},
		{"\x0b" + a + "\x1c\r\x0b" + b + "\x1c\r", []string{a, b}},
		{"preamble\n" + a + "\n\n", []string{a}},
		{strings.TrimSuffix(a, "\r"), []string{a}},
		{"", nil},
	}
	for _, tt := range tests {
		got := Split([]byte(tt.in))
		if len(got) != len(tt.want) {
			t.Errorf("Split(%q) = %q, want %q", tt.in, got, tt.want)
			continue
		}
		for i := range got {
			if string(got[i]) != tt.want[i] {
				t.Errorf("Split(%q)[%d] = %q, want %q", tt.in, i, got[i], tt.want[i])
			}
		}
	}
}

func TestParseAck(t *testing.T) {
	tests := []struct {
		in       string
		code, id string
		text     string
		accepted bool
		wantErr  error
	}{
		{"MSH|^~\\&|A|B|C|D|2020||ACK|1|P|2.3\rMSA|CA|77\r", "CA", "77", "", true, nil},
		{"MSH|^~\\&|A|B|C|D|2020||ACK|1|P|2.3\rMSA|AR|77|no such patient\r", "AR", "77", "no such patient", false, nil},
		{"MSH#$*@%#A#B#C#D#2020##ACK#1#P#2.5\nMSA#AA#x9\nERR###207\n", "AA", "x9", "", true, nil},
		{"MSH|^~\\&|A|B|C|D|2020||ACK|1|P|2.3\r", "", "", "", false, ErrNotAck},
		{"garbage", "", "", "", false, ErrNotHL7},
	}
	for _, tt := range tests {
		r, err := ParseAck([]byte(tt.in))
		if !errors.Is(err, tt.wantErr) || string(r.Code) != tt.code || r.ControlID != tt.id || r.Text != tt.text || r.Accepted() != tt.accepted {
			t.Errorf("ParseAck(%q) = %+v, %v; want %s %s %q, %v", tt.in, r, err, tt.code, tt.id, tt.text, tt.wantErr)
		}
	}
}

// TestParseHeaderErrorsHoldNoContent: errors name fields, lengths and
// positions, never what the message holds (they reach logs and ACKs).
func TestParseHeaderErrorsHoldNoContent(t *testing.T) {
	name := "Quigglesworth^Bartholomew"
	for _, msg := range []string{
		// No CR and an MSH-1 that does not recur: the whole message would be MSH-2.
		"MSH#^~\\&|HIS|GH|LAB|TL|2026||ADT^A01|1|P|2.5PID|1||555-44-3333||" + name,
		"MSH|^~" + name + "|HIS|GH\r",
		"MSH|^~\\&|HIS|GH|LAB|TL|2026||ADT^A01|1|P|2.5|||" + name + "\rPID|1||x||" + name + "\r",
		"MSH|^~\\&|HIS|GH|LAB|TL|2026||ADT^A01|" + strings.Repeat("7", 60000) + "|P|2.5\r",
	} {
		_, err := ParseHeader([]byte(msg))
		if err == nil {
			t.Errorf("ParseHeader(%.40q…) = nil error", msg)
			continue
		}
		if strings.Contains(err.Error(), "Quigglesworth") || strings.Contains(err.Error(), "555-44") || len(err.Error()) > 200 {
			t.Errorf("ParseHeader(%.40q…) error holds content: %q", msg, err)
		}
	}
	h, err := ParseHeader([]byte("MSH|^~\\&|A|B|C|D|2026||ADT^A01|" + strings.Repeat("7", 500) + "|P|2.7\r"))
	if !errors.Is(err, ErrFieldTooLong) || h == nil || len(h.ControlID) != MaxControlID {
		t.Errorf("ParseHeader(500-character MSH-10) = %v, %v; want ErrFieldTooLong and the ID cut to %d", h, err, MaxControlID)
	}
}
