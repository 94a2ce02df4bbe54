package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/store"
)

func runStoreCmd(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("store", "migrate -config FILE", `
"hl7mail store migrate -config FILE" moves a single instance's embedded
store into the PostgreSQL database of the cluster FILE's cluster section
names, with the instance stopped: every message (with its state, attempts
and response), the receipts awaited, the quarantine, the alerts, the IMAP
positions and both journals (each mail checked against the digest recorded
when it was written). Messages keep their ids. It runs in one transaction
into a database that holds no message yet, then checks the copy: as many
rows and journal mails as were read, every payload and journal mail with
its digest. The embedded store is left as it was. FILE is the node's
partners.yaml with its cluster section added; its store setting names the
folder moved from.`, stderr)
	if len(args) == 0 || args[0] != "migrate" {
		fs.Usage()
		return 2
	}
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args[1:]); code >= 0 {
		return code
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail store migrate:", err)
		return 1
	}
	if cfg.Cluster == nil {
		fmt.Fprintln(stderr, "hl7mail store migrate: the configuration has no cluster section: add one naming the database to move into")
		return 2
	}
	src, err := store.Open(store.Options{Dir: cfg.StoreDir()})
	if errors.Is(err, store.ErrLocked) {
		fmt.Fprintln(stderr, "hl7mail store migrate: the instance is running: stop it first (the store is moved offline)")
		return 1
	}
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail store migrate:", err)
		return 1
	}
	defer src.Close()
	pg, err := openClusterStore(cfg)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail store migrate:", err)
		return 1
	}
	defer pg.Close()
	r, err := pg.Migrate(context.Background(), src, cfg.StoreDir())
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail store migrate:", err)
		return 1
	}
	fmt.Fprintf(stdout, "moved %s into the cluster's database, and checked the copy:\n", cfg.StoreDir())
	for _, t := range store.DumpTables {
		fmt.Fprintf(stdout, "  %-11s %d\n", t, r.Rows[t])
	}
	fmt.Fprintf(stdout, "  journal     %d sent, %d received\n", r.Journal["outgoing.mbox"], r.Journal["incoming.mbox"])
	if r.Duplicates > 0 {
		fmt.Fprintf(stdout, "  %d resends kept as duplicates are one message each, as the cluster keeps them\n", r.Duplicates)
	}
	fmt.Fprintln(stdout, "Start the nodes with this configuration; the embedded store is left as it was.")
	return 0
}
