package security

import (
	"bufio"
	"bytes"
	"fmt"
	"regexp"
	"strings"

	"github.com/emersion/go-message/textproto"
)

// Delivery-status notifications (RFC 3464): what a mail server sends back
// when our mail could not be delivered, or is delayed. No module served
// here reads them; the format is header-like field groups inside
// multipart/report, read with go-message's textproto like the MDN's.

const typeDeliveryStatus = "message/delivery-status"

// DSN is a delivery-status notification.
type DSN struct {
	// EnvelopeID is the Original-Envelope-Id: the ENVID we submitted with.
	EnvelopeID   string
	ReportingMTA string
	Recipients   []DSNRecipient
	// ReturnedMessageID is the Message-ID of the returned header
	// (text/rfc822-headers or message/rfc822), when it came back.
	ReturnedMessageID string
}

// DSNRecipient is the report for one recipient.
type DSNRecipient struct {
	FinalRecipient string // address
	Action         string // failed, delayed, delivered, relayed, expanded
	Status         string // d.d.d (RFC 3463)
	Diagnostic     string // Diagnostic-Code, bounded (see Bounded)
}

// IsDSN reports whether mail (a whole message) is a delivery-status report.
func IsDSN(mail []byte) bool {
	e, err := parseEntity(mail)
	return err == nil && e.typ == typeMultipartReport && strings.EqualFold(e.params["report-type"], "delivery-status")
}

var statusCode = regexp.MustCompile(`^[245]\.[0-9]{1,3}\.[0-9]{1,3}$`)

// ParseDSN reads a delivery-status report (a whole message).
func ParseDSN(mail []byte) (*DSN, error) {
	parts, err := reportParts(mail, "DSN", "delivery-status")
	if err != nil {
		return nil, err
	}
	d := &DSN{}
	found := false
	for _, p := range parts {
		pe, err := parseEntity(p)
		if err != nil {
			return nil, err
		}
		switch pe.typ {
		case typeDeliveryStatus, "message/global-delivery-status":
			if found {
				return nil, malformed("DSN has two delivery-status parts")
			}
			found = true
			b, err := decodedBody(p)
			if err != nil {
				return nil, err
			}
			if err := d.readFields(b); err != nil {
				return nil, err
			}
		case "text/rfc822-headers", "message/rfc822", "message/global-headers":
			b, err := decodedBody(p)
			if err != nil {
				return nil, err
			}
			if h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(b))); err == nil {
				d.ReturnedMessageID = strings.TrimSpace(h.Get("Message-Id"))
			}
		}
	}
	if !found {
		return nil, malformed("DSN has no message/delivery-status part")
	}
	return d, nil
}

// readFields reads the per-message group, then one group per recipient
// (RFC 3464 §2.1), each ended by a blank line.
func (d *DSN) readFields(b []byte) error {
	b = bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n"))
	groups := bytes.Split(bytes.TrimSpace(b), []byte("\n\n"))
	for i, g := range groups {
		g = append(bytes.ReplaceAll(bytes.TrimSpace(g), []byte("\n"), []byte("\r\n")), "\r\n\r\n"...)
		h, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(g)))
		if err != nil {
			return fmt.Errorf("delivery-status fields: %w", HeaderFault(g))
		}
		if i == 0 {
			d.EnvelopeID = strings.TrimSpace(xtextDecode(h.Get("Original-Envelope-Id")))
			_, mta, _ := strings.Cut(h.Get("Reporting-MTA"), ";") // "dns; host"
			d.ReportingMTA = Bounded(mta, 255)
			continue
		}
		r := DSNRecipient{
			FinalRecipient: addressOf(h.Get("Final-Recipient")),
			Action:         strings.ToLower(strings.TrimSpace(h.Get("Action"))),
			Status:         strings.TrimSpace(h.Get("Status")),
			Diagnostic:     Bounded(h.Get("Diagnostic-Code"), 200),
		}
		if r.FinalRecipient == "" || r.Action == "" {
			return malformed("delivery-status recipient %d without Final-Recipient or Action", i)
		}
		if s, _, _ := strings.Cut(r.Status, " "); statusCode.MatchString(s) {
			r.Status = s
		} else {
			r.Status = ""
		}
		d.Recipients = append(d.Recipients, r)
	}
	if len(d.Recipients) == 0 {
		return malformed("delivery-status without a recipient")
	}
	return nil
}

// xtextDecode undoes RFC 3461 §4 xtext (+XX hex escapes).
func xtextDecode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '+' && i+2 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+3], "%02X", &c); err == nil {
				b.WriteByte(c)
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
