package outbound

import (
	"bytes"
	"context"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/hl7mail/hl7mail/internal/embedded"
)

// BenchmarkSubmit sends mails of the size of a sealed HL7 message, one
// after another on one session to the in-process server: with hl7mail's
// client (pipelined) and, as the baseline, go-smtp's (one command at a
// time).
func BenchmarkSubmit(b *testing.B) {
	srv := &embedded.SMTP{Discard: true}
	addr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	line := []byte("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n")
	mail := append([]byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\n\r\n"), bytes.Repeat(line, 70)...)
	ctx := context.Background()
	b.Run("hl7mail", func(b *testing.B) {
		sess, err := (&SMTPSubmitter{Addr: addr, TLS: "none"}).Open(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer sess.Close()
		for b.Loop() {
			if err := sess.Submit(ctx, "edi@hospital.test", []string{"lab@partner.test"}, mail,
				SubmitOptions{EnvelopeID: "hl7mail.1.ab@hospital.test"}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("go-smtp", func(b *testing.B) {
		c, err := smtp.Dial(addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		opts := &smtp.MailOptions{EnvelopeID: "hl7mail.1.ab@hospital.test", Return: smtp.DSNReturnHeaders}
		rcpt := &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed}}
		for b.Loop() {
			if err := c.Mail("edi@hospital.test", opts); err != nil {
				b.Fatal(err)
			}
			if err := c.Rcpt("lab@partner.test", rcpt); err != nil {
				b.Fatal(err)
			}
			w, err := c.Data()
			if err != nil {
				b.Fatal(err)
			}
			w.Write(mail)
			if err := w.Close(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
