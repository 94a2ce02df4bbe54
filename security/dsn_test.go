package security

import (
	"strings"
	"testing"
)

// postfixBounce is the form of Postfix's bounce for a RET=HDRS submission
// (the header only comes back), with an ENVID that needed xtext escapes.
const postfixBounce = "From: MAILER-DAEMON@mail.lab.test (Mail Delivery System)\r\n" +
	"Subject: Undelivered Mail Returned to Sender\r\n" +
	"To: edi@hospital.test\r\n" +
	"Auto-Submitted: auto-replied\r\n" +
	"MIME-Version: 1.0\r\n" +
	"Content-Type: multipart/report; report-type=delivery-status;\r\n" +
	"\tboundary=\"AB12.1764580000/mail.lab.test\"\r\n" +
	"Message-Id: <20261201103000.AB12@mail.lab.test>\r\n" +
	"\r\n" +
	"This is a MIME-encapsulated message.\r\n" +
	"\r\n" +
	"--AB12.1764580000/mail.lab.test\r\n" +
	"Content-Description: Notification\r\n" +
	"Content-Type: text/plain; charset=us-ascii\r\n" +
	"\r\n" +
	"I'm sorry to have to inform you that your message could not be delivered.\r\n" +
	"\r\n" +
	"--AB12.1764580000/mail.lab.test\r\n" +
	"Content-Description: Delivery report\r\n" +
	"Content-Type: message/delivery-status\r\n" +
	"\r\n" +
	"Reporting-MTA: dns; mail.lab.test\r\n" +
	"X-Postfix-Queue-ID: AB12\r\n" +
	"X-Postfix-Sender: rfc822; edi@hospital.test\r\n" +
	"Original-Envelope-Id: 42.1764580000+2B1@hospital.test\r\n" +
	"Arrival-Date: Tue,  1 Dec 2026 10:30:00 +0000 (UTC)\r\n" +
	"\r\n" +
	"Final-Recipient: rfc822; nobody@lab.test\r\n" +
	"Original-Recipient: rfc822;nobody@lab.test\r\n" +
	"Action: failed\r\n" +
	"Status: 5.1.1\r\n" +
	"Diagnostic-Code: X-Postfix; unknown user: \"nobody\"\r\n" +
	"\r\n" +
	"--AB12.1764580000/mail.lab.test\r\n" +
	"Content-Description: Undelivered Message Headers\r\n" +
	"Content-Type: text/rfc822-headers\r\n" +
	"\r\n" +
	"From: edi@hospital.test\r\n" +
	"To: nobody@lab.test\r\n" +
	"Message-ID: <42.1764580000+1@hospital.test>\r\n" +
	"Subject: HL7\r\n" +
	"\r\n" +
	"--AB12.1764580000/mail.lab.test--\r\n"

func TestParseDSN(t *testing.T) {
	if !IsDSN([]byte(postfixBounce)) {
		t.Fatal("IsDSN(Postfix bounce) = false")
	}
	d, err := ParseDSN([]byte(postfixBounce))
	if err != nil {
		t.Fatal(err)
	}
	if d.EnvelopeID != "42.1764580000+1@hospital.test" || d.ReportingMTA != "mail.lab.test" ||
		d.ReturnedMessageID != "<42.1764580000+1@hospital.test>" || len(d.Recipients) != 1 {
		t.Fatalf("ParseDSN = %+v", d)
	}
	r := d.Recipients[0]
	if r.FinalRecipient != "nobody@lab.test" || r.Action != "failed" || r.Status != "5.1.1" ||
		r.Diagnostic != `X-Postfix; unknown user: "nobody"` {
		t.Errorf("recipient = %+v", r)
	}
	// A delayed report, LF line ends, no returned header, a status with a
	// comment; a diagnostic quoting HL7 is reduced to its length.
	delayed := strings.ReplaceAll(strings.Replace(strings.Replace(postfixBounce, "Action: failed", "Action: delayed", 1),
		"Status: 5.1.1", "Status: 4.4.1 (connection timed out)", 1), "\r\n", "\n")
	delayed = strings.Replace(delayed, `unknown user: "nobody"`, "rejected MSH|^~\\&|LAB", 1)
	d, err = ParseDSN([]byte(delayed))
	if err != nil || len(d.Recipients) != 1 || d.Recipients[0].Action != "delayed" || d.Recipients[0].Status != "4.4.1" ||
		d.Recipients[0].Diagnostic != "(32 bytes)" {
		t.Errorf("ParseDSN(delayed) = %+v, %v", d, err)
	}
	if IsDSN([]byte("From: a@b\r\nContent-Type: multipart/report; report-type=disposition-notification; boundary=x\r\n\r\n--x--\r\n")) {
		t.Error("an MDN taken for a DSN")
	}
	if _, err := ParseDSN([]byte(strings.Replace(postfixBounce, "message/delivery-status", "text/plain", 1))); err == nil {
		t.Error("a report without its delivery-status part parsed")
	}
}
