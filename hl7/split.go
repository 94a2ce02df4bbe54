package hl7

import "bytes"

// Split returns the messages in data, as a file of messages is usually
// written: segments end in CR, LF or CRLF, each MSH segment starts a new
// message, and blank lines and MLLP frame bytes (0x0B, 0x1C) between messages
// are ignored. Each returned message has its segments ending in CR, as HL7
// requires (HL7 v2.5 §2.5.1). Text before the first MSH is dropped.
func Split(data []byte) [][]byte {
	var out [][]byte
	var cur []byte
	for len(data) > 0 {
		seg := data
		data = nil
		if i := bytes.IndexAny(seg, "\r\n"); i >= 0 {
			seg, data = seg[:i], seg[i+1:]
		}
		// A CRLF leaves an empty segment between CR and LF: skipped here.
		seg = bytes.Trim(seg, "\x0b\x1c")
		if len(bytes.TrimSpace(seg)) == 0 {
			continue
		}
		if bytes.HasPrefix(seg, []byte("MSH")) {
			if len(cur) > 0 {
				out = append(out, cur)
			}
			cur = []byte{}
		} else if cur == nil {
			continue
		}
		cur = append(cur, seg...)
		cur = append(cur, '\r')
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}
