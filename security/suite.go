package security

import (
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
)

// Suite names, as partners.yaml spells them.
const (
	SuitePGP   = "pgp"   // PGP/MIME, RFC 3156
	SuiteSMIME = "smime" // S/MIME 4.0, RFC 8551
	SuiteNone  = "none"  // no signature, no encryption (allow_unencrypted)
)

// A Suite seals mail for one partner and opens that partner's mail: the
// one place the choice between PGP/MIME, S/MIME and none is made. Get one
// from Keyring.Suite.
type Suite interface {
	// Name is SuitePGP, SuiteSMIME or SuiteNone.
	Name() string
	// Usable returns a *KeyError when mail to the partner cannot be sealed
	// at now: its key or ours is missing, expired, revoked or not yet valid.
	Usable(now time.Time) error
	// Seal signs entity with our key and encrypts it to the partner and to
	// ourselves (so that the outgoing journal stays readable to us, as
	// evidence of what was sent). It returns the MIC of what was signed.
	Seal(entity []byte, now time.Time) ([]byte, MIC, error)
	// Open decrypts mail and verifies that the partner signed it.
	Open(mail []byte, now time.Time) (*Opened, error)
	// OpenOwn decrypts mail we sealed for the partner (it is encrypted to
	// us too) and verifies our signature: evidence of what was sent.
	OpenOwn(mail []byte, now time.Time) (*Opened, error)
}

// ErrNoKey means a partner's key or ours is missing or unusable: the
// message cannot be sent safely and is not sent at all. It is not about the
// message: the partner's queue waits (a KeyError says why) until the key is
// mended.
var ErrNoKey = errors.New("no key to seal the message with")

// KeyError says why a partner's mail cannot be sealed: its key or ours is
// missing, expired or unreadable. It wraps ErrNoKey.
type KeyError struct {
	Reason string // our own words and dates: never key material
}

func (e *KeyError) Error() string { return "cannot seal: " + e.Reason }
func (e *KeyError) Unwrap() error { return ErrNoKey }

// Keyring holds our keys and every partner's, by partner name, each as a
// list over time: a party rolls over by listing its next key beside the
// current one (see keys.go for which one does what). Build it with the one
// key loader (gateway.LoadKeys); the zero Keyring has no keys.
type Keyring struct {
	PGPSelf       []*openpgp.Entity
	SMIMESelf     []SMIMEIdentity
	PGPPartners   map[string][]*openpgp.Entity   // by partner name
	SMIMEPartners map[string][]*x509.Certificate // pinned, by partner name
	// Anchors, by partner name, accept a partner's certificate that chains
	// to one of them (smime_trust, trust_anchors) besides the pinned ones.
	Anchors map[string]*Anchors
	// Revocation checks S/MIME certificates whose issuer is known; nil
	// checks none.
	Revocation RevocationChecker
	// Seen remembers the newest certificate each partner signed with that
	// its anchors accepted: what mail to it is encrypted to when none is
	// pinned. nil remembers nothing.
	Seen CertMemory
	// Unusable says, by partner name, why a partner's key could not be
	// loaded: its mail waits with that reason.
	Unusable map[string]string

	issuers []*x509.Certificate // AddIssuers
}

// Suite returns the suite named name (SuitePGP, SuiteSMIME, SuiteNone) for
// partner, with keyTransport the S/MIME key transport to encrypt with as
// partners.yaml names it ("oaep", the default, or "pkcs1v15"). An unknown
// name gives a suite whose every use fails with an error that names it.
func (k *Keyring) Suite(name, partner, keyTransport string) Suite {
	switch name {
	case SuitePGP:
		return pgpSuite{k, partner}
	case SuiteSMIME:
		kt := OAEPSHA256
		if keyTransport == "pkcs1v15" {
			kt = PKCS1v15
		}
		return smimeSuite{k, partner, kt}
	case SuiteNone:
		return noneSuite{}
	}
	return unknownSuite{name, partner}
}

func (k *Keyring) unusable(partner string) error {
	if why, ok := k.Unusable[partner]; ok {
		return &KeyError{Reason: why}
	}
	return nil
}

type pgpSuite struct {
	k       *Keyring
	partner string
}

func (s pgpSuite) Name() string { return SuitePGP }

func (s pgpSuite) Usable(now time.Time) error {
	_, _, err := s.keys(now)
	return err
}

// keys are the key we sign with and the keys we encrypt to: every valid
// encryption key of the partner's, and our signing key, so that the
// outgoing journal stays readable to us.
func (s pgpSuite) keys(now time.Time) (*openpgp.Entity, []*openpgp.Entity, error) {
	if err := s.k.unusable(s.partner); err != nil {
		return nil, nil, err
	}
	theirs := s.k.PGPPartners[s.partner]
	if len(s.k.PGPSelf) == 0 || len(theirs) == 0 {
		return nil, nil, &KeyError{Reason: "no OpenPGP key loaded for partner " + s.partner}
	}
	to := PGPEncryptTo(theirs, now)
	if len(to) == 0 {
		return nil, nil, &KeyError{Reason: "partner " + s.partner + ": " + pgpWhyNone(theirs, now, true)}
	}
	self := NewestPGP(s.k.PGPSelf, now, false)
	if self == nil {
		return nil, nil, &KeyError{Reason: "our OpenPGP key: " + pgpWhyNone(s.k.PGPSelf, now, false)}
	}
	return self, append(to, self), nil
}

func (s pgpSuite) Seal(entity []byte, now time.Time) ([]byte, MIC, error) {
	self, to, err := s.keys(now)
	if err != nil {
		return nil, MIC{}, err
	}
	signed, mic, err := PGPSign(entity, self, now)
	if err != nil {
		return nil, mic, err
	}
	enc, err := PGPEncrypt(signed, to, now)
	return enc, mic, err
}

func (s pgpSuite) Open(mail []byte, now time.Time) (*Opened, error) {
	if err := wrongSuite(mail, SuitePGP, s.partner); err != nil {
		return nil, err
	}
	var list openpgp.EntityList
	for _, es := range s.k.PGPPartners {
		list = append(list, es...)
	}
	return PGPOpenFrom(mail, PGPKeys{Self: s.k.PGPSelf, Partners: list}, s.k.PGPPartners[s.partner], now)
}

func (s pgpSuite) OpenOwn(mail []byte, now time.Time) (*Opened, error) {
	self := s.k.PGPSelf
	return PGPOpenFrom(mail, PGPKeys{Self: self, Partners: self}, self, now)
}

type smimeSuite struct {
	k       *Keyring
	partner string
	kt      KeyTransport
}

func (s smimeSuite) Name() string { return SuiteSMIME }

func (s smimeSuite) Usable(now time.Time) error {
	_, _, err := s.keys(now)
	return err
}

// keys are our newest valid identity and the partner's certificate mail
// is encrypted to (SMIMEEncryptTo).
func (s smimeSuite) keys(now time.Time) (*SMIMEIdentity, *x509.Certificate, error) {
	if err := s.k.unusable(s.partner); err != nil {
		return nil, nil, err
	}
	if len(s.k.SMIMESelf) == 0 {
		return nil, nil, &KeyError{Reason: "no S/MIME certificate of ours is loaded"}
	}
	self := NewestIdentity(s.k.SMIMESelf, now)
	if self == nil {
		return nil, nil, &KeyError{Reason: "our S/MIME certificate: " + certWhyNone(certsOf(s.k.SMIMESelf), now)}
	}
	to, err := s.k.SMIMEEncryptTo(s.partner, now)
	if err != nil {
		return nil, nil, err
	}
	return self, to, nil
}

func (s smimeSuite) Seal(entity []byte, now time.Time) ([]byte, MIC, error) {
	self, to, err := s.keys(now)
	if err != nil {
		return nil, MIC{}, err
	}
	signed, mic, err := SMIMESignChain(entity, self.Cert, self.Key, self.Chain)
	if err != nil {
		return nil, mic, err
	}
	enc, err := SMIMEEncrypt(signed, []*x509.Certificate{to, self.Cert}, s.kt)
	return enc, mic, err
}

func (s smimeSuite) Open(mail []byte, now time.Time) (*Opened, error) {
	if err := wrongSuite(mail, SuiteSMIME, s.partner); err != nil {
		return nil, err
	}
	keys := SMIMEKeys{Self: s.k.SMIMESelf, Check: func(signer *x509.Certificate, carried []*x509.Certificate, now time.Time) error {
		return s.k.CheckSMIMESigner(s.partner, signer, carried, now)
	}}
	o, err := SMIMEOpen(mail, keys, nil, now)
	if err == nil && s.k.Seen != nil && o.SignerCert != nil && !pinned(s.k.SMIMEPartners[s.partner], o.SignerCert) {
		s.k.Seen.Saw(s.partner, o.SignerCert, o.carried)
	}
	return o, err
}

func (s smimeSuite) OpenOwn(mail []byte, now time.Time) (*Opened, error) {
	own := certsOf(s.k.SMIMESelf)
	var first *x509.Certificate
	if len(own) > 0 {
		first = own[0]
	}
	return SMIMEOpen(mail, SMIMEKeys{Self: s.k.SMIMESelf, Partners: own, Check: func(signer *x509.Certificate, _ []*x509.Certificate, now time.Time) error {
		return checkPinned(signer, own, nil, now)
	}}, first, now)
}

// noneSuite sends and takes mail as it is. Configuration allows it only
// with allow_unencrypted.
type noneSuite struct{}

func (noneSuite) Name() string               { return SuiteNone }
func (noneSuite) Usable(now time.Time) error { return nil }

func (noneSuite) Seal(entity []byte, now time.Time) ([]byte, MIC, error) {
	return entity, ComputeMIC(entity), nil
}

func (noneSuite) Open(mail []byte, now time.Time) (*Opened, error) {
	return &Opened{Entity: mail, MIC: ComputeMIC(mail)}, nil
}

func (n noneSuite) OpenOwn(mail []byte, now time.Time) (*Opened, error) { return n.Open(mail, now) }

type unknownSuite struct{ name, partner string }

func (s unknownSuite) Name() string { return s.name }
func (s unknownSuite) err() error {
	return fmt.Errorf("partner %s: unknown security %q", s.partner, s.name)
}
func (s unknownSuite) Usable(time.Time) error { return s.err() }
func (s unknownSuite) Seal([]byte, time.Time) ([]byte, MIC, error) {
	return nil, MIC{}, s.err()
}
func (s unknownSuite) Open([]byte, time.Time) (*Opened, error)    { return nil, s.err() }
func (s unknownSuite) OpenOwn([]byte, time.Time) (*Opened, error) { return nil, s.err() }

// wrongSuite refuses a mail that uses another suite than the partner's.
func wrongSuite(mail []byte, want, partner string) error {
	if s := SuiteOf(mail); s != "" && s != want {
		return fmt.Errorf("%w: the mail uses %s; partner %s is configured for %s", ErrWrongSuite, s, partner, want)
	}
	return nil
}
