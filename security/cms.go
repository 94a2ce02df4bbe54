package security

import (
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
)

// CMS enveloped data (RFC 5652 §6) and authenticated-enveloped data
// (RFC 5083, AES-GCM per RFC 5084), for RSA key transport. Written here
// rather than taken from github.com/smallstep/pkcs7, whose RSA-OAEP output
// leaves out the MGF1 parameters and whose AES-GCM goes into EnvelopedData
// instead of AuthEnvelopedData, both of which OpenSSL rejects.

var (
	oidData              = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidSignedData        = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}
	oidEnvelopedData     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 3}
	oidAuthEnvelopedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 16, 1, 23}
	oidRSAEncryption     = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}
	oidRSAESOAEP         = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}
	oidMGF1              = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 8}
	oidSHA1              = asn1.ObjectIdentifier{1, 3, 14, 3, 2, 26}
	oidSHA256            = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 1}
	oidSHA384            = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 2}
	oidSHA512            = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 2, 3}
	oidAES128CBC         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 2}
	oidAES192CBC         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 22}
	oidAES256CBC         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 42}
	oidAES128GCM         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 6}
	oidAES192GCM         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 26}
	oidAES256GCM         = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 46}
	nullParams           = asn1.RawValue{Tag: asn1.TagNull}
)

type contentInfo struct {
	ContentType asn1.ObjectIdentifier
	Content     asn1.RawValue `asn1:"explicit,tag:0"`
}

type issuerAndSerial struct {
	Issuer       asn1.RawValue
	SerialNumber *big.Int
}

type keyTransRecipientInfo struct {
	Version                int
	Rid                    issuerAndSerial
	KeyEncryptionAlgorithm pkix.AlgorithmIdentifier
	EncryptedKey           []byte
}

type encryptedContentInfo struct {
	ContentType                asn1.ObjectIdentifier
	ContentEncryptionAlgorithm pkix.AlgorithmIdentifier
	EncryptedContent           []byte `asn1:"optional,tag:0"`
}

type envelopedData struct {
	Version              int
	RecipientInfos       []asn1.RawValue `asn1:"set"`
	EncryptedContentInfo encryptedContentInfo
}

type authEnvelopedData struct {
	Version                  int
	RecipientInfos           []asn1.RawValue `asn1:"set"`
	AuthEncryptedContentInfo encryptedContentInfo
	AuthAttrs                asn1.RawValue `asn1:"optional,tag:1"`
	MAC                      []byte
}

type oaepParams struct {
	Hash pkix.AlgorithmIdentifier `asn1:"optional,explicit,tag:0"`
	MGF  pkix.AlgorithmIdentifier `asn1:"optional,explicit,tag:1"`
}

type gcmParams struct {
	Nonce  []byte
	ICVLen int `asn1:"optional,default:12"`
}

// KeyTransport is how the content key is encrypted to the recipient.
type KeyTransport int

// Key transports.
const (
	// OAEPSHA256 is RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 8017,
	// parameters per RFC 4055 §4.1), the default.
	OAEPSHA256 KeyTransport = iota
	// PKCS1v15 is RSAES-PKCS1-v1_5, for partners that need it.
	PKCS1v15
)

// cmsEncrypt returns DER ContentInfo holding EnvelopedData: content
// encrypted with AES-256-CBC under a fresh key, that key encrypted to each
// recipient's RSA certificate.
func cmsEncrypt(content []byte, recipients []*x509.Certificate, kt KeyTransport) ([]byte, error) {
	key := make([]byte, 32)
	iv := make([]byte, aes.BlockSize)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	if _, err := rand.Read(iv); err != nil {
		return nil, err
	}
	block, _ := aes.NewCipher(key)
	pad := aes.BlockSize - len(content)%aes.BlockSize
	padded := make([]byte, len(content)+pad)
	copy(padded, content)
	for i := len(content); i < len(padded); i++ {
		padded[i] = byte(pad)
	}
	ciphertext := make([]byte, len(padded))
	cipher.NewCBCEncrypter(block, iv).CryptBlocks(ciphertext, padded)

	var ris []asn1.RawValue
	for _, cert := range recipients {
		pub, ok := cert.PublicKey.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("security: recipient certificate %q has no RSA key", cert.Subject)
		}
		var ek []byte
		var alg pkix.AlgorithmIdentifier
		var err error
		switch kt {
		case PKCS1v15:
			//lint:ignore SA1019 kept for partners whose S/MIME software needs it (key_transport: pkcs1v15); OAEP is the default
			ek, err = rsa.EncryptPKCS1v15(rand.Reader, pub, key)
			alg = pkix.AlgorithmIdentifier{Algorithm: oidRSAEncryption, Parameters: nullParams}
		default:
			ek, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, key, nil)
			sha := pkix.AlgorithmIdentifier{Algorithm: oidSHA256}
			shaDER, _ := asn1.Marshal(sha)
			params, perr := asn1.Marshal(oaepParams{Hash: sha,
				MGF: pkix.AlgorithmIdentifier{Algorithm: oidMGF1, Parameters: asn1.RawValue{FullBytes: shaDER}}})
			if perr != nil {
				return nil, perr
			}
			alg = pkix.AlgorithmIdentifier{Algorithm: oidRSAESOAEP, Parameters: asn1.RawValue{FullBytes: params}}
		}
		if err != nil {
			return nil, fmt.Errorf("security: encrypt content key: %w", err)
		}
		ri, err := asn1.Marshal(keyTransRecipientInfo{
			Rid:                    issuerAndSerial{Issuer: asn1.RawValue{FullBytes: cert.RawIssuer}, SerialNumber: cert.SerialNumber},
			KeyEncryptionAlgorithm: alg,
			EncryptedKey:           ek,
		})
		if err != nil {
			return nil, err
		}
		ris = append(ris, asn1.RawValue{FullBytes: ri})
	}
	ivDER, _ := asn1.Marshal(iv)
	ed, err := asn1.Marshal(envelopedData{
		RecipientInfos: ris,
		EncryptedContentInfo: encryptedContentInfo{
			ContentType:                oidData,
			ContentEncryptionAlgorithm: pkix.AlgorithmIdentifier{Algorithm: oidAES256CBC, Parameters: asn1.RawValue{FullBytes: ivDER}},
			EncryptedContent:           ciphertext,
		},
	})
	if err != nil {
		return nil, err
	}
	return marshalContentInfo(oidEnvelopedData, ed)
}

// marshalContentInfo wraps DER content in a ContentInfo, explicitly tagged
// [0] (RFC 5652 §3).
func marshalContentInfo(ct asn1.ObjectIdentifier, content []byte) ([]byte, error) {
	return asn1.Marshal(struct {
		ContentType asn1.ObjectIdentifier
		Content     asn1.RawValue
	}{ct, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: content}})
}

// cmsDecrypt opens DER ContentInfo holding EnvelopedData (AES-CBC) or
// AuthEnvelopedData (AES-GCM) with our certificate and key.
func cmsDecrypt(der []byte, cert *x509.Certificate, key crypto.Decrypter) ([]byte, error) {
	var ci contentInfo
	if rest, err := asn1.Unmarshal(der, &ci); err != nil || len(rest) > 0 {
		return nil, malformed("CMS ContentInfo: %v", err)
	}
	var ris []asn1.RawValue
	var eci encryptedContentInfo
	var mac, aad []byte
	auth := false
	switch {
	case ci.ContentType.Equal(oidEnvelopedData):
		var ed envelopedData
		if _, err := asn1.Unmarshal(ci.Content.Bytes, &ed); err != nil {
			return nil, malformed("CMS EnvelopedData: %v", err)
		}
		ris, eci = ed.RecipientInfos, ed.EncryptedContentInfo
	case ci.ContentType.Equal(oidAuthEnvelopedData):
		var ad authEnvelopedData
		if _, err := asn1.Unmarshal(ci.Content.Bytes, &ad); err != nil {
			return nil, malformed("CMS AuthEnvelopedData: %v", err)
		}
		ris, eci, mac, auth = ad.RecipientInfos, ad.AuthEncryptedContentInfo, ad.MAC, true
		if len(ad.AuthAttrs.FullBytes) > 0 {
			// The attributes are authenticated as a SET OF (RFC 5083 §2.2).
			aad = append([]byte{0x31}, ad.AuthAttrs.FullBytes[1:]...)
		}
	case ci.ContentType.Equal(oidSignedData):
		return nil, fmt.Errorf("%w: signed-data, not enveloped", ErrNotEncrypted)
	default:
		return nil, fmt.Errorf("%w: CMS content type %v", ErrNotEncrypted, ci.ContentType)
	}
	var cek []byte
	found := false
	for _, raw := range ris {
		var ri keyTransRecipientInfo
		if _, err := asn1.Unmarshal(raw.FullBytes, &ri); err != nil {
			continue // another kind of RecipientInfo
		}
		if ri.Rid.SerialNumber == nil || ri.Rid.SerialNumber.Cmp(cert.SerialNumber) != 0 ||
			string(ri.Rid.Issuer.FullBytes) != string(cert.RawIssuer) {
			continue
		}
		found = true
		var err error
		cek, err = decryptContentKey(ri, key)
		if err != nil {
			return nil, err
		}
		break
	}
	if !found {
		return nil, fmt.Errorf("%w: no recipient entry for our certificate", ErrNotForUs)
	}
	block, err := contentCipher(eci.ContentEncryptionAlgorithm.Algorithm, cek)
	if err != nil {
		return nil, err
	}
	if auth {
		var p gcmParams
		if _, err := asn1.Unmarshal(eci.ContentEncryptionAlgorithm.Parameters.FullBytes, &p); err != nil {
			return nil, malformed("GCM parameters: %v", err)
		}
		gcm, err := cipher.NewGCMWithNonceSize(block, len(p.Nonce))
		if err != nil || p.ICVLen != len(mac) || len(mac) != gcm.Overhead() {
			return nil, malformed("GCM parameters: nonce %d bytes, tag %d bytes", len(p.Nonce), len(mac))
		}
		plain, err := gcm.Open(nil, p.Nonce, append(eci.EncryptedContent, mac...), aad)
		if err != nil {
			return nil, fmt.Errorf("%w: GCM authentication failed", ErrIntegrity)
		}
		return plain, nil
	}
	var iv []byte
	if _, err := asn1.Unmarshal(eci.ContentEncryptionAlgorithm.Parameters.FullBytes, &iv); err != nil || len(iv) != aes.BlockSize {
		return nil, malformed("CBC parameters: %v", err)
	}
	ct := eci.EncryptedContent
	if len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
		return nil, malformed("encrypted content of %d bytes", len(ct))
	}
	plain := make([]byte, len(ct))
	cipher.NewCBCDecrypter(block, iv).CryptBlocks(plain, ct)
	pad := int(plain[len(plain)-1])
	if pad < 1 || pad > aes.BlockSize {
		return nil, fmt.Errorf("%w: bad CBC padding", ErrIntegrity)
	}
	for _, b := range plain[len(plain)-pad:] {
		if int(b) != pad {
			return nil, fmt.Errorf("%w: bad CBC padding", ErrIntegrity)
		}
	}
	return plain[:len(plain)-pad], nil
}

func decryptContentKey(ri keyTransRecipientInfo, key crypto.Decrypter) ([]byte, error) {
	alg := ri.KeyEncryptionAlgorithm
	switch {
	case alg.Algorithm.Equal(oidRSAEncryption):
		//lint:ignore SA1019 partners' agents still write PKCS #1 v1.5 key transport, which must be read
		k, err := key.Decrypt(rand.Reader, ri.EncryptedKey, &rsa.PKCS1v15DecryptOptions{})
		if err != nil {
			return nil, fmt.Errorf("%w: content key: %v", ErrNotForUs, err)
		}
		return k, nil
	case alg.Algorithm.Equal(oidRSAESOAEP):
		h := crypto.SHA1 // RFC 4055 defaults
		if len(alg.Parameters.FullBytes) > 0 {
			var p oaepParams
			if _, err := asn1.Unmarshal(alg.Parameters.FullBytes, &p); err != nil {
				return nil, malformed("RSA-OAEP parameters: %v", err)
			}
			if len(p.Hash.Algorithm) > 0 {
				var err error
				if h, err = hashForOID(p.Hash.Algorithm); err != nil {
					return nil, err
				}
			}
		}
		k, err := key.Decrypt(rand.Reader, ri.EncryptedKey, &rsa.OAEPOptions{Hash: h})
		if err != nil {
			return nil, fmt.Errorf("%w: content key: %v", ErrNotForUs, err)
		}
		return k, nil
	}
	return nil, malformed("key transport %v not supported", alg.Algorithm)
}

func contentCipher(oid asn1.ObjectIdentifier, key []byte) (cipher.Block, error) {
	want := 0
	switch {
	case oid.Equal(oidAES128CBC), oid.Equal(oidAES128GCM):
		want = 16
	case oid.Equal(oidAES192CBC), oid.Equal(oidAES192GCM):
		want = 24
	case oid.Equal(oidAES256CBC), oid.Equal(oidAES256GCM):
		want = 32
	default:
		return nil, fmt.Errorf("%w: content cipher %v", ErrWeakAlgorithm, oid)
	}
	if len(key) != want {
		return nil, malformed("content key of %d bytes for %v", len(key), oid)
	}
	return aes.NewCipher(key)
}

func hashForOID(oid asn1.ObjectIdentifier) (crypto.Hash, error) {
	switch {
	case oid.Equal(oidSHA1):
		return crypto.SHA1, nil
	case oid.Equal(oidSHA256):
		return crypto.SHA256, nil
	case oid.Equal(oidSHA384):
		return crypto.SHA384, nil
	case oid.Equal(oidSHA512):
		return crypto.SHA512, nil
	}
	return 0, errors.New("security: unsupported hash " + oid.String())
}
