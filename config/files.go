package config

import (
	"fmt"
	"os"
	"strings"
)

// MinTokenLength is the shortest dashboard token accepted, in bytes.
const MinTokenLength = 32

// CheckFiles checks that the key, certificate, password and token files the
// configuration names exist, are regular files and can be read, and that
// the environment variables it names are set. It returns an *Error listing
// every problem, or nil.
//
// Files holding secrets (private keys, passphrases, passwords, the
// dashboard token) must not be readable by group or others.
func (c *Config) CheckFiles() error {
	v := validator{c: c, e: c.Problems(), lines: c.lines}
	secret := map[string]bool{"self.pgp_key": true, "self.smime_key": true, "self.passphrase_file": true,
		"router.tls.key_file": true,
		"smtp.password_file":  true, "imap.password_file": true, "dashboard.token_file": true,
		"alerts.webhook.token_file": true}
	file := func(path, who, name string) {
		if name == "" {
			return
		}
		p := c.Path(name)
		st, err := os.Stat(p)
		if err != nil {
			v.addf(path, who, "", "%v", err)
			return
		}
		if !st.Mode().IsRegular() {
			v.addf(path, who, "", "%s is not a regular file", p)
			return
		}
		if (secret[path] || strings.HasSuffix(path, ".password_file") || strings.HasSuffix(path, "listen_tls.key_file")) &&
			st.Mode().Perm()&0o077 != 0 {
			v.addf(path, who, "chmod 600 "+p, "%s holds a secret but is readable by group or others (mode %04o)", p, st.Mode().Perm())
			return
		}
		f, err := os.Open(p)
		if err != nil {
			v.addf(path, who, "", "%v", err)
			return
		}
		f.Close()
	}
	env := func(path, name string) {
		if name != "" && os.Getenv(name) == "" {
			v.addf(path, "", "", "environment variable %s is not set", name)
		}
	}
	files := func(field, who string, fs Files) {
		for i, f := range fs {
			file(fs.Field(field, i), who, f)
		}
	}
	files("self.pgp_key", "", c.Self.PGPKey)
	files("self.smime_cert", "", c.Self.SMIMECert)
	files("self.smime_key", "", c.Self.SMIMEKey)
	files("trust_anchors", "", c.TrustAnchors)
	files("revocation.crl_files", "", c.Revocation.CRLFiles)
	file("self.passphrase_file", "", c.Self.PassphraseFile)
	env("self.passphrase_env", c.Self.PassphraseEnv)
	file("smtp.password_file", "", c.SMTP.PasswordFile)
	env("smtp.password_env", c.SMTP.PasswordEnv)
	file("imap.password_file", "", c.IMAP.PasswordFile)
	env("imap.password_env", c.IMAP.PasswordEnv)
	file("dashboard.token_file", "", c.Dashboard.TokenFile)
	if c.Dashboard.TokenFile != "" {
		// A token short enough to guess is no token.
		if t, err := c.Secret(c.Dashboard.TokenFile, ""); err == nil && len(strings.TrimSpace(t)) < MinTokenLength {
			v.addf("dashboard.token_file", "", "e.g. head -c 32 /dev/urandom | base64 > "+c.Dashboard.TokenFile,
				"the token holds %d bytes; at least %d are required", len(strings.TrimSpace(t)), MinTokenLength)
		}
	}
	file("alerts.webhook.token_file", "", c.Alerts.Webhook.TokenFile)
	file("smtp.ca_file", "", c.SMTP.CAFile)
	file("imap.ca_file", "", c.IMAP.CAFile)
	for i, l := range c.Local {
		if l.IMAP != nil {
			file(fmt.Sprintf("local[%d].imap.password_file", i), "", l.IMAP.PasswordFile)
			env(fmt.Sprintf("local[%d].imap.password_env", i), l.IMAP.PasswordEnv)
			file(fmt.Sprintf("local[%d].imap.ca_file", i), "", l.IMAP.CAFile)
		}
	}
	for i, p := range c.Partners {
		files(fmt.Sprintf("partners[%d].pgp_key", i), p.Name, p.PGPKey)
		files(fmt.Sprintf("partners[%d].smime_cert", i), p.Name, p.SMIMECert)
		files(fmt.Sprintf("partners[%d].smime_trust", i), p.Name, p.SMIMETrust)
		if t := p.ListenTLS; t != nil {
			file(fmt.Sprintf("partners[%d].listen_tls.cert_file", i), p.Name, t.CertFile)
			file(fmt.Sprintf("partners[%d].listen_tls.key_file", i), p.Name, t.KeyFile)
			file(fmt.Sprintf("partners[%d].listen_tls.client_ca_file", i), p.Name, t.ClientCAFile)
		}
	}
	if t := c.Router.TLS; t != nil {
		file("router.tls.ca_file", "", t.CAFile)
		file("router.tls.cert_file", "", t.CertFile)
		file("router.tls.key_file", "", t.KeyFile)
	}
	return v.e.Err()
}
