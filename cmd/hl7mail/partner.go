package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"text/tabwriter"

	"github.com/hl7mail/hl7mail/config"
)

func runPartner(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "add":
			return runPartnerAdd(args[1:], stdout, stderr)
		case "remove":
			return runPartnerRemove(args[1:], stdout, stderr)
		case "list":
			return runPartnerList(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintln(stderr, `usage: hl7mail partner add|remove|list [flags]   ("hl7mail partner add -h" for one's flags)`)
	return 2
}

func runPartnerAdd(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("partner add", "[-config FILE] -name NAME -email ADDR -listen HOST:PORT -key FILE [-security pgp|smime]", `
Adds a partner to partners.yaml: its lines go after the last partner's,
and every other line of the file stays as it was, comments included. The
partner's key (-key: its armored public key for pgp, its PEM certificate
for smime) is copied beside the configuration, in keys/. The result is
checked as "hl7mail check" does, and written only when it passes; then the
running instance reloads it, and the partner's surrogate listens without a
restart. With -security none (and -allow-unencrypted) no key is needed.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	name := fs.String("name", "", "the partner's name (letters, digits, '-', '_', '.'; required)")
	email := fs.String("email", "", "the partner's mail address (required)")
	listen := fs.String("listen", "", "the surrogate's `address`, where the router sends to reach the partner (required)")
	key := fs.String("key", "", "the partner's public key or certificate `file` (required with pgp or smime)")
	suite := fs.String("security", "pgp", "pgp, smime or none")
	plain := fs.Bool("allow-unencrypted", false, "with -security none: mail to this partner travels unencrypted")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *name == "" || *email == "" || *listen == "" {
		fmt.Fprintln(stderr, "hl7mail partner add: -name, -email and -listen are required")
		return 2
	}
	np := config.NewPartner{Name: *name, Email: *email, Listen: *listen, Security: config.Suite(*suite), AllowUnencrypted: *plain}
	var copyKey func() (undo func(), err error)
	if np.Security.Signs() {
		if *key == "" {
			fmt.Fprintf(stderr, "hl7mail partner add: -key is required with -security %s\n", *suite)
			return 2
		}
		ext := ".asc"
		if np.Security == config.SMIME {
			ext = ".crt"
		}
		np.Key = filepath.Join("keys", *name+ext)
		dst := filepath.Join(filepath.Dir(*cfgPath), np.Key)
		data, err := os.ReadFile(*key)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail partner add:", err)
			return 1
		}
		if old, err := os.ReadFile(dst); err == nil && string(old) != string(data) {
			fmt.Fprintf(stderr, "hl7mail partner add: %s exists and holds another key; remove it first\n", dst)
			return 1
		}
		copyKey = func() (func(), error) {
			if _, err := os.Stat(dst); err == nil {
				return func() {}, nil // the same key is there already
			}
			// The folder may hold our private key too, which protects
			// itself (0600); the folder above keeps others out.
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return nil, err
			}
			// A public key: the service's user, whoever that is, reads it.
			if err := os.WriteFile(dst, data, 0o644); err != nil {
				return nil, err
			}
			return func() { os.Remove(dst) }, nil
		}
	}
	return editPartners(*cfgPath, stdout, stderr, "partner add", copyKey, func(data []byte) ([]byte, error) {
		if c, err := config.Parse(*cfgPath, data); err == nil && c.Partner(*name) != nil {
			return nil, fmt.Errorf("partner %s is configured already", *name)
		}
		return config.AddPartner(data, np)
	}, fmt.Sprintf("partner %s added", *name))
}

func runPartnerRemove(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("partner remove", "[-config FILE] -name NAME", `
Removes a partner from partners.yaml (its lines and the comments heading
it; every other line stays as it was), checks the result and reloads the
running instance: the partner's surrogate stops listening. Its messages,
receipts and journal entries stay in the store, and its key file stays.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	name := fs.String("name", "", "the partner's name (required)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *name == "" {
		fmt.Fprintln(stderr, "hl7mail partner remove: -name is required")
		return 2
	}
	return editPartners(*cfgPath, stdout, stderr, "partner remove", nil, func(data []byte) ([]byte, error) {
		return config.RemovePartner(data, *name)
	}, fmt.Sprintf("partner %s removed", *name))
}

func runPartnerList(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("partner list", "[-config FILE]", `
Lists the partners of partners.yaml: name, address, surrogate, suite.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tEMAIL\tLISTEN\tSECURITY")
	for _, p := range cfg.Partners {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, p.Email, p.Listen, p.Security)
	}
	tw.Flush()
	return 0
}

// editPartners changes the configuration file with edit, checks the result
// as "hl7mail check" does (its keys and files included; before, files the
// edit needs are put in place by prepare), writes it in place of the old
// one (same mode) only when it passes, and asks the running instance to
// reload it.
func editPartners(path string, stdout, stderr io.Writer, cmd string, prepare func() (undo func(), err error),
	edit func([]byte) ([]byte, error), done string) int {
	fail := func(err error) int {
		fmt.Fprintf(stderr, "hl7mail %s: %v\n", cmd, err)
		return 1
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fail(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fail(err)
	}
	changed, err := edit(data)
	if err != nil {
		return fail(err)
	}
	undo := func() {}
	if prepare != nil {
		if undo, err = prepare(); err != nil {
			return fail(err)
		}
	}
	// The new file is checked where it will be (relative paths resolve
	// against its folder), under a name of its own until it passes.
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".new")
	if err := os.WriteFile(tmp, changed, fi.Mode().Perm()); err != nil {
		undo()
		return fail(err)
	}
	defer os.Remove(tmp)
	// The same owner and group as the file it replaces (root:hl7mail as
	// the package installs it): the service must still read it.
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		os.Chown(tmp, int(st.Uid), int(st.Gid))
	}
	_, keys, err := loadChecked(tmp)
	if err == nil && keys.Problems != nil {
		err = keys.Problems // what check refuses: a partner's key that cannot serve
	}
	if err != nil {
		undo()
		fmt.Fprintln(stderr, err)
		fmt.Fprintf(stderr, "hl7mail %s: the result does not pass the check; %s is unchanged\n", cmd, path)
		return 1
	}
	if err := os.Rename(tmp, path); err != nil {
		undo()
		return fail(err)
	}
	fmt.Fprintf(stdout, "%s in %s\n", done, path)
	_, api, err := loadOps(path)
	if err == nil {
		err = api.call("POST", "/api/reload", struct{}{}, nil)
	}
	switch {
	case errors.Is(err, errNotRunning):
		fmt.Fprintln(stdout, "hl7mail serve is not running: it takes the change when it starts")
	case err != nil:
		fmt.Fprintf(stderr, "hl7mail %s: the running instance did not reload: %v (hl7mail reload -config %s tries again)\n", cmd, err, path)
		return 1
	default:
		fmt.Fprintln(stdout, "the running instance reloaded it")
	}
	return 0
}
