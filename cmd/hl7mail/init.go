package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/hl7mail/hl7mail/security"
)

// packagedExample is where the Debian package keeps the partners.yaml it
// installed: "init" replaces that one, never a file someone edited.
const packagedExample = "/usr/share/hl7mail/partners.yaml.example"

func runInit(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("init", "-dir DIR -name NAME -email ADDR [-pgp] [-smime] [-store DIR] [-force]", `
Sets up a site: this site's keys (keys/self.asc with -pgp, the default;
keys/self.crt and keys/self.key with -smime), mode 0600, and a commented
partners.yaml with our identity filled in and no partners yet, which
"hl7mail check" passes. It prints the fingerprints to read to partners over
the phone. Keys already there are kept. A partners.yaml that differs from
the one the package installed is never overwritten, unless -force. When
the user hl7mail exists (the package made it), it is given the keys, and
partners.yaml is made readable to its group. Then: "hl7mail partner add".`, stderr)
	dir := fs.String("dir", "", "the configuration `folder` (required): /etc/hl7mail for the package's service")
	name := fs.String("name", "", "this site's name (required), e.g. general-hospital")
	email := fs.String("email", "", "this site's mail address (required)")
	pgp := fs.Bool("pgp", false, "make an OpenPGP key (the default when neither -pgp nor -smime is given)")
	smime := fs.Bool("smime", false, "make an S/MIME certificate")
	storeDir := fs.String("store", "", "the store `folder` (default /var/lib/hl7mail for /etc/hl7mail, else var/hl7mail)")
	force := fs.Bool("force", false, "overwrite a partners.yaml that was edited")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *dir == "" || *name == "" || *email == "" {
		fs.Usage()
		return 2
	}
	if !*pgp && !*smime {
		*pgp = true
	}
	fail := func(err error) int {
		fmt.Fprintln(stderr, "hl7mail init:", err)
		return 1
	}
	path := filepath.Join(*dir, "partners.yaml")
	if old, err := os.ReadFile(path); err == nil && !*force {
		if ex, err := os.ReadFile(packagedExample); err != nil || !bytes.Equal(old, ex) {
			return fail(fmt.Errorf("%s exists and is not the example the package installed; -force overwrites it", path))
		}
	}
	if *storeDir == "" {
		*storeDir = "var/hl7mail"
		if clean := filepath.Clean(*dir); clean == "/etc/hl7mail" || strings.HasPrefix(clean, "/etc/hl7mail/") {
			*storeDir = filepath.Join("/var/lib/hl7mail", strings.TrimPrefix(clean, "/etc/hl7mail"))
		}
	}
	keys := filepath.Join(*dir, "keys")
	site := initSite{Name: *name, Email: *email, Store: *storeDir, Path: path, PGP: *pgp, SMIME: *smime}
	var told []string
	if *pgp {
		k, err := keepOrMake(keys, "self.asc", "self.pub.asc", func() (madeKey, error) {
			return makePGP(keys, "self.asc", "self.pub.asc", *name, []string{*email}, false, nil)
		}, func(k madeKey) (string, error) {
			e, err := security.LoadPGPKey(k.private, nil)
			if err != nil {
				return "", err
			}
			return security.Fingerprint(e), nil
		})
		if err != nil {
			return fail(err)
		}
		told = append(told, fmt.Sprintf("OpenPGP key: %s\n  public key for partners: %s\n  fingerprint: %s", k.private, k.public, k.fingerprint))
	}
	if *smime {
		k, err := keepOrMake(keys, "self.key", "self.crt", func() (madeKey, error) {
			return makeSMIME(keys, "self.key", "self.crt", *name, *email, time.Time{})
		}, func(k madeKey) (string, error) {
			c, err := security.LoadCert(k.public)
			if err != nil {
				return "", err
			}
			return certFingerprint(c), nil
		})
		if err != nil {
			return fail(err)
		}
		told = append(told, fmt.Sprintf("S/MIME key: %s\n  certificate for partners: %s\n  fingerprint: %s", k.private, k.public, k.fingerprint))
	}
	var b bytes.Buffer
	if err := initTemplate.Execute(&b, site); err != nil {
		return fail(err)
	}
	if err := os.WriteFile(path+".new", b.Bytes(), 0o640); err != nil {
		return fail(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		return fail(err)
	}
	if err := giveToService(keys, path); err != nil {
		return fail(err)
	}
	fmt.Fprintf(stdout, "wrote %s\n", path)
	for _, t := range told {
		fmt.Fprintln(stdout, t)
	}
	fmt.Fprintf(stdout, "Read the fingerprints to each partner over the phone when you exchange keys.\n"+
		"Next: set the mail server in smtp: (and imap:), then\n"+
		"  hl7mail partner add -config %s -name NAME -email ADDR -listen 127.0.0.1:PORT -key THEIR-KEY\n"+
		"  hl7mail check -config %s\n", path, path)
	return 0
}

// keepOrMake keeps a key pair already in dir (priv there), reading its
// fingerprint again with fingerprint, or makes it.
func keepOrMake(dir, priv, pub string, makeIt func() (madeKey, error), fingerprint func(madeKey) (string, error)) (madeKey, error) {
	k := madeKey{private: filepath.Join(dir, priv), public: filepath.Join(dir, pub)}
	if _, err := os.Stat(k.private); errors.Is(err, os.ErrNotExist) {
		return makeIt()
	}
	fp, err := fingerprint(k)
	if err != nil {
		return madeKey{}, fmt.Errorf("%s is there already and cannot be read (%v): move it away, or mend it", k.private, err)
	}
	k.fingerprint = fp + " (the key made before, kept)"
	return k, nil
}

// giveToService hands the keys folder and its files to the user hl7mail
// and partners.yaml to its group, when that user exists and we may.
func giveToService(keys, config string) error {
	u, err := user.Lookup("hl7mail")
	if err != nil || os.Geteuid() != 0 {
		return nil // no service user (a checkout, a test): the files stay ours
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := filepath.Walk(keys, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	}); err != nil {
		return err
	}
	return os.Chown(config, 0, gid)
}

type initSite struct {
	Name, Email, Store, Path string
	PGP, SMIME               bool
}

var initTemplate = template.Must(template.New("partners.yaml").Parse(`# partners.yaml — hl7mail configuration for {{.Name}}, written by "hl7mail init".
#
# hl7mail stands beside the hospital's HL7 router. Each partner gets a local
# MLLP listener (its "surrogate"): the router sends to it as if the partner
# were a local system; hl7mail answers CA once the message is on disk, then
# signs, encrypts and mails it. Partner mail is verified and delivered to the
# router over MLLP. The shipped example in the README shows every setting.
#
# Relative paths are relative to this file. Passwords are never written here:
# name a file (*_file, mode 0600) or an environment variable (*_env).
#   Check it:          hl7mail check -config {{.Path}}
#   Add a partner:     hl7mail partner add -config {{.Path}} -name NAME -email ADDR -listen 127.0.0.1:PORT -key FILE
#   Apply a change:    systemctl reload hl7mail (or: hl7mail reload -config {{.Path}})

# Who we are. The private keys sign our mail and decrypt what partners send.
self:
  name: {{.Name}}
  email: {{.Email}}
{{- if .PGP}}
  pgp_key: keys/self.asc            # give partners keys/self.pub.asc
{{- end}}
{{- if .SMIME}}
  smime_cert: keys/self.crt         # give partners this certificate
  smime_key: keys/self.key
{{- end}}

# Messages, receipts and the evidence journals (outgoing.mbox, incoming.mbox).
store: {{.Store}}

# The HL7 router (interface engine): partners' messages are delivered here.
router:
  addr: 127.0.0.1:6661

# Outbound mail. tls: starttls (default), tls (implicit), or none (loopback only).
smtp:
  addr: 127.0.0.1:25
  tls: none
  # username: {{.Email}}
  # password_file: keys/smtp        # the password, one line, mode 0600

# Inbound mail over IMAP. Leave it out when the MTA pipes mail to
# "hl7mail receive" (see the README, "Pipe mode").
# imap:
#   addr: mail.example:143
#   tls: starttls
#   username: {{.Email}}
#   password_file: keys/imap

# The operator page and /metrics. A non-loopback address needs token_file.
dashboard:
  addr: 127.0.0.1:8025

# The partners, one item each: "hl7mail partner add" writes them here.
partners: []
`))
