package security

import (
	"crypto/x509"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
)

// PGPUnusable says why key e cannot encrypt (encrypt set) or sign at now,
// or returns "" when it can. An expired encryption subkey is an expired
// key (RFC 9580 §5.2.3.13: the subkey's own Key Expiration Time). The
// reason names dates only.
func PGPUnusable(e *openpgp.Entity, now time.Time) string { return pgpUnusable(e, now, true) }

// PGPUnusableToSign is PGPUnusable for signing with our own key.
func PGPUnusableToSign(e *openpgp.Entity, now time.Time) string { return pgpUnusable(e, now, false) }

func pgpUnusable(e *openpgp.Entity, now time.Time, encrypt bool) string {
	if e.Revoked(now) {
		return "the OpenPGP key is revoked"
	}
	var ok bool
	if encrypt {
		_, ok = e.EncryptionKey(now)
	} else {
		_, ok = e.SigningKey(now)
	}
	if ok {
		return ""
	}
	sig, _ := e.PrimarySelfSignature()
	if sig != nil && e.PrimaryKey.KeyExpired(sig, now) {
		if now.Before(e.PrimaryKey.CreationTime) {
			return "the OpenPGP key is not valid before " + e.PrimaryKey.CreationTime.Format(time.DateOnly)
		}
		return "the OpenPGP key expired on " + keyExpiry(e.PrimaryKey, sig).Format(time.DateOnly)
	}
	job := "signing"
	if encrypt {
		job = "encryption"
	}
	var last time.Time
	for _, sk := range e.Subkeys {
		if sk.Sig == nil || !sk.Sig.FlagsValid {
			continue
		}
		if encrypt && !sk.Sig.FlagEncryptCommunications && !sk.Sig.FlagEncryptStorage || !encrypt && !sk.Sig.FlagSign {
			continue
		}
		if at := keyExpiry(sk.PublicKey, sk.Sig); sk.PublicKey.KeyExpired(sk.Sig, now) && at.After(last) {
			last = at
		}
	}
	if !last.IsZero() {
		return "the OpenPGP " + job + " subkey expired on " + last.Format(time.DateOnly)
	}
	return "the OpenPGP key has no valid " + job + " key"
}

// keyExpiry is when pk expires by sig (the zero time for never).
func keyExpiry(pk *packet.PublicKey, sig *packet.Signature) time.Time {
	if sig.KeyLifetimeSecs == nil || *sig.KeyLifetimeSecs == 0 {
		return time.Time{}
	}
	return pk.CreationTime.Add(time.Duration(*sig.KeyLifetimeSecs) * time.Second)
}

// CertUnusable says why certificate c is not valid at now, or returns "".
func CertUnusable(c *x509.Certificate, now time.Time) string {
	switch {
	case now.Before(c.NotBefore):
		return "the certificate is not valid before " + c.NotBefore.Format(time.DateOnly)
	case now.After(c.NotAfter):
		return "the certificate expired on " + c.NotAfter.Format(time.DateOnly)
	}
	return ""
}

// PGPExpiry is when key e's primary key expires, the zero time for never.
func PGPExpiry(e *openpgp.Entity) time.Time {
	sig, _ := e.PrimarySelfSignature()
	if sig == nil {
		return time.Time{}
	}
	return keyExpiry(e.PrimaryKey, sig)
}
