package main

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/security"
)

func runKeygen(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("keygen", "-kind pgp|smime -name NAME -email ADDR -out DIR", `
Makes a key pair for this site or for a test partner. The private key is
written with mode 0600; the public part is what you hand to partners.
  pgp:   DIR/private.asc and DIR/public.asc (Ed25519 + Cv25519, or RSA-3072 with -rsa)
  smime: DIR/key.pem and DIR/cert.pem (self-signed, emailProtection, RSA-3072)
Existing files are never overwritten. For a rollover, -not-before makes an
S/MIME certificate that starts on the agreed switch date: listed beside the
current one, it is "next" until then and takes over by itself.`, stderr)
	kind := fs.String("kind", "", "pgp or smime (required)")
	name := fs.String("name", "", "name in the key or certificate (required)")
	email := fs.String("email", "", "mail address (required); for pgp, several comma-separated: one user ID each (local addresses)")
	out := fs.String("out", "", "output `folder` (required)")
	rsa := fs.Bool("rsa", false, "pgp: RSA-3072 instead of Ed25519/Cv25519")
	passFile := fs.String("passphrase-file", "", "pgp: protect the private key with the passphrase in this `file`")
	notBefore := fs.String("not-before", "", "smime: the certificate's first day, `YYYY-MM-DD` (UTC; default: now)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	var start time.Time
	if *notBefore != "" {
		var err error
		if start, err = time.Parse(time.DateOnly, *notBefore); err != nil || *kind != "smime" {
			fmt.Fprintf(stderr, "hl7mail keygen: -not-before %q: want a date, YYYY-MM-DD, with -kind smime\n", *notBefore)
			return 2
		}
	}
	if *kind == "" || *name == "" || *email == "" || *out == "" {
		fs.Usage()
		return 2
	}
	var pass []byte
	if *passFile != "" {
		b, err := os.ReadFile(*passFile)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail keygen:", err)
			return 1
		}
		pass = []byte(strings.TrimRight(string(b), "\r\n"))
	}
	fail := func(err error) int {
		fmt.Fprintln(stderr, "hl7mail keygen:", err)
		return 1
	}
	switch *kind {
	case "pgp":
		emails := strings.Split(*email, ",")
		for i := range emails {
			emails[i] = strings.TrimSpace(emails[i])
		}
		k, err := makePGP(*out, "private.asc", "public.asc", *name, emails, *rsa, pass)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "private key: %s\npublic key:  %s (hand this to partners)\nfingerprint: %s\n", k.private, k.public, k.fingerprint)
	case "smime":
		if len(pass) > 0 {
			return fail(fmt.Errorf("-passphrase-file applies to pgp keys only"))
		}
		k, err := makeSMIME(*out, "key.pem", "cert.pem", *name, *email, start)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "private key: %s\ncertificate: %s (hand this to partners)\nvalid: %s to %s\nfingerprint: %s\n",
			k.private, k.public, k.from, k.until, k.fingerprint)
	default:
		return fail(fmt.Errorf("-kind %q: want pgp or smime", *kind))
	}
	return 0
}

// madeKey is a key pair written by makePGP or makeSMIME.
type madeKey struct {
	private, public string // the files
	fingerprint     string // to read to partners over the phone
	from, until     string // the certificate's first and last day (S/MIME)
}

// makePGP writes a new OpenPGP key pair for emails (the first the primary
// user ID) to dir: the private key (mode 0600) as priv, the public as pub.
// Existing files are never overwritten.
func makePGP(dir, priv, pub, name string, emails []string, rsa bool, pass []byte) (madeKey, error) {
	e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: name, Email: emails[0], AlsoEmails: emails[1:], RSA: rsa})
	if err != nil {
		return madeKey{}, err
	}
	pubData, err := security.ArmorPGPPublic(e)
	if err != nil {
		return madeKey{}, err
	}
	privData, err := security.ArmorPGPPrivate(e, pass)
	if err != nil {
		return madeKey{}, err
	}
	k := madeKey{fingerprint: security.Fingerprint(e)}
	if k.private, err = security.WriteKeyFile(dir, priv, privData, true); err != nil {
		return madeKey{}, err
	}
	if k.public, err = security.WriteKeyFile(dir, pub, pubData, false); err != nil {
		return madeKey{}, err
	}
	return k, nil
}

// makeSMIME writes a new self-signed S/MIME certificate for email and its
// private key (mode 0600) to dir, as cert and key. Existing files are never
// overwritten.
// makeSMIME writes a key and a self-signed certificate valid from
// notBefore (the zero time: from now).
func makeSMIME(dir, key, cert, name, email string, notBefore time.Time) (madeKey, error) {
	sk, c, err := security.GenerateCert(security.CertOptions{Name: name, Email: email, NotBefore: notBefore})
	if err != nil {
		return madeKey{}, err
	}
	keyPEM, err := security.PEMKey(sk)
	if err != nil {
		return madeKey{}, err
	}
	k := madeKey{fingerprint: certFingerprint(c), from: c.NotBefore.Format(time.DateOnly), until: c.NotAfter.Format(time.DateOnly)}
	if k.private, err = security.WriteKeyFile(dir, key, keyPEM, true); err != nil {
		return madeKey{}, err
	}
	if k.public, err = security.WriteKeyFile(dir, cert, security.PEMCert(c), false); err != nil {
		return madeKey{}, err
	}
	return k, nil
}

// certFingerprint is the SHA-256 of a certificate, as openssl x509
// -fingerprint -sha256 shows it (without the colons).
func certFingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return "SHA-256 " + strings.ToUpper(hex.EncodeToString(sum[:]))
}
