package security

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
	"github.com/smallstep/pkcs7"
)

// LoadCerts reads every certificate of a file: PEM certificates (a chain,
// leaf first, or a bundle), a PKCS #7 bundle (.p7b, PEM or DER, as CAs
// and DirectTrust publish them) or one DER certificate.
func LoadCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	certs, err := parseCerts(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return certs, nil
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	if !bytes.Contains(data, []byte("-----BEGIN")) {
		if c, err := x509.ParseCertificate(data); err == nil {
			return []*x509.Certificate{c}, nil
		}
		return parsePKCS7Certs(data)
	}
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		switch b.Type {
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, err
			}
			out = append(out, c)
		case "PKCS7", "CMS":
			cs, err := parsePKCS7Certs(b.Bytes)
			if err != nil {
				return nil, err
			}
			out = append(out, cs...)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate (PEM, PKCS #7 or DER)")
	}
	return out, nil
}

func parsePKCS7Certs(der []byte) ([]*x509.Certificate, error) {
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("neither a DER certificate nor a PKCS #7 bundle: %v", err)
	}
	if len(p7.Certificates) == 0 {
		return nil, errors.New("the PKCS #7 bundle holds no certificate")
	}
	return p7.Certificates, nil
}

// LoadPGPKeyFile reads a key file (see ReadPGPKey) or a file holding only
// a key revocation signature, as GnuPG writes to openpgp-revocs.d (with or
// without the colon that guards its armor line): exactly one of the
// results is set.
func LoadPGPKeyFile(path string, passphrase []byte) (*openpgp.Entity, *packet.Signature, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	if rev := readRevocation(data); rev != nil {
		return nil, rev, nil
	}
	e, err := ReadPGPKey(bytes.NewReader(data), passphrase)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return e, nil, nil
}

// readRevocation returns the key revocation signature data holds alone,
// or nil.
func readRevocation(data []byte) *packet.Signature {
	data = bytes.ReplaceAll(data, []byte(":-----BEGIN PGP"), []byte("-----BEGIN PGP"))
	if i := bytes.Index(data, []byte("-----BEGIN PGP")); i >= 0 {
		block, err := armor.Decode(bytes.NewReader(data[i:]))
		if err != nil {
			return nil
		}
		var b bytes.Buffer
		if _, err := b.ReadFrom(block.Body); err != nil {
			return nil
		}
		data = b.Bytes()
	}
	r := packet.NewReader(bytes.NewReader(data))
	p, err := r.Next()
	if err != nil {
		return nil
	}
	sig, ok := p.(*packet.Signature)
	if !ok || sig.SigType != packet.SigTypeKeyRevocation {
		return nil
	}
	if _, err := r.Next(); err == nil {
		return nil // more than the signature: a key, read as one
	}
	return sig
}

// ApplyRevocation adds rev to the key of keys it was made by, when it
// verifies with that key, and returns the key (nil when none).
func ApplyRevocation(keys []*openpgp.Entity, rev *packet.Signature) *openpgp.Entity {
	for _, e := range keys {
		if rev.IssuerFingerprint != nil && !bytes.Equal(rev.IssuerFingerprint, e.PrimaryKey.Fingerprint) ||
			rev.IssuerKeyId != nil && *rev.IssuerKeyId != e.PrimaryKey.KeyId {
			continue
		}
		if e.PrimaryKey.VerifyRevocationSignature(rev) == nil {
			e.Revocations = append(e.Revocations, rev)
			return e
		}
	}
	return nil
}
