package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/mailbox"
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
	limit := int64(4 * cfg.IMAP.MaxMailSize)
	raw, err := io.ReadAll(io.LimitReader(stdin, limit+1))
	if err != nil {
		return fail(exTempFail, "read the mail: %v", err)
	}
	if int64(len(raw)) > limit {
		return fail(exDataErr, "the mail is larger than %d bytes", limit)
	}
	// Postfix's local(8) and sendmail start a piped mail with the mbox
	// envelope line "From sender date": not part of the mail.
	if bytes.HasPrefix(raw, []byte("From ")) {
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			raw = raw[i+1:]
		}
	}
	api, err := newInstanceAPI(cfg)
	if err != nil {
		return fail(exTempFail, "%v", err)
	}
	a, err := api.receive(raw, *to)
	switch {
	case errors.Is(err, errNotRunning):
		if a, err = receiveStopped(cfg, raw, *to); err != nil {
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

// receive posts a mail to the running instance.
func (a *instanceAPI) receive(raw []byte, to string) (dashboard.ReceiveAnswer, error) {
	var out dashboard.ReceiveAnswer
	req, err := http.NewRequest("POST", a.base+"/api/receive?to="+url.QueryEscape(to), bytes.NewReader(raw))
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
// receipt to the partner, when "hl7mail serve" starts.
func receiveStopped(cfg *config.Config, raw []byte, to string) (dashboard.ReceiveAnswer, error) {
	var a dashboard.ReceiveAnswer
	if err := cfg.CheckFiles(); err != nil {
		return a, err
	}
	keys, err := gateway.LoadKeys(cfg, time.Now())
	if err != nil {
		return a, err
	}
	st, err := openWritable(cfg)
	if err != nil {
		return a, err
	}
	defer st.Close()
	j, err := journal.Open(filepath.Join(cfg.StoreDir(), gateway.IncomingJournal))
	if err != nil {
		return a, err
	}
	defer j.Close()
	r := &mailbox.Receiver{Opener: &mailbox.Opener{Config: cfg, Keys: &keys.Sealer, MaxSize: cfg.IMAP.MaxMailSize},
		Store: st, Journal: j}
	res, err := r.HandleTo(context.Background(), raw, to)
	if err != nil {
		return a, err
	}
	a.Stored, a.Replay = res.ID, res.Replay
	if res.Quarantine != nil {
		a.Quarantined = string(res.Quarantine.Reason)
	}
	return a, nil
}
