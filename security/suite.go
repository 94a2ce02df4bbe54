package security

import (
	"crypto"
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

// Keyring holds our keys and every partner's, by partner name. Build it
// with the one key loader (gateway.LoadKeys); the zero Keyring has no keys.
type Keyring struct {
	PGPSelf       *openpgp.Entity
	SMIMECert     *x509.Certificate
	SMIMEKey      crypto.Signer
	PGPPartners   map[string]*openpgp.Entity   // by partner name
	SMIMEPartners map[string]*x509.Certificate // by partner name
	// Unusable says, by partner name, why a partner's key could not be
	// loaded: its mail waits with that reason.
	Unusable map[string]string
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
	if err := s.k.unusable(s.partner); err != nil {
		return err
	}
	to := s.k.PGPPartners[s.partner]
	if s.k.PGPSelf == nil || to == nil {
		return &KeyError{Reason: "no OpenPGP key loaded for partner " + s.partner}
	}
	if why := PGPUnusable(to, now); why != "" {
		return &KeyError{Reason: "partner " + s.partner + ": " + why}
	}
	if why := PGPUnusableToSign(s.k.PGPSelf, now); why != "" {
		return &KeyError{Reason: "our OpenPGP key: " + why}
	}
	return nil
}

func (s pgpSuite) Seal(entity []byte, now time.Time) ([]byte, MIC, error) {
	if err := s.Usable(now); err != nil {
		return nil, MIC{}, err
	}
	signed, mic, err := PGPSign(entity, s.k.PGPSelf, now)
	if err != nil {
		return nil, mic, err
	}
	enc, err := PGPEncrypt(signed, []*openpgp.Entity{s.k.PGPPartners[s.partner], s.k.PGPSelf}, now)
	return enc, mic, err
}

func (s pgpSuite) Open(mail []byte, now time.Time) (*Opened, error) {
	if err := wrongSuite(mail, SuitePGP, s.partner); err != nil {
		return nil, err
	}
	var list openpgp.EntityList
	for _, e := range s.k.PGPPartners {
		list = append(list, e)
	}
	return PGPOpen(mail, PGPKeys{Self: s.k.PGPSelf, Partners: list}, s.k.PGPPartners[s.partner], now)
}

func (s pgpSuite) OpenOwn(mail []byte, now time.Time) (*Opened, error) {
	self := s.k.PGPSelf
	return PGPOpen(mail, PGPKeys{Self: self, Partners: openpgp.EntityList{self}}, self, now)
}

type smimeSuite struct {
	k       *Keyring
	partner string
	kt      KeyTransport
}

func (s smimeSuite) Name() string { return SuiteSMIME }

func (s smimeSuite) Usable(now time.Time) error {
	if err := s.k.unusable(s.partner); err != nil {
		return err
	}
	to := s.k.SMIMEPartners[s.partner]
	if s.k.SMIMECert == nil || to == nil {
		return &KeyError{Reason: "no S/MIME certificate loaded for partner " + s.partner}
	}
	if why := CertUnusable(to, now); why != "" {
		return &KeyError{Reason: "partner " + s.partner + ": " + why}
	}
	if why := CertUnusable(s.k.SMIMECert, now); why != "" {
		return &KeyError{Reason: "our S/MIME certificate: " + why}
	}
	return nil
}

func (s smimeSuite) Seal(entity []byte, now time.Time) ([]byte, MIC, error) {
	if err := s.Usable(now); err != nil {
		return nil, MIC{}, err
	}
	signed, mic, err := SMIMESign(entity, s.k.SMIMECert, s.k.SMIMEKey)
	if err != nil {
		return nil, mic, err
	}
	enc, err := SMIMEEncrypt(signed, []*x509.Certificate{s.k.SMIMEPartners[s.partner], s.k.SMIMECert}, s.kt)
	return enc, mic, err
}

func (s smimeSuite) Open(mail []byte, now time.Time) (*Opened, error) {
	if err := wrongSuite(mail, SuiteSMIME, s.partner); err != nil {
		return nil, err
	}
	keys := SMIMEKeys{Cert: s.k.SMIMECert, Key: s.k.SMIMEKey}
	for _, c := range s.k.SMIMEPartners {
		keys.Partners = append(keys.Partners, c)
	}
	return SMIMEOpen(mail, keys, s.k.SMIMEPartners[s.partner], now)
}

func (s smimeSuite) OpenOwn(mail []byte, now time.Time) (*Opened, error) {
	c := s.k.SMIMECert
	return SMIMEOpen(mail, SMIMEKeys{Cert: c, Key: s.k.SMIMEKey, Partners: []*x509.Certificate{c}}, c, now)
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
