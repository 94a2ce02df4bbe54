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

// AppendIndexed appends mail to j, synced, and records it in idx, even
// when ctx has ended: a mail journalled is a mail indexed.
func AppendIndexed(ctx context.Context, j *Journal, idx Index, from string, t time.Time, messageID string, mail []byte) error {
	off, err := j.Append(from, t, mail)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(mail)
	return idx.RecordJournal(context.WithoutCancel(ctx), filepath.Base(j.Path()), off, messageID, sum[:])
}
