package main

import (
	"context"
	"fmt"
	"io"

	"github.com/hl7mail/hl7mail/store"
)

func runRetry(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("retry", "[-config FILE] ID | -partner NAME | -all", `
Puts a failed, expired or bounced outbound message (ID as listed by "hl7mail
messages") back in its partner's queue, to be sent at once with the same
Message-ID; expire_after counts again from now. -partner NAME puts back
every failed or expired message of that partner, -all those of every
partner: oldest first, in the order they were accepted. On a running
instance the sender is woken; on a stopped one they leave at the next start.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	partner := fs.String("partner", "", "every failed or expired message of partner `NAME`")
	all := fs.Bool("all", false, "every failed or expired message of every partner")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	bulk := *all || *partner != ""
	if *all && *partner != "" || bulk && len(fs.Args()) != 0 {
		fmt.Fprintln(stderr, "hl7mail retry: give one of ID, -partner NAME or -all")
		return 2
	}
	var id int64
	if !bulk {
		var err error
		if id, err = parseID(fs); err != nil {
			fmt.Fprintln(stderr, "hl7mail retry:", err)
			return 2
		}
	}
	cfg, api, err := loadOps(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	if !bulk {
		err = orStore(api.call("POST", fmt.Sprintf("/api/messages/%d/retry", id), struct{}{}, nil), cfg, true,
			func(st *store.Store) error { return st.Retry(context.Background(), id) })
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail retry:", err)
			return 1
		}
		fmt.Fprintf(stdout, "message %d queued again\n", id)
		return 0
	}
	if *partner != "" && cfg.Partner(*partner) == nil {
		fmt.Fprintf(stderr, "hl7mail retry: no partner %q in %s\n", *partner, *cfgPath)
		return 1
	}
	var out struct {
		Requeued int `json:"requeued"`
	}
	err = orStore(api.call("POST", "/api/retry", map[string]string{"partner": *partner}, &out), cfg, true,
		func(st *store.Store) error {
			counts, err := st.RetryAll(context.Background(), *partner)
			for _, n := range counts {
				out.Requeued += n
			}
			return err
		})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail retry:", err)
		return 1
	}
	fmt.Fprintf(stdout, "%d messages queued again\n", out.Requeued)
	return 0
}
