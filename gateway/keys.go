package gateway

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/packet"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/revocation"
	"github.com/hl7mail/hl7mail/security"
)

// ExpiryWarning and ExpiryUrgent are how long before a party's last valid
// key or certificate expires that it is reported: an alert at each.
const (
	ExpiryWarning = 30 * 24 * time.Hour
	ExpiryUrgent  = 7 * 24 * time.Hour
)

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

	// Revocations is the revocation checker (Keyring.Revocation), nil
	// when the configuration has no revocation section.
	Revocations *revocation.Checker

	expiries []expiry       // every loaded key or certificate that expires
	fields   map[any]string // where partners.yaml names each loaded key (named)
}

type expiry struct {
	who, field, what string
	party            string    // "self" or the partner's name
	kind             string    // the list it is in: "pgp", "smime"
	at               time.Time // zero: never expires
}

// Expiring returns a warning for each party (and kind of key) whose last
// valid key or certificate expires within ExpiryWarning of now, another
// when within ExpiryUrgent, or has expired: what a running instance looks
// at again twice a day. A key with a successor listed beside it is not
// reported: the successor takes over.
func (k *Keys) Expiring(now time.Time) []string {
	last := map[string]expiry{}
	var order []string
	for _, x := range k.expiries {
		id := x.party + "\x00" + x.kind
		if l, ok := last[id]; !ok {
			order = append(order, id)
			last[id] = x
		} else if !l.at.IsZero() && (x.at.IsZero() || x.at.After(l.at)) {
			last[id] = x
		}
	}
	var out []string
	for _, id := range order {
		x := last[id]
		if x.at.IsZero() {
			continue
		}
		switch left := x.at.Sub(now); {
		case left < 0:
			out = append(out, fmt.Sprintf("%s: %s: %s expired on %s", x.who, x.field, x.what, x.at.Format(time.DateOnly)))
		case left < ExpiryUrgent:
			out = append(out, fmt.Sprintf("%s: %s: %s expires on %s, within 7 days, and nothing replaces it", x.who, x.field, x.what, x.at.Format(time.DateOnly)))
		case left < ExpiryWarning:
			out = append(out, fmt.Sprintf("%s: %s: %s expires on %s, within 30 days, and nothing replaces it", x.who, x.field, x.what, x.at.Format(time.DateOnly)))
		}
	}
	return out
}

// LoadKeys reads every key and certificate the configuration names. It
// reports all problems at once as a *config.Error (unreadable, wrong kind,
// protected without passphrase, expired, no address matching the partner).
//
// A party's keys may be a list (rollover): an expired or not yet valid key
// in a list is a problem only when no key of the list is valid.
//
// Only our own keys stop the start: a partner's key problem is kept in
// Problems, and when the key cannot be used at all (unreadable, another
// address), in Keyring.Unusable. When ours have problems, the error lists
// the partners' too, so that check names everything at once.
func LoadKeys(cfg *config.Config, now time.Time) (*Keys, error) {
	k := &Keys{Keyring: security.Keyring{PGPPartners: map[string][]*openpgp.Entity{}, SMIMEPartners: map[string][]*x509.Certificate{},
		Anchors: map[string]*security.Anchors{}, Unusable: map[string]string{}}}
	e := cfg.Problems()
	pass, err := passphrase(cfg)
	if err != nil {
		e.Addf("self.passphrase_file", "", "", "%v", err)
	}
	var dated []datedKey
	for i, f := range cfg.Self.PGPKey {
		field := cfg.Self.PGPKey.Field("self.pgp_key", i)
		ent, err := security.LoadPGPKey(cfg.Path(f), pass)
		switch {
		case err != nil:
			e.Addf(field, "", "", "%v", err)
		case ent.PrivateKey == nil:
			e.Addf(field, "", "our own key must include the private key", "%s holds a public key only", f)
		default:
			k.PGPSelf = append(k.PGPSelf, ent)
			k.named(ent, field)
			dated = append(dated, pgpDated(field, ent, now, false))
		}
	}
	k.checkList("", "pgp", dated, now, e)
	dated = nil
	for i, f := range cfg.Self.SMIMECert {
		field := cfg.Self.SMIMECert.Field("self.smime_cert", i)
		if i >= len(cfg.Self.SMIMEKey) {
			break // validation names the mismatch
		}
		keyField := cfg.Self.SMIMEKey.Field("self.smime_key", i)
		certs, cerr := security.LoadCerts(cfg.Path(f))
		key, kerr := security.LoadKey(cfg.Path(cfg.Self.SMIMEKey[i]))
		switch {
		case cerr != nil:
			e.Addf(field, "", "", "%v", cerr)
		case kerr != nil:
			e.Addf(keyField, "", "", "%v", kerr)
		case !samePublicKey(certs[0], key):
			e.Addf(keyField, "", "", "the key does not belong to the certificate %s", f)
		default:
			k.SMIMESelf = append(k.SMIMESelf, security.SMIMEIdentity{Cert: certs[0], Key: key, Chain: certs[1:]})
			k.named(certs[0], field)
			dated = append(dated, certDated(field, certs[0]))
		}
	}
	k.checkList("", "smime", dated, now, e)
	if r := cfg.Revocation; len(r.CRLFiles) > 0 || r.Fetch {
		o := revocation.Options{Fetch: r.Fetch, FailOpen: r.Fail == config.FailOpen}
		for i, f := range r.CRLFiles {
			crl, err := revocation.LoadCRL(cfg.Path(f))
			if err != nil {
				e.Addf(r.CRLFiles.Field("revocation.crl_files", i), "", "", "%v", err)
				continue
			}
			o.CRLs = append(o.CRLs, crl)
		}
		k.Revocations = revocation.New(o)
		k.Revocation = k.Revocations
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
	k.warnUnaskable(cfg)
	return k, nil
}

// warnUnaskable warns of each pinned partner certificate whose issuer is
// known but whose revocation nothing can tell (no CRL file of its issuer,
// and no responder or distribution point to fetch): with fail closed its
// mail will be refused as revocation-unknown.
func (k *Keys) warnUnaskable(cfg *config.Config) {
	if k.Revocations == nil || cfg.Revocation.Fail != config.FailClosed {
		return
	}
	for _, p := range cfg.Partners {
		for _, c := range k.SMIMEPartners[p.Name] {
			if issuer := k.IssuerOf(c); issuer != nil && !k.Revocations.CanAsk(c, issuer) {
				k.Warnings = append(k.Warnings, fmt.Sprintf("partner %s: %s: nothing can tell whether certificate %s is revoked "+
					"(add its CA's CRL to revocation.crl_files, or set fetch: true): with fail: closed its mail is refused",
					p.Name, k.fieldOf(c), c.Subject))
			}
		}
	}
}

// datedKey is one key of a list, with when it serves and what it is.
type datedKey struct {
	field, what string
	from, to    time.Time // to is zero for never
	why         string    // why it cannot serve now, or ""
}

func pgpDated(field string, ent *openpgp.Entity, now time.Time, encrypt bool) datedKey {
	d := datedKey{field: field, what: "OpenPGP key " + security.Fingerprint(ent), from: ent.PrimaryKey.CreationTime,
		to: security.PGPExpiry(ent)}
	if encrypt {
		d.why = security.PGPUnusable(ent, now)
	} else {
		d.why = security.PGPUnusableToSign(ent, now)
	}
	return d
}

func certDated(field string, c *x509.Certificate) datedKey {
	return datedKey{field: field, what: "certificate " + c.Subject.String(), from: c.NotBefore, to: c.NotAfter}
}

// checkList records the expiries of one party's list of keys and reports
// it when none of them serves now: the reason of the newest, or, when
// the list is one key, its own.
func (k *Keys) checkList(partner, kind string, list []datedKey, now time.Time, e *config.Error) {
	who, party := "self", "self"
	if partner != "" {
		who, party = "partner "+partner, partner
	}
	serves := false
	var newest *datedKey
	for i := range list {
		d := &list[i]
		if d.why == "" && (now.Before(d.from) || !d.to.IsZero() && now.After(d.to)) {
			d.why = "not valid now"
		}
		if d.why == "" {
			serves = true
		}
		if newest == nil || d.from.After(newest.from) {
			newest = d
		}
		// What serves, or will, or did until it expired; not what is
		// revoked or otherwise unusable. A zero end is a key that never
		// expires: its party has nothing to renew.
		if d.why == "" || d.why == "not valid now" {
			k.expiries = append(k.expiries, expiry{who: who, field: d.field, what: d.what, party: party, kind: kind, at: d.to})
		}
	}
	if serves || newest == nil {
		for _, w := range k.Expiring(now) {
			if strings.HasPrefix(w, who+": ") && !slices.Contains(k.Warnings, w) {
				k.Warnings = append(k.Warnings, w)
			}
		}
		return
	}
	switch d := newest; {
	case now.Before(d.from):
		e.Addf(d.field, partner, "list the current key beside it until then", "%s is not valid before %s", d.what, d.from.Format(time.DateOnly))
	case !d.to.IsZero() && now.After(d.to):
		e.Addf(d.field, partner, "renew it and exchange the new one", "%s expired on %s", d.what, d.to.Format(time.DateOnly))
	default:
		e.Addf(d.field, partner, "", "%s: %s", d.what, d.why)
	}
}

// loadPartner loads the keys or certificates of partner p (partners[i]),
// adding its problems to e. One that cannot serve p at all is Unusable.
func (k *Keys) loadPartner(cfg *config.Config, i int, p *config.Partner, now time.Time, e *config.Error) {
	field := func(f string) string { return fmt.Sprintf("partners[%d].%s", i, f) }
	unusable := func(f, hint, format string, args ...any) {
		e.Addf(field(f), p.Name, hint, format, args...)
		if _, ok := k.Unusable[p.Name]; !ok {
			k.Unusable[p.Name] = fmt.Sprintf("partner %s: %s: ", p.Name, field(f)) + fmt.Sprintf(format, args...)
		}
	}
	switch p.Security {
	case config.PGP:
		var keys []*openpgp.Entity
		var revs []*packet.Signature
		var revFields []string
		for j, f := range p.PGPKey {
			ent, rev, err := security.LoadPGPKeyFile(cfg.Path(f), nil)
			switch {
			case err != nil:
				unusable(p.PGPKey.Field("pgp_key", j), "", "%v", err)
				return
			case rev != nil:
				revs, revFields = append(revs, rev), append(revFields, field(p.PGPKey.Field("pgp_key", j)))
				continue
			}
			if !pgpHasEmail(ent, p.Email) {
				unusable(p.PGPKey.Field("pgp_key", j), "ask the partner for the key of "+p.Email, "no user ID of the key names %s", p.Email)
			}
			keys = append(keys, ent)
			k.named(ent, field(p.PGPKey.Field("pgp_key", j)))
		}
		for j, rev := range revs {
			if security.ApplyRevocation(keys, rev) == nil {
				e.Addf(revFields[j], p.Name, "", "the revocation is of none of the partner's listed keys")
			}
		}
		k.PGPPartners[p.Name] = keys
		var dated []datedKey
		for j, ent := range keys {
			dated = append(dated, pgpDated(field(p.PGPKey.Field("pgp_key", j)), ent, now, true))
		}
		k.checkList(p.Name, "pgp", dated, now, e)
	case config.SMIME:
		var dated []datedKey
		for j, f := range p.SMIMECert {
			certs, err := security.LoadCerts(cfg.Path(f))
			if err != nil {
				unusable(p.SMIMECert.Field("smime_cert", j), "", "%v", err)
				return
			}
			if !certHasEmail(certs[0], p.Email) {
				unusable(p.SMIMECert.Field("smime_cert", j), "ask the partner for the certificate of "+p.Email, "the certificate does not name %s", p.Email)
			}
			k.SMIMEPartners[p.Name] = append(k.SMIMEPartners[p.Name], certs[0])
			k.named(certs[0], field(p.SMIMECert.Field("smime_cert", j)))
			k.AddIssuers(certs[1:]...)
			dated = append(dated, certDated(field(p.SMIMECert.Field("smime_cert", j)), certs[0]))
		}
		if len(dated) > 0 {
			k.checkList(p.Name, "smime", dated, now, e)
		}
		trust, tfield := p.SMIMETrust, "smime_trust"
		if len(trust) == 0 {
			trust, tfield = cfg.TrustAnchors, ""
		}
		var anchors []*x509.Certificate
		for j, f := range trust {
			certs, err := security.LoadCerts(cfg.Path(f))
			if err != nil {
				if tfield == "" {
					e.Addf(cfg.TrustAnchors.Field("trust_anchors", j), "", "", "%v", err)
					continue
				}
				unusable(trust.Field(tfield, j), "", "%v", err)
				return
			}
			anchors = append(anchors, certs...)
			for _, c := range certs {
				if tfield == "" {
					k.named(c, cfg.TrustAnchors.Field("trust_anchors", j))
				} else {
					k.named(c, field(trust.Field(tfield, j)))
				}
			}
		}
		if len(anchors) > 0 {
			k.Anchors[p.Name] = security.NewAnchors(p.Email, anchors)
		}
	}
}

func passphrase(cfg *config.Config) ([]byte, error) {
	p, err := cfg.Secret(cfg.Self.PassphraseFile, cfg.Self.PassphraseEnv)
	if p == "" {
		return nil, err
	}
	return []byte(p), err
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
			if p.Partner == "" || !strings.Contains(p.Field, ".pgp_key") && !strings.Contains(p.Field, ".smime_cert") &&
				!strings.Contains(p.Field, ".smime_trust") {
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
