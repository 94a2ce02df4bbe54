package spool

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/hl7mail/hl7mail/internal/safefile"
)

// The spool log is the store's write-ahead log: Accept appends each message
// to it and fdatasyncs before reporting success, so that acknowledging a
// message costs one write and one sync, like a plain append-only file. The
// store's ingester then copies records into its database, where they are
// queried; at Open the store replays records the database lacks. A segment
// is written over only once its records are synced in the database.
//
// A record is:
//
//	length  uint32  bytes after the checksum
//	crc     uint32  CRC-32C of those bytes
//	seq     int64   message id
//	time    int64   received, Unix microseconds
//	dir     byte    'o' outbound, 'i' inbound
//	partner, controlID, messageType, messageID, mic, kind, inReplyTo
//	        uint16 length + bytes each
//	sha256  [32]byte of the payload
//	payload the rest
//
// A record that is short or fails its checksum ends the log: it is the tail
// of a write that never completed, so it was never acknowledged.
//
// The log is a set of segment files, each zero-filled ahead and written in
// place, so that a sync flushes only data: a file that grows needs a journal
// commit on every sync, which on ext4 also writes out other files' dirty
// data. A full segment is left for another whose records are all synced in
// the database; records left from an earlier pass through a segment have
// smaller ids, and reading stops at the first id that does not increase.

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one message in the spool log.
type Record struct {
	ID   int64    // the message's id, in the order messages were accepted
	Time int64    // when it was accepted, Unix microseconds
	Msg  Message  // the message
	Hash [32]byte // SHA-256 of Msg.Payload
}

const logHeader = 8

func (r *Record) appendTo(dst []byte) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, logHeader)...)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(r.ID))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(r.Time))
	// 'N', the direction ('O' or 'I') and the number of strings that
	// follow. Records written before that say 'O' or 'I' and have eight
	// strings, or 'o' or 'i' and seven (before the recipient was kept).
	d := byte('O')
	if r.Msg.Direction == Inbound {
		d = 'I'
	}
	strs := r.Msg.strings()
	dst = append(dst, 'N', d, byte(len(strs)))
	for _, s := range strs {
		dst = binary.LittleEndian.AppendUint16(dst, uint16(len(s)))
		dst = append(dst, s...)
	}
	dst = append(dst, r.Hash[:]...)
	dst = append(dst, r.Msg.Payload...)
	body := dst[start+logHeader:]
	binary.LittleEndian.PutUint32(dst[start:], uint32(len(body)))
	binary.LittleEndian.PutUint32(dst[start+4:], crc32.Checksum(body, castagnoli))
	return dst
}

var errBadRecord = errors.New("bad spool log record")

func decodeRecord(body []byte) (Record, error) {
	var r Record
	if len(body) < 8+8+1+7*2+32 {
		return r, errBadRecord
	}
	r.ID = int64(binary.LittleEndian.Uint64(body))
	r.Time = int64(binary.LittleEndian.Uint64(body[8:]))
	fields := r.Msg.fields()
	p := body[17:]
	switch body[16] {
	case 'N':
		if len(p) < 2 {
			return r, errBadRecord
		}
		switch p[0] {
		case 'O':
			r.Msg.Direction = Outbound
		case 'I':
			r.Msg.Direction = Inbound
		default:
			return r, errBadRecord
		}
		n := int(p[1])
		p = p[2:]
		for len(fields) < n { // written by a later version: read past them
			fields = append(fields, new(string))
		}
		fields = fields[:n]
	case 'O':
		r.Msg.Direction, fields = Outbound, fields[:8]
	case 'I':
		r.Msg.Direction, fields = Inbound, fields[:8]
	case 'o':
		r.Msg.Direction, fields = Outbound, fields[:7]
	case 'i':
		r.Msg.Direction, fields = Inbound, fields[:7]
	default:
		return r, errBadRecord
	}
	for _, dst := range fields {
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
	copy(r.Hash[:], p)
	r.Msg.Payload = append([]byte(nil), p[32:]...)
	return r, nil
}

// strings are the string fields of m in the order a record holds them;
// fields points at them in the same order.
func (m *Message) strings() []string {
	return []string{m.Partner, m.ControlID, m.MessageType, m.MessageID, m.MIC, m.Kind, m.InReplyTo, m.Recipient, m.ReceiptNote, m.AnswerTo}
}

func (m *Message) fields() []*string {
	return []*string{&m.Partner, &m.ControlID, &m.MessageType, &m.MessageID, &m.MIC, &m.Kind, &m.InReplyTo, &m.Recipient,
		&m.ReceiptNote, &m.AnswerTo}
}

// segmentSize is the size each segment file is zero-filled to. Writing
// moves to another segment when the active one is full.
const segmentSize = 16 << 20

// segment is one file of the spool log.
type segment struct {
	f    *os.File
	path string
	last int64 // highest id written to it since it was last reused
}

// spoolLog is the log: segment files spool-N.log, one of them active. Its
// methods are called under the Spool's commitMu.
type spoolLog struct {
	dir     string
	segSize int64
	segs    []*segment
	active  int
	size    int64 // bytes in use in the active segment
	buf     []byte
	// failNext, when set (in tests), makes the next append fail as a full
	// disk would.
	failNext error
}

// openSpoolLog opens the segments in dir (creating two when there are
// none) and returns the records they hold, in id order. Writing starts over
// at the first segment: the caller replays the records first.
func openSpoolLog(dir string, segSize int64) (*spoolLog, []Record, error) {
	if segSize <= 0 {
		segSize = segmentSize
	}
	l := &spoolLog{dir: dir, segSize: segSize}
	paths, err := filepath.Glob(filepath.Join(dir, "spool-*.log"))
	if err != nil {
		return nil, nil, err
	}
	sort.Strings(paths)
	var recs []Record
	for _, p := range paths {
		seg, segRecs, _, err := openSegment(p)
		if err != nil {
			l.close()
			return nil, nil, err
		}
		l.segs = append(l.segs, seg)
		recs = append(recs, segRecs...)
	}
	for len(l.segs) < 2 {
		if err := l.addSegment(); err != nil {
			l.close()
			return nil, nil, err
		}
	}
	for _, seg := range l.segs {
		if err := preallocate(seg.f, segSize); err != nil {
			l.close()
			return nil, nil, err
		}
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].ID < recs[j].ID })
	return l, recs, nil
}

// openSegment opens a segment file and reads its records: they run while
// each is complete, checks out and has a larger id than the one before.
// end is where they end.
func openSegment(path string) (*segment, []Record, int64, error) {
	f, err := safefile.OpenPrivate(path)
	if err != nil {
		return nil, nil, 0, fmt.Errorf("spool: open spool log: %w", err)
	}
	var recs []Record
	var end, prev int64
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
		if err != nil || r.ID <= prev {
			break
		}
		prev = r.ID
		recs = append(recs, r)
		end += logHeader + int64(n)
	}
	return &segment{f: f, path: path}, recs, end, nil
}

// addSegment creates the next segment file, zero-filled.
func (l *spoolLog) addSegment() error {
	p := filepath.Join(l.dir, fmt.Sprintf("spool-%d.log", len(l.segs)))
	seg, _, _, err := openSegment(p)
	if err != nil {
		return err
	}
	if err := preallocate(seg.f, l.segSize); err != nil {
		seg.f.Close()
		return err
	}
	if err := syncDir(l.dir); err != nil {
		seg.f.Close()
		return err
	}
	l.segs = append(l.segs, seg)
	return nil
}

// preallocate zero-fills f up to size and syncs it, so that later writes
// within it change no file metadata.
func preallocate(f *os.File, size int64) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("spool: spool log: %w", err)
	}
	if st.Size() >= size {
		return nil
	}
	zeros := make([]byte, 1<<20)
	for off := st.Size(); off < size; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), size-off)], off); err != nil {
			return fmt.Errorf("spool: preallocate spool log: %w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("spool: preallocate spool log: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// append writes recs in one write after the records in use and syncs them.
// When the active segment is full, writing moves to a segment whose records
// all have ids up to durable (they are synced in the database), or to a new
// segment when none is. On failure the records in use are unchanged: the
// next append writes over whatever part of the failed one reached the file.
func (l *spoolLog) append(recs []Record, durable int64) error {
	l.buf = l.buf[:0]
	for i := range recs {
		l.buf = recs[i].appendTo(l.buf)
	}
	if l.size > 0 && l.size+int64(len(l.buf)) > l.segSize {
		if err := l.rotate(durable); err != nil {
			return err
		}
	}
	err := l.failNext
	l.failNext = nil
	seg := l.segs[l.active]
	if err == nil {
		_, err = seg.f.WriteAt(l.buf, l.size)
	}
	if err == nil {
		err = fdatasync(seg.f)
	}
	if err != nil {
		return fmt.Errorf("spool: spool log write: %w", err)
	}
	l.size += int64(len(l.buf))
	seg.last = recs[len(recs)-1].ID
	if cap(l.buf) > 4<<20 {
		l.buf = nil
	}
	return nil
}

// rotate makes the next reusable segment active.
func (l *spoolLog) rotate(durable int64) error {
	for i := 1; i < len(l.segs); i++ {
		j := (l.active + i) % len(l.segs)
		if l.segs[j].last <= durable {
			l.active, l.size = j, 0
			return nil
		}
	}
	if err := l.addSegment(); err != nil {
		return err
	}
	l.active, l.size = len(l.segs)-1, 0
	return nil
}

func (l *spoolLog) close() error {
	var errs []error
	for _, seg := range l.segs {
		errs = append(errs, seg.f.Close())
	}
	return errors.Join(errs...)
}

// fdatasync flushes the file's data (and the metadata needed to read it).
func fdatasync(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			return err
		}
	}
}
