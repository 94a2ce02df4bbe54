package bench

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"io"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/security"
)

// CryptoResult is one measured operation: hl7mail's and the raw
// cryptography it rests on, over the same messages.
type CryptoResult struct {
	Suite, Op      string
	PerSecond      float64
	RawPerSecond   float64
	RawDescription string
}

// rate runs f over msgs and returns messages per second, after a warm-up
// over the first hundred.
func rate(msgs [][]byte, f func(i int, m []byte) error) (float64, error) {
	for i, m := range msgs[:min(100, len(msgs))] {
		if err := f(i, m); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	for i, m := range msgs {
		if err := f(i, m); err != nil {
			return 0, err
		}
	}
	return float64(len(msgs)) / time.Since(start).Seconds(), nil
}

// Crypto measures sealing (MIME-EDI, sign, encrypt) and opening (decrypt,
// verify, decode) of msgs with PGP (Ed25519/Cv25519) and S/MIME (RSA-3072,
// AES-256-CBC, RSA-OAEP), each beside the bare primitives on the same bytes.
func Crypto(msgs [][]byte) ([]CryptoResult, error) {
	now := time.Now()
	var out []CryptoResult

	// PGP.
	sender, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Sender", Email: "s@bench.test"})
	if err != nil {
		return nil, err
	}
	receiver, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Receiver", Email: "r@bench.test"})
	if err != nil {
		return nil, err
	}
	sealed := make([][]byte, len(msgs))
	seal, err := rate(msgs, func(i int, m []byte) error {
		edi, err := security.EncodeEDI(m, security.EDIOptions{})
		if err != nil {
			return err
		}
		signed, _, err := security.PGPSign(edi, sender, now)
		if err != nil {
			return err
		}
		sealed[i], err = security.PGPEncrypt(signed, []*openpgp.Entity{receiver}, now)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pgp seal: %w", err)
	}
	rawSealed := make([][]byte, len(msgs))
	rawSigs := make([][]byte, len(msgs))
	rawSeal, err := rate(msgs, func(i int, m []byte) error {
		var sig, enc bytes.Buffer
		if err := openpgp.DetachSign(&sig, sender, bytes.NewReader(m), nil); err != nil {
			return err
		}
		w, err := openpgp.Encrypt(&enc, []*openpgp.Entity{receiver}, nil, &openpgp.FileHints{IsBinary: true}, nil)
		if err != nil {
			return err
		}
		w.Write(m)
		if err := w.Close(); err != nil {
			return err
		}
		rawSealed[i], rawSigs[i] = enc.Bytes(), sig.Bytes()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pgp raw seal: %w", err)
	}
	out = append(out, CryptoResult{"pgp", "sign+encrypt", seal, rawSeal, "openpgp.DetachSign + Encrypt"})

	keys := security.PGPKeys{Self: openpgp.EntityList{receiver}, Partners: openpgp.EntityList{sender}}
	open, err := rate(sealed, func(i int, m []byte) error {
		o, err := security.PGPOpen(append([]byte("From: s@bench.test\r\n"), m...), keys, sender, now)
		if err != nil {
			return err
		}
		_, _, err = security.DecodeEDI(o.Entity, security.Accept{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pgp open: %w", err)
	}
	rawOpen, err := rate(rawSealed, func(i int, m []byte) error {
		md, err := openpgp.ReadMessage(bytes.NewReader(m), openpgp.EntityList{receiver}, nil, nil)
		if err != nil {
			return err
		}
		plain, err := io.ReadAll(md.UnverifiedBody)
		if err != nil {
			return err
		}
		_, err = openpgp.CheckDetachedSignature(openpgp.EntityList{sender}, bytes.NewReader(plain), bytes.NewReader(rawSigs[i]), nil)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pgp raw open: %w", err)
	}
	out = append(out, CryptoResult{"pgp", "decrypt+verify", open, rawOpen, "openpgp.ReadMessage + CheckDetachedSignature"})

	// S/MIME.
	sKey, sCert, err := security.GenerateCert(security.CertOptions{Name: "Sender", Email: "s@bench.test"})
	if err != nil {
		return nil, err
	}
	rKey, rCert, err := security.GenerateCert(security.CertOptions{Name: "Receiver", Email: "r@bench.test"})
	if err != nil {
		return nil, err
	}
	seal, err = rate(msgs, func(i int, m []byte) error {
		edi, err := security.EncodeEDI(m, security.EDIOptions{})
		if err != nil {
			return err
		}
		signed, _, err := security.SMIMESign(edi, sCert, sKey)
		if err != nil {
			return err
		}
		sealed[i], err = security.SMIMEEncrypt(signed, []*x509.Certificate{rCert}, security.OAEPSHA256)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("smime seal: %w", err)
	}
	sPriv, rPriv := sKey.(*rsa.PrivateKey), rKey.(*rsa.PrivateKey)
	type rawMsg struct{ sig, ek, iv, ct []byte }
	raws := make([]rawMsg, len(msgs))
	rawSeal, err = rate(msgs, func(i int, m []byte) error {
		d := sha256.Sum256(m)
		sig, err := rsa.SignPKCS1v15(rand.Reader, sPriv, crypto.SHA256, d[:])
		if err != nil {
			return err
		}
		key, iv := make([]byte, 32), make([]byte, 16)
		rand.Read(key)
		rand.Read(iv)
		block, _ := aes.NewCipher(key)
		padded := append(append([]byte{}, m...), bytes.Repeat([]byte{byte(16 - len(m)%16)}, 16-len(m)%16)...)
		ct := make([]byte, len(padded))
		cipher.NewCBCEncrypter(block, iv).CryptBlocks(ct, padded)
		ek, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &rPriv.PublicKey, key, nil)
		raws[i] = rawMsg{sig, ek, iv, ct}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("smime raw seal: %w", err)
	}
	out = append(out, CryptoResult{"smime", "sign+encrypt", seal, rawSeal, "rsa.SignPKCS1v15 + AES-CBC + rsa.EncryptOAEP"})

	skeys := security.SMIMEKeys{Self: []security.SMIMEIdentity{{Cert: rCert, Key: rKey}}, Partners: []*x509.Certificate{sCert}}
	open, err = rate(sealed, func(i int, m []byte) error {
		o, err := security.SMIMEOpen(append([]byte("From: s@bench.test\r\n"), m...), skeys, sCert, now)
		if err != nil {
			return err
		}
		_, _, err = security.DecodeEDI(o.Entity, security.Accept{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("smime open: %w", err)
	}
	rawOpen, err = rate(msgs, func(i int, m []byte) error {
		r := raws[i]
		key, err := rsa.DecryptOAEP(sha256.New(), rand.Reader, rPriv, r.ek, nil)
		if err != nil {
			return err
		}
		block, _ := aes.NewCipher(key)
		plain := make([]byte, len(r.ct))
		cipher.NewCBCDecrypter(block, r.iv).CryptBlocks(plain, r.ct)
		d := sha256.Sum256(plain[:len(plain)-int(plain[len(plain)-1])])
		return rsa.VerifyPKCS1v15(&sPriv.PublicKey, crypto.SHA256, d[:], r.sig)
	})
	if err != nil {
		return nil, fmt.Errorf("smime raw open: %w", err)
	}
	out = append(out, CryptoResult{"smime", "decrypt+verify", open, rawOpen, "rsa.DecryptOAEP + AES-CBC + rsa.VerifyPKCS1v15"})
	return out, nil
}

// PrintCrypto writes the crypto results as a table.
func PrintCrypto(w io.Writer, rs []CryptoResult) {
	fmt.Fprintf(w, "%-6s %-15s %10s %10s %8s  %s\n", "suite", "operation", "msgs/s", "raw msgs/s", "ratio", "raw baseline")
	for _, r := range rs {
		fmt.Fprintf(w, "%-6s %-15s %10.0f %10.0f %7.2fx  %s\n", r.Suite, r.Op, r.PerSecond, r.RawPerSecond, r.PerSecond/r.RawPerSecond, r.RawDescription)
	}
}
