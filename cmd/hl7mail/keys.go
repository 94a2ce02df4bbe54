package main

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
)

func runKeys(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("keys", "[-config FILE] [-json]", `
Prints every key and certificate of ours and of each partner: party, kind
(pgp, smime, or a trust anchor), fingerprint, valid from and to, role (sign,
decrypt, encrypt-to, verify, trust), state and days left. States: active (the
newest valid one, in use), next (not valid yet; takes over on its date by
itself), retiring (valid, a newer one is active; still accepted), expired,
revoked. From the running instance when it runs (with the certificates
partners signed with that their anchors accepted), else from the files.
Exits 1 when a party has no key that serves now.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	_, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	var rows []dashboard.KeyRow
	if err := api.call("GET", "/api/keys", nil, &rows); err != nil {
		if !errors.Is(err, errNotRunning) {
			fmt.Fprintln(stderr, "hl7mail keys:", err)
			return 1
		}
		cfg, keys, err := gateway.Load(*cfgPath, time.Now())
		if err != nil {
			fmt.Fprintln(stderr, err)
			return 1
		}
		if st, err := openStore(cfg, false); err == nil {
			defer st.Close()
			keys.Attach(st, nil)
		}
		rows = gateway.KeyReport(cfg, keys, time.Now(), true)
		if keys.Problems != nil {
			defer fmt.Fprintln(stderr, keys.Problems)
		}
	}
	if *asJSON {
		printJSON(stdout, rows)
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "PARTY\tKIND\tFINGERPRINT\tVALID-FROM\tVALID-TO\tROLE\tSTATE\tDAYS-LEFT\tFIELD")
		for _, r := range rows {
			to, days, roles := "never", "-", "-"
			if !r.To.IsZero() {
				to = r.To.Format(time.DateOnly)
			}
			if r.DaysLeft != nil {
				days = strconv.Itoa(*r.DaysLeft)
			}
			if len(r.Roles) > 0 {
				roles = strings.Join(r.Roles, ",")
			}
			state := r.Status
			if r.Note != "" {
				state += " (" + r.Note + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Party, r.Kind, shortFingerprint(r.Fingerprint),
				r.From.Format(time.DateOnly), to, roles, state, days, r.Field)
		}
		tw.Flush()
	}
	if party := withoutKey(rows); party != "" {
		fmt.Fprintf(stderr, "hl7mail keys: %s has no key that serves now\n", party)
		return 1
	}
	return 0
}

// shortFingerprint is the last 16 hex digits, as gpg --list-keys shows a
// long key ID; -json has the whole.
func shortFingerprint(f string) string {
	if len(f) > 16 {
		return f[len(f)-16:]
	}
	return f
}

// withoutKey names the first party (and kind) with keys none of which is
// active.
func withoutKey(rows []dashboard.KeyRow) string {
	active := map[string]bool{}
	var order []string
	for _, r := range rows {
		if r.Kind == "anchor" {
			continue
		}
		id := r.Party + " (" + r.Kind + ")"
		if _, ok := active[id]; !ok {
			order = append(order, id)
		}
		active[id] = active[id] || r.Status == "active"
	}
	for _, p := range order {
		if !active[p] {
			return p
		}
	}
	return ""
}
