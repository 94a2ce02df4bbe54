package security

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"
)

type smimeParty struct {
	cert *x509.Certificate
	key  crypto.Signer
}

var (
	certsOnce                  sync.Once
	sHospital, sLab, sStranger smimeParty
	sExpired                   smimeParty
	certsErr                   error
)

// smimeCerts makes RSA-2048 test certificates once (the product's default
// is RSA-3072; 2048 keeps the tests quick).
func smimeCerts(t testing.TB) {
	t.Helper()
	certsOnce.Do(func() {
		for _, p := range []struct {
			dst         *smimeParty
			name, email string
			notBefore   time.Time
			lifetime    time.Duration
		}{
			{&sHospital, "General Hospital", "edi@hospital.test", now.Add(-time.Hour), 0},
			{&sLab, "Tucker Lab", "lab@partner.test", now.Add(-time.Hour), 0},
			{&sStranger, "Someone Else", "x@elsewhere.test", now.Add(-time.Hour), 0},
			{&sExpired, "Old Clinic", "old@clinic.test", now.Add(-48 * time.Hour), 24 * time.Hour},
		} {
			p.dst.key, p.dst.cert, certsErr = GenerateCert(CertOptions{Name: p.name, Email: p.email, RSABits: 2048,
				NotBefore: p.notBefore, Lifetime: p.lifetime})
			if certsErr != nil {
				return
			}
		}
	})
	if certsErr != nil {
		t.Fatal(certsErr)
	}
}

func labSMIME() SMIMEKeys {
	return SMIMEKeys{Self: []SMIMEIdentity{{Cert: sLab.cert, Key: sLab.key}}, Partners: []*x509.Certificate{sHospital.cert, sStranger.cert, sExpired.cert}}
}

func smimeSeal(t testing.TB, payload []byte, signer smimeParty, kt KeyTransport) ([]byte, MIC) {
	t.Helper()
	edi, err := EncodeEDI(payload, EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	signed, mic, err := SMIMESign(edi, signer.cert, signer.key)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := SMIMEEncrypt(signed, []*x509.Certificate{sLab.cert}, kt)
	if err != nil {
		t.Fatal(err)
	}
	return mail(enc), mic
}

func TestSMIMERoundTripCorpus(t *testing.T) {
	smimeCerts(t)
	for i, m := range loadCorpus(t) {
		kt := OAEPSHA256
		if i%2 == 1 {
			kt = PKCS1v15
		}
		sealed, mic := smimeSeal(t, m, sHospital, kt)
		if bytes.Contains(sealed, []byte("MSH|")) {
			t.Fatalf("message %d: HL7 text visible", i)
		}
		o, err := SMIMEOpen(sealed, labSMIME(), sHospital.cert, now)
		if err != nil {
			t.Fatalf("message %d: SMIMEOpen: %v", i, err)
		}
		got, _, err := DecodeEDI(o.Entity, Accept{})
		if err != nil || !bytes.Equal(got, m) || !o.MIC.Equal(mic) || !o.Encrypted {
			t.Fatalf("message %d: payload %q, %v; Opened %+v", i, got, err, o)
		}
	}
}

// TestSMIMEMICIsMessageDigest: the MIC equals the messageDigest attribute
// inside the CMS signature.
func TestSMIMEMICIsMessageDigest(t *testing.T) {
	smimeCerts(t)
	edi, _ := EncodeEDI(loadCorpus(t)[3], EDIOptions{})
	signed, mic, err := SMIMESign(edi, sHospital.cert, sHospital.key)
	if err != nil {
		t.Fatal(err)
	}
	ps := parts(t, signed)
	der, err := decodedBody(ps[1])
	if err != nil {
		t.Fatal(err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		t.Fatal(err)
	}
	var digest []byte
	if err := p7.UnmarshalSignedAttribute(pkcs7.OIDAttributeMessageDigest, &digest); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(digest, mic.Digest) {
		t.Errorf("messageDigest %x, MIC %x", digest, mic.Digest)
	}
}

func TestSMIMEOpenRejects(t *testing.T) {
	smimeCerts(t)
	payload := []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261123||ORM^O01|7|P|2.3\rPID|1||123\r")
	edi, _ := EncodeEDI(payload, EDIOptions{})
	encTo := func(entity []byte, to *x509.Certificate) []byte {
		enc, err := SMIMEEncrypt(entity, []*x509.Certificate{to}, OAEPSHA256)
		if err != nil {
			t.Fatal(err)
		}
		return mail(enc)
	}
	signedBy := func(p smimeParty) []byte {
		s, _, err := SMIMESign(edi, p.cert, p.key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	tampered := signedBy(sHospital)
	i := bytes.Index(tampered, []byte("\r\n\r\nTVNI")) + 6
	tampered[i] ^= 0x01
	onlyLab := SMIMEKeys{Self: []SMIMEIdentity{{Cert: sLab.cert, Key: sLab.key}}, Partners: []*x509.Certificate{sHospital.cert}}
	tests := []struct {
		name     string
		mail     []byte
		keys     SMIMEKeys
		expected *x509.Certificate
		want     error
	}{
		{"tampered payload", encTo(tampered, sLab.cert), labSMIME(), sHospital.cert, ErrBadSignature},
		{"signed by another partner", encTo(signedBy(sStranger), sLab.cert), labSMIME(), sHospital.cert, ErrWrongSigner},
		{"signed by a stranger", encTo(signedBy(sStranger), sLab.cert), onlyLab, sHospital.cert, ErrUnknownSigner},
		{"unsigned", encTo(edi, sLab.cert), labSMIME(), sHospital.cert, ErrUnsigned},
		{"encrypted to someone else", encTo(signedBy(sHospital), sStranger.cert), labSMIME(), sHospital.cert, ErrNotForUs},
		{"signed, not encrypted", mail(signedBy(sHospital)), labSMIME(), sHospital.cert, ErrNotEncrypted},
		{"plain MIME-EDI", mail(edi), labSMIME(), sHospital.cert, ErrNotEncrypted},
		// A partner still signing with its expired certificate.
		{"expired certificate", encTo(signedBy(sExpired), sLab.cert), labSMIME(), sExpired.cert, ErrExpired},
		{"micalg differs", encTo(bytes.Replace(signedBy(sHospital), []byte("micalg=sha-256"), []byte("micalg=sha-512"), 1), sLab.cert), labSMIME(), sHospital.cert, ErrMICAlgorithm},
		{"garbage", mail([]byte("Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\nContent-Transfer-Encoding: base64\r\n\r\nMIIB\r\n")), labSMIME(), sHospital.cert, ErrMalformed},
	}
	for _, tt := range tests {
		o, err := SMIMEOpen(tt.mail, tt.keys, tt.expected, now)
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: SMIMEOpen = %+v, %v; want %v", tt.name, o, err, tt.want)
		}
	}
}

func FuzzSMIMEOpen(f *testing.F) {
	smimeCerts(f)
	sealed, _ := smimeSeal(f, []byte("MSH|^~\\&|A||||||ORU^R01|1|P|2.3\r"), sHospital, OAEPSHA256)
	f.Add(sealed)
	f.Fuzz(func(t *testing.T, m []byte) {
		o, err := SMIMEOpen(m, labSMIME(), sHospital.cert, now)
		if err == nil && o.Signer != CertName(sHospital.cert) {
			t.Fatalf("opened with signer %s", o.Signer)
		}
	})
}

// TestSMIMEWeakKey: a signature by a certificate with an RSA key under 2048
// bits is refused, even from the expected partner.
func TestSMIMEWeakKey(t *testing.T) {
	smimeCerts(t)
	key, cert, err := GenerateCert(CertOptions{Name: "Weak", Email: "weak@partner.test", RSABits: 1024, NotBefore: now.Add(-time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A\r"), EDIOptions{})
	signed, _, err := SMIMESign(edi, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	enc, _ := SMIMEEncrypt(signed, []*x509.Certificate{sLab.cert}, OAEPSHA256)
	keys := SMIMEKeys{Self: []SMIMEIdentity{{Cert: sLab.cert, Key: sLab.key}}, Partners: []*x509.Certificate{cert}}
	if _, err := SMIMEOpen(mail(enc), keys, cert, now); !errors.Is(err, ErrWeakAlgorithm) {
		t.Errorf("SMIMEOpen(RSA-1024 signer) = %v, want ErrWeakAlgorithm", err)
	}
}
