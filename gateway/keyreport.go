package gateway

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/security"
)

// KeyReport is every key and certificate of cfg's parties as keys loaded
// them, with what each does at now and its state: what "hl7mail keys"
// prints and the dashboard shows. For S/MIME certificates whose issuer is
// known, revocation is asked when ask is set ("hl7mail keys" on a stopped
// instance); otherwise only the CRL files and the answers cached by the
// running mail side are read, so that a slow responder never holds up the
// dashboard or a metrics scrape.
func KeyReport(cfg *config.Config, keys *Keys, now time.Time, ask bool) []dashboard.KeyRow {
	if !ask && keys.Revocations != nil {
		view := *keys
		view.Revocation = keys.Revocations.Cached()
		keys = &view
	}
	var rows []dashboard.KeyRow
	for _, e := range keys.PGPSelf {
		st := security.KeyStateOfPGP(e, keys.PGPSelf, now, false)
		roles := []string{"decrypt"}
		if st == security.StateActive {
			roles = []string{"sign", "decrypt"}
		}
		rows = append(rows, pgpRow("self", keys.fieldOf(e), e, st, roles, now))
	}
	for _, id := range keys.SMIMESelf {
		st := security.KeyStateOfCert(id.Cert, certsOfIDs(keys.SMIMESelf), now)
		roles := []string{"decrypt"}
		if st == security.StateActive {
			roles = []string{"sign", "decrypt"}
		}
		rows = append(rows, certRow("self", keys.fieldOf(id.Cert), "smime", id.Cert, st, roles, "", now))
	}
	for _, p := range cfg.Partners {
		switch p.Security {
		case config.PGP:
			// A partner's key verifies while its signing key is valid, and
			// is encrypted to while its encryption key is too (PGP mail
			// goes to every valid one).
			list := keys.PGPPartners[p.Name]
			for _, e := range list {
				st := security.KeyStateOfPGP(e, list, now, false)
				var roles []string
				note := ""
				if st == security.StateActive || st == security.StateRetiring {
					roles = []string{"verify"}
					if why := security.PGPUnusable(e, now); why == "" {
						roles = []string{"encrypt-to", "verify"}
					} else {
						note = why
					}
				}
				r := pgpRow(p.Name, keys.fieldOf(e), e, st, roles, now)
				if note != "" {
					r.Note = note
				}
				rows = append(rows, r)
			}
		case config.SMIME:
			list := keys.SMIMEPartners[p.Name]
			to, _ := keys.SMIMEEncryptTo(p.Name, now)
			for _, c := range list {
				st := security.KeyStateOfCert(c, list, now)
				rows = append(rows, keys.partnerCertRow(p.Name, keys.fieldOf(c), c, st, to, nil, now))
			}
			if keys.Seen != nil && keys.Anchors[p.Name] != nil {
				if c, carried := keys.Seen.Newest(p.Name); c != nil {
					st := security.StateActive
					if s := security.KeyStateOfCert(c, []*x509.Certificate{c}, now); s != security.StateActive {
						st = s
					}
					rows = append(rows, keys.partnerCertRow(p.Name, "store", c, st, to, carried, now))
				}
			}
			if a := keys.Anchors[p.Name]; a != nil {
				for _, c := range slices.Concat(a.Roots, a.Intermediates) {
					st := security.KeyStateOfCert(c, []*x509.Certificate{c}, now)
					var roles []string
					if st == security.StateActive {
						roles = []string{"trust"}
					}
					field := keys.fieldOf(c)
					rows = append(rows, certRow(p.Name, field, "anchor", c, st, roles, "", now))
				}
			}
		}
	}
	return rows
}

// partnerCertRow is a partner's certificate: it verifies while valid, is
// encrypted to when it is to, and is revoked when the checker says so.
func (k *Keys) partnerCertRow(partner, field string, c *x509.Certificate, st security.KeyState, to *x509.Certificate,
	carried []*x509.Certificate, now time.Time) dashboard.KeyRow {
	var roles []string
	note := ""
	if st == security.StateActive || st == security.StateRetiring {
		roles = []string{"verify"}
		if to != nil && string(to.Raw) == string(c.Raw) {
			roles = []string{"encrypt-to", "verify"}
		}
		if err := k.CheckSMIMESigner(partner, c, carried, now); errors.Is(err, security.ErrRevoked) {
			st, roles, note = security.StateRevoked, nil, "revoked"
		} else if errors.Is(err, security.ErrRevocationUnknown) {
			note = "revocation cannot be told: refused while it cannot"
		}
	}
	return certRow(partner, field, "smime", c, st, roles, note, now)
}

func pgpRow(party, field string, e *openpgp.Entity, st security.KeyState, roles []string, now time.Time) dashboard.KeyRow {
	r := dashboard.KeyRow{Party: party, Field: field, Kind: "pgp", Fingerprint: security.Fingerprint(e),
		From: e.PrimaryKey.CreationTime, To: security.PGPExpiry(e), Roles: roles, Status: string(st)}
	for _, id := range e.Identities {
		if id.UserId != nil {
			r.Subject = id.UserId.Email
			break
		}
	}
	if st == security.StateActive || st == security.StateRetiring {
		// An encryption subkey may expire before the primary key: the key
		// serves until the first of them.
		if sub, ok := e.EncryptionKey(now); ok && sub.SelfSignature != nil && sub.SelfSignature.KeyLifetimeSecs != nil &&
			*sub.SelfSignature.KeyLifetimeSecs > 0 {
			at := sub.PublicKey.CreationTime.Add(time.Duration(*sub.SelfSignature.KeyLifetimeSecs) * time.Second)
			if r.To.IsZero() || at.Before(r.To) {
				r.To = at
			}
		}
	}
	if st == security.StateRevoked {
		r.Note = "a revocation signature is on the key"
	}
	daysLeft(&r, now)
	return r
}

func certRow(party, field, kind string, c *x509.Certificate, st security.KeyState, roles []string, note string, now time.Time) dashboard.KeyRow {
	sum := sha256.Sum256(c.Raw)
	r := dashboard.KeyRow{Party: party, Field: field, Kind: kind, Fingerprint: strings.ToUpper(hex.EncodeToString(sum[:])),
		Subject: c.Subject.String(), From: c.NotBefore, To: c.NotAfter, Roles: roles, Status: string(st), Note: note}
	daysLeft(&r, now)
	return r
}

func daysLeft(r *dashboard.KeyRow, now time.Time) {
	if r.To.IsZero() || r.Status == string(security.StateExpired) || r.Status == string(security.StateRevoked) {
		return
	}
	d := int(math.Floor(r.To.Sub(now).Hours() / 24))
	r.DaysLeft = &d
}

func certsOfIDs(ids []security.SMIMEIdentity) []*x509.Certificate {
	out := make([]*x509.Certificate, len(ids))
	for i, id := range ids {
		out[i] = id.Cert
	}
	return out
}

// fieldOf names where partners.yaml names a loaded key or certificate.
func (k *Keys) fieldOf(key any) string { return k.fields[key] }

// named records that field names key (an *openpgp.Entity or an
// *x509.Certificate).
func (k *Keys) named(key any, field string) {
	if k.fields == nil {
		k.fields = map[any]string{}
	}
	k.fields[key] = field
}
