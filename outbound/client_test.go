package outbound

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// scripted is an SMTP server that answers as Postfix does, with Postfix's
// words, and records each command line and whether the next command had
// already come with it (pipelined).
type scripted struct {
	pipelining bool
	mail       string                   // MAIL's reply, then the server hangs up; "": 250
	rcpt       func(line string) string // RCPT's reply ("": hang up); nil: 250
	data       string                   // DATA's reply when RCPT was refused ("" : 554)
	refuse     int                      // the first mails refused after their data

	mu    sync.Mutex
	lines []string
	ahead []bool // for each line: more input was already waiting
	mails int
}

func (f *scripted) serve(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.session(c)
		}
	}()
	return ln.Addr().String()
}

func (f *scripted) session(c net.Conn) {
	defer c.Close()
	r, w := bufio.NewReader(c), bufio.NewWriter(c)
	say := func(s string) { w.WriteString(s + "\r\n"); w.Flush() }
	say("220 mx.hospital.test ESMTP Postfix")
	refused := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		f.mu.Lock()
		f.lines = append(f.lines, line)
		f.ahead = append(f.ahead, r.Buffered() > 0)
		f.mu.Unlock()
		verb, _, _ := strings.Cut(strings.ToUpper(line), " ")
		switch verb {
		case "EHLO":
			ext := "250-mx.hospital.test\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES"
			if f.pipelining {
				ext = "250-mx.hospital.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n250-DSN\r\n250 ENHANCEDSTATUSCODES"
			}
			say(ext)
		case "MAIL":
			refused = false
			if f.mail != "" {
				say(f.mail)
				return
			}
			say("250 2.1.0 Ok")
		case "RCPT":
			reply := "250 2.1.5 Ok"
			if f.rcpt != nil {
				if reply = f.rcpt(line); reply == "" {
					return
				}
			}
			if !strings.HasPrefix(reply, "2") {
				refused = true
			}
			say(reply)
		case "DATA":
			if refused && f.data == "" {
				say("554 5.5.1 Error: no valid recipients")
				continue
			}
			say("354 End data with <CR><LF>.<CR><LF>")
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
			}
			if refused {
				say("554 5.5.1 Error: no valid recipients")
				continue
			}
			f.mu.Lock()
			refuse := f.refuse > 0
			if refuse {
				f.refuse--
			} else {
				f.mails++
			}
			f.mu.Unlock()
			if refuse {
				say("550 5.7.1 Message content rejected")
				continue
			}
			say("250 2.0.0 Ok: queued as 4XyZ1")
		case "QUIT":
			say("221 2.0.0 Bye")
			return
		default:
			say("502 5.5.2 Error: command not recognized")
		}
	}
}

// queued returns how many mails the server took.
func (f *scripted) queued() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.mails
}

// sent returns the command lines from MAIL on, and for each whether the
// next one had come with it.
func (f *scripted) sent() (lines []string, ahead []bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, l := range f.lines {
		if v, _, _ := strings.Cut(l, " "); v == "MAIL" || v == "RCPT" || v == "DATA" {
			lines, ahead = append(lines, l), append(ahead, f.ahead[i])
		}
	}
	return lines, ahead
}

var testMail = []byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nSubject: x\r\n\r\n.starts with a dot\r\nbody\r\n")

// TestClientPipelines: where the server offers PIPELINING, MAIL, RCPT and
// DATA go in one write; where it does not, each waits for its reply. Both
// carry BODY and the DSN parameters the server offers.
func TestClientPipelines(t *testing.T) {
	for _, pipelining := range []bool{true, false} {
		f := &scripted{pipelining: pipelining}
		sub := &SMTPSubmitter{Addr: f.serve(t), TLS: "none", Timeout: 10 * time.Second}
		sess, err := sub.Open(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := sess.Submit(context.Background(), "edi@hospital.test", []string{"lab@partner.test"}, testMail,
				SubmitOptions{EnvelopeID: "hl7mail.1.ab@hospital.test"}); err != nil {
				t.Fatalf("pipelining %v: %v", pipelining, err)
			}
		}
		if err := sess.Close(); err != nil {
			t.Errorf("QUIT: %v", err)
		}
		lines, ahead := f.sent()
		want := []string{
			"MAIL FROM:<edi@hospital.test> BODY=8BITMIME RET=HDRS ENVID=hl7mail.1.ab@hospital.test",
			"RCPT TO:<lab@partner.test> NOTIFY=FAILURE,DELAY",
			"DATA",
		}
		if len(lines) != 6 {
			t.Fatalf("pipelining %v: server got %q, want two transactions", pipelining, lines)
		}
		for i, l := range lines {
			if l != want[i%3] {
				t.Errorf("pipelining %v: command %d = %q, want %q", pipelining, i, l, want[i%3])
			}
			// With PIPELINING, MAIL and RCPT come with the command after
			// them; DATA is last in its group. Without, nothing comes early.
			if wantAhead := pipelining && i%3 != 2; ahead[i] != wantAhead {
				t.Errorf("pipelining %v: %q had the next command with it: %v, want %v", pipelining, l, ahead[i], wantAhead)
			}
		}
		if n := f.queued(); n != 2 {
			t.Errorf("pipelining %v: server queued %d mails, want 2", pipelining, n)
		}
	}
}

// TestClientRefusals: a refused recipient is about the message (Postfix's
// 550 is final, 450 is for later), whether the server then refuses DATA,
// as Postfix does, or takes it (the client ends the empty data). A refused
// MAIL is about the session.
func TestClientRefusals(t *testing.T) {
	for _, c := range []struct {
		name       string
		rcpt, data string
		pipelining bool
		fault      Fault
	}{
		{"550 to RCPT, DATA refused", "550 5.1.1 <lab@partner.test>: Recipient address rejected: User unknown", "", true, FaultMessage},
		{"450 to RCPT, DATA taken", "450 4.2.0 <lab@partner.test>: Recipient address rejected: Greylisted", "354", true, FaultRetry},
		{"550 to RCPT, one at a time", "550 5.1.1 <lab@partner.test>: Recipient address rejected: User unknown", "", false, FaultMessage},
	} {
		f := &scripted{pipelining: c.pipelining, rcpt: func(string) string { return c.rcpt }, data: c.data}
		sub := &SMTPSubmitter{Addr: f.serve(t), TLS: "none", Timeout: 10 * time.Second}
		err := sub.Submit(context.Background(), "edi@hospital.test", []string{"lab@partner.test"}, testMail, SubmitOptions{})
		var se *smtp.SMTPError
		if !errors.As(err, &se) || !strings.Contains(err.Error(), "RCPT TO") || Classify(err) != c.fault {
			t.Errorf("%s: %v (fault %v), want the RCPT refusal, fault %v", c.name, err, Classify(err), c.fault)
			continue
		}
		if se.EnhancedCode[0] != se.Code/100 || strings.HasPrefix(se.Message, fmt.Sprint(se.Code/100)+".") {
			t.Errorf("%s: enhanced code %v, message %q: want the code apart from the words", c.name, se.EnhancedCode, se.Message)
		}
		if f.queued() != 0 {
			t.Errorf("%s: the server queued a mail", c.name)
		}
	}
}

func TestReplyError(t *testing.T) {
	for _, c := range []struct {
		code      int
		msg       string
		enhanced  smtp.EnhancedCode
		remaining string
	}{
		{535, "5.7.8 Error: authentication failed: authentication failure", smtp.EnhancedCode{5, 7, 8}, "Error: authentication failed: authentication failure"},
		{451, "4.3.0 Error: queue file write error\n4.3.0 try later", smtp.EnhancedCode{4, 3, 0}, "Error: queue file write error\ntry later"},
		{550, "no such user here", smtp.EnhancedCode{}, "no such user here"},
		{550, "4.1.1 a code of another class", smtp.EnhancedCode{}, "4.1.1 a code of another class"},
	} {
		e := replyError(c.code, c.msg)
		if e.Code != c.code || e.EnhancedCode != c.enhanced || e.Message != c.remaining {
			t.Errorf("replyError(%d, %q) = %+v, want %v %q", c.code, c.msg, e, c.enhanced, c.remaining)
		}
	}
	if got := xtext("a+b=c d\x01"); got != "a+2Bb+3Dc+20d+01" {
		t.Errorf("xtext = %q", got)
	}
}

// TestClientHangUpBeforeData: a server that goes away before the data
// (a restart) never had the mail: a session fault, so that a kept session
// is replaced at once, pipelined or not.
func TestClientHangUpBeforeData(t *testing.T) {
	for _, pipelining := range []bool{true, false} {
		f := &scripted{pipelining: pipelining, rcpt: func(string) string { return "" }}
		sub := &SMTPSubmitter{Addr: f.serve(t), TLS: "none", Timeout: 10 * time.Second}
		err := sub.Submit(context.Background(), "edi@hospital.test", []string{"lab@partner.test"}, testMail, SubmitOptions{})
		var sess *SessionError
		if !errors.As(err, &sess) || sess.Stage != "mail" || Classify(err) != FaultLink {
			t.Errorf("pipelining %v: %v, want a session fault before the message was named", pipelining, err)
		}
	}
}

// TestClientMailRefused: a server that refuses MAIL and hangs up (Postfix's
// 421 when it shuts down) ends the session before the message was named:
// a session fault, with the server's words, whatever came after MAIL in
// the same write.
func TestClientMailRefused(t *testing.T) {
	for _, pipelining := range []bool{true, false} {
		f := &scripted{pipelining: pipelining, mail: "421 4.3.2 Service shutting down"}
		sub := &SMTPSubmitter{Addr: f.serve(t), TLS: "none", Timeout: 10 * time.Second}
		err := sub.Submit(context.Background(), "edi@hospital.test", []string{"lab@partner.test"}, testMail, SubmitOptions{})
		var sess *SessionError
		if !errors.As(err, &sess) || sess.Stage != "mail" || !strings.Contains(err.Error(), "Service shutting down") ||
			Classify(err) != FaultLink {
			t.Errorf("pipelining %v: %v, want a session fault at MAIL with the 421", pipelining, err)
		}
	}
}
