package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/inbound"
)

// Exit codes of "hl7mail receive" (sysexits.h): an MTA retries on
// EX_TEMPFAIL and bounces on the others.
const (
	exOK       = 0
	exDataErr  = 65 // the mail is beyond any limit: bounced
	exTempFail = 75 // nothing was decided: the MTA keeps the mail and tries again
)

func runReceive(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := newFlags("receive", "[-config FILE] [-to ADDR] < mail", `
Takes one mail on standard input, as an MTA pipes it (a Postfix or sendmail
alias: ward: "|/usr/local/bin/hl7mail receive -config /etc/hl7mail/partners.yaml"),
through the same path as the IMAP watcher: journal first, decrypt, verify,
store or quarantine; the running instance then delivers it to the router and
answers with the receipt. It hands the mail to the running "hl7mail serve"
over its dashboard (loopback); when none runs, it stores the mail itself,
for the router at the next start.

Exit status (sysexits): 0 once the mail is stored or quarantined; 75
(EX_TEMPFAIL) when it could not be, so that the MTA keeps it and tries
again; 65 when the mail is larger than four times imap.max_mail_size.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	to := fs.String("to", "", "the envelope recipient, as the MTA gives it (${recipient})")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "hl7mail receive: "+format+"\n", a...)
		return code
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return fail(exTempFail, "%v", err)
	}
	if *to != "" && !cfg.IsOurs(*to) {
		fmt.Fprintf(stderr, "hl7mail receive: note: %s is none of this site's addresses; the mail's To decides\n", *to)
		*to = ""
	}
	raw, size, err := readMail(stdin, int64(cfg.IMAP.MaxMailSize))
	if err != nil {
		return fail(exTempFail, "read the mail: %v", err)
	}
	if limit := 4 * int64(cfg.IMAP.MaxMailSize); size > limit {
		return fail(exDataErr, "the mail is larger than %d bytes", limit)
	}
	api, err := newInstanceAPI(cfg)
	if err != nil {
		return fail(exTempFail, "%v", err)
	}
	a, err := api.receive(raw, size, *to)
	switch {
	case errors.Is(err, errNotRunning):
		if a, err = receiveStopped(cfg, raw, size, *to); err != nil {
			return fail(exTempFail, "hl7mail serve is not running and the mail could not be stored: %v", err)
		}
	case errors.Is(err, errTooLarge):
		return fail(exDataErr, "%v", err)
	case err != nil:
		return fail(exTempFail, "%v", err)
	}
	switch {
	case a.Quarantined != "":
		fmt.Fprintf(stdout, "quarantined: %s\n", a.Quarantined)
	case a.Stored != 0:
		fmt.Fprintf(stdout, "stored as message %d\n", a.Stored)
	default:
		fmt.Fprintln(stdout, "taken")
	}
	return exOK
}

var errTooLarge = errors.New("too large")

// readMail reads a piped mail. A mail of at most max bytes is returned
// whole; of a larger one only the header is kept (at most 64 KiB), so that
// it can be quarantined as oversize. Memory stays bounded however large the
// mail: what follows the first 64 KiB goes to an unnamed temporary file
// (O_TMPFILE, mode 0600, gone when closed), read back only when the mail
// turns out to be within the limit. size is the mail's length. Postfix's
// local(8) and sendmail start a piped mail with the mbox envelope line
// "From sender date": it is not part of the mail.
func readMail(r io.Reader, max int64) (raw []byte, size int64, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	if b, _ := br.Peek(5); string(b) == "From " {
		if _, err := br.ReadSlice('\n'); err != nil && err != bufio.ErrBufferFull {
			return nil, 0, err
		}
	}
	head := make([]byte, 64<<10)
	n, err := io.ReadFull(br, head)
	head = head[:n]
	if err == io.EOF || err == io.ErrUnexpectedEOF || int64(n) > max {
		if int64(n) <= max {
			return head, int64(n), nil
		}
		rest, err := io.Copy(io.Discard, br)
		return headerOnly(head), int64(n) + rest, err
	}
	if err != nil {
		return nil, 0, err
	}
	spool, err := os.OpenFile(os.TempDir(), os.O_RDWR|unix.O_TMPFILE, 0o600)
	if err != nil {
		return nil, 0, fmt.Errorf("temporary file: %w", err)
	}
	defer spool.Close()
	rest, err := io.Copy(spool, io.LimitReader(br, max-int64(n)+1))
	if err != nil {
		return nil, 0, err
	}
	if size = int64(n) + rest; size > max {
		more, err := io.Copy(io.Discard, br)
		return headerOnly(head), size + more, err
	}
	raw = make([]byte, size)
	copy(raw, head)
	if _, err := spool.ReadAt(raw[n:], 0); err != nil && err != io.EOF {
		return nil, 0, err
	}
	return raw, size, nil
}

// headerOnly returns the header of the mail that starts with b.
func headerOnly(b []byte) []byte {
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		return b[:i+4]
	}
	if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
		return b[:i+2]
	}
	return b
}

// receive posts a mail to the running instance: whole, or, for one of
// size bytes over the limit, its header.
func (a *instanceAPI) receive(raw []byte, size int64, to string) (dashboard.ReceiveAnswer, error) {
	var out dashboard.ReceiveAnswer
	req, err := http.NewRequest("POST", a.base+"/api/receive?to="+url.QueryEscape(to)+"&size="+strconv.FormatInt(size, 10),
		bytes.NewReader(raw))
	if err != nil {
		return out, err
	}
	req.Header.Set("Content-Type", "message/rfc822")
	status, body, err := a.do(req)
	if err != nil {
		return out, err
	}
	switch status {
	case http.StatusOK:
		return out, json.Unmarshal(body, &out)
	case http.StatusRequestEntityTooLarge:
		return out, fmt.Errorf("%w: %s", errTooLarge, strings.TrimSpace(string(body)))
	}
	return out, fmt.Errorf("the instance answered %d: %s", status, strings.TrimSpace(string(body)))
}

// receiveStopped takes the mail in with the instance stopped: journalled
// and stored (or quarantined) in its store; it goes to the router, and the
// receipt to the partner, when "hl7mail serve" starts (on a node of a
// cluster: in the cluster's database, served by the running nodes).
func receiveStopped(cfg *config.Config, raw []byte, size int64, to string) (dashboard.ReceiveAnswer, error) {
	var a dashboard.ReceiveAnswer
	if err := cfg.CheckFiles(); err != nil {
		return a, err
	}
	keys, err := gateway.LoadKeys(cfg, time.Now())
	if err != nil {
		return a, err
	}
	st, j, closeStore, err := openInbound(cfg)
	if err != nil {
		return a, err
	}
	defer closeStore()
	r := gateway.NewReceiver(cfg, keys, st, j, nil, nil)
	var res inbound.Result
	if size > int64(cfg.IMAP.MaxMailSize) {
		res, err = r.HandleOversize(context.Background(), raw, size)
	} else {
		res, err = r.HandleTo(context.Background(), raw, to)
	}
	if err != nil {
		return a, err
	}
	a.Stored, a.Replay = res.ID, res.Replay
	if res.Quarantine != nil {
		a.Quarantined = string(res.Quarantine.Reason)
	}
	return a, nil
}
