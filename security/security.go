// Package security is hl7mail's wire format (draft-ietf-ediint-hl7-02 §2.6,
// §4 and §5, brought up to date): the MIME-EDI entity that carries an HL7
// message, signed and then encrypted as two layers with PGP/MIME (RFC 3156)
// or S/MIME (RFC 8551), the Received-Content-MIC of a signed entity
// (RFC 3335 §5.2, RFC 4130 §7.3.1), and the reading of all of it from mail,
// with typed errors for every way a mail can fail to be trusted.
//
// A partner's suite is chosen in one place: Keyring.Suite gives the Suite
// (pgp, smime or none) that seals mail for that partner and opens its mail.
//
// The package is a library: it imports nothing of hl7mail's services and
// logs nothing.
//
// It imports, of this module, nothing.
package security

import (
	"errors"
	"fmt"
)

// Errors a caller branches on. Verification and decryption errors wrap one
// of these; errors.Is finds it.
var (
	// ErrMalformed: the mail is not the MIME structure it claims to be.
	ErrMalformed = errors.New("malformed MIME")
	// ErrNotEncrypted: the content is not encrypted, where it must be.
	ErrNotEncrypted = errors.New("not encrypted")
	// ErrNotForUs: encrypted, but not to a key of ours.
	ErrNotForUs = errors.New("not encrypted to our key")
	// ErrWrongSuite: encrypted with the other suite than the partner's
	// (PGP/MIME from an S/MIME partner, or the reverse).
	ErrWrongSuite = errors.New("encrypted with another suite than the partner's")
	// ErrIntegrity: decrypted with our key, but what came out is damaged
	// (a bad CBC padding, a failed GCM tag, an unreadable inner entity):
	// the ciphertext was altered or cut on the way.
	ErrIntegrity = errors.New("encrypted content damaged")
	// ErrUnsigned: the content carries no signature.
	ErrUnsigned = errors.New("not signed")
	// ErrBadSignature: the signature does not match the content (tampered).
	ErrBadSignature = errors.New("bad signature")
	// ErrUnknownSigner: signed by a key or certificate we do not know.
	ErrUnknownSigner = errors.New("unknown signer")
	// ErrWrongSigner: signed validly, but not by the partner expected.
	ErrWrongSigner = errors.New("signer is not the expected partner")
	// ErrExpired: the signer's key or certificate is expired or not yet valid.
	ErrExpired = errors.New("key or certificate expired or not yet valid")
	// ErrWeakAlgorithm: MD5, SHA-1 signatures, RSA under 2048 bits.
	ErrWeakAlgorithm = errors.New("weak algorithm refused")
	// ErrMICAlgorithm: micalg names another digest than the signature used.
	ErrMICAlgorithm = errors.New("micalg does not match the signature's digest")
	// ErrContentType: the payload is not a MIME-EDI type this partner may send.
	ErrContentType = errors.New("content type not accepted")
)

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}
