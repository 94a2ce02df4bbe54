package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/store"
)

func runMessages(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("messages", "[-config FILE] [flags]", `
Lists the messages in the store, newest first: id, direction, partner, MSH-10
control ID, message type, Message-ID, state and times. Never payloads. Works
whether or not hl7mail serve is running.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	asJSON := fs.Bool("json", false, "print a JSON array")
	partner := fs.String("partner", "", "only this partner")
	state := fs.String("state", "", "only this state (queued, duplicate, ...)")
	dir := fs.String("direction", "", "only this direction: out (router → partner) or in")
	controlID := fs.String("control-id", "", "only this MSH-10 control ID")
	limit := fs.Int("limit", 100, "at most this many messages")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	st, err := readStore(*cfgPath, "messages")
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer st.Close()
	list, err := st.List(context.Background(), store.Filter{Partner: *partner, State: store.State(*state),
		Direction: store.Direction(*dir), ControlID: *controlID, Limit: *limit})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail messages:", err)
		return 1
	}
	if *asJSON {
		if list == nil {
			list = []store.Message{}
		}
		if err := printJSON(stdout, list); err != nil {
			fmt.Fprintln(stderr, "hl7mail messages:", err)
			return 1
		}
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tDIR\tPARTNER\tCONTROL-ID\tTYPE\tSTATE\tMESSAGE-ID\tRECEIVED\tUPDATED")
	for _, m := range list {
		state := string(m.State)
		if m.DuplicateOf != 0 {
			state += fmt.Sprintf(" (of %d)", m.DuplicateOf)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Direction, m.Partner, dash(m.ControlID),
			dash(m.MessageType), state, dash(m.MessageID), m.Received.Format(time.DateTime), m.Updated.Format(time.DateTime))
	}
	tw.Flush()
	return 0
}

// listings is what messages and reports read of a store.
type listings interface {
	List(ctx context.Context, f store.Filter) ([]store.Message, error)
	Reports(ctx context.Context, f store.ReportFilter) ([]store.Report, error)
	Close() error
}

// readStore opens the store of the configuration at cfgPath read-only,
// for command cmd: it works whether or not hl7mail serve is running. On a
// node of a cluster it is the cluster's database, whichever node wrote.
func readStore(cfgPath, cmd string) (listings, error) {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return nil, err
	}
	if cfg.Cluster != nil {
		pg, err := openClusterStore(cfg)
		if err != nil {
			return nil, fmt.Errorf("hl7mail %s: %w", cmd, err)
		}
		return pg, nil
	}
	if _, err := os.Stat(filepath.Join(cfg.StoreDir(), store.FileName)); err != nil {
		return nil, fmt.Errorf("hl7mail %s: no store in %s (has hl7mail serve run?)", cmd, cfg.StoreDir())
	}
	st, err := store.OpenReadOnly(cfg.StoreDir())
	if err != nil {
		return nil, fmt.Errorf("hl7mail %s: %w", cmd, err)
	}
	return st, nil
}

// dash is term(s), or "-" for an empty s.
func dash(s string) string {
	if s == "" {
		return "-"
	}
	return term(s)
}

// term makes s safe to print on a terminal: a value that holds a control
// character (ESC, BEL, CR, a tab that would break the table), or bytes
// that are not UTF-8, is printed quoted and escaped, as the logs do.
func term(s string) string {
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

func runReports(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("reports", "[-config FILE] [flags]", `
Lists the reports that came back about our mail, newest first: partners'
receipts (MDNs: processed, dispatched, failed, deleted, denied, and those
that match no message of ours) and mail servers' delivery-status reports
(bounces, delays), each with the message it names and what hl7mail made of
it. The mails themselves are in the incoming journal.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	asJSON := fs.Bool("json", false, "print a JSON array")
	partner := fs.String("partner", "", "only this partner")
	message := fs.Int64("message", 0, "only those about this message `ID`")
	limit := fs.Int("limit", 100, "at most this many reports")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	st, err := readStore(*cfgPath, "reports")
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	defer st.Close()
	list, err := st.Reports(context.Background(), store.ReportFilter{Partner: *partner, Message: *message, Limit: *limit})
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail reports:", err)
		return 1
	}
	if *asJSON {
		if list == nil {
			list = []store.Report{}
		}
		if err := printJSON(stdout, list); err != nil {
			fmt.Fprintln(stderr, "hl7mail reports:", err)
			return 1
		}
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRECEIVED\tTYPE\tPARTNER\tMESSAGE\tDISPOSITION\tOUTCOME\tDETAIL\tORIGINAL-MESSAGE-ID")
	for _, r := range list {
		msg := "-"
		if r.Message != 0 {
			msg = strconv.FormatInt(r.Message, 10)
		}
		disp := r.Disposition
		if r.Unsigned {
			disp += " (unsigned)"
		}
		if r.FinalDelivery {
			disp += " (final destination)"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, r.Received.Format(time.DateTime), r.Type, dash(r.Partner),
			msg, term(disp), term(r.Outcome), dash(r.Detail), dash(r.OriginalMessageID))
	}
	tw.Flush()
	return 0
}
