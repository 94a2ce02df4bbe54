package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/demo"
)

func runDemo(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("demo", "[-once] [-n N] [-dir DIR]", `
Runs the whole loop in one process, with nothing installed beyond Go: an
embedded SMTP/IMAP mail system, a hospital and two partners as real hl7mail
instances (the lab on PGP, the clinic on S/MIME), and stand-in routers. The
hospital's router sends the order of the draft's §5 example and N sample
messages to the surrogates; each travels signed and encrypted by mail to the
partner's router, whose answer comes back with a signed receipt. Prints a
trace of every step and a summary; exits non-zero when any message did not
make the whole trip.`, stderr)
	once := fs.Bool("once", false, "stop after the summary instead of running until Ctrl-C")
	n := fs.Int("n", 10, "sample messages to send besides the §5 order")
	dir := fs.String("dir", "", "keep keys, configurations, stores and journals in this `folder` (default: a temporary one, removed)")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	msgs, err := corpus.Default()
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail demo:", err)
		return 1
	}
	if *n < len(msgs) {
		msgs = msgs[:max(*n, 0)]
	}
	work := *dir
	if work == "" {
		if work, err = os.MkdirTemp("", "hl7mail-demo"); err != nil {
			fmt.Fprintln(stderr, "hl7mail demo:", err)
			return 1
		}
		defer os.RemoveAll(work)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	opts := demo.Options{Dir: work, Messages: msgs, Out: stdout}
	if !*once {
		opts.Wait = ctx.Done()
	}
	if _, err := demo.Run(ctx, opts); err != nil {
		fmt.Fprintln(stderr, "hl7mail demo:", err)
		return 1
	}
	return 0
}
