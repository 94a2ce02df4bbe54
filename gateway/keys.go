package gateway

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/security"
)

// ExpiryWarning is how long before a key or certificate expires that it is
// reported.
const ExpiryWarning = 30 * 24 * time.Hour

// Keys are the keys and certificates a configuration names, loaded: the
// Keyring the mail side seals and opens with, and what expires soon.
type Keys struct {
	security.Keyring
	// Warnings name keys and certificates that expire within ExpiryWarning.
	Warnings []string
	// Problems are the partners' key problems (unreadable, wrong address,
	// expired, an expired encryption subkey), nil when there are none. They
	// do not stop the gateway: that partner's queue waits with an alert
	// (Suite.Usable) while every other partner works.
	Problems *config.Error

	expiries []expiry // every loaded key or certificate that expires
}

type expiry struct {
	who, field, what string
	party            string // "self" or the partner's name
	at               time.Time
}

// Expiring returns a warning for each loaded key or certificate that
// expires within ExpiryWarning of now, or has expired: what a running
// instance looks at again every day.
func (k *Keys) Expiring(now time.Time) []string {
	var out []string
	for _, x := range k.expiries {
		switch {
		case now.After(x.at):
			out = append(out, fmt.Sprintf("%s: %s: %s expired on %s", x.who, x.field, x.what, x.at.Format(time.DateOnly)))
		case x.at.Sub(now) < ExpiryWarning:
			out = append(out, fmt.Sprintf("%s: %s: %s expires on %s", x.who, x.field, x.what, x.at.Format(time.DateOnly)))
		}
	}
	return out
}

// LoadKeys reads every key and certificate the configuration names. It
// reports all problems at once as a *config.Error (unreadable, wrong kind,
// protected without passphrase, expired, no address matching the partner).
//
// Only our own keys stop the start: a partner's key problem is kept in
// Problems, and when the key cannot be used at all (unreadable, another
// address), in Keyring.Unusable. When ours have problems, the error lists
// the partners' too, so that check names everything at once.
func LoadKeys(cfg *config.Config, now time.Time) (*Keys, error) {
	k := &Keys{Keyring: security.Keyring{PGPPartners: map[string]*openpgp.Entity{}, SMIMEPartners: map[string]*x509.Certificate{},
		Unusable: map[string]string{}}}
	e := cfg.Problems()
	pass, err := passphrase(cfg)
	if err != nil {
		e.Addf("self.passphrase_file", "", "", "%v", err)
	}
	if cfg.Self.PGPKey != "" {
		if k.PGPSelf, err = security.LoadPGPKey(cfg.Path(cfg.Self.PGPKey), pass); err != nil {
			e.Addf("self.pgp_key", "", "", "%v", err)
		} else if k.PGPSelf.PrivateKey == nil {
			e.Addf("self.pgp_key", "", "our own key must include the private key", "%s holds a public key only", cfg.Self.PGPKey)
			k.PGPSelf = nil
		} else {
			k.checkPGP("self.pgp_key", "", k.PGPSelf, now, e)
		}
	}
	if cfg.Self.SMIMECert != "" && cfg.Self.SMIMEKey != "" {
		cert, cerr := security.LoadCert(cfg.Path(cfg.Self.SMIMECert))
		key, kerr := security.LoadKey(cfg.Path(cfg.Self.SMIMEKey))
		switch {
		case cerr != nil:
			e.Addf("self.smime_cert", "", "", "%v", cerr)
		case kerr != nil:
			e.Addf("self.smime_key", "", "", "%v", kerr)
		case !samePublicKey(cert, key):
			e.Addf("self.smime_key", "", "", "the key does not belong to the certificate %s", cfg.Self.SMIMECert)
		default:
			k.SMIMECert, k.SMIMEKey = cert, key
			k.checkCert("self.smime_cert", "", cert, now, e)
		}
	}
	pe := cfg.Problems()
	for i, p := range cfg.Partners {
		k.loadPartner(cfg, i, &p, now, pe)
	}
	if e.Err() != nil {
		e.Problems = append(e.Problems, pe.Problems...)
		return nil, e
	}
	if pe.Err() != nil {
		k.Problems = pe
	}
	return k, nil
}

// loadPartner loads the key or certificate of partner p (partners[i]),
// adding its problems to e. One that cannot serve p at all is Unusable.
func (k *Keys) loadPartner(cfg *config.Config, i int, p *config.Partner, now time.Time, e *config.Error) {
	field := func(f string) string { return fmt.Sprintf("partners[%d].%s", i, f) }
	unusable := func(f, hint, format string, args ...any) {
		e.Addf(field(f), p.Name, hint, format, args...)
		k.Unusable[p.Name] = fmt.Sprintf("partner %s: %s: ", p.Name, field(f)) + fmt.Sprintf(format, args...)
	}
	switch p.Security {
	case config.PGP:
		ent, err := security.LoadPGPKey(cfg.Path(p.PGPKey), nil)
		if err != nil {
			unusable("pgp_key", "", "%v", err)
			return
		}
		if !pgpHasEmail(ent, p.Email) {
			unusable("pgp_key", "ask the partner for the key of "+p.Email, "no user ID of the key names %s", p.Email)
		}
		k.PGPPartners[p.Name] = ent
		// An expired encryption subkey is an expired key too (checkPGP
		// reports the primary key's own expiry).
		if expired := k.checkPGP(field("pgp_key"), p.Name, ent, now, e); !expired {
			if why := security.PGPUnusable(ent, now); why != "" {
				e.Addf(field("pgp_key"), p.Name, "ask the partner for its renewed key", "%s", why)
			}
		}
	case config.SMIME:
		cert, err := security.LoadCert(cfg.Path(p.SMIMECert))
		if err != nil {
			unusable("smime_cert", "", "%v", err)
			return
		}
		if !certHasEmail(cert, p.Email) {
			unusable("smime_cert", "ask the partner for the certificate of "+p.Email, "the certificate does not name %s", p.Email)
		}
		k.SMIMEPartners[p.Name] = cert
		k.checkCert(field("smime_cert"), p.Name, cert, now, e)
	}
}

func passphrase(cfg *config.Config) ([]byte, error) {
	p, err := cfg.Secret(cfg.Self.PassphraseFile, cfg.Self.PassphraseEnv)
	if p == "" {
		return nil, err
	}
	return []byte(p), err
}

// checkPGP checks the primary key's expiry; it reports whether the key has
// expired (and was reported so).
func (k *Keys) checkPGP(field, partner string, ent *openpgp.Entity, now time.Time, e *config.Error) bool {
	sig, _ := ent.PrimarySelfSignature()
	if sig == nil || sig.KeyLifetimeSecs == nil || *sig.KeyLifetimeSecs == 0 {
		return false
	}
	expires := ent.PrimaryKey.CreationTime.Add(time.Duration(*sig.KeyLifetimeSecs) * time.Second)
	return k.checkExpiry(field, partner, "OpenPGP key "+security.Fingerprint(ent), expires, now, e)
}

func (k *Keys) checkCert(field, partner string, c *x509.Certificate, now time.Time, e *config.Error) {
	if now.Before(c.NotBefore) {
		e.Addf(field, partner, "", "certificate %s is not valid before %s", c.Subject, c.NotBefore.Format(time.DateOnly))
		return
	}
	k.checkExpiry(field, partner, "certificate "+c.Subject.String(), c.NotAfter, now, e)
}

// checkExpiry records when what expires, reports it expired or expiring,
// and reports whether it has expired.
func (k *Keys) checkExpiry(field, partner, what string, expires, now time.Time, e *config.Error) bool {
	who, party := "self", "self"
	if partner != "" {
		who, party = "partner "+partner, partner
	}
	k.expiries = append(k.expiries, expiry{who: who, field: field, what: what, party: party, at: expires})
	switch {
	case now.After(expires):
		e.Addf(field, partner, "renew it and exchange the new one", "%s expired on %s", what, expires.Format(time.DateOnly))
		return true
	case expires.Sub(now) < ExpiryWarning:
		k.Warnings = append(k.Warnings, fmt.Sprintf("%s: %s: %s expires on %s", who, field, what, expires.Format(time.DateOnly)))
	}
	return false
}

func pgpHasEmail(ent *openpgp.Entity, email string) bool {
	for _, id := range ent.Identities {
		if id.UserId != nil && strings.EqualFold(id.UserId.Email, email) {
			return true
		}
	}
	return false
}

func certHasEmail(c *x509.Certificate, email string) bool {
	for _, a := range c.EmailAddresses {
		if strings.EqualFold(a, email) {
			return true
		}
	}
	return false
}

func samePublicKey(c *x509.Certificate, key crypto.Signer) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	pub, ok := key.Public().(equaler)
	return ok && pub.Equal(c.PublicKey)
}

// Load reads the configuration at path, checks the files it names and
// loads the keys: what serve, check and a reload do. A partner's missing or
// unreadable key file is left to LoadKeys, which keeps it a partner
// problem (Keys.Problems) rather than one that stops the start.
func Load(path string, now time.Time) (*config.Config, *Keys, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, nil, err
	}
	var ce *config.Error
	if err := cfg.CheckFiles(); errors.As(err, &ce) {
		kept := ce.Problems[:0]
		for _, p := range ce.Problems {
			if p.Partner == "" || !strings.HasSuffix(p.Field, ".pgp_key") && !strings.HasSuffix(p.Field, ".smime_cert") {
				kept = append(kept, p)
			}
		}
		ce.Problems = kept
		if ce.Err() != nil {
			return nil, nil, ce
		}
	} else if err != nil {
		return nil, nil, err
	}
	keys, err := LoadKeys(cfg, now)
	if err != nil {
		return nil, nil, err
	}
	return cfg, keys, nil
}
