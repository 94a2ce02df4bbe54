package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/evidence"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/pgstore"
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
	o, closeStore, err := evidenceOptions(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail evidence:", err)
		return 1
	}
	defer closeStore()
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
	fs := newFlags("journal", "verify [-config FILE] | export [-config FILE] -out DIR", `
"hl7mail journal verify" walks both journals (outgoing.mbox, incoming.mbox)
and the store: every entry must have the digest recorded when it was
written, open and verify again (ours with our key, partners' with theirs),
and have its counterpart in the store (a stored message, the pending receipt
it closed, or a quarantine record); every message the store says was mailed
or received must be in a journal. Prints each problem; exits non-zero when
there is any. On a node of a cluster the journals are the cluster's, in its
database, whichever node wrote them.

"hl7mail journal export -out DIR" writes both journals to DIR as
outgoing.mbox and incoming.mbox: a cluster's from its database (each mail
checked against its digest on the way), a single instance's copied from its
store folder.`, stderr)
	if len(args) == 0 || args[0] != "verify" && args[0] != "export" {
		fs.Usage()
		return 2
	}
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	outDir := fs.String("out", "", "export: the `folder` to write the journals to")
	if code := parse(fs, args[1:]); code >= 0 {
		return code
	}
	if args[0] == "export" {
		return journalExport(*cfgPath, *outDir, stdout, stderr)
	}
	o, closeStore, err := evidenceOptions(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail journal verify:", err)
		return 1
	}
	defer closeStore()
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
// read-only (the instance may be running), or a cluster's database; the
// caller calls the close returned.
func evidenceOptions(cfgPath string) (evidence.Options, func(), error) {
	cfg, keys, err := loadChecked(cfgPath)
	if err != nil {
		return evidence.Options{}, nil, err
	}
	if cfg.Cluster != nil {
		pg, err := openClusterStore(cfg)
		if err != nil {
			return evidence.Options{}, nil, err
		}
		return evidence.Options{Config: cfg, Keys: &keys.Keyring, Store: pg, Journals: pg}, func() { pg.Close() }, nil
	}
	st, err := openStore(cfg, false)
	if err != nil {
		return evidence.Options{}, nil, err
	}
	return evidence.Options{Config: cfg, Keys: &keys.Keyring, Store: st}, func() { st.Close() }, nil
}

// openClusterStore opens the database of cfg's cluster, as cfg's node,
// for a command.
func openClusterStore(cfg *config.Config) (*pgstore.Store, error) {
	dsn, err := cfg.DSN()
	if err != nil {
		return nil, fmt.Errorf("cluster.postgres.dsn_file: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return pgstore.Open(ctx, pgstore.Options{DSN: dsn, Node: cfg.Cluster.Node, Writers: 1})
}

// journalExport writes the journals of cfgPath's instance or cluster to
// dir as outgoing.mbox and incoming.mbox.
func journalExport(cfgPath, dir string, stdout, stderr io.Writer) int {
	if dir == "" {
		fmt.Fprintln(stderr, "hl7mail journal export: -out DIR is required")
		return 2
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail journal export:", err)
		return 1
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fmt.Fprintln(stderr, "hl7mail journal export:", err)
		return 1
	}
	if cfg.Cluster != nil {
		pg, err := openClusterStore(cfg)
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail journal export:", err)
			return 1
		}
		defer pg.Close()
		if err := pg.ExportJournal(context.Background(), dir); err != nil {
			fmt.Fprintln(stderr, "hl7mail journal export:", err)
			return 1
		}
	} else {
		for _, f := range []string{gateway.OutgoingJournal, gateway.IncomingJournal} {
			if err := copyJournal(filepath.Join(cfg.StoreDir(), f), filepath.Join(dir, f)); err != nil {
				fmt.Fprintln(stderr, "hl7mail journal export:", err)
				return 1
			}
		}
	}
	fmt.Fprintf(stdout, "journals written to %s (%s, %s)\n", dir, gateway.OutgoingJournal, gateway.IncomingJournal)
	return 0
}

// copyJournal copies a single instance's journal, as far as it is written
// whole (journal.Read stops at a torn last entry), to a new file.
func copyJournal(from, to string) error {
	entries, err := journal.Read(from)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	j, err := journal.Open(to)
	if err != nil {
		return err
	}
	ms := make([]journal.Mail, len(entries))
	for i, e := range entries {
		ms[i] = journal.Mail{From: e.From, Time: e.Time, Bytes: e.Mail}
	}
	if len(ms) > 0 {
		if _, err := j.AppendAll(ms); err != nil {
			j.Close()
			return err
		}
	}
	return j.Close()
}
