package security

import (
	"bytes"
	"errors"
	"testing"
)

// TestRead: one pass tells what an opened entity carries and reads it: an
// HL7 message, a receipt, a bundle with and without its response; what is
// none of these is KindUnknown without an error, and a MIME-EDI type the
// partner may not send is an error.
func TestRead(t *testing.T) {
	const hl7 = "MSH|^~\\&|A|B|C|D|20261201||ORU^R01|1|P|2.5\rPID|1\r"
	edi, err := EncodeEDI([]byte(hl7), EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mdn, err := ReceiptFrom("lab@partner.test", "<m1@h>", Disposition{Type: Processed}).Entity()
	if err != nil {
		t.Fatal(err)
	}
	// An application/edi-consent entity, as a partner's software writes it.
	consent := bytes.Replace(edi, []byte(TypeEDIHL7), []byte(TypeEDIConsent), 1)
	for _, tc := range []struct {
		name    string
		entity  []byte
		kind    Kind
		payload string
		mdn     bool
	}{
		{"hl7", edi, KindHL7, hl7, false},
		{"mdn", mdn, KindMDN, "", true},
		{"bundle", BuildBundle(edi, mdn), KindBundle, hl7, true},
		{"text", []byte("Content-Type: text/plain\r\n\r\nhello"), KindUnknown, "", false},
		{"no header", []byte("\x00\x01 not a mail"), KindUnknown, "", false},
	} {
		c, err := Read(tc.entity, Accept{})
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if c.Kind != tc.kind || string(c.Payload) != tc.payload || (c.MDN != nil) != tc.mdn ||
			(c.Bundle != nil) != (tc.kind == KindBundle) {
			t.Errorf("%s: kind %s, %d payload bytes, MDN %v, bundle %v", tc.name, c.Kind, len(c.Payload), c.MDN != nil, c.Bundle != nil)
		}
		if tc.mdn && c.MDN.OriginalMessageID != "<m1@h>" {
			t.Errorf("%s: receipt for %q", tc.name, c.MDN.OriginalMessageID)
		}
	}
	if _, err := Read(consent, Accept{}); !errors.Is(err, ErrContentType) {
		t.Errorf("edi-consent not accepted: %v, want ErrContentType", err)
	}
	if c, err := Read(consent, Accept{Consent: true}); err != nil || string(c.Payload) != hl7 {
		t.Errorf("edi-consent accepted: %v", err)
	}
}

// canonicalByByte is the plain reading of RFC 2049 §4 that Canonical must
// agree with: each bare CR, bare LF and CRLF becomes CRLF.
func canonicalByByte(entity []byte) []byte {
	var b bytes.Buffer
	for i := 0; i < len(entity); i++ {
		switch c := entity[i]; c {
		case '\r':
			b.WriteString("\r\n")
			if i+1 < len(entity) && entity[i+1] == '\n' {
				i++
			}
		case '\n':
			b.WriteString("\r\n")
		default:
			b.WriteByte(c)
		}
	}
	return b.Bytes()
}

func FuzzCanonical(f *testing.F) {
	for _, s := range []string{"", "a", "\r", "\n", "\r\n", "\n\r", "\r\r\n", "a\rb\nc\r\nd", "MSH|^~\\&|A\rPID|1\r", "x\r\n\r\n\r"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if got, want := Canonical(in), canonicalByByte(in); !bytes.Equal(got, want) {
			t.Fatalf("Canonical(%q) = %q, want %q", in, got, want)
		}
	})
}
