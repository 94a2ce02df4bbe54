package security

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"os"
	"strings"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	pgperrors "github.com/ProtonMail/go-crypto/openpgp/errors"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
)

// PGP/MIME content types (RFC 3156).
const (
	typeMultipartSigned    = "multipart/signed"
	typeMultipartEncrypted = "multipart/encrypted"
	protoPGPSignature      = "application/pgp-signature"
	protoPGPEncrypted      = "application/pgp-encrypted"
)

// pgpConfig is the OpenPGP configuration for what hl7mail writes: SHA-256
// signatures, AES-256, no compression, and the MDC-protected packet that
// GnuPG 2.2 reads.
func pgpConfig(now time.Time) *packet.Config {
	return &packet.Config{
		DefaultHash:            crypto.SHA256,
		DefaultCipher:          packet.CipherAES256,
		DefaultCompressionAlgo: packet.CompressionNone,
		Time:                   func() time.Time { return now },
	}
}

// Fingerprint returns the hex fingerprint of an OpenPGP key.
func Fingerprint(e *openpgp.Entity) string {
	return strings.ToUpper(hex.EncodeToString(e.PrimaryKey.Fingerprint))
}

// ReadPGPKey reads the first key of an armored (or binary) key file. When
// passphrase is given, protected private keys are decrypted with it.
func ReadPGPKey(r io.Reader, passphrase []byte) (*openpgp.Entity, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	var list openpgp.EntityList
	if bytes.Contains(data, []byte("-----BEGIN PGP")) {
		list, err = openpgp.ReadArmoredKeyRing(bytes.NewReader(data))
	} else {
		list, err = openpgp.ReadKeyRing(bytes.NewReader(data))
	}
	if err != nil {
		return nil, fmt.Errorf("read OpenPGP key: %w", err)
	}
	if len(list) == 0 {
		return nil, errors.New("read OpenPGP key: no key in file")
	}
	e := list[0]
	if e.PrivateKey != nil && e.PrivateKey.Encrypted {
		if len(passphrase) == 0 {
			return nil, errors.New("read OpenPGP key: the private key is protected and no passphrase was given")
		}
		if err := e.DecryptPrivateKeys(passphrase); err != nil {
			return nil, fmt.Errorf("read OpenPGP key: %w", err)
		}
	}
	return e, nil
}

// LoadPGPKey reads the key file at path (see ReadPGPKey).
func LoadPGPKey(path string, passphrase []byte) (*openpgp.Entity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	e, err := ReadPGPKey(f, passphrase)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return e, nil
}

// newBoundary returns a random multipart boundary.
func newBoundary() string {
	var b [15]byte
	rand.Read(b[:])
	return "hl7mail-" + hex.EncodeToString(b[:])
}

// writeHeader writes a Content-Type header line (and any extra lines) and
// the blank line that ends the header.
func writeEntityHeader(w *bytes.Buffer, contentType string, params map[string]string, extra ...string) {
	w.WriteString("Content-Type: " + mime.FormatMediaType(contentType, params) + "\r\n")
	for _, l := range extra {
		w.WriteString(l + "\r\n")
	}
	w.WriteString("\r\n")
}

// PGPSign signs entity (a MIME entity, canonicalized first) with a detached
// signature and returns the multipart/signed entity (RFC 3156 §5) and the
// MIC of what was signed.
func PGPSign(entity []byte, signer *openpgp.Entity, now time.Time) ([]byte, MIC, error) {
	canon := Canonical(entity)
	var sig bytes.Buffer
	if err := openpgp.ArmoredDetachSign(&sig, signer, bytes.NewReader(canon), pgpConfig(now)); err != nil {
		return nil, MIC{}, fmt.Errorf("security: sign: %w", err)
	}
	return assembleSigned(canon, sig.Bytes(), "pgp-sha256"), ComputeMIC(canon), nil
}

// assembleSigned builds a PGP multipart/signed entity from the canonical
// signed entity and its armored detached signature.
func assembleSigned(canon, armoredSig []byte, micalg string) []byte {
	boundary := newBoundary()
	var b bytes.Buffer
	writeEntityHeader(&b, typeMultipartSigned, map[string]string{
		"boundary": boundary, "micalg": micalg, "protocol": protoPGPSignature})
	b.WriteString("--" + boundary + "\r\n")
	b.Write(canon)
	b.WriteString("\r\n--" + boundary + "\r\n")
	writeEntityHeader(&b, protoPGPSignature, map[string]string{"name": "signature.asc"},
		`Content-Disposition: attachment; filename="signature.asc"`)
	b.Write(Canonical(armoredSig))
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes()
}

// PGPEncrypt encrypts entity to the recipients and returns the
// multipart/encrypted entity (RFC 3156 §4).
func PGPEncrypt(entity []byte, to []*openpgp.Entity, now time.Time) ([]byte, error) {
	var armored bytes.Buffer
	aw, err := armor.Encode(&armored, "PGP MESSAGE", nil)
	if err != nil {
		return nil, err
	}
	pw, err := openpgp.Encrypt(aw, to, nil, &openpgp.FileHints{IsBinary: true}, pgpConfig(now))
	if err != nil {
		return nil, fmt.Errorf("security: encrypt: %w", err)
	}
	if _, err := pw.Write(Canonical(entity)); err != nil {
		return nil, fmt.Errorf("security: encrypt: %w", err)
	}
	if err := pw.Close(); err != nil {
		return nil, fmt.Errorf("security: encrypt: %w", err)
	}
	if err := aw.Close(); err != nil {
		return nil, fmt.Errorf("security: encrypt: %w", err)
	}
	return assembleEncrypted(armored.Bytes()), nil
}

// assembleEncrypted builds a PGP multipart/encrypted entity around an
// armored OpenPGP message.
func assembleEncrypted(armored []byte) []byte {
	boundary := newBoundary()
	var b bytes.Buffer
	writeEntityHeader(&b, typeMultipartEncrypted, map[string]string{"boundary": boundary, "protocol": protoPGPEncrypted})
	b.WriteString("--" + boundary + "\r\n")
	writeEntityHeader(&b, protoPGPEncrypted, nil)
	b.WriteString("Version: 1\r\n")
	b.WriteString("\r\n--" + boundary + "\r\n")
	writeEntityHeader(&b, "application/octet-stream", map[string]string{"name": "encrypted.asc"},
		`Content-Disposition: inline; filename="encrypted.asc"`)
	b.Write(Canonical(armored))
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes()
}

// PGPKeys are the keys that open mail: ours, to decrypt (any of them), and
// the public keys of every partner, so that a signature by a known partner
// other than the expected one is told apart from one by a stranger.
type PGPKeys struct {
	Self     openpgp.EntityList
	Partners openpgp.EntityList
}

// Opened is what opening a mail established.
type Opened struct {
	// Entity is the signed MIME entity, in canonical form: for hl7mail's
	// own messages, the MIME-EDI entity.
	Entity []byte
	// MIC is the digest of Entity with the signature's hash algorithm, for
	// the receipt.
	MIC MIC
	// Signer is the signer's key fingerprint (PGP) or certificate subject
	// and fingerprint (CertName): which of a partner's keys signed.
	Signer string
	// SignerCert is the S/MIME signer's certificate.
	SignerCert *x509.Certificate
	carried    []*x509.Certificate // the other certificates of the CMS signature
	Encrypted  bool
	// Combined is true when signature and encryption came as one OpenPGP
	// message rather than two MIME layers.
	Combined bool
	// Signed is the decrypted signed entity as it was inside the
	// encryption (multipart/signed, or opaque signed data), for a third
	// party to verify with gpg or openssl; nil for the combined form.
	Signed []byte
}

// PGPOpen decrypts mail (a whole message, headers included) and verifies
// that expected signed what is inside. Encryption is required. It accepts
// the layered form hl7mail writes (multipart/signed inside
// multipart/encrypted) and the combined form (one signed and encrypted
// OpenPGP message inside multipart/encrypted).
func PGPOpen(mail []byte, keys PGPKeys, expected *openpgp.Entity, now time.Time) (*Opened, error) {
	var list openpgp.EntityList
	if expected != nil {
		list = append(list, expected)
	}
	return PGPOpenFrom(mail, keys, list, now)
}

// PGPOpenFrom is PGPOpen for a partner with several keys: a signature by
// any of expected is the partner's.
func PGPOpenFrom(mail []byte, keys PGPKeys, expected openpgp.EntityList, now time.Time) (*Opened, error) {
	e, err := parseEntity(mail)
	if err != nil {
		return nil, err
	}
	if e.typ != typeMultipartEncrypted {
		if e.typ == typeMultipartSigned {
			return nil, fmt.Errorf("%w: signed but not encrypted", ErrNotEncrypted)
		}
		return nil, fmt.Errorf("%w: Content-Type %s", ErrNotEncrypted, e.typ)
	}
	if p := strings.ToLower(e.params["protocol"]); p != protoPGPEncrypted {
		return nil, malformed("multipart/encrypted protocol %s, want %s", token(e.params["protocol"]), protoPGPEncrypted)
	}
	parts, err := e.parts()
	if err != nil {
		return nil, err
	}
	if len(parts) != 2 {
		return nil, malformed("multipart/encrypted has %d parts, want 2", len(parts))
	}
	_, ciphertext, err := splitEntity(parts[1])
	if err != nil {
		return nil, err
	}
	block, err := armor.Decode(bytes.NewReader(ciphertext))
	if err != nil {
		return nil, malformed("encrypted part: %v", err)
	}
	md, err := openpgp.ReadMessage(block.Body, openKeyring{self: keys.Self, signers: keys.Partners}, nil, pgpConfig(now))
	if err != nil {
		var sessionErr pgperrors.DecryptWithSessionKeyError
		switch {
		case errors.Is(err, pgperrors.ErrKeyIncorrect):
			return nil, fmt.Errorf("%w: %v", ErrNotForUs, err)
		case errors.As(err, &sessionErr):
			// The session key decrypted to something that does not
			// decrypt the data: the ciphertext was altered.
			return nil, fmt.Errorf("%w: encrypted part: %v", ErrBadSignature, err)
		}
		return nil, malformed("encrypted part: %v", err)
	}
	if !md.IsEncrypted || md.IsSymmetricallyEncrypted {
		return nil, fmt.Errorf("%w: not encrypted to a public key", ErrNotEncrypted)
	}
	plain, err := io.ReadAll(md.UnverifiedBody)
	if err != nil {
		// An integrity failure of the encrypted data (MDC) comes here.
		return nil, fmt.Errorf("%w: decrypted data: %v", ErrBadSignature, err)
	}
	if md.IsSigned {
		return combinedResult(md, Canonical(plain), keys, expected, now)
	}
	o, err := pgpVerify(plain, keys, expected, now)
	if err != nil {
		return nil, err
	}
	o.Encrypted, o.Signed = true, plain
	return o, nil
}

// SplitSigned returns the two parts of a multipart/signed entity: the
// signed part exactly as it was signed (canonical, CRLF) and the body of
// the signature part (an armored OpenPGP signature, or base64 CMS as
// written), so that gpg --verify or openssl can check them apart.
func SplitSigned(entity []byte) (content, signature []byte, err error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, nil, err
	}
	if e.typ != typeMultipartSigned {
		return nil, nil, fmt.Errorf("%w: content is %s", ErrUnsigned, e.typ)
	}
	parts, err := e.parts()
	if err != nil {
		return nil, nil, err
	}
	if len(parts) != 2 {
		return nil, nil, malformed("multipart/signed has %d parts, want 2", len(parts))
	}
	_, sig, err := splitEntity(parts[1])
	if err != nil {
		return nil, nil, err
	}
	return Canonical(parts[0]), sig, nil
}

// openKeyring decrypts with our own key only and verifies signatures with
// the partners' keys only, whatever else those entities hold.
type openKeyring struct {
	self    openpgp.EntityList
	signers openpgp.EntityList
}

// KeysById serves decryption: only our keys.
func (k openKeyring) KeysById(id uint64) []openpgp.Key {
	return k.self.KeysById(id)
}

// KeysByIdUsage serves signature checks: only the partners' keys.
func (k openKeyring) KeysByIdUsage(id uint64, usage byte) []openpgp.Key {
	return k.signers.KeysByIdUsage(id, usage)
}

// DecryptionKeys serves anonymous recipients: only our keys.
func (k openKeyring) DecryptionKeys() []openpgp.Key {
	return k.self.DecryptionKeys()
}

// combinedResult checks the signature of a signed-and-encrypted OpenPGP
// message, read to its end.
func combinedResult(md *openpgp.MessageDetails, plain []byte, keys PGPKeys, expected openpgp.EntityList, now time.Time) (*Opened, error) {
	if md.SignedBy == nil {
		return nil, fmt.Errorf("%w: key id %X", ErrUnknownSigner, md.SignedByKeyId)
	}
	sig := md.Signature
	if md.SignatureError != nil {
		return nil, classifyPGPError(md.SignatureError)
	}
	if sig == nil {
		return nil, fmt.Errorf("%w: no signature packet", ErrUnsigned)
	}
	if err := checkSigner(md.SignedBy.Entity, sig.Hash, keys, expected); err != nil {
		return nil, err
	}
	return &Opened{Entity: plain, MIC: computeMICWith(plain, sig.Hash), Signer: Fingerprint(md.SignedBy.Entity),
		Encrypted: true, Combined: true}, nil
}

// pgpVerify verifies a multipart/signed entity (RFC 3156 §5).
func pgpVerify(entity []byte, keys PGPKeys, expected openpgp.EntityList, now time.Time) (*Opened, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, err
	}
	if e.typ != typeMultipartSigned {
		return nil, fmt.Errorf("%w: content is %s", ErrUnsigned, e.typ)
	}
	params := e.params
	if p := strings.ToLower(params["protocol"]); p != protoPGPSignature {
		return nil, malformed("multipart/signed protocol %s, want %s", token(params["protocol"]), protoPGPSignature)
	}
	micalg, err := parseDigestName(params["micalg"])
	if err != nil {
		return nil, fmt.Errorf("micalg: %w", err)
	}
	parts, err := e.parts()
	if err != nil {
		return nil, err
	}
	if len(parts) != 2 {
		return nil, malformed("multipart/signed has %d parts, want 2", len(parts))
	}
	signed := Canonical(parts[0])
	_, sigBody, err := splitEntity(parts[1])
	if err != nil {
		return nil, err
	}
	sigReader := io.Reader(bytes.NewReader(sigBody))
	if bytes.Contains(sigBody, []byte("-----BEGIN PGP")) {
		block, err := armor.Decode(bytes.NewReader(sigBody))
		if err != nil {
			return nil, malformed("signature part: %v", err)
		}
		sigReader = block.Body
	}
	keyring := append(openpgp.EntityList{}, keys.Partners...)
	sig, signer, err := openpgp.VerifyDetachedSignature(keyring, bytes.NewReader(signed), sigReader, pgpConfig(now))
	if sig != nil && signer != nil && err != nil && isExpiry(err) {
		return nil, fmt.Errorf("%w: %s: %v", ErrExpired, Fingerprint(signer), err)
	}
	if err != nil {
		return nil, classifyPGPError(err)
	}
	if sig.Hash != micalg {
		return nil, fmt.Errorf("%w: micalg %s, signature %s", ErrMICAlgorithm, params["micalg"], sig.Hash)
	}
	if err := checkSigner(signer, sig.Hash, keys, expected); err != nil {
		return nil, err
	}
	return &Opened{Entity: signed, MIC: computeMICWith(signed, sig.Hash), Signer: Fingerprint(signer)}, nil
}

// checkSigner refuses weak signatures and signers other than expected.
func checkSigner(signer *openpgp.Entity, hash crypto.Hash, keys PGPKeys, expected openpgp.EntityList) error {
	if hash == crypto.SHA1 || hash == crypto.MD5 {
		return fmt.Errorf("%w: %s signature", ErrWeakAlgorithm, hash)
	}
	if bits, err := signer.PrimaryKey.BitLength(); err == nil && isRSA(signer.PrimaryKey.PubKeyAlgo) && bits < 2048 {
		return fmt.Errorf("%w: RSA key of %d bits", ErrWeakAlgorithm, bits)
	}
	for _, e := range expected {
		if bytes.Equal(signer.PrimaryKey.Fingerprint, e.PrimaryKey.Fingerprint) {
			return nil
		}
	}
	return fmt.Errorf("%w: signed by %s", ErrWrongSigner, Fingerprint(signer))
}

func isRSA(a packet.PublicKeyAlgorithm) bool {
	return a == packet.PubKeyAlgoRSA || a == packet.PubKeyAlgoRSASignOnly
}

func isExpiry(err error) bool {
	return errors.Is(err, pgperrors.ErrKeyExpired) || errors.Is(err, pgperrors.ErrSignatureExpired)
}

// classifyPGPError maps go-crypto's verification errors to ours.
func classifyPGPError(err error) error {
	var sigErr pgperrors.SignatureError
	var weak pgperrors.WeakAlgorithmError
	switch {
	case errors.Is(err, pgperrors.ErrUnknownIssuer):
		return fmt.Errorf("%w: %v", ErrUnknownSigner, err)
	case isExpiry(err):
		return fmt.Errorf("%w: %v", ErrExpired, err)
	case errors.Is(err, pgperrors.ErrKeyRevoked):
		return fmt.Errorf("%w: the OpenPGP key is revoked", ErrRevoked)
	case errors.As(err, &weak):
		return fmt.Errorf("%w: %v", ErrWeakAlgorithm, err)
	case errors.As(err, &sigErr):
		return fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	return fmt.Errorf("%w: %v", ErrBadSignature, err)
}
