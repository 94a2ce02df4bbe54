package journal

import (
	"context"
	"crypto/sha256"
	"path/filepath"
	"time"
)

// Index records where a journalled mail is and its SHA-256 digest
// (*store.Store does): evidence and "hl7mail journal verify" find an
// altered entry by it.
type Index interface {
	RecordJournal(ctx context.Context, file string, offset int64, messageID string, sum []byte) error
}

// Appender is a journal that mails are appended to one at a time, each
// placed by an offset: *Journal is one; a journal in a shared database
// another.
type Appender interface {
	Append(from string, t time.Time, msg []byte) (int64, error)
	Path() string
}

// AppendIndexed appends mail to j, synced, and records it in idx, even
// when ctx has ended: a mail journalled is a mail indexed.
func AppendIndexed(ctx context.Context, j Appender, idx Index, from string, t time.Time, messageID string, mail []byte) error {
	off, err := j.Append(from, t, mail)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(mail)
	return idx.RecordJournal(context.WithoutCancel(ctx), filepath.Base(j.Path()), off, messageID, sum[:])
}
