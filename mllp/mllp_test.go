package mllp

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// result is what one ReadFrame call gave: a payload or an error.
type result struct {
	payload string
	err     error
}

func readAll(r io.Reader, max int) []result {
	rd := NewReader(r, max)
	var out []result
	for i := 0; i < 100; i++ {
		p, err := rd.ReadFrame()
		if err == io.EOF {
			return out
		}
		out = append(out, result{string(p), err})
		var fe *FrameError
		if err != nil && !errors.As(err, &fe) || errors.Is(err, ErrIncomplete) {
			return out
		}
	}
	panic("reader does not terminate")
}

const sb, eb, cr = "\x0b", "\x1c", "\r"

func TestReadFrame(t *testing.T) {
	big := strings.Repeat("x", 40)
	tests := []struct {
		name string
		in   string
		max  int
		want []result
	}{
		{"one", sb + "MSH|a\r" + eb + cr, 0, []result{{"MSH|a\r", nil}}},
		{"several in one write", sb + "A" + eb + cr + sb + "B" + eb + cr + sb + "C" + eb + cr, 0,
			[]result{{"A", nil}, {"B", nil}, {"C", nil}}},
		{"whitespace between frames", "\r\n " + sb + "A" + eb + cr + "\n\n" + sb + "B" + eb + cr + "\r\n", 0,
			[]result{{"A", nil}, {"B", nil}}},
		{"end block without CR", sb + "A" + eb + sb + "B" + eb, 0, []result{{"A", nil}, {"B", nil}}},
		{"empty payload", sb + eb + cr, 0, []result{{"", nil}}},
		{"junk before start", "GET / HTTP/1.1" + sb + "A" + eb + cr, 0, []result{{"A", nil}}},
		{"junk only", "GET / HTTP/1.1\r\n\r\n", 0, []result{{"", ErrNoStartBlock}}},
		{"junk over limit", strings.Repeat("z", 100), 10, []result{{"", ErrNoStartBlock}}},
		{"missing end block", sb + "A\rPID" + sb + "MSH|B" + eb + cr, 0,
			[]result{{"", ErrNoEndBlock}, {"MSH|B", nil}}},
		{"missing end block before a batch", sb + "A" + sb + "FHS|B" + eb + cr, 0,
			[]result{{"", ErrNoEndBlock}, {"FHS|B", nil}}},
		// A stray start block (a pasted manual line break) is data: one
		// frame, one answer.
		{"stray start block", sb + "MSH|a\rNTE|1||line one" + sb + "line two\r" + eb + cr + sb + "MSH|b" + eb + cr, 0,
			[]result{{"MSH|a\rNTE|1||line one" + sb + "line two\r", nil}, {"MSH|b", nil}}},
		{"stray start block before the end", sb + "MSH|a" + sb + eb + cr, 0, []result{{"MSH|a" + sb, nil}}},
		{"stray start block, stream ends", sb + "MSH|a" + sb + "x", 0, []result{{"", ErrIncomplete}}},
		{"stream ends in frame", sb + "MSH|partial", 0, []result{{"", ErrIncomplete}}},
		{"too large, then next", sb + big + eb + cr + sb + "ok" + eb + cr, 10,
			[]result{{"", ErrTooLarge}, {"ok", nil}}},
		{"exactly max", sb + big + eb + cr, 40, []result{{big, nil}}},
		{"bare CR payload kept", sb + "MSH|x\rPID|1\rOBX|\n|y\r" + eb + cr, 0, []result{{"MSH|x\rPID|1\rOBX|\n|y\r", nil}}},
	}
	readers := map[string]func(io.Reader) io.Reader{
		"whole":   func(r io.Reader) io.Reader { return r },
		"onebyte": iotest.OneByteReader,
		"half":    iotest.HalfReader,
	}
	for _, tt := range tests {
		for rname, wrap := range readers {
			got := readAll(wrap(strings.NewReader(tt.in)), tt.max)
			if len(got) != len(tt.want) {
				t.Errorf("%s/%s: ReadFrame(%q) = %v, want %v", tt.name, rname, tt.in, got, tt.want)
				continue
			}
			for i := range got {
				if !errors.Is(got[i].err, tt.want[i].err) || tt.want[i].err == nil && got[i].payload != tt.want[i].payload {
					t.Errorf("%s/%s: frame %d = %q, %v; want %q, %v", tt.name, rname, i, got[i].payload, got[i].err, tt.want[i].payload, tt.want[i].err)
				}
			}
		}
	}
}

func TestFrameErrorPrefix(t *testing.T) {
	msh := "MSH|^~\\&|A|B|C|D|2020||ORU^R01|77|P|2.3\r"
	in := sb + msh + strings.Repeat("OBX|1\r", 2000) + eb + cr
	_, err := NewReader(strings.NewReader(in), 1000).ReadFrame()
	var fe *FrameError
	if !errors.As(err, &fe) || !errors.Is(err, ErrTooLarge) {
		t.Fatalf("ReadFrame = %v, want FrameError ErrTooLarge", err)
	}
	if fe.Size != len(in)-3 || !bytes.HasPrefix(fe.Prefix, []byte(msh)) || len(fe.Prefix) > prefixSize {
		t.Errorf("FrameError size %d prefix %d bytes %q...", fe.Size, len(fe.Prefix), fe.Prefix[:20])
	}
}

func TestJunkCount(t *testing.T) {
	rd := NewReader(strings.NewReader("\r\n"+sb+"A"+eb+cr+"xyz\r\n"+sb+"B"+eb+cr), 0)
	if _, err := rd.ReadFrame(); err != nil || rd.Junk != 0 {
		t.Fatalf("first frame: err %v junk %d, want nil 0", err, rd.Junk)
	}
	if _, err := rd.ReadFrame(); err != nil || rd.Junk != 3 {
		t.Fatalf("second frame: err %v junk %d, want nil 3", err, rd.Junk)
	}
}

func TestWriteFrame(t *testing.T) {
	var b bytes.Buffer
	if err := WriteFrame(&b, []byte("MSH|x\r")); err != nil {
		t.Fatal(err)
	}
	if got := b.String(); got != sb+"MSH|x\r"+eb+cr {
		t.Errorf("WriteFrame = %q", got)
	}
}

// FuzzReadFrame feeds arbitrary streams: the reader must terminate without
// panicking, return payloads that hold no end block and no start block
// that begins a message, and respect the limit.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte(sb+"MSH|a"+eb+cr+sb+"B"+eb+cr), 0)
	f.Add([]byte("junk"+sb+"A"+sb+"B"+eb), 4)
	f.Add([]byte(sb+strings.Repeat("y", 50)+eb+cr), 8)
	f.Add([]byte(eb+cr+sb), 0)
	f.Fuzz(func(t *testing.T, in []byte, max int) {
		if max < 0 || max > 1<<16 {
			max = 0
		}
		rd := NewReader(iotest.HalfReader(bytes.NewReader(in)), max)
		limit := max
		if limit == 0 {
			limit = DefaultMaxSize
		}
		for n := 0; n <= len(in)+1; n++ {
			p, err := rd.ReadFrame()
			if err == io.EOF {
				return
			}
			var fe *FrameError
			if err != nil {
				if !errors.As(err, &fe) || errors.Is(err, ErrIncomplete) {
					return
				}
				continue
			}
			if len(p) > limit || bytes.IndexByte(p, EndBlock) >= 0 || startsMessage(p) {
				t.Fatalf("ReadFrame(%q) returned bad payload %q", in, p)
			}
		}
		t.Fatalf("ReadFrame(%q) returned more frames than bytes", in)
	})
}

// startsMessage reports whether p holds a start block followed by MSH, FHS
// or BHS: a frame boundary, never data.
func startsMessage(p []byte) bool {
	for _, seg := range []string{"MSH", "FHS", "BHS"} {
		if bytes.Contains(p, []byte(sb+seg)) {
			return true
		}
	}
	return false
}

// FuzzRoundTrip checks that any payload free of frame bytes comes back
// exactly, however the stream is split.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("MSH|^~\\&|A\rPID|1\r"), []byte("MSH|b"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		clean := func(p []byte) []byte {
			return bytes.Map(func(r rune) rune {
				if r == StartBlock || r == EndBlock {
					return -1
				}
				return r
			}, p)
		}
		a, b = clean(a), clean(b)
		stream := AppendFrame(AppendFrame(nil, a), b)
		rd := NewReader(iotest.OneByteReader(bytes.NewReader(stream)), 0)
		for _, want := range [][]byte{a, b} {
			got, err := rd.ReadFrame()
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("ReadFrame = %q, %v; want %q", got, err, want)
			}
		}
		if _, err := rd.ReadFrame(); err != io.EOF {
			t.Fatalf("ReadFrame at end = %v, want EOF", err)
		}
	})
}
