package main

import (
	"context"
	"fmt"
	"io"

	"github.com/hl7mail/hl7mail/evidence"
)

func runEvidence(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("evidence", "[-config FILE] [-out DIR] ID", `
Re-verifies from the journals alone what was sent, received and agreed for
one message (ID: a stored id, a Message-ID or an MSH-10 control ID). For a
message sent: the mail as sent (Message-ID, time, MIC recomputed from the
outgoing journal), the partner's signed receipt (signature checked again,
MIC compared) and the partner's signed response (the commitment, MSA-1 AA),
if any. For a message received, the mirror image: the partner's mail, our
receipt and our response. -out DIR writes the original bytes, the
decrypted signed entities, the keys or certificates and a report that a
third party can check with gpg or openssl. Exits non-zero when a link is
missing or does not verify, naming it.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	out := fs.String("out", "", "write the evidence files to `DIR`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if len(fs.Args()) != 1 {
		fmt.Fprintln(stderr, "hl7mail evidence: give one id")
		return 2
	}
	o, err := evidenceOptions(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail evidence:", err)
		return 1
	}
	defer o.Store.Close()
	ctx := context.Background()
	m, err := evidence.Find(ctx, o.Store, fs.Args()[0])
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail evidence:", err)
		return 1
	}
	r, err := evidence.Build(ctx, o, m)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail evidence:", err)
		return 1
	}
	r.Write(stdout)
	if *out != "" {
		if err := r.Export(*out, o.Keys); err != nil {
			fmt.Fprintln(stderr, "hl7mail evidence:", err)
			return 1
		}
		fmt.Fprintf(stdout, "\nEvidence written to %s (see report.txt there).\n", *out)
	}
	if !r.OK() {
		return 1
	}
	return 0
}

func runJournal(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("journal", "verify [-config FILE]", `
"hl7mail journal verify" walks both journals (outgoing.mbox, incoming.mbox)
and the store: every entry must have the digest recorded when it was
written, open and verify again (ours with our key, partners' with theirs),
and have its counterpart in the store (a stored message, the pending receipt
it closed, or a quarantine record); every message the store says was mailed
or received must be in a journal. Prints each problem; exits non-zero when
there is any.`, stderr)
	if len(args) == 0 || args[0] != "verify" {
		fs.Usage()
		return 2
	}
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args[1:]); code >= 0 {
		return code
	}
	o, err := evidenceOptions(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail journal verify:", err)
		return 1
	}
	defer o.Store.Close()
	a, err := evidence.VerifyJournals(context.Background(), o)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail journal verify:", err)
		return 1
	}
	a.Write(stdout)
	if !a.OK() {
		return 1
	}
	return 0
}

// evidenceOptions loads the configuration and keys and opens the store
// read-only (the instance may be running); the caller closes the store.
func evidenceOptions(cfgPath string) (evidence.Options, error) {
	cfg, keys, err := loadChecked(cfgPath)
	if err != nil {
		return evidence.Options{}, err
	}
	st, err := openStore(cfg, false)
	if err != nil {
		return evidence.Options{}, err
	}
	return evidence.Options{Config: cfg, Keys: &keys.Keyring, Store: st}, nil
}
