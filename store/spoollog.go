package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"syscall"
)

// The spool log is the store's write-ahead log: Accept appends each message
// to it and fdatasyncs before reporting success, so that acknowledging a
// message costs one write and one sync, like a plain append-only file. The
// ingester then copies records into the SQLite database, where they are
// queried; Open replays records the database lacks. Once every record is in
// the database the log is truncated.
//
// A record is:
//
//	length  uint32  bytes after the checksum
//	crc     uint32  CRC-32C of those bytes
//	seq     int64   message id
//	time    int64   received, Unix microseconds
//	dir     byte    'o' outbound, 'i' inbound
//	partner, controlID, messageType  uint16 length + bytes each
//	sha256  [32]byte of the payload
//	payload the rest
//
// A record that is short or fails its checksum ends the log: it is the tail
// of a write that never completed, so it was never acknowledged.
//
// The file is zero-filled ahead (preallocSize) and written in place from the
// start again once emptied, so that a sync flushes only data: a file that
// grows needs a journal commit on every sync, which on ext4 also writes out
// every other file's dirty data. Records left from an earlier pass through
// the file have smaller ids, and reading stops at the first id that does not
// increase.
const spoolLogName = "spool.log"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// logRecord is one message in the spool log.
type logRecord struct {
	seq  int64
	time int64
	m    NewMessage
	hash [32]byte
}

const logHeader = 8

func (r *logRecord) appendTo(dst []byte) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, logHeader)...)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(r.seq))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(r.time))
	d := byte('o')
	if r.m.Direction == Inbound {
		d = 'i'
	}
	dst = append(dst, d)
	for _, s := range []string{r.m.Partner, r.m.ControlID, r.m.MessageType} {
		dst = binary.LittleEndian.AppendUint16(dst, uint16(len(s)))
		dst = append(dst, s...)
	}
	dst = append(dst, r.hash[:]...)
	dst = append(dst, r.m.Payload...)
	body := dst[start+logHeader:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(body)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(body, castagnoli))
	return dst
}

var errBadRecord = errors.New("bad spool log record")

func decodeRecord(body []byte) (logRecord, error) {
	var r logRecord
	if len(body) < 8+8+1+3*2+32 {
		return r, errBadRecord
	}
	r.seq = int64(binary.LittleEndian.Uint64(body))
	r.time = int64(binary.LittleEndian.Uint64(body[8:]))
	switch body[16] {
	case 'o':
		r.m.Direction = Outbound
	case 'i':
		r.m.Direction = Inbound
	default:
		return r, errBadRecord
	}
	p := body[17:]
	for _, dst := range []*string{&r.m.Partner, &r.m.ControlID, &r.m.MessageType} {
		if len(p) < 2 {
			return r, errBadRecord
		}
		n := int(binary.LittleEndian.Uint16(p))
		if len(p) < 2+n {
			return r, errBadRecord
		}
		*dst = string(p[2 : 2+n])
		p = p[2+n:]
	}
	if len(p) < 32 {
		return r, errBadRecord
	}
	copy(r.hash[:], p)
	r.m.Payload = append([]byte(nil), p[32:]...)
	return r, nil
}

// preallocSize is how much of the log file is zero-filled ahead.
const preallocSize = 16 << 20

// spoolLog is the open log file. Its methods are called under the store's
// commitMu.
type spoolLog struct {
	f    *os.File
	size int64 // where the next record goes: the bytes in use
	buf  []byte
	// failNext, when set (in tests), makes the next append fail as a full
	// disk would.
	failNext error
}

// openSpoolLog opens the log at path, returns the records it holds and cuts
// off an incomplete tail.
func openSpoolLog(path string) (*spoolLog, []logRecord, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("store: open spool log: %w", err)
	}
	var recs []logRecord
	var good, prev int64
	br := bufio.NewReaderSize(f, 1<<20)
	hdr := make([]byte, logHeader)
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			break
		}
		n := binary.LittleEndian.Uint32(hdr)
		if n == 0 || n > 1<<30 {
			break
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(br, body); err != nil {
			break
		}
		if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(hdr[4:]) {
			break
		}
		r, err := decodeRecord(body)
		if err != nil || r.seq <= prev {
			break
		}
		prev = r.seq
		recs = append(recs, r)
		good += logHeader + int64(n)
	}
	l := &spoolLog{f: f, size: good}
	if err := l.prealloc(); err != nil {
		f.Close()
		return nil, nil, err
	}
	return l, recs, nil
}

// prealloc zero-fills the file up to preallocSize and syncs it, so that
// later writes within it change no file metadata.
func (l *spoolLog) prealloc() error {
	st, err := l.f.Stat()
	if err != nil {
		return fmt.Errorf("store: spool log: %w", err)
	}
	if st.Size() >= preallocSize {
		return nil
	}
	zeros := make([]byte, 1<<20)
	for off := st.Size(); off < preallocSize; off += int64(len(zeros)) {
		if _, err := l.f.WriteAt(zeros[:min(int64(len(zeros)), preallocSize-off)], off); err != nil {
			return fmt.Errorf("store: preallocate spool log: %w", err)
		}
	}
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("store: preallocate spool log: %w", err)
	}
	return nil
}

// append writes recs in one write at the end of the records in use and
// syncs them. On failure the records in use are unchanged: the next append
// writes over whatever part of the failed one reached the file.
func (l *spoolLog) append(recs []logRecord) error {
	l.buf = l.buf[:0]
	for i := range recs {
		l.buf = recs[i].appendTo(l.buf)
	}
	err := l.failNext
	l.failNext = nil
	if err == nil {
		_, err = l.f.WriteAt(l.buf, l.size)
	}
	if err == nil {
		err = fdatasync(l.f)
	}
	if err != nil {
		return fmt.Errorf("store: spool log write: %w", err)
	}
	l.size += int64(len(l.buf))
	if cap(l.buf) > 4<<20 {
		l.buf = nil
	}
	return nil
}

// reset starts writing at the beginning again, once every record is synced
// in the database. The old records stay until overwritten; their ids are
// smaller, so reading stops at them.
func (l *spoolLog) reset() { l.size = 0 }

func (l *spoolLog) close() error { return l.f.Close() }

// fdatasync flushes the file's data (and the metadata needed to read it).
func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}
