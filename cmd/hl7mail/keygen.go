package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hl7mail/hl7mail/security"
)

func runKeygen(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("keygen", "-kind pgp|smime -name NAME -email ADDR -out DIR", `
Makes a key pair for this site or for a test partner. The private key is
written with mode 0600; the public part is what you hand to partners.
  pgp:   DIR/private.asc and DIR/public.asc (Ed25519 + Cv25519, or RSA-3072 with -rsa)
  smime: DIR/key.pem and DIR/cert.pem (self-signed, emailProtection, RSA-3072)
Existing files are never overwritten.`, stderr)
	kind := fs.String("kind", "", "pgp or smime (required)")
	name := fs.String("name", "", "name in the key or certificate (required)")
	email := fs.String("email", "", "mail address (required); for pgp, several comma-separated: one user ID each (local addresses)")
	out := fs.String("out", "", "output `folder` (required)")
	rsa := fs.Bool("rsa", false, "pgp: RSA-3072 instead of Ed25519/Cv25519")
	passFile := fs.String("passphrase-file", "", "pgp: protect the private key with the passphrase in this `file`")
	if code := parse(fs, args); code >= 0 {
		return code
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
		e, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: *name, Email: emails[0], AlsoEmails: emails[1:], RSA: *rsa})
		if err != nil {
			return fail(err)
		}
		pub, err := security.ArmorPGPPublic(e)
		if err != nil {
			return fail(err)
		}
		priv, err := security.ArmorPGPPrivate(e, pass)
		if err != nil {
			return fail(err)
		}
		pp, err := security.WriteKeyFile(*out, "private.asc", priv, true)
		if err != nil {
			return fail(err)
		}
		pubp, err := security.WriteKeyFile(*out, "public.asc", pub, false)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "private key: %s\npublic key:  %s (hand this to partners)\nfingerprint: %s\n", pp, pubp, security.Fingerprint(e))
	case "smime":
		if len(pass) > 0 {
			return fail(fmt.Errorf("-passphrase-file applies to pgp keys only"))
		}
		key, cert, err := security.GenerateCert(security.CertOptions{Name: *name, Email: *email})
		if err != nil {
			return fail(err)
		}
		keyPEM, err := security.PEMKey(key)
		if err != nil {
			return fail(err)
		}
		kp, err := security.WriteKeyFile(*out, "key.pem", keyPEM, true)
		if err != nil {
			return fail(err)
		}
		cp, err := security.WriteKeyFile(*out, "cert.pem", security.PEMCert(cert), false)
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stdout, "private key: %s\ncertificate: %s (hand this to partners)\nvalid until: %s\n", kp, cp, cert.NotAfter.Format("2006-01-02"))
	default:
		return fail(fmt.Errorf("-kind %q: want pgp or smime", *kind))
	}
	return 0
}
