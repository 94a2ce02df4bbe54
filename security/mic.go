package security

import (
	"crypto"
	"crypto/sha1"
	"crypto/sha256"
	_ "crypto/sha512" // registers SHA-384 and SHA-512
	"encoding/base64"
	"fmt"
	"strings"
)

// MIC is a Received-Content-MIC (draft-ietf-ediint-hl7-02 §4.1.3; RFC 3335
// §5.2; RFC 4130 §7.3.1): the digest of a signed entity in canonical form,
// its MIME headers, the blank line and the body.
type MIC struct {
	Digest []byte
	Hash   crypto.Hash // crypto.SHA256, or crypto.SHA1 from older partners
}

// ComputeMIC digests the canonical form of entity with SHA-256.
func ComputeMIC(entity []byte) MIC {
	d := sha256.Sum256(Canonical(entity))
	return MIC{Digest: d[:], Hash: crypto.SHA256}
}

// String formats the MIC as it is written in an MDN: "<base64>, sha-256".
func (m MIC) String() string {
	return base64.StdEncoding.EncodeToString(m.Digest) + ", " + micalgName(m.Hash)
}

// Equal reports whether two MICs name the same digest.
func (m MIC) Equal(o MIC) bool {
	return m.Hash == o.Hash && string(m.Digest) == string(o.Digest)
}

func micalgName(h crypto.Hash) string {
	switch h {
	case crypto.SHA1:
		return "sha1"
	case crypto.SHA256:
		return "sha-256"
	}
	return strings.ToLower(h.String())
}

// ParseMIC reads "<base64>, <algorithm>"; it accepts sha-256, sha256, sha1
// and sha-1 in any case (RFC 5751 names, and the older RFC 3335 ones).
func ParseMIC(s string) (MIC, error) {
	digest, alg, ok := strings.Cut(s, ",")
	if !ok {
		return MIC{}, malformed("Received-Content-MIC %s has no algorithm", token(s))
	}
	h, err := parseDigestName(strings.TrimSpace(alg))
	if err != nil {
		return MIC{}, err
	}
	d, err := base64.StdEncoding.DecodeString(strings.TrimSpace(digest))
	if err != nil {
		return MIC{}, malformed("Received-Content-MIC digest: %v", err)
	}
	if len(d) != h.Size() {
		return MIC{}, malformed("Received-Content-MIC digest is %d bytes, %s needs %d", len(d), alg, h.Size())
	}
	return MIC{Digest: d, Hash: h}, nil
}

// parseDigestName maps a digest name of an MDN or a micalg parameter to a
// hash: sha-256, sha256, pgp-sha256; sha1, sha-1, pgp-sha1.
func parseDigestName(name string) (crypto.Hash, error) {
	n := strings.TrimPrefix(strings.ToLower(strings.TrimSpace(name)), "pgp-")
	switch n {
	case "sha-256", "sha256":
		return crypto.SHA256, nil
	case "sha-1", "sha1":
		return crypto.SHA1, nil
	case "sha-384", "sha384":
		return crypto.SHA384, nil
	case "sha-512", "sha512":
		return crypto.SHA512, nil
	case "md5":
		return 0, fmt.Errorf("%w: digest %s", ErrWeakAlgorithm, token(name))
	}
	return 0, malformed("unknown digest %s", token(name))
}

// MICWith digests the canonical form of entity with h: the MIC of a
// receipt whose request named that signed-receipt-micalg.
func MICWith(entity []byte, h crypto.Hash) MIC { return computeMICWith(entity, h) }

// computeMICWith digests the canonical entity with h.
func computeMICWith(entity []byte, h crypto.Hash) MIC {
	c := Canonical(entity)
	if h == crypto.SHA1 {
		d := sha1.Sum(c)
		return MIC{Digest: d[:], Hash: h}
	}
	hh := h.New()
	hh.Write(c)
	return MIC{Digest: hh.Sum(nil), Hash: h}
}
