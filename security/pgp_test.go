package security

import (
	"bytes"
	"crypto"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/internal/corpus"
)

var now = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)

// testKeys are generated once per test binary: hospital and lab, as in the
// draft's §5 example, and a third party.
var (
	keysOnce                sync.Once
	hospital, lab, stranger *openpgp.Entity
	keysErr                 error
)

func pgpKeys(t testing.TB) {
	t.Helper()
	keysOnce.Do(func() {
		for _, k := range []struct {
			dst         **openpgp.Entity
			name, email string
		}{{&hospital, "General Hospital", "edi@hospital.test"}, {&lab, "Tucker Lab", "lab@partner.test"},
			{&stranger, "Someone Else", "x@elsewhere.test"}} {
			*k.dst, keysErr = GeneratePGPKey(PGPKeyOptions{Name: k.name, Email: k.email, Now: now.Add(-time.Hour)})
			if keysErr != nil {
				return
			}
		}
	})
	if keysErr != nil {
		t.Fatal(keysErr)
	}
}

// labKeys are the keys the lab opens mail with: its own, and the public
// keys of its partners (the hospital and the stranger).
func labKeys() PGPKeys {
	return PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{hospital, stranger}}
}

func loadCorpus(t testing.TB) [][]byte {
	t.Helper()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

func TestEDIRoundTrip(t *testing.T) {
	for i, m := range loadCorpus(t) {
		for _, ct := range []string{TypeEDIHL7, TypeXEDIHL7} {
			e, err := EncodeEDI(m, EDIOptions{ContentType: ct})
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(e, []byte("MSH|")) || !bytes.Equal(e, Canonical(e)) {
				t.Fatalf("message %d: entity not base64 or not canonical: %q", i, e[:80])
			}
			got, gotCT, err := DecodeEDI(e, Accept{})
			if err != nil || gotCT != ct || !bytes.Equal(got, m) {
				t.Fatalf("message %d: DecodeEDI = %q, %s, %v", i, got, gotCT, err)
			}
		}
	}
}

func TestDecodeEDIContentTypes(t *testing.T) {
	entity := func(ct string) []byte {
		return []byte("Content-Type: " + ct + "\r\nContent-Transfer-Encoding: base64\r\n\r\nTVNIfF4=\r\n")
	}
	tests := []struct {
		ct      string
		accept  Accept
		wantErr error
	}{
		{"application/edi-hl7", Accept{}, nil},
		{"Application/X-EDI-HL7", Accept{}, nil},
		{"application/edi-consent", Accept{}, ErrContentType},
		{"application/edi-consent", Accept{Consent: true}, nil},
		{"text/plain", Accept{}, ErrContentType},
		{"application/edi-x12", Accept{Consent: true}, ErrContentType},
	}
	for _, tt := range tests {
		p, _, err := DecodeEDI(entity(tt.ct), tt.accept)
		if !errors.Is(err, tt.wantErr) || err == nil && string(p) != "MSH|^" {
			t.Errorf("DecodeEDI(%s, %+v) = %q, %v; want %v", tt.ct, tt.accept, p, err, tt.wantErr)
		}
	}
}

// seal wraps an HL7 message as hl7mail sends it: MIME-EDI, signed by
// signer, encrypted to lab.
func seal(t testing.TB, payload []byte, signer *openpgp.Entity) ([]byte, MIC) {
	t.Helper()
	e, err := EncodeEDI(payload, EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	signed, mic, err := PGPSign(e, signer, now)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := PGPEncrypt(signed, []*openpgp.Entity{lab}, now)
	if err != nil {
		t.Fatal(err)
	}
	return mail(enc), mic
}

// mail puts RFC 5322 headers before an entity.
func mail(entity []byte) []byte {
	return append([]byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nSubject: HL7\r\nMIME-Version: 1.0\r\n"), entity...)
}

func TestPGPRoundTripCorpus(t *testing.T) {
	pgpKeys(t)
	for i, m := range loadCorpus(t) {
		sealed, mic := seal(t, m, hospital)
		if bytes.Contains(sealed, []byte("MSH|")) || bytes.Contains(sealed, []byte("PID|")) {
			t.Fatalf("message %d: HL7 text visible in the sealed mail", i)
		}
		o, err := PGPOpen(sealed, labKeys(), hospital, now)
		if err != nil {
			t.Fatalf("message %d: PGPOpen: %v", i, err)
		}
		got, _, err := DecodeEDI(o.Entity, Accept{})
		if err != nil || !bytes.Equal(got, m) {
			t.Fatalf("message %d: payload %q, %v", i, got, err)
		}
		if !o.MIC.Equal(mic) || o.Signer != Fingerprint(hospital) || !o.Encrypted || o.Combined {
			t.Fatalf("message %d: Opened = %+v, sign-time MIC %s", i, o, mic)
		}
	}
}

func TestPGPOpenRejects(t *testing.T) {
	pgpKeys(t)
	payload := []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|7|P|2.3\rPID|1||123\r")
	edi, _ := EncodeEDI(payload, EDIOptions{})
	encryptTo := func(entity []byte, to *openpgp.Entity) []byte {
		enc, err := PGPEncrypt(entity, []*openpgp.Entity{to}, now)
		if err != nil {
			t.Fatal(err)
		}
		return mail(enc)
	}
	signedBy := func(e *openpgp.Entity) []byte { return signedAt(t, edi, e, now) }
	tamper := func() []byte {
		s := signedBy(hospital)
		// Flip one byte of the base64 payload inside the signed part.
		i := bytes.Index(s, []byte("\r\n\r\nTVNI")) + 6
		s[i] ^= 0x01
		return s
	}
	micalgMismatch := func() []byte {
		return bytes.Replace(signedBy(hospital), []byte("micalg=pgp-sha256"), []byte("micalg=pgp-sha512"), 1)
	}
	expiring, err := GeneratePGPKey(PGPKeyOptions{Name: "Old", Email: "old@partner.test", Lifetime: time.Hour, Now: now.Add(-2 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		mail     []byte
		expected *openpgp.Entity
		keys     PGPKeys
		want     error
	}{
		{"tampered payload", encryptTo(tamper(), lab), hospital, labKeys(), ErrBadSignature},
		{"signed by a stranger", encryptTo(signedBy(stranger), lab), hospital, PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{hospital}}, ErrUnknownSigner},
		{"signed by another partner", encryptTo(signedBy(stranger), lab), hospital, labKeys(), ErrWrongSigner},
		{"unsigned", encryptTo(edi, lab), hospital, labKeys(), ErrUnsigned},
		{"encrypted to someone else", encryptTo(signedBy(hospital), stranger), hospital, labKeys(), ErrNotForUs},
		{"signed, not encrypted", mail(signedBy(hospital)), hospital, labKeys(), ErrNotEncrypted},
		{"plain MIME-EDI", mail(edi), hospital, labKeys(), ErrNotEncrypted},
		{"micalg differs from signature", encryptTo(micalgMismatch(), lab), hospital, labKeys(), ErrMICAlgorithm},
		{"expired signer key", encryptTo(signedAt(t, edi, expiring, now.Add(-90*time.Minute)), lab), expiring, PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{expiring}}, ErrExpired},
		{"garbage", []byte("Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=x\r\n\r\n--x\r\n\r\nVersion: 1\r\n--x\r\n\r\nnot armor\r\n--x--\r\n"), hospital, labKeys(), ErrMalformed},
		{"no closing delimiter", []byte("Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=x\r\n\r\n--x\r\n\r\nVersion: 1\r\n"), hospital, labKeys(), ErrMalformed},
	}
	for _, tt := range tests {
		o, err := PGPOpen(tt.mail, tt.keys, tt.expected, now)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: PGPOpen = %+v, %v; want %v", tt.name, o, err, tt.want)
		}
	}
}

func signedAt(t *testing.T, entity []byte, e *openpgp.Entity, at time.Time) []byte {
	t.Helper()
	s, _, err := PGPSign(entity, e, at)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPGPVerifyLineEnds: a signed part whose CRLFs became LF in transit
// (as some stores keep mail) still verifies: verification canonicalizes.
func TestPGPVerifyLineEnds(t *testing.T) {
	pgpKeys(t)
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A\rPID|1\r"), EDIOptions{})
	signed, mic, err := PGPSign(edi, hospital, now)
	if err != nil {
		t.Fatal(err)
	}
	lf := bytes.ReplaceAll(signed, []byte("\r\n"), []byte("\n"))
	o, err := pgpVerify(lf, labKeys(), openpgp.EntityList{hospital}, now)
	if err != nil || !o.MIC.Equal(mic) {
		t.Errorf("pgpVerify(LF line ends) = %+v, %v; want MIC %s", o, err, mic)
	}
}

func TestMultipartParts(t *testing.T) {
	tests := []struct {
		body    string
		want    []string
		wantErr bool
	}{
		{"--b\r\nA\r\n--b\r\nB\r\n--b--\r\n", []string{"A", "B"}, false},
		{"preamble\r\n--b\r\nA\r\n--b \t\r\nB\r\n--b--", []string{"A", "B"}, false},
		{"--b\nA\n--b\nB\n--b--\n", []string{"A", "B"}, false},
		{"--b\r\nA --b inside\r\n--bb\r\n--b\r\nB\r\n--b--\r\nepilogue", []string{"A --b inside\r\n--bb", "B"}, false},
		{"--b\r\n\r\n--b--\r\n", []string{""}, false},
		{"--b\r\nA\r\n", nil, true},
		{"no delimiters", nil, true},
	}
	for _, tt := range tests {
		got, err := multipartParts([]byte(tt.body), "b")
		if (err != nil) != tt.wantErr || len(got) != len(tt.want) {
			t.Errorf("multipartParts(%q) = %q, %v", tt.body, got, err)
			continue
		}
		for i := range got {
			if string(got[i]) != tt.want[i] {
				t.Errorf("multipartParts(%q)[%d] = %q, want %q", tt.body, i, got[i], tt.want[i])
			}
		}
	}
}

func TestMIC(t *testing.T) {
	tests := []struct {
		in      string
		want    crypto.Hash
		wantErr error
	}{
		{"p6E0R34zzXhBQUNRnh+Q4A1dW7c3l9i/7TTWxX0nhtA=, sha-256", crypto.SHA256, nil},
		{"p6E0R34zzXhBQUNRnh+Q4A1dW7c3l9i/7TTWxX0nhtA=,SHA256", crypto.SHA256, nil},
		{"DNNTxw7bBJAl+R+W1x6dL8tYufg=, sha1", crypto.SHA1, nil},
		{"DNNTxw7bBJAl+R+W1x6dL8tYufg=, SHA-1", crypto.SHA1, nil},
		{"DNNTxw7bBJAl+R+W1x6dL8tYufg=, md5", 0, ErrWeakAlgorithm},
		{"DNNTxw7bBJAl+R+W1x6dL8tYufg=, sha-256", 0, ErrMalformed},
		{"no algorithm", 0, ErrMalformed},
		{"!!!, sha-256", 0, ErrMalformed},
	}
	for _, tt := range tests {
		m, err := ParseMIC(tt.in)
		if !errors.Is(err, tt.wantErr) || m.Hash != tt.want {
			t.Errorf("ParseMIC(%q) = %+v, %v; want %v, %v", tt.in, m, err, tt.want, tt.wantErr)
		}
		if err == nil {
			back, _ := ParseMIC(m.String())
			if !back.Equal(m) {
				t.Errorf("ParseMIC(%q).String() = %q does not read back", tt.in, m.String())
			}
		}
	}
	if got := ComputeMIC([]byte("a\nb\r\n")); !got.Equal(ComputeMIC([]byte("a\r\nb\n"))) {
		t.Error("ComputeMIC differs for the same canonical form")
	}
	if !strings.HasSuffix(ComputeMIC(nil).String(), ", sha-256") {
		t.Error("MIC not written with sha-256")
	}
}

func FuzzMultipartParts(f *testing.F) {
	f.Add([]byte("--b\r\nA\r\n--b\r\nB\r\n--b--\r\n"))
	f.Add([]byte("--b\nA\n--b--"))
	f.Fuzz(func(t *testing.T, body []byte) {
		parts, err := multipartParts(body, "b")
		if err != nil {
			return
		}
		total := 0
		for _, p := range parts {
			total += len(p)
		}
		if total > len(body) {
			t.Fatalf("parts longer than the body")
		}
	})
}

func FuzzPGPOpen(f *testing.F) {
	pgpKeys(f)
	sealed, _ := seal(f, []byte("MSH|^~\\&|A||||||ORU^R01|1|P|2.3\r"), hospital)
	f.Add(sealed)
	f.Add([]byte("Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=x\r\n\r\n--x\r\n\r\nVersion: 1\r\n--x\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nwcBM\r\n-----END PGP MESSAGE-----\r\n--x--\r\n"))
	f.Fuzz(func(t *testing.T, m []byte) {
		o, err := PGPOpen(m, labKeys(), hospital, now)
		if err == nil && o.Signer != Fingerprint(hospital) {
			t.Fatalf("opened with signer %s", o.Signer)
		}
	})
}
