package security

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"time"
)

// CertOptions shape a new S/MIME certificate.
type CertOptions struct {
	Name, Email string
	// RSABits is the RSA key size (default 3072). ECDSA makes a P-256 key
	// instead; RSA is what partners' S/MIME tools accept most widely.
	RSABits int
	ECDSA   bool
	// Lifetime is the validity (default two years); NotBefore defaults to
	// now less an hour.
	Lifetime  time.Duration
	NotBefore time.Time
}

// GenerateCert makes a private key and a self-signed certificate for
// S/MIME (RFC 8550): key usage digitalSignature and keyEncipherment,
// extended key usage emailProtection, the address in subjectAltName.
func GenerateCert(opts CertOptions) (crypto.Signer, *x509.Certificate, error) {
	var key crypto.Signer
	var err error
	usage := x509.KeyUsageDigitalSignature
	if opts.ECDSA {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	} else {
		bits := opts.RSABits
		if bits == 0 {
			bits = 3072
		}
		key, err = rsa.GenerateKey(rand.Reader, bits)
		usage |= x509.KeyUsageKeyEncipherment
	}
	if err != nil {
		return nil, nil, fmt.Errorf("security: generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return nil, nil, err
	}
	notBefore := opts.NotBefore
	if notBefore.IsZero() {
		notBefore = time.Now().Add(-time.Hour)
	}
	lifetime := opts.Lifetime
	if lifetime == 0 {
		lifetime = 2 * 365 * 24 * time.Hour
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: opts.Name},
		EmailAddresses:        []string{opts.Email},
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(lifetime),
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageEmailProtection},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("security: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	return key, cert, nil
}

// PEMCert encodes a certificate as PEM.
func PEMCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// PEMKey encodes a private key as PKCS #8 PEM.
func PEMKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
