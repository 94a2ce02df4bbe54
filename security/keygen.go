package security

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/ProtonMail/go-crypto/openpgp/packet"
)

// PGPKeyOptions shape a new OpenPGP key.
type PGPKeyOptions struct {
	Name, Email string
	// AlsoEmails are further addresses of the same site (local addresses,
	// draft-ietf-ediint-hl7-02 §6.3), each a user ID of the key.
	AlsoEmails []string
	// RSA makes an RSA-3072 key instead of the default Ed25519 signing key
	// with a Cv25519 encryption subkey. Both are v4 keys that GnuPG 2.2 reads.
	RSA bool
	// Lifetime bounds the key's validity (0: no expiry).
	Lifetime time.Duration
	Now      time.Time
}

// GeneratePGPKey makes a new OpenPGP key.
func GeneratePGPKey(opts PGPKeyOptions) (*openpgp.Entity, error) {
	cfg := pgpConfig(opts.Now)
	if opts.Now.IsZero() {
		cfg.Time = nil
	}
	cfg.Algorithm = packet.PubKeyAlgoEdDSA
	cfg.Curve = packet.Curve25519
	if opts.RSA {
		cfg.Algorithm = packet.PubKeyAlgoRSA
		cfg.RSABits = 3072
	}
	cfg.KeyLifetimeSecs = uint32(opts.Lifetime / time.Second)
	e, err := openpgp.NewEntity(opts.Name, "hl7mail", opts.Email, cfg)
	if err != nil {
		return nil, fmt.Errorf("security: generate OpenPGP key: %w", err)
	}
	for _, addr := range opts.AlsoEmails {
		if err := e.AddUserId(opts.Name, "hl7mail", addr, cfg); err != nil {
			return nil, fmt.Errorf("security: add user ID %s: %w", addr, err)
		}
	}
	return e, nil
}

// ArmorPGPPublic returns the armored public key (or keys, one block),
// to hand to partners.
func ArmorPGPPublic(es ...*openpgp.Entity) ([]byte, error) {
	var b bytes.Buffer
	w, err := armor.Encode(&b, openpgp.PublicKeyType, nil)
	if err != nil {
		return nil, err
	}
	for _, e := range es {
		if err := e.Serialize(w); err != nil {
			return nil, err
		}
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// ArmorPGPPrivate returns the armored private key, protected with
// passphrase when one is given. It leaves e's private keys usable.
func ArmorPGPPrivate(e *openpgp.Entity, passphrase []byte) ([]byte, error) {
	if len(passphrase) > 0 {
		if err := e.EncryptPrivateKeys(passphrase, nil); err != nil {
			return nil, err
		}
		defer e.DecryptPrivateKeys(passphrase)
	}
	var b bytes.Buffer
	w, err := armor.Encode(&b, openpgp.PrivateKeyType, nil)
	if err != nil {
		return nil, err
	}
	if err := e.SerializePrivateWithoutSigning(w, nil); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}

// WriteKeyFile writes data to dir/name, mode 0600 for private material and
// 0644 for public, refusing to overwrite an existing file.
func WriteKeyFile(dir, name string, data []byte, private bool) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	mode := os.FileMode(0o644)
	if private {
		mode = 0o600
	}
	p := filepath.Join(dir, name)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return "", err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return "", err
	}
	return p, f.Close()
}
