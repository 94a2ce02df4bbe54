package security

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
)

var entity = []byte("Content-Type: application/edi-hl7\r\nContent-Transfer-Encoding: base64\r\n\r\nTVNIfF5+XCZ8\r\n")

func pgpKeyAt(t *testing.T, email string, at time.Time) *openpgp.Entity {
	t.Helper()
	e, err := GeneratePGPKey(PGPKeyOptions{Name: email, Email: email, Now: at})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// TestPGPRollover: a partner listing two keys may sign with either, mail to
// it is encrypted to both, and mail encrypted to our old key still opens
// after we moved to a new one.
func TestPGPRollover(t *testing.T) {
	now := time.Now()
	oldSelf, newSelf := pgpKeyAt(t, "edi@h.test", now.Add(-400*24*time.Hour)), pgpKeyAt(t, "edi@h.test", now.Add(-time.Hour))
	a, b := pgpKeyAt(t, "lab@l.test", now.Add(-300*24*time.Hour)), pgpKeyAt(t, "lab@l.test", now.Add(-24*time.Hour))
	hospital := &Keyring{PGPSelf: []*openpgp.Entity{oldSelf, newSelf}, PGPPartners: map[string][]*openpgp.Entity{"lab": {a, b}}}
	suite := hospital.Suite(SuitePGP, "lab", "")

	for _, signer := range []*openpgp.Entity{a, b} {
		signed, _, err := PGPSign(entity, signer, now)
		if err != nil {
			t.Fatal(err)
		}
		// The partner still encrypts to our old key.
		mail, err := PGPEncrypt(signed, []*openpgp.Entity{oldSelf}, now)
		if err != nil {
			t.Fatal(err)
		}
		o, err := suite.Open(append([]byte("From: lab@l.test\r\n"), mail...), now)
		if err != nil {
			t.Fatalf("signed by %s: %v", Fingerprint(signer), err)
		}
		if o.Signer != Fingerprint(signer) {
			t.Errorf("evidence names signer %s, want %s", o.Signer, Fingerprint(signer))
		}
	}

	// We sign with the newest of ours and encrypt to both of the partner's.
	sealed, _, err := suite.Seal(entity, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []*openpgp.Entity{a, b} {
		lab := &Keyring{PGPSelf: []*openpgp.Entity{k}, PGPPartners: map[string][]*openpgp.Entity{"hospital": {newSelf}}}
		o, err := lab.Suite(SuitePGP, "hospital", "").Open(sealed, now)
		if err != nil {
			t.Fatalf("the partner's key %s cannot open: %v", Fingerprint(k), err)
		}
		if o.Signer != Fingerprint(newSelf) {
			t.Errorf("signed by %s, want our newest key", o.Signer)
		}
	}
	// Our old key alone no longer verifies it.
	lab := &Keyring{PGPSelf: []*openpgp.Entity{a}, PGPPartners: map[string][]*openpgp.Entity{"hospital": {oldSelf}}}
	if _, err := lab.Suite(SuitePGP, "hospital", "").Open(sealed, now); !errors.Is(err, ErrUnknownSigner) {
		t.Errorf("opened with only our old key listed: %v, want unknown signer", err)
	}

	// A key removed from the list is refused.
	signed, _, _ := PGPSign(entity, a, now)
	mail, _ := PGPEncrypt(signed, []*openpgp.Entity{newSelf}, now)
	hospital.PGPPartners["lab"] = []*openpgp.Entity{b}
	if _, err := suite.Open(mail, now); !errors.Is(err, ErrUnknownSigner) {
		t.Errorf("key A removed: %v, want unknown signer", err)
	}
}

// TestPGPNextKey: a key not yet valid is next, and takes over on its date.
func TestPGPNextKey(t *testing.T) {
	now := time.Now()
	cur, next := pgpKeyAt(t, "edi@h.test", now.Add(-time.Hour)), pgpKeyAt(t, "edi@h.test", now.Add(48*time.Hour))
	list := []*openpgp.Entity{next, cur}
	if got := NewestPGP(list, now, false); got != cur {
		t.Errorf("today signs %v, want the current key", got)
	}
	if got := NewestPGP(list, now.Add(72*time.Hour), false); got != next {
		t.Errorf("in three days signs %v, want the next key", got)
	}
	if got := KeyStateOfPGP(next, list, now, false); got != StateNext {
		t.Errorf("next key state %s", got)
	}
	if got := KeyStateOfPGP(cur, list, now.Add(72*time.Hour), false); got != StateRetiring {
		t.Errorf("old key after the switch: %s, want retiring", got)
	}
}

// TestPGPRevocation: a revocation signature applied to a partner's key is
// honoured: its mail is refused as revoked and nothing is encrypted to it.
func TestPGPRevocation(t *testing.T) {
	now := time.Now()
	self, b := pgpKeyAt(t, "edi@h.test", now.Add(-time.Hour)), pgpKeyAt(t, "lab@l.test", now.Add(-time.Hour))
	signed, _, _ := PGPSign(entity, b, now)
	mail, _ := PGPEncrypt(signed, []*openpgp.Entity{self}, now)
	pub, _ := ArmorPGPPublic(b)
	theirs, err := ReadPGPKey(bytes.NewReader(pub), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.RevokeKey(packet.KeyCompromised, "stolen laptop", nil); err != nil {
		t.Fatal(err)
	}
	rev := b.Revocations[0]
	if ApplyRevocation([]*openpgp.Entity{theirs}, rev) != theirs {
		t.Fatal("the revocation was not applied")
	}
	k := &Keyring{PGPSelf: []*openpgp.Entity{self}, PGPPartners: map[string][]*openpgp.Entity{"lab": {theirs}}}
	if _, err := k.Suite(SuitePGP, "lab", "").Open(mail, now); !errors.Is(err, ErrRevoked) {
		t.Errorf("mail signed by a revoked key: %v, want revoked", err)
	}
	if err := k.Suite(SuitePGP, "lab", "").Usable(now); !errors.Is(err, ErrNoKey) {
		t.Errorf("sealing to a revoked key: %v, want no key", err)
	}
	// A revocation by another key is not applied.
	other := pgpKeyAt(t, "x@x.test", now)
	if ApplyRevocation([]*openpgp.Entity{other}, rev) != nil {
		t.Error("a revocation applied to a key that did not make it")
	}
}

type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newCA(t *testing.T, name string, parent *testCA) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	pc, pk := tmpl, crypto.Signer(key)
	if parent != nil {
		pc, pk = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, pc, key.Public(), pk)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &testCA{c, key}
}

func (ca *testCA) issue(t *testing.T, email string, notBefore, notAfter time.Time, eku ...x509.ExtKeyUsage) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key, _, err := GenerateCert(CertOptions{Name: email, Email: email, RSABits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: email},
		EmailAddresses: []string{email}, NotBefore: notBefore, NotAfter: notAfter, ExtKeyUsage: eku,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, key
}

// TestSMIMEAnchors: a partner certificate issued by an intermediate of the
// partner's CA is accepted with the CA as anchor, and refused, each for its
// own reason, for another address, expired, or from another CA.
func TestSMIMEAnchors(t *testing.T) {
	now := time.Now()
	root := newCA(t, "Partner Root", nil)
	inter := newCA(t, "Partner Issuing CA", root)
	other := newCA(t, "Other Root", nil)
	selfKey, selfCert, _ := GenerateCert(CertOptions{Name: "H", Email: "edi@h.test", RSABits: 2048})
	me := []SMIMEIdentity{{Cert: selfCert, Key: selfKey}}

	good, goodKey := inter.issue(t, "lab@l.test", now.Add(-time.Hour), now.Add(time.Hour), x509.ExtKeyUsageEmailProtection)
	elsewhere, elsewhereKey := inter.issue(t, "someone@l.test", now.Add(-time.Hour), now.Add(time.Hour))
	expired, expiredKey := inter.issue(t, "lab@l.test", now.Add(-3*time.Hour), now.Add(-2*time.Hour))
	stranger, strangerKey := other.issue(t, "lab@l.test", now.Add(-time.Hour), now.Add(time.Hour))
	server, serverKey := inter.issue(t, "lab@l.test", now.Add(-time.Hour), now.Add(time.Hour), x509.ExtKeyUsageServerAuth)

	seal := func(cert *x509.Certificate, key crypto.Signer, chain ...*x509.Certificate) []byte {
		signed, _, err := SMIMESignChain(entity, cert, key, chain)
		if err != nil {
			t.Fatal(err)
		}
		mail, err := SMIMEEncrypt(signed, []*x509.Certificate{selfCert}, OAEPSHA256)
		if err != nil {
			t.Fatal(err)
		}
		return mail
	}
	withAnchors := &Keyring{SMIMESelf: me, Anchors: map[string]*Anchors{"lab": NewAnchors("lab@l.test", []*x509.Certificate{root.cert})},
		Seen: &memory{}}
	pinnedOnly := &Keyring{SMIMESelf: me, SMIMEPartners: map[string][]*x509.Certificate{"lab": {stranger}}}

	cases := []struct {
		name string
		k    *Keyring
		mail []byte
		want error
	}{
		{"chains to the anchor, intermediate in the message", withAnchors, seal(good, goodKey, inter.cert), nil},
		{"the same without smime_trust", pinnedOnly, seal(good, goodKey, inter.cert), ErrUnknownSigner},
		{"another address", withAnchors, seal(elsewhere, elsewhereKey, inter.cert), ErrWrongSigner},
		{"expired", withAnchors, seal(expired, expiredKey, inter.cert), ErrExpired},
		{"another CA", withAnchors, seal(stranger, strangerKey), ErrUntrusted},
		{"no intermediate anywhere", withAnchors, seal(good, goodKey), ErrUntrusted},
		{"not for email protection", withAnchors, seal(server, serverKey, inter.cert), ErrUntrusted},
	}
	for _, c := range cases {
		o, err := c.k.Suite(SuiteSMIME, "lab", "").Open(c.mail, now)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
		if c.want == nil && err == nil && o.Signer != CertName(good) {
			t.Errorf("%s: signer %s", c.name, o.Signer)
		}
	}
	// The certificate the partner signed with is the one mail to it goes to.
	to, err := withAnchors.SMIMEEncryptTo("lab", now)
	if err != nil || !bytes.Equal(to.Raw, good.Raw) {
		t.Errorf("encrypt to the wrong certificate (%v); want the one the partner signed with", err)
	}
	// With the intermediate configured, a message without it is accepted.
	withAnchors.Anchors["lab"] = NewAnchors("lab@l.test", []*x509.Certificate{root.cert, inter.cert})
	if _, err := withAnchors.Suite(SuiteSMIME, "lab", "").Open(seal(good, goodKey), now); err != nil {
		t.Errorf("intermediate from the configured files: %v", err)
	}
}

// TestSMIMERollover: two pinned certificates of a partner both verify; mail
// goes to the newest valid; ours signs with our newest and any decrypts.
func TestSMIMERollover(t *testing.T) {
	now := time.Now()
	mk := func(email string, from time.Time) SMIMEIdentity {
		key, cert, err := GenerateCert(CertOptions{Name: email, Email: email, RSABits: 2048, NotBefore: from, Lifetime: 800 * 24 * time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		return SMIMEIdentity{Cert: cert, Key: key}
	}
	oldSelf, newSelf := mk("edi@h.test", now.Add(-400*24*time.Hour)), mk("edi@h.test", now.Add(-time.Hour))
	a, b := mk("lab@l.test", now.Add(-300*24*time.Hour)), mk("lab@l.test", now.Add(-time.Hour))
	next := mk("lab@l.test", now.Add(30*24*time.Hour))
	k := &Keyring{SMIMESelf: []SMIMEIdentity{oldSelf, newSelf},
		SMIMEPartners: map[string][]*x509.Certificate{"lab": {a.Cert, b.Cert, next.Cert}}}
	for _, signer := range []SMIMEIdentity{a, b} {
		signed, _, _ := SMIMESign(entity, signer.Cert, signer.Key)
		mail, _ := SMIMEEncrypt(signed, []*x509.Certificate{oldSelf.Cert}, OAEPSHA256)
		if o, err := k.Suite(SuiteSMIME, "lab", "").Open(mail, now); err != nil || o.Signer != CertName(signer.Cert) {
			t.Errorf("signed by %s: %v", CertName(signer.Cert), err)
		}
	}
	if to, err := k.SMIMEEncryptTo("lab", now); err != nil || to != b.Cert {
		t.Errorf("encrypt to %v, %v; want the newest valid", to, err)
	}
	if to, _ := k.SMIMEEncryptTo("lab", now.Add(31*24*time.Hour)); to != next.Cert {
		t.Error("the next certificate did not take over on its date")
	}
	if id := NewestIdentity(k.SMIMESelf, now); id == nil || id.Cert != newSelf.Cert {
		t.Error("we do not sign with our newest certificate")
	}
}

// memory is a CertMemory in a map.
type memory struct {
	m map[string][]*x509.Certificate
}

func (m *memory) Newest(p string) (*x509.Certificate, []*x509.Certificate) {
	if l := m.m[p]; len(l) > 0 {
		return l[0], l[1:]
	}
	return nil, nil
}

func (m *memory) Saw(p string, c *x509.Certificate, carried []*x509.Certificate) {
	if m.m == nil {
		m.m = map[string][]*x509.Certificate{}
	}
	m.m[p] = append([]*x509.Certificate{c}, carried...)
}

// revokedAll is a RevocationChecker that says every certificate is revoked.
type revokedAll struct{}

func (revokedAll) Check(c, _ *x509.Certificate, _ time.Time) error {
	return fmt.Errorf("%w: %s", ErrRevoked, CertName(c))
}

// TestSMIMEChainsAndRevocation: our certificate file's intermediate goes
// with our signature, so a partner holding only the root accepts it; a
// revoked signer is refused as revoked, and a revoked certificate to
// encrypt to holds the partner's mail (a KeyError).
func TestSMIMEChainsAndRevocation(t *testing.T) {
	now := time.Now()
	root := newCA(t, "Our Root", nil)
	inter := newCA(t, "Our Issuing CA", root)
	cert, key := inter.issue(t, "edi@h.test", now.Add(-time.Hour), now.Add(time.Hour), x509.ExtKeyUsageEmailProtection)
	labKey, labCert, _ := GenerateCert(CertOptions{Name: "Lab", Email: "lab@l.test", RSABits: 2048})
	us := &Keyring{SMIMESelf: []SMIMEIdentity{{Cert: cert, Key: key, Chain: []*x509.Certificate{inter.cert}}},
		SMIMEPartners: map[string][]*x509.Certificate{"lab": {labCert}}}
	sealed, _, err := us.Suite(SuiteSMIME, "lab", "").Seal(entity, now)
	if err != nil {
		t.Fatal(err)
	}
	lab := &Keyring{SMIMESelf: []SMIMEIdentity{{Cert: labCert, Key: labKey}},
		Anchors: map[string]*Anchors{"hospital": NewAnchors("edi@h.test", []*x509.Certificate{root.cert})}}
	if _, err := lab.Suite(SuiteSMIME, "hospital", "").Open(sealed, now); err != nil {
		t.Errorf("the partner with only our root: %v", err)
	}
	lab.Revocation = revokedAll{}
	if _, err := lab.Suite(SuiteSMIME, "hospital", "").Open(sealed, now); !errors.Is(err, ErrRevoked) {
		t.Errorf("revoked signer: %v, want revoked", err)
	}
	// Mail to a partner whose certificate is revoked waits.
	labCA := newCA(t, "Lab CA", nil)
	labIssued, _ := labCA.issue(t, "lab@l.test", now.Add(-time.Hour), now.Add(time.Hour))
	us.SMIMEPartners["lab"] = []*x509.Certificate{labIssued}
	us.AddIssuers(labCA.cert)
	us.Revocation = revokedAll{}
	var ke *KeyError
	if err := us.Suite(SuiteSMIME, "lab", "").Usable(now); !errors.As(err, &ke) || !strings.Contains(ke.Reason, "revoked") {
		t.Errorf("sealing to a revoked certificate: %v, want a KeyError naming the revocation", err)
	}
}

// FuzzLoadKeyFiles: whatever a certificate or key file holds, reading it
// returns certificates or an error, never a panic.
func FuzzLoadKeyFiles(f *testing.F) {
	_, cert, _ := GenerateCert(CertOptions{Name: "x", Email: "x@x.test", ECDSA: true})
	f.Add(PEMCert(cert))
	f.Add(cert.Raw)
	f.Add([]byte(":-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nwsBzBCABCgAd\n-----END PGP PUBLIC KEY BLOCK-----\n"))
	f.Add([]byte("-----BEGIN PKCS7-----\nMIIB\n-----END PKCS7-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if certs, err := parseCerts(data); err == nil && len(certs) == 0 {
			t.Fatal("no error and no certificate")
		}
		readRevocation(data)
	})
}
