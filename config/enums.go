package config

import "slices"

// The settings below take one of a few words each. Each is a type of its
// own, with its words as constants, so that code compares against the
// constants and validation asks the type (valid) rather than repeating the
// words.

// Suite is a partner's security: pgp, smime or none.
type Suite string

// Suites.
const (
	PGP        Suite = "pgp"   // PGP/MIME (RFC 3156)
	SMIME      Suite = "smime" // S/MIME 4.0 (RFC 8551)
	NoSecurity Suite = "none"  // unsigned and unencrypted: only with allow_unencrypted
)

func (Suite) words() []string { return []string{"pgp", "smime", "none"} }

// Signs reports whether mail of the suite is signed (and encrypted).
func (s Suite) Signs() bool { return s == PGP || s == SMIME }

// Receipt is the receipt (MDN) asked of a partner: signed, unsigned or none.
type Receipt string

// Receipts.
const (
	ReceiptSigned   Receipt = "signed"
	ReceiptUnsigned Receipt = "unsigned"
	ReceiptNone     Receipt = "none"
)

func (Receipt) words() []string { return []string{"signed", "unsigned", "none"} }

// KeyTransport is how S/MIME content keys are encrypted to a partner.
type KeyTransport string

// Key transports.
const (
	OAEP     KeyTransport = "oaep"     // RSAES-OAEP with SHA-256 (default)
	PKCS1v15 KeyTransport = "pkcs1v15" // RSAES-PKCS1-v1_5, for partners that need it
)

func (KeyTransport) words() []string { return []string{"oaep", "pkcs1v15"} }

// AckMode is when the surrogate answers: immediate or rendezvous.
type AckMode string

// Ack modes.
const (
	AckImmediate  AckMode = "immediate"  // CA once stored
	AckRendezvous AckMode = "rendezvous" // the partner's own response
)

func (AckMode) words() []string { return []string{"immediate", "rendezvous"} }

// AcceptAck is what the surrogate answers a sender in original mode with:
// CA or AA.
type AcceptAck string

// Accept acknowledgements.
const (
	AcceptCA AcceptAck = "CA"
	AcceptAA AcceptAck = "AA"
)

func (AcceptAck) words() []string { return []string{"CA", "AA"} }

// BatchAck is how an HL7 batch is answered: batch or each.
type BatchAck string

// Batch acknowledgements.
const (
	BatchAckBatch BatchAck = "batch" // one ACK for the batch
	BatchAckEach  BatchAck = "each"  // one ACK per message, in a batch
)

func (BatchAck) words() []string { return []string{"batch", "each"} }

// TLSMode is how a mail server is reached: starttls, tls or none.
type TLSMode string

// TLS modes.
const (
	StartTLS    TLSMode = "starttls" // plain, then STARTTLS (default)
	ImplicitTLS TLSMode = "tls"      // TLS from the first byte
	NoTLS       TLSMode = "none"     // loopback only
)

func (TLSMode) words() []string { return []string{"starttls", "tls", "none"} }

// enum is one of the types above.
type enum interface {
	~string
	words() []string
}

// valid reports whether e is one of its type's words.
func valid[E enum](e E) bool { return slices.Contains(e.words(), string(e)) }

// FailMode is what an unanswered revocation check means: closed or open.
type FailMode string

// Fail modes.
const (
	FailClosed FailMode = "closed" // "cannot tell" refuses (the default)
	FailOpen   FailMode = "open"   // "cannot tell" is logged and accepted
)

func (FailMode) words() []string { return []string{"closed", "open"} }
