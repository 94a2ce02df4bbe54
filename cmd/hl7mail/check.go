package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/internal/safefile"
	"github.com/hl7mail/hl7mail/outbound"
)

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("check", "[-config FILE]", `
Validates the configuration and the files it names: it loads every key and
certificate (ours with the passphrase, the partners'), checks that each names
the partner's address and has not expired, and warns of any that expire within
30 days. Prints every problem with its line and exits 1, or prints a summary
and exits 0. A partner's key problem (unreadable, expired, another address)
is a problem here too, though serve starts with it: that partner's queue
waits with an alert while the others work. It also connects to the SMTP
server (unless -offline) and warns when it does not offer what the
configuration needs: AUTH for smtp.username, REQUIRETLS for a partner's
require_tls. Such a server holds the mail with an alert; it fails nothing.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	offline := fs.Bool("offline", false, "do not connect to the SMTP server to see what it offers")
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
	if !*offline {
		for _, w := range smtpWarnings(cfg) {
			fmt.Fprintln(stderr, "warning:", w)
		}
	}
	// PHI at rest: serve refuses the same.
	store := safefile.CheckDir(cfg.StoreDir())
	for _, w := range store.Warnings {
		fmt.Fprintln(stderr, "warning: store:", w)
	}
	if len(store.Refusals) > 0 {
		for _, r := range store.Refusals {
			fmt.Fprintln(stderr, "store:", r)
		}
		return 1
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

// smtpWarnings says what the configured SMTP server lacks for cfg: it is
// reached as the sender would reach it, and nothing is sent.
func smtpWarnings(cfg *config.Config) []string {
	tc, err := gateway.SMTPTLSConfig(cfg)
	if err != nil {
		return []string{"smtp.ca_file: " + err.Error()}
	}
	sub := &outbound.SMTPSubmitter{Addr: cfg.SMTP.Addr, TLS: cfg.SMTP.TLS, TLSConfig: tc}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	offer, err := sub.Probe(ctx, 5*time.Second)
	if err != nil {
		return []string{fmt.Sprintf("the SMTP server cannot be used now (%v): mail waits until it can", err)}
	}
	var out []string
	if cfg.SMTP.Username != "" && !offer.Auth {
		out = append(out, fmt.Sprintf("smtp.username is set but %s offers no AUTH: mail waits until it does", cfg.SMTP.Addr))
	}
	for _, p := range cfg.Partners {
		if p.RequireTLS && (!offer.TLS || !offer.RequireTLS) {
			out = append(out, fmt.Sprintf("partner %s: require_tls, but %s offers no REQUIRETLS over TLS: its mail waits until it does",
				p.Name, cfg.SMTP.Addr))
		}
	}
	return out
}
