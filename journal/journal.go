// Package journal keeps hl7mail's evidence journals (draft-ietf-ediint-hl7-02
// §6.4): every mail exactly as it was sent or received, appended to an mbox
// file that any mail program opens.
//
// The format is mboxrd: each mail starts with a "From " separator line and
// ends with a blank line, and any line of the mail that starts with zero or
// more '>' followed by "From " gets one more '>', which a reader removes.
// The mail's own line ends (CRLF) are kept, so Read gives back the exact
// bytes. Append syncs the file before it returns.
//
// It imports, of this module, only internal/safefile.
package journal

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/internal/safefile"
)

// Journal is an mbox file open for appending. It is safe for concurrent use.
type Journal struct {
	mu   sync.Mutex
	f    *os.File
	size int64
	path string
}

// Open opens (creating with mode 0600) the journal at path; a symbolic
// link there is refused.
func Open(path string) (*Journal, error) {
	f, err := safefile.OpenPrivate(path)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("journal: %w", err)
	}
	return &Journal{f: f, size: st.Size(), path: path}, nil
}

// Path returns the journal's file name as given to Open.
func (j *Journal) Path() string { return j.path }

// Append writes msg as one mbox entry with the envelope sender from and time
// t, syncs it, and returns the offset of its "From " line.
func (j *Journal) Append(from string, t time.Time, msg []byte) (int64, error) {
	offs, err := j.AppendAll([]Mail{{From: from, Time: t, Bytes: msg}})
	if err != nil {
		return 0, err
	}
	return offs[0], nil
}

// Mail is one mail to append: its envelope sender, time and bytes, and
// the Message-ID AppendIndexedAll records it under.
type Mail struct {
	From      string
	Time      time.Time
	MessageID string
	Bytes     []byte
}

// AppendAll writes ms as consecutive mbox entries with one write and one
// sync, and returns the offset of each one's "From " line. Mails
// submitted together cost one sync, not one each; a crash leaves a whole
// prefix of them at most, which Read ends at the last complete entry.
func (j *Journal) AppendAll(ms []Mail) ([]int64, error) {
	var b bytes.Buffer
	rel := make([]int64, len(ms))
	for i, m := range ms {
		rel[i] = int64(b.Len())
		encode(&b, m.From, m.Time, m.Bytes)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	off := j.size
	if _, err := j.f.WriteAt(b.Bytes(), off); err != nil {
		return nil, fmt.Errorf("journal: write: %w", err)
	}
	if err := j.f.Sync(); err != nil {
		return nil, fmt.Errorf("journal: sync: %w", err)
	}
	j.size += int64(b.Len())
	for i := range rel {
		rel[i] += off
	}
	return rel, nil
}

// encode appends msg to b as one mboxrd entry.
func encode(b *bytes.Buffer, from string, t time.Time, msg []byte) {
	if from == "" {
		from = "MAILER-DAEMON"
	}
	b.Grow(len(msg) + 128)
	start := b.Len()
	fmt.Fprintf(b, "From %s %s\n", from, t.UTC().Format(time.ANSIC))
	for len(msg) > 0 {
		line := msg
		if i := bytes.IndexByte(msg, '\n'); i >= 0 {
			line = msg[:i+1]
		}
		msg = msg[len(line):]
		if isFromLine(line) {
			b.WriteByte('>')
		}
		b.Write(line)
	}
	if b.Len() > start && b.Bytes()[b.Len()-1] != '\n' {
		// A mail without a final line end gets one, marked so that Read
		// can leave it out again.
		b.WriteString(noFinalNewline + "\n")
	}
	b.WriteByte('\n')
}

// noFinalNewline follows a mail that did not end in a line end.
const noFinalNewline = "\n>>hl7mail: no final newline<<"

// isFromLine reports whether line is ">*From ".
func isFromLine(line []byte) bool {
	return bytes.HasPrefix(bytes.TrimLeft(line, ">"), []byte("From "))
}

// Close closes the file.
func (j *Journal) Close() error { return j.f.Close() }

// Entry is one mail of a journal.
type Entry struct {
	Offset int64
	From   string
	Time   time.Time
	Mail   []byte
}

// ErrFormat means the file is not an mbox written by Append.
var ErrFormat = errors.New("journal: not an mbox entry")

// Read returns every entry of the journal at path.
func Read(path string) ([]Entry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	defer f.Close()
	return ReadFrom(f)
}

// ReadFrom reads entries from r.
func ReadFrom(r io.Reader) ([]Entry, error) {
	br := bufio.NewReader(r)
	var out []Entry
	var cur *Entry
	var off int64
	var body bytes.Buffer
	finish := func() {
		if cur == nil {
			return
		}
		m := body.Bytes()
		// The blank line Append adds after each mail.
		m = bytes.TrimSuffix(m, []byte("\n"))
		if bytes.HasSuffix(m, []byte(noFinalNewline+"\n")) {
			m = bytes.TrimSuffix(m, []byte(noFinalNewline+"\n"))
		}
		cur.Mail = append([]byte(nil), m...)
		out = append(out, *cur)
		body.Reset()
	}
	for {
		line, err := br.ReadBytes('\n')
		if len(line) > 0 {
			switch {
			case bytes.HasPrefix(line, []byte("From ")):
				finish()
				cur = &Entry{Offset: off}
				fields := bytes.Fields(line[5:])
				if len(fields) > 0 {
					cur.From = string(fields[0])
					cur.Time, _ = time.Parse(time.ANSIC, string(bytes.Join(fields[1:], []byte(" "))))
				}
			case cur == nil:
				return nil, ErrFormat
			case isFromLine(line):
				body.Write(line[1:])
			default:
				body.Write(line)
			}
			off += int64(len(line))
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
	}
	finish()
	return out, nil
}
