package security

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"

	"github.com/emersion/go-message/textproto"
)

// Message disposition notifications (RFC 8098; draft-ietf-ediint-hl7-02
// §4.1.3 tables 4 and 5), the headers that ask for them, and the
// multipart/related bundle of an HL7 response with the MDN for its request
// (§4.1.4).

const (
	typeMultipartReport  = "multipart/report"
	typeMultipartRelated = "multipart/related"
	typeDispositionNote  = "message/disposition-notification"
	// TypeEDIResponse is the type parameter of the response bundle.
	TypeEDIResponse = "application/x-edi-response"
)

// Disposition types (table 4) and modifiers (table 5).
const (
	Processed  = "processed"
	Failed     = "failed"
	Dispatched = "dispatched"
	Deleted    = "deleted"
	Denied     = "denied"

	ModError      = "error"
	ModWarning    = "warning"
	ModSuperseded = "superseded"
	ModExpired    = "expired"
)

var dispositionTypes = map[string]bool{Processed: true, Failed: true, Dispatched: true, Deleted: true, Denied: true,
	"displayed": true}
var dispositionModifiers = map[string]bool{ModError: true, ModWarning: true, ModSuperseded: true, ModExpired: true,
	"mailbox-terminated": true}

// Disposition is the Disposition field of an MDN.
type Disposition struct {
	Type     string // processed, failed, dispatched, deleted, denied
	Modifier string // error, warning, superseded, expired, or empty
}

// String writes the field value, always sent automatically.
func (d Disposition) String() string {
	s := "automatic-action/MDN-sent-automatically; " + d.Type
	if d.Modifier != "" {
		s += "/" + d.Modifier
	}
	return s
}

// OK reports whether the disposition is a plain processed.
func (d Disposition) OK() bool { return d.Type == Processed && d.Modifier == "" }

// Status is the disposition without its action modes: "processed/warning".
func (d Disposition) Status() string {
	if d.Modifier == "" {
		return d.Type
	}
	return d.Type + "/" + d.Modifier
}

// Failure reports whether the disposition says the message was not
// processed: processed/error, failed, deleted or denied (§4.1.3 tables 4
// and 5).
func (d Disposition) Failure() bool {
	switch d.Type {
	case Failed, Deleted, Denied:
		return true
	}
	return d.Modifier == ModError
}

func parseDisposition(v string) (Disposition, error) {
	_, status, ok := strings.Cut(v, ";")
	if !ok {
		return Disposition{}, malformed("Disposition %s has no disposition type", token(v))
	}
	status = strings.ToLower(strings.TrimSpace(status))
	t, mod, _ := strings.Cut(status, "/")
	t, mod = strings.TrimSpace(t), strings.TrimSpace(mod)
	if !dispositionTypes[t] {
		return Disposition{}, malformed("Disposition type %s", token(t))
	}
	if mod != "" {
		// Several modifiers may be listed; the first known one is kept.
		first := strings.TrimSpace(strings.Split(mod, ",")[0])
		if !dispositionModifiers[first] {
			return Disposition{}, malformed("Disposition modifier %s", token(first))
		}
		mod = first
	}
	return Disposition{Type: t, Modifier: mod}, nil
}

// MDN is a message disposition notification.
type MDN struct {
	ReportingUA       string // "host; product"
	OriginalRecipient string // address, optional
	FinalRecipient    string // address
	OriginalMessageID string // with its angle brackets
	Disposition       Disposition
	MIC               *MIC   // Received-Content-MIC, when the request was signed
	Error             string // Error field: the reason for processed/error
	Failure           string // Failure field: the reason for failed (RFC 3798 §3.2.7)
	Warning           string // Warning field: the reason for processed/warning
	// FinalDelivery is Direct's X-DIRECT-FINAL-DESTINATION-DELIVERY on a
	// dispatched MDN: the message reached its final destination.
	FinalDelivery bool
	Text          string // the human-readable part
}

// knownReasons are the words of the Error, Failure and Warning fields that
// the EDIINT and Direct specifications define (RFC 4130 §7.4.3, RFC 3798),
// with those hl7mail sends itself.
var knownReasons = map[string]bool{
	"authentication-failed": true, "decompression-failed": true, "decryption-failed": true,
	"insufficient-message-security": true, "integrity-check-failed": true, "unexpected-processing-error": true,
	"unsupported format": true, "unsupported mic-algorithms": true, "sender-equals-receiver": true,
	"duplicate-document": true, "message too large": true, "disposition-notification-options unreadable": true,
}

// Reason is the reason the MDN gives (Error, else Failure, else Warning)
// in bounded words: the value itself when it is one the specifications
// define, else only its length. A partner's free text may name a patient.
func (m *MDN) Reason() string {
	for _, v := range []string{m.Error, m.Failure, m.Warning} {
		v = strings.TrimSpace(v)
		if v == "" {
			continue
		}
		if knownReasons[strings.ToLower(v)] {
			return strings.ToLower(v)
		}
		return fmt.Sprintf("a reason of its own (%d bytes)", len(v))
	}
	return ""
}

// Entity returns the MDN as a multipart/report MIME entity in canonical form.
func (m *MDN) Entity() ([]byte, error) {
	if m.FinalRecipient == "" || m.OriginalMessageID == "" || m.Disposition.Type == "" {
		return nil, fmt.Errorf("security: MDN needs Final-Recipient, Original-Message-ID and a disposition")
	}
	var fields bytes.Buffer
	field := func(k, v string) {
		fields.WriteString(k + ": " + oneLine(v) + "\r\n")
	}
	field("Reporting-UA", m.ReportingUA)
	if m.OriginalRecipient != "" {
		field("Original-Recipient", "rfc822; "+m.OriginalRecipient)
	}
	field("Final-Recipient", "rfc822; "+m.FinalRecipient)
	field("Original-Message-ID", m.OriginalMessageID)
	field("Disposition", m.Disposition.String())
	if m.MIC != nil {
		field("Received-Content-MIC", m.MIC.String())
	}
	if m.Error != "" {
		field("Error", m.Error)
	}
	if m.Failure != "" {
		field("Failure", m.Failure)
	}
	if m.Warning != "" {
		field("Warning", m.Warning)
	}
	if m.FinalDelivery {
		field("X-DIRECT-FINAL-DESTINATION-DELIVERY", "")
	}
	text := m.Text
	if text == "" {
		text = defaultText(m.Disposition)
	}
	boundary := newBoundary()
	var b bytes.Buffer
	writeEntityHeader(&b, typeMultipartReport, map[string]string{"report-type": "disposition-notification", "boundary": boundary})
	b.WriteString("--" + boundary + "\r\n")
	writeEntityHeader(&b, "text/plain", map[string]string{"charset": "us-ascii"}, "Content-Transfer-Encoding: 7bit")
	b.WriteString(oneLine(text) + "\r\n")
	b.WriteString("\r\n--" + boundary + "\r\n")
	writeEntityHeader(&b, typeDispositionNote, nil, "Content-Transfer-Encoding: 7bit")
	b.Write(fields.Bytes())
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes(), nil
}

func defaultText(d Disposition) string {
	switch {
	case d.OK():
		return "The message has been received and processed."
	case d.Type == Processed:
		return "The message has been received; processing reported " + d.Modifier + "."
	case d.Type == Deleted:
		return "The message has been deleted (" + d.Modifier + ")."
	}
	return "The message has been " + d.Type + "."
}

// oneLine keeps a field value on one line of printable ASCII.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r < ' ' || r > '~' {
			return ' '
		}
		return r
	}, s)
}

// ParseMDN reads a multipart/report; report-type=disposition-notification
// entity.
func ParseMDN(entity []byte) (*MDN, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, err
	}
	return parseMDN(e)
}

// parseMDN is ParseMDN of an entity already parsed.
func parseMDN(e mimeEntity) (*MDN, error) {
	parts, err := reportPartsOf(e, "MDN", "disposition-notification")
	if err != nil {
		return nil, err
	}
	m := &MDN{}
	found := false
	for _, p := range parts {
		pe, err := parseEntity(p)
		if err != nil {
			return nil, err
		}
		switch pe.typ {
		case "text/plain":
			if m.Text == "" {
				t, err := decodedBody(p)
				if err != nil {
					return nil, err
				}
				m.Text = strings.TrimSpace(string(t))
			}
		case typeDispositionNote:
			if found {
				return nil, malformed("MDN has two disposition-notification parts")
			}
			found = true
			b, err := decodedBody(p)
			if err != nil {
				return nil, err
			}
			if err := m.readFields(b); err != nil {
				return nil, err
			}
		}
	}
	if !found {
		return nil, malformed("MDN has no message/disposition-notification part")
	}
	return m, nil
}

// reportParts returns the parts of a multipart/report entity of
// reportType (RFC 6522): an MDN's or a DSN's, what names it in errors.
func reportParts(entity []byte, what, reportType string) ([][]byte, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, err
	}
	return reportPartsOf(e, what, reportType)
}

// reportPartsOf is reportParts of an entity already parsed.
func reportPartsOf(e mimeEntity, what, reportType string) ([][]byte, error) {
	if e.typ != typeMultipartReport || !strings.EqualFold(e.params["report-type"], reportType) {
		return nil, malformed("%s is %s; report-type=%s", what, token(e.typ), token(e.params["report-type"]))
	}
	return e.parts()
}

func (m *MDN) readFields(b []byte) error {
	// Fields are header-like; a blank line ends a group (RFC 8098 §3.1).
	fh, err := textproto.ReadHeader(bufio.NewReader(bytes.NewReader(append(bytes.TrimLeft(b, "\r\n"), "\r\n\r\n"...))))
	if err != nil {
		return fmt.Errorf("disposition-notification fields: %w", HeaderFault(b))
	}
	m.ReportingUA = fh.Get("Reporting-UA")
	m.OriginalRecipient = addressOf(fh.Get("Original-Recipient"))
	m.FinalRecipient = addressOf(fh.Get("Final-Recipient"))
	m.OriginalMessageID = strings.TrimSpace(fh.Get("Original-Message-ID"))
	m.Error = strings.TrimSpace(fh.Get("Error"))
	m.Failure = strings.TrimSpace(fh.Get("Failure"))
	m.Warning = strings.TrimSpace(fh.Get("Warning"))
	m.FinalDelivery = fh.Has("X-Direct-Final-Destination-Delivery")
	if m.FinalRecipient == "" {
		return malformed("MDN without Final-Recipient")
	}
	d := fh.Get("Disposition")
	if d == "" {
		return malformed("MDN without Disposition")
	}
	if m.Disposition, err = parseDisposition(d); err != nil {
		return err
	}
	if v := fh.Get("Received-Content-MIC"); v != "" {
		mic, err := ParseMIC(v)
		if err != nil {
			return err
		}
		m.MIC = &mic
	}
	return nil
}

// addressOf returns the address of "rfc822; addr".
func addressOf(v string) string {
	v = strings.TrimSpace(v)
	if t, addr, ok := strings.Cut(v, ";"); ok && strings.EqualFold(strings.TrimSpace(t), "rfc822") {
		return strings.TrimSpace(addr)
	}
	return v
}

// Bundle is an HL7 response bundled with the MDN for its request.
type Bundle struct {
	// Response is the MIME-EDI entity of the HL7 response (DecodeEDI reads
	// it), nil when the bundle carries only the MDN.
	Response []byte
	MDN      *MDN
}

// BuildBundle returns the multipart/related; type="application/x-edi-
// response" entity: the HL7 response entity first, the MDN second
// (draft-ietf-ediint-hl7-02 §4.1.4). It is then signed as a whole.
func BuildBundle(response, mdn []byte) []byte {
	boundary := newBoundary()
	var b bytes.Buffer
	writeEntityHeader(&b, typeMultipartRelated, map[string]string{"type": TypeEDIResponse, "boundary": boundary})
	b.WriteString("--" + boundary + "\r\n")
	b.Write(Canonical(response))
	b.WriteString("\r\n--" + boundary + "\r\n")
	b.Write(Canonical(mdn))
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes()
}

// ParseBundle reads a response bundle. The type parameter is matched
// without regard to case (the draft writes application/x-EDI-response).
func ParseBundle(entity []byte) (*Bundle, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return nil, err
	}
	return parseBundle(e)
}

// parseBundle is ParseBundle of an entity already parsed.
func parseBundle(e mimeEntity) (*Bundle, error) {
	if e.typ != typeMultipartRelated || !strings.EqualFold(e.params["type"], TypeEDIResponse) {
		return nil, malformed("bundle is %s; type=%s", token(e.typ), token(e.params["type"]))
	}
	parts, err := e.parts()
	if err != nil {
		return nil, err
	}
	b := &Bundle{}
	for _, p := range parts {
		pe, err := parseEntity(p)
		if err != nil {
			return nil, err
		}
		switch pe.typ {
		case TypeEDIHL7, TypeXEDIHL7, TypeEDIConsent:
			if b.Response != nil {
				return nil, malformed("bundle holds two HL7 responses")
			}
			b.Response = p
		case typeMultipartReport:
			if b.MDN != nil {
				return nil, malformed("bundle holds two MDNs")
			}
			if b.MDN, err = parseMDN(pe); err != nil {
				return nil, err
			}
		default:
			return nil, malformed("bundle part of type %s", token(pe.typ))
		}
	}
	if b.MDN == nil {
		return nil, malformed("bundle without an MDN")
	}
	return b, nil
}

// Kind is what an opened (decrypted and verified) entity carries.
type Kind int

// Kinds of content.
const (
	KindUnknown Kind = iota
	KindHL7          // a MIME-EDI entity: an HL7 message
	KindMDN          // a multipart/report MDN
	KindBundle       // an HL7 response bundled with an MDN
)

func (k Kind) String() string {
	return [...]string{"unknown", "hl7", "mdn", "bundle"}[k]
}

// Classify tells what an opened entity carries from its Content-Type.
func Classify(entity []byte) Kind {
	e, err := parseEntity(entity)
	if err != nil {
		return KindUnknown
	}
	return classify(e)
}

func classify(e mimeEntity) Kind {
	ct, params := e.typ, e.params
	switch {
	case ct == TypeEDIHL7 || ct == TypeXEDIHL7 || ct == TypeEDIConsent:
		return KindHL7
	case ct == typeMultipartReport && strings.EqualFold(params["report-type"], "disposition-notification"):
		return KindMDN
	case ct == typeMultipartRelated && strings.EqualFold(params["type"], TypeEDIResponse):
		return KindBundle
	}
	return KindUnknown
}

// Content is what an opened entity carries, read in one pass: its kind,
// and the HL7 payload, the receipt or the bundle.
type Content struct {
	Kind Kind
	// Payload is the HL7 message (KindHL7) or the bundle's response
	// (KindBundle; nil when the bundle holds only the receipt), decoded
	// from its MIME-EDI entity exactly as it was sent.
	Payload []byte
	MDN     *MDN    // KindMDN, KindBundle
	Bundle  *Bundle // KindBundle
}

// Read reads what an opened entity carries, parsing its structure once;
// accept lists the MIME-EDI types the sender may use. An entity of no kind
// hl7mail takes (or whose header cannot be read) is KindUnknown, without
// an error; an error says why an entity of a known kind is unreadable.
func Read(entity []byte, accept Accept) (*Content, error) {
	e, err := parseEntity(entity)
	if err != nil {
		return &Content{Kind: KindUnknown}, nil
	}
	c := &Content{Kind: classify(e)}
	switch c.Kind {
	case KindHL7:
		c.Payload, _, err = DecodeEDI(entity, accept)
	case KindMDN:
		c.MDN, err = parseMDN(e)
	case KindBundle:
		if c.Bundle, err = parseBundle(e); err == nil {
			c.MDN = c.Bundle.MDN
			if c.Bundle.Response != nil {
				c.Payload, _, err = DecodeEDI(c.Bundle.Response, accept)
			}
		}
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// ReceiptFrom is hl7mail's MDN, from our address self, for the mail
// messageID, with disposition d.
func ReceiptFrom(self, messageID string, d Disposition) *MDN {
	domain := self
	if _, after, ok := strings.Cut(self, "@"); ok {
		domain = after
	}
	return &MDN{ReportingUA: domain + "; hl7mail", OriginalRecipient: self, FinalRecipient: self,
		OriginalMessageID: messageID, Disposition: d}
}
