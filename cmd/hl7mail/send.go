package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
)

func runSend(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("send", "-addr HOST:PORT [flags] FILE...", `
Sends the HL7 messages in each FILE ("-" for standard input) over one MLLP
connection and prints each acknowledgement, one segment a line. A file may
hold many messages; segments may end in CR, LF or CRLF. Exits 0 when every
message was accepted (CA or AA), 1 otherwise.`, stderr)
	addr := fs.String("addr", "", "MLLP listener `host:port` (required)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for each ACK")
	quiet := fs.Bool("q", false, "print only a summary")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	if *addr == "" || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	var msgs [][]byte
	for _, name := range fs.Args() {
		var data []byte
		var err error
		if name == "-" {
			data, err = io.ReadAll(os.Stdin)
		} else {
			data, err = os.ReadFile(name)
		}
		if err != nil {
			fmt.Fprintln(stderr, "hl7mail send:", err)
			return 1
		}
		found := hl7.Split(data)
		if len(found) == 0 {
			fmt.Fprintf(stderr, "hl7mail send: %s: no HL7 message (no MSH segment)\n", name)
			return 1
		}
		msgs = append(msgs, found...)
	}
	ctx := context.Background()
	dctx, cancel := context.WithTimeout(ctx, *timeout)
	c, err := mllp.Dial(dctx, *addr)
	cancel()
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail send:", err)
		return 1
	}
	defer c.Close()
	accepted, failed := 0, 0
	for _, m := range msgs {
		h, perr := hl7.ParseHeader(m)
		id := "?"
		if h != nil {
			id = h.ControlID
		}
		// Messages that ask for no answer (MSH-15 NE, acknowledgements) are
		// only written.
		if perr == nil && !h.AckWanted(h.AcceptCode(hl7.CommitReject)) && !h.AckWanted(h.AcceptCode(hl7.CommitAccept)) {
			if err := c.Write(ctx, m); err != nil {
				fmt.Fprintln(stderr, "hl7mail send:", err)
				return 1
			}
			accepted++
			if !*quiet {
				fmt.Fprintf(stdout, "# %s: sent, no ACK requested\n\n", id)
			}
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, *timeout)
		reply, err := c.Send(sctx, m)
		cancel()
		if err != nil {
			if perr == nil && h.AcceptAckType == "ER" && isTimeout(err) {
				// MSH-15 ER: silence means accepted. The connection may now
				// be out of step, so stop here.
				fmt.Fprintf(stdout, "# %s: no error reported (MSH-15 ER)\n", id)
				accepted++
				break
			}
			fmt.Fprintf(stderr, "hl7mail send: message %s: %v\n", id, err)
			return 1
		}
		code := ackCode(reply)
		if code == "CA" || code == "AA" {
			accepted++
		} else {
			failed++
		}
		if !*quiet {
			fmt.Fprintf(stdout, "# %s: %s\n%s\n\n", id, code, strings.ReplaceAll(strings.TrimRight(string(reply), "\r"), "\r", "\n"))
		}
	}
	fmt.Fprintf(stdout, "%d sent, %d accepted, %d not accepted\n", len(msgs), accepted, failed)
	if failed > 0 {
		return 1
	}
	return 0
}

// ackCode returns MSA-1 of an acknowledgement, or "?".
func ackCode(reply []byte) string {
	r, err := hl7.ParseAck(reply)
	if err != nil {
		return "?"
	}
	return string(r.Code)
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}
