package inbound

import (
	"bytes"
	"crypto/x509"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// labSide is the lab's view: partners hospital and clinic (both PGP), and
// the keys of all three.
type labSide struct {
	opener                *Opener
	hospital, clinic, lab *openpgp.Entity
}

func newLabSide(t *testing.T) *labSide {
	t.Helper()
	cfg, err := config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(`self: {name: Tucker Lab, email: lab@partner.test, pgp_key: k}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@hospital.test, security: pgp, pgp_key: k}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: pgp, pgp_key: k}
`))
	if err != nil {
		t.Fatal(err)
	}
	gen := func(email string) *openpgp.Entity {
		e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: email, Email: email})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	l := &labSide{hospital: gen("edi@hospital.test"), clinic: gen("edi@clinic.test"), lab: gen("lab@partner.test")}
	l.opener = &Opener{Config: cfg, Keys: &security.Keyring{PGPSelf: []*openpgp.Entity{l.lab},
		PGPPartners: map[string][]*openpgp.Entity{"hospital": {l.hospital}, "clinic": {l.clinic}}}}
	return l
}

// mailFrom wraps entity as from would send it: signed by signer (unless
// nil), encrypted to the lab (unless plain), with an MDN request.
func (l *labSide) mailFrom(t *testing.T, from string, signer *openpgp.Entity, entity []byte, plain bool) ([]byte, security.MIC) {
	t.Helper()
	now := time.Now()
	mic := security.ComputeMIC(entity)
	if signer != nil {
		var err error
		if entity, mic, err = security.PGPSign(entity, signer, now); err != nil {
			t.Fatal(err)
		}
	}
	if !plain {
		var err error
		if entity, err = security.PGPEncrypt(entity, []*openpgp.Entity{l.lab}, now); err != nil {
			t.Fatal(err)
		}
	}
	to, opts := security.MDNRequest{To: from, Protocol: "pgp-signature"}.Headers()
	head := "From: " + from + "\r\nTo: lab@partner.test\r\nMessage-ID: <m1@x.test>\r\nSubject: HL7\r\n" +
		"Disposition-Notification-To: " + to + "\r\nDisposition-Notification-Options: " + opts + "\r\n"
	return append([]byte(head), entity...), mic
}

// receiver returns a Receiver for the lab with its own store and incoming
// journal (closed at the end of the test), and the journal's path.
func (l *labSide) receiver(t *testing.T) (*Receiver, string) {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "incoming.mbox")
	j, err := journal.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close(); st.Close() })
	return &Receiver{Opener: l.opener, Store: st, Journal: j, Logger: testlog.New(t, slog.LevelInfo)}, path
}

const orm = "MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|q1|P|2.3|||AL\rPID|1||123\r"

func TestOpenHL7(t *testing.T) {
	l := newLabSide(t)
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	m, mic := l.mailFrom(t, "EDI <edi@hospital.test>", l.hospital, edi, false)
	in, err := l.opener.Open(m)
	if err != nil {
		t.Fatal(err)
	}
	if in.Partner.Name != "hospital" || in.Kind != security.KindHL7 || string(in.Payload) != orm ||
		in.Header.ControlID != "q1" || !in.MIC.Equal(mic) || in.MessageID != "<m1@x.test>" ||
		in.MDNRequest == nil || in.MDNRequest.Protocol != "pgp-signature" {
		t.Errorf("Open = %+v", in)
	}
}

func TestOpenBundleAndMDN(t *testing.T) {
	l := newLabSide(t)
	mic := security.ComputeMIC([]byte("x"))
	mdn, _ := (&security.MDN{ReportingUA: "h", FinalRecipient: "edi@hospital.test", OriginalMessageID: "<out1@partner.test>",
		Disposition: security.Disposition{Type: security.Processed}, MIC: &mic}).Entity()
	resp, _ := security.EncodeEDI([]byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ACK^O01|a1|P|2.3\rMSA|AA|q1\r"), security.EDIOptions{})
	m, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, security.BuildBundle(resp, mdn), false)
	in, err := l.opener.Open(m)
	if err != nil {
		t.Fatal(err)
	}
	if in.Kind != security.KindBundle || in.MDN.OriginalMessageID != "<out1@partner.test>" || !in.MDN.MIC.Equal(mic) ||
		in.Header == nil || !in.Header.IsAck() {
		t.Errorf("Open(bundle) = %+v", in)
	}
	m, _ = l.mailFrom(t, "edi@hospital.test", l.hospital, mdn, false)
	if in, err := l.opener.Open(m); err != nil || in.Kind != security.KindMDN || in.Payload != nil {
		t.Errorf("Open(MDN) = %+v, %v", in, err)
	}
}

func TestOpenQuarantines(t *testing.T) {
	l := newLabSide(t)
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	good, _ := l.mailFrom(t, "edi@hospital.test", l.hospital, edi, false)
	stranger, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "x", Email: "x@x.test"})
	mk := func(from string, signer *openpgp.Entity, entity []byte, plain bool) []byte {
		m, _ := l.mailFrom(t, from, signer, entity, plain)
		return m
	}
	tampered := append([]byte(nil), good...)
	// A byte near the end of the armored block lies in the encrypted data.
	i := bytes.Index(tampered, []byte("-----END PGP MESSAGE-----")) - 60
	tampered[i] ^= 0x04
	tests := []struct {
		name    string
		mail    []byte
		max     int
		want    Reason
		partner bool
	}{
		{"unknown sender", mk("someone@else.test", stranger, edi, false), 0, ReasonUnknownSender, false},
		{"unknown sender, unsigned", mk("someone@else.test", nil, edi, false), 0, ReasonUnknownSender, false},
		{"no From", []byte("Subject: x\r\n\r\nbody\r\n"), 0, ReasonMalformed, false},
		{"oversize", good, 1000, ReasonOversize, false},
		{"plain MIME-EDI", mk("edi@hospital.test", nil, edi, true), 0, ReasonNotEncrypted, true},
		{"signed, not encrypted", mk("edi@hospital.test", l.hospital, edi, true), 0, ReasonNotEncrypted, true},
		{"unsigned", mk("edi@hospital.test", nil, edi, false), 0, ReasonUnsigned, true},
		{"signed by the clinic, From the hospital", mk("edi@hospital.test", l.clinic, edi, false), 0, ReasonWrongSigner, true},
		{"signed by a stranger", mk("edi@hospital.test", stranger, edi, false), 0, ReasonUnknownSigner, true},
		// Damaged ciphertext fails OpenPGP's integrity check (MDC): tampering.
		{"tampered ciphertext", tampered, 0, ReasonBadSignature, true},
		{"encrypted to someone else", mkTo(t, l, stranger, edi), 0, ReasonUndecryptable, true},
		{"not HL7", mk("edi@hospital.test", l.hospital, []byte("Content-Type: text/plain\r\n\r\nhello\r\n"), false), 0, ReasonNotHL7, true},
		{"EDI without MSH", mk("edi@hospital.test", l.hospital, mustEDI(t, "hello"), false), 0, ReasonNotHL7, true},
	}
	for _, tt := range tests {
		l.opener.MaxSize = tt.max
		in, err := l.opener.Open(tt.mail)
		var q *QuarantineError
		if !errors.As(err, &q) || q.Reason != tt.want || (q.Partner != nil) != tt.partner {
			t.Errorf("%s: Open = %+v, %v; want quarantine %s (partner known: %v)", tt.name, in, err, tt.want, tt.partner)
		}
	}
	// A gateway rewrote From: the hospital's signature says who sent it.
	l.opener.MaxSize = 0
	in, err := l.opener.Open(mk("relay@dmz.hospital.test", l.hospital, edi, false))
	if err != nil || in.Partner == nil || in.Partner.Name != "hospital" || !in.FromRewritten || in.Payload == nil {
		t.Errorf("Open(From rewritten) = %+v, %v; want the hospital's message", in, err)
	}
}

// mkTo is a mail from the hospital encrypted to another key than the lab's.
func mkTo(t *testing.T, l *labSide, to *openpgp.Entity, edi []byte) []byte {
	t.Helper()
	signed, _, _ := security.PGPSign(edi, l.hospital, time.Now())
	enc, err := security.PGPEncrypt(signed, []*openpgp.Entity{to}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("From: edi@hospital.test\r\nMessage-ID: <m2@x.test>\r\n"), enc...)
}

func mustEDI(t *testing.T, payload string) []byte {
	t.Helper()
	e, err := security.EncodeEDI([]byte(payload), security.EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func TestReasonDisposition(t *testing.T) {
	tests := []struct {
		r     Reason
		typ   string
		mod   string
		text  string
		sends bool
	}{
		{ReasonUndecryptable, security.Processed, security.ModError, "decryption-failed", true},
		{ReasonBadSignature, security.Processed, security.ModError, "integrity-check-failed", true},
		{ReasonWrongSigner, security.Processed, security.ModError, "authentication-failed", true},
		{ReasonUnsigned, security.Processed, security.ModError, "authentication-failed", true},
		{ReasonNotHL7, security.Processed, security.ModError, "unexpected-processing-error", true},
		{ReasonOversize, security.Denied, "", "message too large", true},
		{ReasonUnknownSender, "", "", "", false},
		{ReasonReplay, "", "", "", false},
	}
	for _, tt := range tests {
		d, text, sends := tt.r.Disposition()
		if d.Type != tt.typ || d.Modifier != tt.mod || text != tt.text || sends != tt.sends {
			t.Errorf("%s.Disposition() = %+v %q %v", tt.r, d, text, sends)
		}
	}
}

// TestOpenNamesTheRealFault: a PGP/MIME mail from a partner configured for
// S/MIME is "wrong-suite", not "not-encrypted"; S/MIME ciphertext altered
// on the way is "integrity" (or "undecryptable" where the key transport
// itself was hit), never "malformed"; each with its MDN modifier.
func TestOpenNamesTheRealFault(t *testing.T) {
	cfg, err := config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(`self: {name: Tucker Lab, email: lab@partner.test, pgp_key: k, smime_cert: c, smime_key: k}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: smime, smime_cert: c}
`))
	if err != nil {
		t.Fatal(err)
	}
	labKey, labCert, _ := security.GenerateCert(security.CertOptions{Name: "Lab", Email: "lab@partner.test", RSABits: 2048})
	clinicKey, clinicCert, _ := security.GenerateCert(security.CertOptions{Name: "Clinic", Email: "edi@clinic.test", RSABits: 2048})
	labPGP, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	clinicPGP, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Clinic", Email: "edi@clinic.test"})
	o := &Opener{Config: cfg, Keys: &security.Keyring{PGPSelf: []*openpgp.Entity{labPGP}, SMIMESelf: []security.SMIMEIdentity{{Cert: labCert, Key: labKey}},
		SMIMEPartners: map[string][]*x509.Certificate{"clinic": {clinicCert}}}}
	edi, _ := security.EncodeEDI([]byte(orm), security.EDIOptions{})
	head := "From: edi@clinic.test\r\nTo: lab@partner.test\r\nMessage-ID: <m2@clinic.test>\r\nSubject: HL7\r\n"
	now := time.Now()
	// PGP/MIME from the S/MIME partner.
	signed, _, _ := security.PGPSign(edi, clinicPGP, now)
	pgpMail, _ := security.PGPEncrypt(signed, []*openpgp.Entity{labPGP}, now)
	_, err = o.Open(append([]byte(head), pgpMail...))
	var q *QuarantineError
	if !errors.As(err, &q) || q.Reason != ReasonWrongSuite {
		t.Errorf("PGP mail from an S/MIME partner: %v, want %s", err, ReasonWrongSuite)
	}
	if _, text, _ := ReasonWrongSuite.Disposition(); text != "decryption-failed" {
		t.Errorf("wrong-suite MDN error %q", text)
	}
	// S/MIME, altered in the middle of the ciphertext.
	ssigned, _, _ := security.SMIMESign(edi, clinicCert, clinicKey)
	smime, _ := security.SMIMEEncrypt(ssigned, []*x509.Certificate{labCert}, security.OAEPSHA256)
	mail := append([]byte(head), smime...)
	if _, err := o.Open(mail); err != nil {
		t.Fatalf("the unaltered S/MIME mail: %v", err)
	}
	body := bytes.Index(mail, []byte("\r\n\r\n")) + 4
	for _, at := range []float64{0.5, 0.7, 0.9, 0.97} {
		bad := append([]byte(nil), mail...)
		i := body + int(float64(len(bad)-body)*at)
		for bad[i] == '\r' || bad[i] == '\n' || bad[i] == '=' {
			i++
		}
		if bad[i] == 'A' {
			bad[i] = 'B'
		} else {
			bad[i] = 'A'
		}
		_, err := o.Open(bad)
		if !errors.As(err, &q) || q.Reason != ReasonIntegrity && q.Reason != ReasonUndecryptable && q.Reason != ReasonBadSignature {
			t.Errorf("S/MIME altered at %.0f%%: %v, want integrity", at*100, err)
		}
	}
	if _, text, _ := ReasonIntegrity.Disposition(); text != "integrity-check-failed" {
		t.Errorf("integrity MDN error %q", text)
	}
}
