package main

import (
	"fmt"
	"io"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/gateway"
)

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("check", "[-config FILE]", `
Validates the configuration and the files it names: it loads every key and
certificate (ours with the passphrase, the partners'), checks that each names
the partner's address and has not expired, and warns of any that expire within
30 days. Prints every problem with its line and exits 1, or prints a summary
and exits 0. A partner's key problem (unreadable, expired, another address)
is a problem here too, though serve starts with it: that partner's queue
waits with an alert while the others work.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	cfg, keys, err := loadChecked(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	for _, w := range keys.Warnings {
		fmt.Fprintln(stderr, "warning:", w)
	}
	if keys.Problems != nil {
		// serve starts with these, and holds these partners' queues.
		fmt.Fprintln(stderr, keys.Problems)
		fmt.Fprintln(stderr, "hl7mail serve would start, but the mail for these partners waits until their keys are mended")
		return 1
	}
	fmt.Fprintf(stdout, "%s: OK, %d partners\n", *cfgPath, len(cfg.Partners))
	for _, p := range cfg.Partners {
		fmt.Fprintf(stdout, "  %-20s listen %-21s → %s (%s)\n", p.Name, p.Listen, p.Email, p.Security)
	}
	return 0
}

// loadChecked loads the configuration, checks the files it names and loads
// the keys and certificates (gateway.Load).
func loadChecked(path string) (*config.Config, *gateway.Keys, error) {
	return gateway.Load(path, time.Now())
}
