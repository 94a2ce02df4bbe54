// Command hl7mail is the HL7-over-email gateway: it stands beside a
// hospital's HL7 router and makes every remote partner reachable by mail look
// like a local MLLP server (draft-ietf-ediint-hl7-02 §6.3, figure 9).
//
// Run "hl7mail help" for the commands.
package main

import (
	"fmt"
	"io"
	"os"
)

// command is one subcommand: it parses its own flags and returns the exit code.
type command struct {
	name, summary string
	run           func(args []string, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"serve", "run the gateway: surrogate listeners, store, mail", runServe},
		{"demo", "the whole loop in one process, on embedded mail servers", runDemo},
		{"init", "set up a site: its keys and a partners.yaml without partners yet", runInit},
		{"check", "validate partners.yaml and the files it names", runCheck},
		{"partner", "add, remove or list partners in partners.yaml, and reload", runPartner},
		{"send", "send HL7 messages to an MLLP listener and print each ACK", runSend},
		{"messages", "list stored messages (no payloads)", runMessages},
		{"reports", "list the receipts and bounces that came back", runReports},
		{"status", "the partner table: queues, receipts, connections", runStatus},
		{"alerts", "list or acknowledge alerts", runAlerts},
		{"retry", "put failed, expired or bounced messages back in their queues", runRetry},
		{"dashboard", "print the operator page's address with its token", runDashboard},
		{"reload", "make the running instance read its configuration and keys again", runReload},
		{"release", "deliver a quarantined mail after a person checked it", runRelease},
		{"evidence", "re-verify one transaction from the journals; export it", runEvidence},
		{"journal", "verify: check every journal entry against its signature and the store; export: write them as mbox", runJournal},
		{"store", "migrate: move a single instance's store into a cluster's PostgreSQL", runStoreCmd},
		{"receive", "take one mail from an MTA's pipe on standard input", func(args []string, stdout, stderr io.Writer) int {
			return runReceive(args, os.Stdin, stdout, stderr)
		}},
		{"keygen", "make a PGP key or S/MIME certificate for this site", runKeygen},
		{"keys", "every key and certificate, ours and the partners': role, state, days left", runKeys},
		{"bench", "measure ACK latency and throughput against a baseline", runBench},
		{"version", "print the version of this build", runVersion},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "hl7mail: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "hl7mail: HL7 v2 over secure Internet mail, beside your HL7 router.")
	fmt.Fprintln(w, "\nUsage: hl7mail <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun \"hl7mail <command> -h\" for a command's flags.")
}
