package security

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-message"
	"github.com/smallstep/pkcs7"
)

// S/MIME content types (RFC 8551), with the x- names older agents write.
const (
	typePKCS7Signature  = "application/pkcs7-signature"
	typeXPKCS7Signature = "application/x-pkcs7-signature"
	typePKCS7MIME       = "application/pkcs7-mime"
	typeXPKCS7MIME      = "application/x-pkcs7-mime"
)

// SMIMEKeys are the certificates and keys that open S/MIME mail: ours (any
// of them decrypts), and every partner's certificate, so that a signature
// by a known partner other than the expected one is told apart from one by
// a stranger.
type SMIMEKeys struct {
	Self     []SMIMEIdentity
	Partners []*x509.Certificate
	// Check, when set, decides whether the signer (with the certificates
	// the message carried) is the expected partner, in place of pinning
	// to the expected certificate: Keyring.CheckSMIMESigner.
	Check func(signer *x509.Certificate, carried []*x509.Certificate, now time.Time) error
}

// LoadCert reads the first certificate of a PEM file.
func LoadCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, fmt.Errorf("%s: no PEM certificate", path)
		}
		if b.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			return c, nil
		}
	}
}

// LoadKey reads a PEM private key (PKCS #8, PKCS #1 or SEC 1).
func LoadKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			return nil, fmt.Errorf("%s: no PEM private key", path)
		}
		switch b.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			s, ok := k.(crypto.Signer)
			if !ok {
				return nil, fmt.Errorf("%s: unsupported key type %T", path, k)
			}
			return s, nil
		case "RSA PRIVATE KEY":
			return x509.ParsePKCS1PrivateKey(b.Bytes)
		case "EC PRIVATE KEY":
			return x509.ParseECPrivateKey(b.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, fmt.Errorf("%s: encrypted PEM keys are not supported; keep the key file 0600 instead", path)
		}
	}
}

// base64Part returns a MIME entity with the given header fields and data in
// base64.
func base64Part(contentType string, params map[string]string, filename string, data []byte) ([]byte, error) {
	var h message.Header
	h.SetContentType(contentType, params)
	h.Set("Content-Transfer-Encoding", "base64")
	h.SetContentDisposition("attachment", map[string]string{"filename": filename})
	var b bytes.Buffer
	w, err := message.CreateWriter(&b, h)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(data); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// github.com/smallstep/pkcs7 keeps its encryption settings and its default
// digest in package variables. hl7mail sets none of them: it uses the
// package for SignedData only, choosing the digest on each SignedData
// (SetDigestAlgorithm), and does its enveloped data itself (cms.go). So its
// use here is safe from several goroutines and from other users of the
// package in the same program.

// SMIMESign signs entity (canonicalized first) with a detached CMS
// SignedData (SHA-256, carrying the signer's certificate) and returns the
// multipart/signed entity (RFC 8551 §3.5.3) and the MIC of what was signed.
func SMIMESign(entity []byte, cert *x509.Certificate, key crypto.Signer) ([]byte, MIC, error) {
	return SMIMESignChain(entity, cert, key, nil)
}

// SMIMESignChain is SMIMESign with the intermediates that issued cert
// carried in the signature too, for partners that hold only the root.
func SMIMESignChain(entity []byte, cert *x509.Certificate, key crypto.Signer, chain []*x509.Certificate) ([]byte, MIC, error) {
	canon := Canonical(entity)
	sd, err := pkcs7.NewSignedData(canon)
	if err != nil {
		return nil, MIC{}, fmt.Errorf("security: sign: %w", err)
	}
	sd.SetDigestAlgorithm(pkcs7.OIDDigestAlgorithmSHA256)
	if err := sd.AddSignerChain(cert, key, chain, pkcs7.SignerInfoConfig{}); err != nil {
		return nil, MIC{}, fmt.Errorf("security: sign: %w", err)
	}
	sd.Detach()
	der, err := sd.Finish()
	if err != nil {
		return nil, MIC{}, fmt.Errorf("security: sign: %w", err)
	}
	sigPart, err := base64Part(typePKCS7Signature, map[string]string{"name": "smime.p7s"}, "smime.p7s", der)
	if err != nil {
		return nil, MIC{}, err
	}
	boundary := newBoundary()
	var b bytes.Buffer
	writeEntityHeader(&b, typeMultipartSigned, map[string]string{
		"boundary": boundary, "micalg": "sha-256", "protocol": typePKCS7Signature})
	b.WriteString("--" + boundary + "\r\n")
	b.Write(canon)
	b.WriteString("\r\n--" + boundary + "\r\n")
	b.Write(sigPart)
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes(), ComputeMIC(canon), nil
}

// SMIMEEncrypt encrypts entity (canonicalized first) to the recipients and
// returns the application/pkcs7-mime; smime-type=enveloped-data entity.
func SMIMEEncrypt(entity []byte, to []*x509.Certificate, kt KeyTransport) ([]byte, error) {
	der, err := cmsEncrypt(Canonical(entity), to, kt)
	if err != nil {
		return nil, err
	}
	return base64Part(typePKCS7MIME, map[string]string{"smime-type": "enveloped-data", "name": "smime.p7m"}, "smime.p7m", der)
}

// decodedBody returns the body of a MIME entity with its transfer encoding
// undone.
func decodedBody(entity []byte) ([]byte, error) {
	e, err := message.Read(bytes.NewReader(entity))
	if err != nil && !message.IsUnknownCharset(err) {
		if message.IsUnknownEncoding(err) {
			return nil, malformed("unknown Content-Transfer-Encoding")
		}
		return nil, HeaderFault(entity)
	}
	b, err := io.ReadAll(e.Body)
	if err != nil {
		return nil, malformed("body: %v", err)
	}
	return b, nil
}

// SMIMEOpen decrypts mail (a whole message, headers included) with any of
// our identities and verifies that expected signed what is inside (or that
// keys.Check accepts the signer, when set). Encryption is required. Inside
// the enveloped data it accepts multipart/signed (what hl7mail writes) and
// opaque signed-data.
func SMIMEOpen(mail []byte, keys SMIMEKeys, expected *x509.Certificate, now time.Time) (*Opened, error) {
	e, err := parseEntity(mail)
	if err != nil {
		return nil, err
	}
	ct, params := e.typ, e.params
	if ct == typeMultipartSigned {
		return nil, fmt.Errorf("%w: signed but not encrypted", ErrNotEncrypted)
	}
	if ct != typePKCS7MIME && ct != typeXPKCS7MIME {
		return nil, fmt.Errorf("%w: Content-Type %s", ErrNotEncrypted, ct)
	}
	if st := strings.ToLower(params["smime-type"]); st == "signed-data" {
		return nil, fmt.Errorf("%w: signed-data, not enveloped", ErrNotEncrypted)
	}
	der, err := decodedBody(mail)
	if err != nil {
		return nil, err
	}
	plain, err := smimeDecrypt(der, keys.Self)
	if err != nil {
		return nil, err
	}
	o, err := smimeVerify(plain, keys, expected, now)
	if errors.Is(err, ErrMalformed) {
		// Decrypted with our key, and yet not MIME: CBC has no integrity
		// of its own, so altered ciphertext comes out as garbled blocks.
		return nil, fmt.Errorf("%w: the decrypted entity is unreadable", ErrIntegrity)
	}
	if err != nil {
		return nil, err
	}
	o.Encrypted, o.Signed = true, plain
	return o, nil
}

// smimeDecrypt decrypts with the first of ours the enveloped data names.
func smimeDecrypt(der []byte, self []SMIMEIdentity) ([]byte, error) {
	err := fmt.Errorf("%w: no S/MIME certificate of ours is loaded", ErrNotForUs)
	for _, id := range self {
		dec, ok := id.Key.(crypto.Decrypter)
		if !ok {
			return nil, errors.New("security: our S/MIME key cannot decrypt")
		}
		var plain []byte
		if plain, err = cmsDecrypt(der, id.Cert, dec); !errors.Is(err, ErrNotForUs) {
			return plain, err
		}
	}
	return nil, err
}

// smimeVerify verifies a multipart/signed entity with a CMS signature, or
// an opaque application/pkcs7-mime; smime-type=signed-data one.
func smimeVerify(entity []byte, keys SMIMEKeys, expected *x509.Certificate, now time.Time) (*Opened, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, err
	}
	ct, params := e.typ, e.params
	var signed, sigDER []byte
	var micalg crypto.Hash
	switch ct {
	case typeMultipartSigned:
		p := strings.ToLower(params["protocol"])
		if p != typePKCS7Signature && p != typeXPKCS7Signature {
			return nil, malformed("multipart/signed protocol %s, want %s", token(params["protocol"]), typePKCS7Signature)
		}
		if micalg, err = parseDigestName(params["micalg"]); err != nil {
			return nil, fmt.Errorf("micalg: %w", err)
		}
		parts, err := e.parts()
		if err != nil {
			return nil, err
		}
		if len(parts) != 2 {
			return nil, malformed("multipart/signed has %d parts, want 2", len(parts))
		}
		signed = Canonical(parts[0])
		if sigDER, err = decodedBody(parts[1]); err != nil {
			return nil, err
		}
	case typePKCS7MIME, typeXPKCS7MIME:
		if st := strings.ToLower(params["smime-type"]); st != "signed-data" {
			return nil, fmt.Errorf("%w: smime-type %s inside the encryption", ErrUnsigned, token(params["smime-type"]))
		}
		if sigDER, err = decodedBody(entity); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("%w: content is %s", ErrUnsigned, ct)
	}
	p7, err := pkcs7.Parse(sigDER)
	if err != nil {
		return nil, malformed("CMS signature: %v", err)
	}
	if len(p7.Signers) != 1 {
		return nil, malformed("CMS signature has %d signers, want 1", len(p7.Signers))
	}
	if signed != nil {
		p7.Content = signed
	} else {
		signed = Canonical(p7.Content)
	}
	digest, err := hashForOID(p7.Signers[0].DigestAlgorithm.Algorithm)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrWeakAlgorithm, err)
	}
	if digest == crypto.SHA1 {
		return nil, fmt.Errorf("%w: SHA-1 signature", ErrWeakAlgorithm)
	}
	if micalg != 0 && micalg != digest {
		return nil, fmt.Errorf("%w: micalg %s, signature %s", ErrMICAlgorithm, params["micalg"], digest)
	}
	signer := p7.GetOnlySigner()
	if signer == nil {
		return nil, fmt.Errorf("%w: the signature carries no signer certificate", ErrUnknownSigner)
	}
	if err := p7.Verify(); err != nil {
		var mismatch *pkcs7.MessageDigestMismatchError
		if errors.As(err, &mismatch) {
			return nil, fmt.Errorf("%w: content does not match the signed digest", ErrBadSignature)
		}
		var badTime *pkcs7.SigningTimeNotValidError
		if errors.As(err, &badTime) {
			return nil, fmt.Errorf("%w: signed at %s, certificate valid %s to %s", ErrExpired,
				badTime.SigningTime.Format(time.RFC3339), badTime.NotBefore.Format(time.DateOnly), badTime.NotAfter.Format(time.DateOnly))
		}
		return nil, fmt.Errorf("%w: %v", ErrBadSignature, err)
	}
	check := keys.Check
	if check == nil {
		check = func(signer *x509.Certificate, _ []*x509.Certificate, now time.Time) error {
			var pins []*x509.Certificate
			if expected != nil {
				pins = append(pins, expected)
			}
			return checkPinned(signer, pins, keys.Partners, now)
		}
	}
	if err := check(signer, p7.Certificates, now); err != nil {
		return nil, err
	}
	return &Opened{Entity: signed, MIC: computeMICWith(signed, digest), Signer: CertName(signer), SignerCert: signer,
		carried: p7.Certificates}, nil
}
