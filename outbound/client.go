package outbound

import (
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// client is the SMTP client the submitter talks through: greeting, EHLO,
// STARTTLS, AUTH, and mail transactions on net/textproto.
//
// It is ours, not go-smtp's, for one reason: go-smtp's client sends each
// command and waits for its reply. With PIPELINING (RFC 2920), which
// Postfix and most servers offer, a mail's MAIL, RCPT and DATA go out in
// one write and their replies come back together: two round trips a mail
// instead of four, which is most of the time a queue takes to drain on a
// session that stays open. go-smtp still gives the error type
// (*smtp.SMTPError) and the DSN values, and serves the tests.
type client struct {
	conn    net.Conn // the TLS connection once STARTTLS has run
	text    *textproto.Conn
	ext     map[string]string // what EHLO offered, names upper case
	tls     bool
	timeout time.Duration // for each exchange and for the data
}

func newClient(conn net.Conn, encrypted bool, timeout time.Duration) *client {
	return &client{conn: conn, text: textproto.NewConn(conn), tls: encrypted, timeout: timeout}
}

// offers reports whether EHLO offered the extension name.
func (c *client) offers(name string) bool {
	_, ok := c.ext[name]
	return ok
}

// exchange bounds one exchange with the server by the timeout.
func (c *client) exchange() func() {
	c.conn.SetDeadline(time.Now().Add(c.timeout))
	return func() { c.conn.SetDeadline(time.Time{}) }
}

// reply reads one reply. A code that is not want (a prefix, as textproto
// reads it: 2 takes any 2xx) is an *smtp.SMTPError with the server's words.
func (c *client) reply(want int) (int, string, error) {
	code, msg, err := c.text.ReadResponse(want)
	var te *textproto.Error
	if errors.As(err, &te) {
		return code, msg, replyError(te.Code, te.Msg)
	}
	return code, msg, err
}

// cmd sends one command line and reads its reply.
func (c *client) cmd(want int, line string) (int, string, error) {
	defer c.exchange()()
	if err := c.text.PrintfLine("%s", line); err != nil {
		return 0, "", err
	}
	return c.reply(want)
}

// greet reads the server's greeting.
func (c *client) greet() error {
	defer c.exchange()()
	_, _, err := c.reply(220)
	return err
}

// hello says EHLO and records the extensions offered; a server that does
// not know EHLO gets HELO and is taken to offer none.
func (c *client) hello() error {
	_, msg, err := c.cmd(250, "EHLO localhost")
	if err != nil {
		var se *smtp.SMTPError
		if !errors.As(err, &se) || se.Code/100 != 5 {
			return err
		}
		c.ext = map[string]string{}
		_, _, err = c.cmd(250, "HELO localhost")
		return err
	}
	c.ext = map[string]string{}
	lines := strings.Split(msg, "\n")
	for _, line := range lines[1:] { // the first line is the server's name
		name, arg, _ := strings.Cut(line, " ")
		c.ext[strings.ToUpper(name)] = arg
	}
	return nil
}

// startTLS runs STARTTLS and the handshake; EHLO is said again after it.
func (c *client) startTLS(config *tls.Config) error {
	if !c.offers("STARTTLS") {
		return errors.New("the server does not offer STARTTLS")
	}
	if _, _, err := c.cmd(220, "STARTTLS"); err != nil {
		return err
	}
	conn := tls.Client(c.conn, config)
	defer c.exchange()()
	if err := conn.Handshake(); err != nil {
		return err
	}
	c.conn, c.text, c.tls, c.ext = conn, textproto.NewConn(conn), true, nil
	return nil
}

// auth logs in with the SASL mechanism a (RFC 4954).
func (c *client) auth(a sasl.Client) error {
	mech, resp, err := a.Start()
	if err != nil {
		return err
	}
	line := "AUTH " + mech
	if resp != nil {
		line += " " + encodeSASL(resp)
	}
	code, msg, err := c.cmd(0, line)
	for err == nil {
		switch code {
		case 235:
			return nil
		case 334:
			var challenge []byte
			if challenge, err = base64.StdEncoding.DecodeString(msg); err != nil {
				break
			}
			if resp, err = a.Next(challenge); err != nil {
				break
			}
			code, msg, err = c.cmd(0, encodeSASL(resp))
			continue
		default:
			return replyError(code, msg)
		}
		c.cmd(501, "*") // abandon the exchange
	}
	return err
}

// encodeSASL is a SASL response as AUTH sends it: "=" for an empty one.
func encodeSASL(b []byte) string {
	if len(b) == 0 {
		return "="
	}
	return base64.StdEncoding.EncodeToString(b)
}

// transactionError says which command of a transaction the server refused.
type transactionError struct {
	Command string // MAIL FROM, RCPT TO, DATA
	Err     error
}

func (e *transactionError) Error() string { return e.Command + ": " + e.Err.Error() }
func (e *transactionError) Unwrap() error { return e.Err }

// send runs one mail transaction: MAIL, RCPT for each of to, DATA and the
// mail. Where the server offers PIPELINING the commands up to DATA go in
// one write. A refusal is a *transactionError over the server's
// *smtp.SMTPError; after any error the session is not used again (the
// Sender opens a new one), so nothing is reset here.
func (c *client) send(from string, to []string, mail []byte, opts SubmitOptions) error {
	cmds, err := c.envelope(from, to, opts)
	if err != nil {
		return err
	}
	if err := c.commands(cmds); err != nil {
		var te *transactionError
		if !errors.As(err, &te) {
			// The connection broke before the server had the mail: as a
			// session that would not take MAIL.
			err = &transactionError{Command: "MAIL FROM", Err: err}
		}
		return err
	}
	return c.data(mail)
}

// envelope is the transaction's commands: MAIL, the RCPTs, DATA.
func (c *client) envelope(from string, to []string, opts SubmitOptions) ([]string, error) {
	for _, a := range append([]string{from}, to...) {
		if strings.ContainsAny(a, "\r\n<> ") {
			return nil, fmt.Errorf("address %q is not one SMTP takes", a)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "MAIL FROM:<%s>", from)
	if c.offers("8BITMIME") {
		b.WriteString(" BODY=8BITMIME")
	}
	// No SIZE (RFC 1870): a server that finds the mail too big refuses it
	// after the data, where the refusal is about the message, not at MAIL,
	// where it would read as a session fault and hold every queue.
	if opts.RequireTLS { // the session has checked that the server offers it
		b.WriteString(" REQUIRETLS")
	}
	dsn := c.offers("DSN") && opts.EnvelopeID != ""
	if dsn {
		fmt.Fprintf(&b, " RET=%s ENVID=%s", smtp.DSNReturnHeaders, xtext(opts.EnvelopeID))
	}
	cmds := []string{b.String()}
	for _, rcpt := range to {
		line := "RCPT TO:<" + rcpt + ">"
		if dsn {
			line += " NOTIFY=" + string(smtp.DSNNotifyFailure) + "," + string(smtp.DSNNotifyDelayed)
		}
		cmds = append(cmds, line)
	}
	return append(cmds, "DATA"), nil
}

// commands sends MAIL, the RCPTs and DATA, in one write where the server
// pipelines, and reads their replies in order: 250s, then 354.
func (c *client) commands(cmds []string) error {
	defer c.exchange()()
	want := func(i int) (int, string) {
		switch i {
		case 0:
			return 250, "MAIL FROM"
		case len(cmds) - 1:
			return 354, "DATA"
		}
		return 25, "RCPT TO" // 250 or 251
	}
	if !c.offers("PIPELINING") {
		for i, line := range cmds {
			code, name := want(i)
			if err := c.text.PrintfLine("%s", line); err != nil {
				return err
			}
			_, _, err := c.reply(code)
			var se *smtp.SMTPError
			if errors.As(err, &se) {
				return &transactionError{Command: name, Err: err}
			}
			if err != nil {
				return err // the connection broke
			}
		}
		return nil
	}
	for _, line := range cmds {
		c.text.W.WriteString(line)
		c.text.W.WriteString("\r\n")
	}
	if err := c.text.W.Flush(); err != nil {
		return err
	}
	// Every reply is read, refused or not, so that the session stays in
	// step; the first refusal is the one reported.
	var first error
	for i := range cmds {
		code, name := want(i)
		got, _, err := c.reply(code)
		var se *smtp.SMTPError
		if err != nil && !errors.As(err, &se) {
			if first != nil {
				return first // the refusal, then the server hung up
			}
			return err // the connection broke
		}
		if err != nil && first == nil {
			first = &transactionError{Command: name, Err: err}
		}
		if i == len(cmds)-1 && got == 354 && first != nil {
			// DATA was taken after a refusal before it (RFC 2920 §3.1): an
			// empty mail ends it, and its reply does not matter.
			c.text.PrintfLine(".")
			c.reply(0)
		}
	}
	return first
}

// data sends the mail, dot-stuffed, and reads the server's verdict.
func (c *client) data(mail []byte) error {
	defer c.exchange()()
	w := c.text.DotWriter()
	if _, err := w.Write(mail); err != nil {
		w.Close()
		return err
	}
	if err := w.Close(); err != nil {
		return err
	}
	if _, _, err := c.reply(250); err != nil {
		return &transactionError{Command: "DATA", Err: err}
	}
	return nil
}

// quit says QUIT, waiting at most wait for the answer, and closes.
func (c *client) quit(wait time.Duration) error {
	c.timeout = min(c.timeout, wait)
	_, _, err := c.cmd(221, "QUIT")
	c.text.Close()
	return err
}

// replyError is a server's refusal as go-smtp gives it, with the enhanced
// status code (RFC 3463) taken from the text when it starts with one.
func replyError(code int, msg string) *smtp.SMTPError {
	e := &smtp.SMTPError{Code: code, Message: msg}
	first, rest, ok := strings.Cut(msg, " ")
	if !ok {
		return e
	}
	parts := strings.Split(first, ".")
	if len(parts) != 3 || parts[0] != strconv.Itoa(code/100) {
		return e
	}
	var ec smtp.EnhancedCode
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || n > 999 {
			return e
		}
		ec[i] = n
	}
	e.EnhancedCode = ec
	// Each line of a multi-line reply repeats the code (RFC 2034).
	e.Message = strings.ReplaceAll(rest, "\n"+first+" ", "\n")
	return e
}

// xtext encodes s as xtext (RFC 3461 §4): "+" and "=" and what is not
// printable ASCII become "+XX".
func xtext(s string) string {
	var b strings.Builder
	for i := range len(s) {
		ch := s[i]
		if ch >= '!' && ch <= '~' && ch != '+' && ch != '=' {
			b.WriteByte(ch)
			continue
		}
		fmt.Fprintf(&b, "+%02X", ch)
	}
	return b.String()
}
