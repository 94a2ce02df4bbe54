// Package mllp implements the Minimal Lower Layer Protocol that carries HL7
// v2 messages over TCP (HL7 v2.5 Appendix C.4, "MLLP Release 1"): each
// message is framed as a start block 0x0B, the payload, an end block 0x1C and
// a carriage return 0x0D.
//
// Reader takes frames from a stream: several frames per read, frames split
// across many reads, junk between frames and oversized or unterminated frames
// are all reported without hanging or losing the framing of what follows.
// Client sends a message and reads its acknowledgement; Server accepts
// connections and serves each with a Handler (the surrogates, the embedded
// router and the bench's baseline all run on it).
//
// It imports, of this module, nothing.
package mllp

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

// Frame bytes (HL7 v2.5 Appendix C.4.2).
const (
	StartBlock     = 0x0B
	EndBlock       = 0x1C
	CarriageReturn = 0x0D
)

// DefaultMaxSize is the largest payload a Reader accepts unless told otherwise.
const DefaultMaxSize = 1 << 20

// prefixSize is how much of a rejected frame is kept, enough for its MSH.
const prefixSize = 4096

// Errors a Reader returns. ErrTooLarge and ErrNoEndBlock come inside a
// *FrameError and leave the stream framed: the next ReadFrame goes on with
// the next frame. ErrNoStartBlock and ErrIncomplete end the stream.
var (
	ErrTooLarge     = errors.New("mllp: frame exceeds the maximum size")
	ErrNoEndBlock   = errors.New("mllp: a new message began inside a frame (previous frame has no end block)")
	ErrNoStartBlock = errors.New("mllp: data without a start block")
	ErrIncomplete   = errors.New("mllp: stream ended inside a frame")
)

// FrameError reports a frame that was discarded. Prefix holds its first
// bytes (at most 4 KiB), so that its MSH can be read to address a rejection.
type FrameError struct {
	Err    error
	Size   int // bytes of payload seen
	Prefix []byte
}

func (e *FrameError) Error() string { return fmt.Sprintf("%v (%d bytes)", e.Err, e.Size) }
func (e *FrameError) Unwrap() error { return e.Err }

// Reader reads MLLP frames. It is not safe for concurrent use.
type Reader struct {
	br      *bufio.Reader
	max     int
	buf     []byte
	inFrame bool // a start block was consumed while reading the previous frame
	// Junk is the number of bytes other than CR, LF and spaces skipped
	// before the frame most recently returned.
	Junk int
}

// NewReader returns a Reader of frames of at most maxSize payload bytes
// (DefaultMaxSize when maxSize <= 0).
func NewReader(r io.Reader, maxSize int) *Reader {
	if maxSize <= 0 {
		maxSize = DefaultMaxSize
	}
	return &Reader{br: bufio.NewReaderSize(r, 64<<10), max: maxSize}
}

// ReadFrame returns the payload of the next frame, valid until the next call.
// It returns io.EOF when the stream ends between frames.
func (r *Reader) ReadFrame() ([]byte, error) {
	r.Junk = 0
	if !r.inFrame {
		if err := r.skipToStart(); err != nil {
			return nil, err
		}
	}
	r.inFrame = false
	r.buf = r.buf[:0]
	size := 0
	var ferr error
	for {
		if r.br.Buffered() == 0 {
			if _, err := r.br.Peek(1); err != nil {
				if err == io.EOF {
					err = ErrIncomplete
				}
				return nil, &FrameError{Err: err, Size: size, Prefix: r.prefix()}
			}
		}
		data, _ := r.br.Peek(r.br.Buffered())
		end := bytes.IndexByte(data, EndBlock)
		chunk := data
		if end >= 0 {
			chunk = data[:end]
		}
		sb, more := frameStart(data, len(chunk))
		if more > 0 {
			// The bytes that tell a stray start block from a new frame
			// have not arrived: wait for them (the frame is not over, so
			// the sender has more to send), then look again.
			if _, err := r.br.Peek(more); err == nil {
				continue
			}
			sb = -1 // the stream ends: the start block was data
		}
		if sb >= 0 {
			// A new frame starts before this one ended.
			r.take(chunk[:sb], &size, &ferr)
			r.br.Discard(sb + 1)
			r.inFrame = true
			return nil, &FrameError{Err: ErrNoEndBlock, Size: size, Prefix: r.prefix()}
		}
		r.take(chunk, &size, &ferr)
		if end < 0 {
			r.br.Discard(len(data))
			continue
		}
		r.br.Discard(end + 1)
		// The CR after the end block is consumed when it has arrived; a
		// sender that omits it, or whose CR comes later, is not waited for.
		if r.br.Buffered() > 0 {
			if b, _ := r.br.Peek(1); b[0] == CarriageReturn {
				r.br.Discard(1)
			}
		}
		if ferr != nil {
			return nil, &FrameError{Err: ferr, Size: size, Prefix: r.prefix()}
		}
		return r.buf, nil
	}
}

// frameStart returns the offset in data[:n] of a start block that begins a
// new frame: one followed by a segment that starts a message (MSH) or a
// batch (FHS, BHS), so that the frame before it lacked its end block. Any
// other start block inside a frame is data of that frame (a stray 0x0B,
// such as a word processor's manual line break pasted into a field): the
// frame stays whole and gets one answer. It returns -1 when there is none;
// more > 0 says how many bytes of data must be buffered to decide.
func frameStart(data []byte, n int) (off, more int) {
	for i := 0; i < n; i++ {
		if data[i] != StartBlock {
			continue
		}
		rest := data[i+1:]
		if len(rest) < 3 {
			if bytes.IndexByte(rest, EndBlock) >= 0 {
				continue // the frame ends right after it: data
			}
			return -1, i + 4
		}
		if seg := string(rest[:3]); seg == "MSH" || seg == "FHS" || seg == "BHS" {
			return i, 0
		}
	}
	return -1, 0
}

// take appends p to the frame unless the frame has grown too large, in
// which case only the first prefixSize bytes are kept.
func (r *Reader) take(p []byte, size *int, ferr *error) {
	*size += len(p)
	if *size > r.max {
		*ferr = ErrTooLarge
		if room := prefixSize - len(r.buf); room > 0 {
			r.buf = append(r.buf, p[:min(room, len(p))]...)
		}
		return
	}
	r.buf = append(r.buf, p...)
}

func (r *Reader) prefix() []byte {
	return r.buf[:min(len(r.buf), prefixSize)]
}

// skipToStart consumes bytes up to and including the next start block.
func (r *Reader) skipToStart() error {
	skipped := 0
	for {
		b, err := r.br.ReadByte()
		if err != nil {
			if err == io.EOF && r.Junk > 0 {
				return fmt.Errorf("%w: %d bytes", ErrNoStartBlock, r.Junk)
			}
			return err
		}
		if b == StartBlock {
			return nil
		}
		skipped++
		switch b {
		case '\r', '\n', ' ', '\t', EndBlock:
		default:
			r.Junk++
		}
		if skipped > r.max {
			return fmt.Errorf("%w: %d bytes", ErrNoStartBlock, skipped)
		}
	}
}

// AppendFrame appends the frame of payload to dst.
func AppendFrame(dst, payload []byte) []byte {
	dst = append(dst, StartBlock)
	dst = append(dst, payload...)
	return append(dst, EndBlock, CarriageReturn)
}

// WriteFrame writes payload as one frame in a single Write.
func WriteFrame(w io.Writer, payload []byte) error {
	_, err := w.Write(AppendFrame(make([]byte, 0, len(payload)+3), payload))
	return err
}
