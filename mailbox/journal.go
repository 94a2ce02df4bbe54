package mailbox

import (
	"context"
	"crypto/sha256"
	"path/filepath"
	"time"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/store"
)

// journalAppend writes a mail to a journal, synced, and records in the
// store where it went and its SHA-256 digest: evidence and "hl7mail journal
// verify" find an altered entry by it.
func journalAppend(ctx context.Context, j *journal.Journal, st *store.Store, from string, t time.Time, messageID string, mail []byte) error {
	off, err := j.Append(from, t, mail)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(mail)
	return st.RecordJournal(context.WithoutCancel(ctx), filepath.Base(j.Path()), off, messageID, sum[:])
}
