package security

import (
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// TestSuites: each suite seals what the partner's own suite opens, and only
// that; a key that cannot be used says why before anything is sealed.
func TestSuites(t *testing.T) {
	now := time.Now()
	ours, _ := GeneratePGPKey(PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	theirs, _ := GeneratePGPKey(PGPKeyOptions{Name: "L", Email: "lab@partner.test"})
	key, cert, err := GenerateCert(CertOptions{Name: "H", Email: "edi@hospital.test", RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	pkey, pcert, err := GenerateCert(CertOptions{Name: "L", Email: "lab@partner.test", RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	hospital := &Keyring{PGPSelf: []*openpgp.Entity{ours}, SMIMESelf: []SMIMEIdentity{{Cert: cert, Key: key}},
		PGPPartners: map[string][]*openpgp.Entity{"lab": {theirs}}, SMIMEPartners: map[string][]*x509.Certificate{"lab": {pcert}}}
	lab := &Keyring{PGPSelf: []*openpgp.Entity{theirs}, SMIMESelf: []SMIMEIdentity{{Cert: pcert, Key: pkey}},
		PGPPartners: map[string][]*openpgp.Entity{"hospital": {ours}}, SMIMEPartners: map[string][]*x509.Certificate{"hospital": {cert}}}
	edi, err := EncodeEDI([]byte("MSH|^~\\&|A|B|C|D|20261201||ORU^R01|1|P|2.5\r"), EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{SuitePGP, SuiteSMIME, SuiteNone} {
		out := hospital.Suite(name, "lab", "")
		if out.Name() != name {
			t.Errorf("Suite(%s).Name() = %s", name, out.Name())
		}
		sealed, mic, err := out.Seal(edi, now)
		if err != nil {
			t.Fatalf("%s: Seal: %v", name, err)
		}
		if got := SuiteOf(sealed); got != map[string]string{SuitePGP: SuitePGP, SuiteSMIME: SuiteSMIME}[name] {
			t.Errorf("%s sealed into %q", name, got)
		}
		opened, err := lab.Suite(name, "hospital", "").Open(sealed, now)
		if err != nil {
			t.Fatalf("%s: Open: %v", name, err)
		}
		if string(opened.Entity) != string(edi) || !opened.MIC.Equal(mic) {
			t.Errorf("%s: opened %d bytes, MIC %v; want the entity sealed and MIC %v", name, len(opened.Entity), opened.MIC, mic)
		}
		if (opened.Signer == "") != (name == SuiteNone) {
			t.Errorf("%s: signer %q", name, opened.Signer)
		}
		// What we sent stays readable to us, and verifiable as ours.
		own, err := out.OpenOwn(sealed, now)
		if err != nil || string(own.Entity) != string(edi) {
			t.Errorf("%s: OpenOwn: %v", name, err)
		}
		if name != SuiteNone {
			if _, err := lab.Suite(name, "hospital", "").OpenOwn(sealed, now); err == nil {
				t.Errorf("%s: the lab opened the hospital's mail as its own", name)
			}
		}
	}
	// PGP/MIME sent to a partner configured for S/MIME is refused as such.
	sealed, _, _ := hospital.Suite(SuitePGP, "lab", "").Seal(edi, now)
	if _, err := lab.Suite(SuiteSMIME, "hospital", "").Open(sealed, now); !errors.Is(err, ErrWrongSuite) {
		t.Errorf("PGP/MIME opened as S/MIME: %v, want ErrWrongSuite", err)
	}
	// A partner without a key, or one the loader marked unusable, waits.
	hospital.Unusable = map[string]string{"clinic": "partner clinic: unreadable key"}
	for _, partner := range []string{"clinic", "nobody"} {
		var ke *KeyError
		if _, _, err := hospital.Suite(SuitePGP, partner, "").Seal(edi, now); !errors.As(err, &ke) || !errors.Is(err, ErrNoKey) {
			t.Errorf("seal to %s: %v, want a KeyError", partner, err)
		}
	}
	// Our certificate expired: named as ours.
	later := pcert.NotAfter.Add(time.Hour)
	var ke *KeyError
	if err := hospital.Suite(SuiteSMIME, "lab", "").Usable(later); !errors.As(err, &ke) {
		t.Errorf("expired certificates usable: %v", err)
	}
	if err := hospital.Suite("rot13", "lab", "").Usable(now); err == nil {
		t.Error("an unknown suite is usable")
	}
}
