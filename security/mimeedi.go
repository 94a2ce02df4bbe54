package security

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"mime"
	"strings"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"
)

// MIME-EDI content types (draft-ietf-ediint-hl7-02 §2.6; RFC 1767).
const (
	TypeEDIHL7     = "application/edi-hl7"
	TypeXEDIHL7    = "application/x-edi-hl7"
	TypeEDIConsent = "application/edi-consent"
)

// EDIOptions shape the MIME-EDI entity.
type EDIOptions struct {
	// ContentType is application/edi-hl7 (default) or application/x-edi-hl7.
	ContentType string
	// Name is the file name offered in Content-Disposition (optional).
	Name string
}

// EncodeEDI returns the MIME-EDI entity carrying payload, in canonical form
// (CRLF line ends): its headers, a blank line and the payload in base64.
// HL7 ends segments with a bare CR, which a quoted-printable or 8bit body
// would not carry intact through mail; base64 carries the exact bytes.
func EncodeEDI(payload []byte, opts EDIOptions) ([]byte, error) {
	ct := opts.ContentType
	if ct == "" {
		ct = TypeEDIHL7
	}
	if ct != TypeEDIHL7 && ct != TypeXEDIHL7 {
		return nil, fmt.Errorf("security: content type %q is not a MIME-EDI HL7 type", ct)
	}
	var h message.Header
	h.SetContentType(ct, nil)
	h.Set("Content-Transfer-Encoding", "base64")
	if opts.Name != "" {
		h.SetContentDisposition("attachment", map[string]string{"filename": opts.Name})
	}
	var b bytes.Buffer
	w, err := message.CreateWriter(&b, h)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(payload); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Accept lists the MIME-EDI types a partner may send.
type Accept struct {
	// Consent allows application/edi-consent.
	Consent bool
}

// DecodeEDI reads a MIME-EDI entity (headers and body) and returns the
// payload bytes exactly as they were sent, and the content type.
func DecodeEDI(entity []byte, accept Accept) ([]byte, string, error) {
	e, err := message.Read(bytes.NewReader(entity))
	if err != nil && !message.IsUnknownCharset(err) && !message.IsUnknownEncoding(err) {
		return nil, "", HeaderFault(entity)
	}
	if message.IsUnknownEncoding(err) {
		return nil, "", malformed("unknown Content-Transfer-Encoding")
	}
	ct, _, err := e.Header.ContentType()
	if err != nil {
		return nil, "", malformed("content type: %v", err)
	}
	ct = strings.ToLower(ct)
	switch {
	case ct == TypeEDIHL7 || ct == TypeXEDIHL7:
	case ct == TypeEDIConsent && accept.Consent:
	default:
		return nil, ct, fmt.Errorf("%w: %s", ErrContentType, ct)
	}
	payload, err := io.ReadAll(e.Body)
	if err != nil {
		return nil, ct, malformed("body: %v", err)
	}
	return payload, ct, nil
}

// Canonical returns entity with every line ending in CRLF (RFC 2049 §4;
// draft-ietf-ediint-hl7-02 §4.1.1): the form that is signed and digested.
// Bare CR and bare LF both become CRLF. The payload inside a base64 body is
// not affected.
//
// It copies line by line (bytes.IndexByte finds each LF, and any bare CR
// within a line) rather than byte by byte: every seal and every open
// canonicalizes the whole mail, so this loop is on the hot path.
func Canonical(entity []byte) []byte {
	out := make([]byte, 0, len(entity)+len(entity)/40+2)
	for len(entity) > 0 {
		j := bytes.IndexByte(entity, '\n')
		line := entity
		if j >= 0 {
			line = entity[:j]
			if n := len(line); n > 0 && line[n-1] == '\r' {
				line = line[:n-1] // the CR of this CRLF
			}
		}
		for {
			k := bytes.IndexByte(line, '\r')
			if k < 0 {
				out = append(out, line...)
				break
			}
			out = append(out, line[:k]...)
			out = append(out, '\r', '\n') // a bare CR
			line = line[k+1:]
		}
		if j < 0 {
			break
		}
		out = append(out, '\r', '\n')
		entity = entity[j+1:]
	}
	return out
}

// splitEntity returns the header and body of a MIME entity.
func splitEntity(entity []byte) (textproto.Header, []byte, error) {
	br := bufio.NewReader(bytes.NewReader(entity))
	h, err := textproto.ReadHeader(br)
	if err != nil {
		return textproto.Header{}, nil, HeaderFault(entity)
	}
	body, _ := io.ReadAll(br)
	return h, body, nil
}

// mimeEntity is a MIME entity's Content-Type and body.
type mimeEntity struct {
	typ    string            // lower-cased media type
	params map[string]string // its parameters
	body   []byte
}

// parseEntity reads the header of entity and its Content-Type.
func parseEntity(entity []byte) (mimeEntity, error) {
	h, body, err := splitEntity(entity)
	if err != nil {
		return mimeEntity{}, err
	}
	t, params, err := contentType(h)
	if err != nil {
		return mimeEntity{}, err
	}
	return mimeEntity{typ: t, params: params, body: body}, nil
}

// parts returns the raw body parts of a multipart entity.
func (e mimeEntity) parts() ([][]byte, error) { return multipartParts(e.body, e.params["boundary"]) }

// contentType parses the Content-Type of h, lower-casing the type.
func contentType(h textproto.Header) (string, map[string]string, error) {
	v := h.Get("Content-Type")
	if v == "" {
		return "text/plain", map[string]string{}, nil
	}
	t, params, err := mime.ParseMediaType(v)
	if err != nil {
		return "", nil, malformed("Content-Type %s: %v", token(v), err)
	}
	return strings.ToLower(t), params, nil
}

// multipartParts returns the raw bytes of each body part of a multipart
// body (RFC 2046 §5.1.1): everything between a delimiter line and the CRLF
// that precedes the next one, headers included, exactly as received. The
// bytes are what a multipart/signed signature covers (RFC 1847 §2.1), which
// a parsing reader would not hand back unchanged.
func multipartParts(body []byte, boundary string) ([][]byte, error) {
	if boundary == "" {
		return nil, malformed("multipart without boundary")
	}
	delim := []byte("--" + boundary)
	var parts [][]byte
	start := -1 // start of the current part's bytes
	pos := 0
	for pos <= len(body) {
		// A delimiter line starts the body or follows a line break.
		i := bytes.Index(body[pos:], delim)
		if i < 0 {
			break
		}
		i += pos
		atLineStart := i == 0 || body[i-1] == '\n'
		after := i + len(delim)
		if !atLineStart {
			pos = after
			continue
		}
		closing := bytes.HasPrefix(body[after:], []byte("--"))
		// The rest of the delimiter line may hold only white space.
		eol := bytes.IndexByte(body[after:], '\n')
		lineEnd := len(body)
		if eol >= 0 {
			lineEnd = after + eol + 1
		}
		rest := body[after:lineEnd]
		if closing {
			rest = rest[2:]
		}
		if len(bytes.Trim(rest, " \t\r\n")) != 0 {
			pos = after
			continue
		}
		if start >= 0 {
			end := i
			// The CRLF (or LF) before the delimiter belongs to it.
			if end > start && body[end-1] == '\n' {
				end--
				if end > start && body[end-1] == '\r' {
					end--
				}
			}
			parts = append(parts, body[start:end])
		}
		if closing {
			return parts, nil
		}
		start = lineEnd
		pos = lineEnd
	}
	return nil, malformed("multipart body has no closing delimiter --%s--", boundary)
}
