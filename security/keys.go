package security

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// Keys over time. Each party may list several keys or certificates: the
// current one and the next (or the one before), so that a rollover needs
// no flag day. What each is used for:
//   - We sign with our newest valid key (latest creation or notBefore) and
//     decrypt with any of ours, so that mail a partner still encrypts to
//     our old key opens.
//   - A partner's mail is accepted when signed by any of its listed keys
//     that is valid (or, for S/MIME with anchors, by a certificate that
//     chains to them); the evidence records which (Opened.Signer).
//   - PGP mail goes encrypted to every valid encryption key the partner
//     lists, so that the partner's own rollover is painless; S/MIME mail
//     to the partner's newest valid certificate.
//   - A key not yet valid is "next": it takes over on its date by itself.
//
// Validity is judged when the mail is read, not at the signing time the
// signer claims: a signer's clock is not evidence.

// More errors a caller branches on.
var (
	// ErrRevoked: the signer's key or certificate is revoked.
	ErrRevoked = errors.New("key or certificate revoked")
	// ErrRevocationUnknown: whether the signer's certificate is revoked
	// cannot be told (no current CRL or OCSP answer), and revocation
	// fails closed.
	ErrRevocationUnknown = errors.New("revocation status unknown")
	// ErrUntrusted: the signer's certificate does not chain to the
	// partner's trust anchors, or is not for email protection.
	ErrUntrusted = errors.New("certificate not trusted")
)

// SMIMEIdentity is one of our S/MIME certificates, its key, and the
// intermediates that issued it (sent with every signature).
type SMIMEIdentity struct {
	Cert  *x509.Certificate
	Key   crypto.Signer // an *rsa.PrivateKey decrypts as well
	Chain []*x509.Certificate
}

// Anchors accept a partner's certificate by chain rather than pinning: a
// certificate that chains to Roots (through Intermediates, or those the
// message carries), is valid, is for email protection (or has no extended
// key usage) and names the partner's Email (or its domain, for a
// domain-bound certificate as Direct uses). Build with NewAnchors.
type Anchors struct {
	Email         string
	Roots         []*x509.Certificate
	Intermediates []*x509.Certificate
	roots         *x509.CertPool
}

// NewAnchors returns the anchors for a partner at email: certs are the
// certificates of its trust files, self-signed ones the roots, the others
// intermediates.
func NewAnchors(email string, certs []*x509.Certificate) *Anchors {
	a := &Anchors{Email: email, roots: x509.NewCertPool()}
	for _, c := range certs {
		if bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil {
			a.Roots = append(a.Roots, c)
			a.roots.AddCert(c)
		} else {
			a.Intermediates = append(a.Intermediates, c)
		}
	}
	return a
}

// A RevocationChecker tells whether cert, issued by issuer, is revoked at
// now: nil when it is not, an error wrapping ErrRevoked when it is, and one
// wrapping ErrRevocationUnknown when that cannot be told and the check
// fails closed.
type RevocationChecker interface {
	Check(cert, issuer *x509.Certificate, now time.Time) error
}

// A CertMemory remembers the newest certificate a partner signed with
// (that its anchors accepted), with the certificates that came with it
// (intermediates), for mail to it.
type CertMemory interface {
	Newest(partner string) (*x509.Certificate, []*x509.Certificate)
	Saw(partner string, c *x509.Certificate, carried []*x509.Certificate)
}

// CertName names a certificate in evidence and logs: its subject and the
// start of its SHA-256 fingerprint, which tell two certificates of one
// subject apart (a renewal).
func CertName(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return c.Subject.String() + " [" + strings.ToUpper(hex.EncodeToString(sum[:8])) + "]"
}

// NewestPGP returns the newest of keys (latest creation time; of equal
// ones, the last listed) that can sign at now (or encrypt, with encrypt
// set), or nil.
func NewestPGP(keys []*openpgp.Entity, now time.Time, encrypt bool) *openpgp.Entity {
	var best *openpgp.Entity
	for _, e := range keys {
		if pgpUnusable(e, now, encrypt) != "" {
			continue
		}
		if best == nil || !e.PrimaryKey.CreationTime.Before(best.PrimaryKey.CreationTime) {
			best = e // of two made in one second, the one listed later
		}
	}
	return best
}

// PGPEncryptTo returns every key of keys that can encrypt at now.
func PGPEncryptTo(keys []*openpgp.Entity, now time.Time) []*openpgp.Entity {
	var out []*openpgp.Entity
	for _, e := range keys {
		if pgpUnusable(e, now, true) == "" {
			out = append(out, e)
		}
	}
	return out
}

// pgpWhyNone says why none of keys serves at now: the reason of the newest.
func pgpWhyNone(keys []*openpgp.Entity, now time.Time, encrypt bool) string {
	var newest *openpgp.Entity
	for _, e := range keys {
		if newest == nil || e.PrimaryKey.CreationTime.After(newest.PrimaryKey.CreationTime) {
			newest = e
		}
	}
	if newest == nil {
		return "no OpenPGP key"
	}
	why := pgpUnusable(newest, now, encrypt)
	if len(keys) > 1 {
		why = fmt.Sprintf("none of the %d keys is valid; the newest: %s", len(keys), why)
	}
	return why
}

// NewestCert returns the newest of certs (latest notBefore; of equal ones,
// the last listed) valid at now, or nil.
func NewestCert(certs []*x509.Certificate, now time.Time) *x509.Certificate {
	var best *x509.Certificate
	for _, c := range certs {
		if CertUnusable(c, now) != "" {
			continue
		}
		if best == nil || !c.NotBefore.Before(best.NotBefore) {
			best = c // of two valid from one moment, the one listed later
		}
	}
	return best
}

// NewestIdentity returns our newest identity valid at now, or nil.
func NewestIdentity(ids []SMIMEIdentity, now time.Time) *SMIMEIdentity {
	c := NewestCert(certsOf(ids), now)
	for i := range ids {
		if ids[i].Cert == c {
			return &ids[i]
		}
	}
	return nil
}

func certsOf(ids []SMIMEIdentity) []*x509.Certificate {
	out := make([]*x509.Certificate, len(ids))
	for i, id := range ids {
		out[i] = id.Cert
	}
	return out
}

// certWhyNone says why none of certs is valid at now: the newest's reason.
func certWhyNone(certs []*x509.Certificate, now time.Time) string {
	var newest *x509.Certificate
	for _, c := range certs {
		if newest == nil || c.NotBefore.After(newest.NotBefore) {
			newest = c
		}
	}
	if newest == nil {
		return "no certificate"
	}
	why := CertUnusable(newest, now)
	if len(certs) > 1 {
		why = fmt.Sprintf("none of the %d certificates is valid; the newest: %s", len(certs), why)
	}
	return why
}

func pinned(pins []*x509.Certificate, c *x509.Certificate) bool {
	for _, p := range pins {
		if bytes.Equal(p.Raw, c.Raw) {
			return true
		}
	}
	return false
}

func checkKeySize(signer *x509.Certificate) error {
	switch k := signer.PublicKey.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("%w: RSA key of %d bits", ErrWeakAlgorithm, k.N.BitLen())
		}
	case *ecdsa.PublicKey:
	}
	return nil
}

// checkPinned accepts signer when it is one of pins and valid at now; one
// of others is the wrong signer, anything else unknown.
func checkPinned(signer *x509.Certificate, pins, others []*x509.Certificate, now time.Time) error {
	if err := checkKeySize(signer); err != nil {
		return err
	}
	if !pinned(pins, signer) {
		if pinned(others, signer) {
			return fmt.Errorf("%w: signed by %s", ErrWrongSigner, CertName(signer))
		}
		return fmt.Errorf("%w: %s", ErrUnknownSigner, CertName(signer))
	}
	if now.Before(signer.NotBefore) || now.After(signer.NotAfter) {
		return fmt.Errorf("%w: certificate valid %s to %s", ErrExpired,
			signer.NotBefore.Format(time.DateOnly), signer.NotAfter.Format(time.DateOnly))
	}
	return nil
}

// CheckSMIMESigner decides whether signer, with the certificates the
// message carried, may sign for partner at now: one of its pinned
// certificates, or one its anchors accept; and not revoked.
func (k *Keyring) CheckSMIMESigner(partner string, signer *x509.Certificate, carried []*x509.Certificate, now time.Time) error {
	if err := checkKeySize(signer); err != nil {
		return err
	}
	pins := k.SMIMEPartners[partner]
	var others []*x509.Certificate
	for name, cs := range k.SMIMEPartners {
		if name != partner {
			others = append(others, cs...)
		}
	}
	a := k.Anchors[partner]
	if pinned(pins, signer) || a == nil {
		if err := checkPinned(signer, pins, others, now); err != nil {
			return err
		}
		return k.checkRevoked(signer, k.issuerOf(signer, carried), now)
	}
	chain, err := a.verify(signer, carried, now)
	if err != nil {
		if pinned(others, signer) {
			return fmt.Errorf("%w: signed by %s", ErrWrongSigner, CertName(signer))
		}
		return err
	}
	if !a.names(signer) {
		return fmt.Errorf("%w: the certificate %s names neither %s nor its domain", ErrWrongSigner, CertName(signer), a.Email)
	}
	return k.checkRevoked(signer, chain[1], now)
}

// verify returns signer's chain to a root (leaf first), or why there is
// none in our own words.
func (a *Anchors) verify(signer *x509.Certificate, carried []*x509.Certificate, now time.Time) ([]*x509.Certificate, error) {
	inter := x509.NewCertPool()
	for _, c := range append(append([]*x509.Certificate{}, a.Intermediates...), carried...) {
		inter.AddCert(c)
	}
	chains, err := signer.Verify(x509.VerifyOptions{Roots: a.roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection}})
	if err == nil {
		if len(chains[0]) < 2 {
			// The partner's certificate is itself an anchor: accepted as
			// if pinned, with no issuer to ask about revocation.
			return append(chains[0], chains[0][0]), nil
		}
		return chains[0], nil
	}
	var invalid x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	switch {
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return nil, fmt.Errorf("%w: %s valid %s to %s", ErrExpired, CertName(signer),
			signer.NotBefore.Format(time.DateOnly), signer.NotAfter.Format(time.DateOnly))
	case errors.As(err, &invalid) && invalid.Reason == x509.IncompatibleUsage:
		return nil, fmt.Errorf("%w: %s is not for email protection", ErrUntrusted, CertName(signer))
	case errors.As(err, &unknown):
		return nil, fmt.Errorf("%w: %s does not chain to a trust anchor of the partner's", ErrUntrusted, CertName(signer))
	case errors.As(err, &invalid):
		return nil, fmt.Errorf("%w: %s: its chain is invalid (reason %d)", ErrUntrusted, CertName(signer), invalid.Reason)
	}
	return nil, fmt.Errorf("%w: %s: its chain is invalid", ErrUntrusted, CertName(signer))
}

// names reports whether c names the partner's address (rfc822Name) or,
// for a domain-bound certificate, its domain (dNSName).
func (a *Anchors) names(c *x509.Certificate) bool {
	for _, e := range c.EmailAddresses {
		if strings.EqualFold(e, a.Email) {
			return true
		}
	}
	if at := strings.LastIndexByte(a.Email, '@'); at >= 0 {
		for _, d := range c.DNSNames {
			if strings.EqualFold(d, a.Email[at+1:]) {
				return true
			}
		}
	}
	return false
}

// issuerOf finds the certificate that issued c among those carried and
// those the keyring knows, or nil (a self-signed certificate has none).
func (k *Keyring) issuerOf(c *x509.Certificate, carried []*x509.Certificate) *x509.Certificate {
	if bytes.Equal(c.RawSubject, c.RawIssuer) {
		return nil
	}
	try := func(list []*x509.Certificate) *x509.Certificate {
		for _, p := range list {
			if bytes.Equal(p.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(p) == nil {
				return p
			}
		}
		return nil
	}
	if p := try(carried); p != nil {
		return p
	}
	for _, a := range k.Anchors {
		if p := try(a.Intermediates); p != nil {
			return p
		}
		if p := try(a.Roots); p != nil {
			return p
		}
	}
	return try(k.Issuers())
}

// IssuerOf finds the certificate that issued c among those the keyring
// knows (anchors, and the chains of the partners' certificate files), or
// nil: a self-signed certificate, or an issuer not configured.
func (k *Keyring) IssuerOf(c *x509.Certificate) *x509.Certificate { return k.issuerOf(c, nil) }

// Issuers are the CA certificates the keyring knows beside the anchors:
// those that came in the partners' certificate files after the leaf.
func (k *Keyring) Issuers() []*x509.Certificate { return k.issuers }

// AddIssuers records CA certificates that came with a partner's pinned
// certificate, to find its issuer for revocation.
func (k *Keyring) AddIssuers(certs ...*x509.Certificate) { k.issuers = append(k.issuers, certs...) }

func (k *Keyring) checkRevoked(c, issuer *x509.Certificate, now time.Time) error {
	if k.Revocation == nil || issuer == nil || issuer == c {
		return nil
	}
	return k.Revocation.Check(c, issuer, now)
}

// SMIMEEncryptTo returns the certificate mail to partner is encrypted to
// at now: its newest valid pinned certificate, or else the newest its
// anchors accepted when it signed (Seen). A revoked one, or one whose
// status cannot be told when that fails closed, holds the partner's mail.
func (k *Keyring) SMIMEEncryptTo(partner string, now time.Time) (*x509.Certificate, error) {
	pins := k.SMIMEPartners[partner]
	c := NewestCert(pins, now)
	if c == nil && k.Seen != nil && k.Anchors[partner] != nil {
		if s, carried := k.Seen.Newest(partner); s != nil {
			if err := k.CheckSMIMESigner(partner, s, carried, now); err != nil {
				return nil, &KeyError{Reason: "partner " + partner + ": the certificate it last signed with: " + err.Error()}
			}
			return s, nil
		}
	}
	if c == nil {
		if len(pins) > 0 {
			return nil, &KeyError{Reason: "partner " + partner + ": " + certWhyNone(pins, now)}
		}
		return nil, &KeyError{Reason: "partner " + partner + ": no certificate to encrypt to yet: pin one (smime_cert) or wait for the partner's first signed mail"}
	}
	if err := k.checkRevoked(c, k.issuerOf(c, nil), now); err != nil {
		return nil, &KeyError{Reason: "partner " + partner + ": " + err.Error()}
	}
	return c, nil
}

// KeyState is what a key or certificate of a party's list is doing now.
type KeyState string

// Key states.
const (
	StateActive   KeyState = "active"   // the newest valid: signs, or is encrypted to
	StateNext     KeyState = "next"     // not valid yet: takes over on its date
	StateRetiring KeyState = "retiring" // valid, but a newer one is active: still accepted
	StateExpired  KeyState = "expired"
	StateRevoked  KeyState = "revoked"
)

// KeyStateOfPGP is the state of e among its party's keys at now, for
// signing (our keys, encrypt false) or encryption (a partner's).
func KeyStateOfPGP(e *openpgp.Entity, list []*openpgp.Entity, now time.Time, encrypt bool) KeyState {
	switch {
	case e.Revoked(now):
		return StateRevoked
	case now.Before(e.PrimaryKey.CreationTime):
		return StateNext
	case pgpUnusable(e, now, encrypt) != "":
		return StateExpired
	case NewestPGP(list, now, encrypt) == e:
		return StateActive
	}
	return StateRetiring
}

// KeyStateOfCert is the state of c among its party's certificates at now;
// revocation is the caller's to ask.
func KeyStateOfCert(c *x509.Certificate, list []*x509.Certificate, now time.Time) KeyState {
	switch {
	case now.Before(c.NotBefore):
		return StateNext
	case now.After(c.NotAfter):
		return StateExpired
	case NewestCert(list, now) == c:
		return StateActive
	}
	return StateRetiring
}
