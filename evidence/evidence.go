// Package evidence re-verifies, from the journals alone, what was sent,
// received and agreed for one transaction (draft-ietf-ediint-hl7-02 §3.1.5,
// §3.2.2.4, §6.4): the mail as sent and its MIC, the partner's signed
// receipt (MDN) and whether its Received-Content-MIC matches, and the
// partner's signed response (the commitment); for an inbound message, the
// mirror image. Every mail is opened again from the bytes the journals
// hold, every signature checked again; the store is only used to find the
// transaction and to compare what it recorded.
//
// hl7mail encrypts what it sends to itself as well as to the partner, so
// that its own outgoing journal can be read again.
//
// It imports, of this module, only config, hl7, internal/safefile, journal,
// security, store; none of the mail side that wrote the journals.
package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/safefile"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// Journal file names in the store folder (as gateway writes them).
const (
	OutgoingJournal = "outgoing.mbox"
	IncomingJournal = "incoming.mbox"
)

// Link is one link of the chain.
type Link struct {
	Name   string   // "sent", "receipt", "commitment"; "received", "receipt sent", "commitment sent"
	OK     bool     // present and verified
	Absent bool     // for the commitment only: the partner sent none (not an error)
	Lines  []string // what was found, or why it is broken
}

// Report is the chain for one message.
type Report struct {
	Message store.Message
	Partner *config.Partner
	Links   []*Link
	files   []exportFile
}

// OK reports whether every link is present and verified (an absent
// commitment is allowed: not every message gets an application response).
func (r *Report) OK() bool {
	for _, l := range r.Links {
		if !l.OK && !l.Absent {
			return false
		}
	}
	return true
}

// Broken returns the names of the links that are missing or do not verify.
func (r *Report) Broken() []string {
	var out []string
	for _, l := range r.Links {
		if !l.OK && !l.Absent {
			out = append(out, l.Name)
		}
	}
	return out
}

// Options configure Build. All are required.
type Options struct {
	Config *config.Config
	Keys   *security.Keyring
	Store  Store
	// Journals are where the journals are read from; nil: the mbox files
	// in the store folder.
	Journals Journals
}

// Store is what the evidence is checked against: the embedded store, or a
// cluster's shared one.
type Store interface {
	Get(ctx context.Context, id int64) (store.Message, error)
	Search(ctx context.Context, q string, limit int) ([]store.Message, error)
	List(ctx context.Context, f store.Filter) ([]store.Message, error)
	QuarantineList(ctx context.Context, limit int) ([]store.Quarantined, error)
	PendingByMessageID(ctx context.Context, messageID string) (store.Pending, error)
	Reports(ctx context.Context, f store.ReportFilter) ([]store.Report, error)
	// JournalDigests are the SHA-256 digests recorded for the entries of
	// journal file (OutgoingJournal, IncomingJournal), by offset.
	JournalDigests(ctx context.Context, file string) (map[int64][]byte, error)
}

// Journals reads a journal's entries: file is OutgoingJournal or
// IncomingJournal, each entry placed by its offset (in a cluster's
// database, its row).
type Journals interface {
	JournalEntries(ctx context.Context, file string) ([]journal.Entry, error)
}

// entries reads journal file, from the store folder or o.Journals.
func (o Options) entries(ctx context.Context, file string) ([]entry, error) {
	if o.Journals == nil {
		return readJournal(filepath.Join(o.Config.StoreDir(), file))
	}
	list, err := o.Journals.JournalEntries(ctx, file)
	if err != nil {
		return nil, err
	}
	return parseEntries(list, file), nil
}

// Find returns the stored message id names: a stored id, a Message-ID or
// an MSH-10 control ID (the newest such message).
func Find(ctx context.Context, st Store, id string) (store.Message, error) {
	if n, err := strconv.ParseInt(id, 10, 64); err == nil {
		if m, err := st.Get(ctx, n); err == nil {
			return m, nil
		}
	}
	list, err := st.Search(ctx, id, 1000)
	if err != nil {
		return store.Message{}, err
	}
	for _, m := range list {
		if m.MessageID == id || m.MessageID == "<"+strings.Trim(id, "<>")+">" || m.ControlID == id {
			return st.Get(ctx, m.ID)
		}
	}
	return store.Message{}, fmt.Errorf("%w: no message with id, Message-ID or control ID %q", store.ErrNotFound, id)
}

// entry is a journal entry with what its header says.
type entry struct {
	journal.Entry
	file      string
	messageID string
	inReplyTo string
	from      string
}

func readJournal(path string) ([]entry, error) {
	entries, err := journal.Read(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return parseEntries(entries, filepath.Base(path)), nil
}

// parseEntries reads what the evidence needs of the header of each entry
// of journal file.
func parseEntries(entries []journal.Entry, file string) []entry {
	out := make([]entry, 0, len(entries))
	for _, e := range entries {
		x := entry{Entry: e, file: file}
		if m, err := mail.ReadMessage(bytes.NewReader(e.Mail)); err == nil {
			x.messageID = strings.TrimSpace(m.Header.Get("Message-Id"))
			x.inReplyTo = strings.TrimSpace(m.Header.Get("In-Reply-To"))
			if a, err := mail.ParseAddress(m.Header.Get("From")); err == nil {
				x.from = strings.ToLower(a.Address)
			}
		}
		out = append(out, x)
	}
	return out
}

// opener opens mail of one partner, or our own.
type opener struct {
	o       Options
	partner *config.Partner
	digests map[string]map[int64][]byte // journal file → offset → SHA-256 recorded when written
}

// open decrypts and verifies raw as signed by the partner (ours false) or
// by us (ours true), as of when.
func (op opener) open(raw []byte, ours bool, when time.Time) (*security.Opened, error) {
	p := op.partner
	if p.Security.Signs() {
		suite := op.o.Keys.Suite(string(p.Security), p.Name, string(p.KeyTransport))
		if ours {
			return suite.OpenOwn(raw, when)
		}
		return suite.Open(raw, when)
	}
	return nil, fmt.Errorf("partner %s uses security %s: mail is neither signed nor encrypted, there is nothing to verify", op.partner.Name, op.partner.Security)
}

func normal(addr string) string { return strings.ToLower(strings.TrimSpace(addr)) }

// exportFile is a file Export writes.
type exportFile struct {
	name string
	data []byte
	note string // how to check it
}

// export keeps, for Export, the journalled bytes of a mail and what a third
// party needs to check its signature.
func (r *Report) export(prefix string, raw []byte, opened *security.Opened, ours bool) {
	r.files = append(r.files, exportFile{name: prefix + ".eml", data: raw, note: "the mail exactly as journalled"})
	if opened.Signed == nil {
		return
	}
	signer := "partner"
	if ours {
		signer = "us"
	}
	switch r.Partner.Security {
	case config.PGP:
		content, sig, err := security.SplitSigned(opened.Signed)
		if err != nil {
			return
		}
		key := "partner-key.asc"
		if ours {
			key = "our-key.asc"
		}
		r.files = append(r.files,
			exportFile{name: prefix + "-content.mime", data: content, note: "the signed MIME entity, decrypted"},
			exportFile{name: prefix + "-signature.asc", data: sig, note: fmt.Sprintf(
				"signature by %s: gpg --import %s; gpg --verify %s-signature.asc %s-content.mime", signer, key, prefix, prefix)})
	case config.SMIME:
		cert := "partner-cert.pem"
		if ours {
			cert = "our-cert.pem"
		}
		r.files = append(r.files, exportFile{name: prefix + "-signed.eml", data: opened.Signed, note: fmt.Sprintf(
			"the signed entity, decrypted: openssl cms -verify -in %s-signed.eml -CAfile %s -purpose any -out /dev/null", prefix, cert)})
	}
}

// Export writes to dir the original bytes of every mail in the chain, the
// decrypted signed entities and signatures, the public keys or
// certificates to check them with, and report.txt saying how. dir must be
// new, or an empty private folder of ours (safefile.ExportDir); each file
// is created anew, never written through a file or link already there.
func (r *Report) Export(dir string, keys *security.Keyring) error {
	if err := safefile.ExportDir(dir); err != nil {
		return err
	}
	files := append([]exportFile(nil), r.files...)
	switch r.Partner.Security {
	case config.PGP:
		our, err := security.ArmorPGPPublic(keys.PGPSelf...)
		if err != nil {
			return err
		}
		theirs, err := security.ArmorPGPPublic(keys.PGPPartners[r.Partner.Name]...)
		if err != nil {
			return err
		}
		files = append(files, exportFile{name: "our-key.asc", data: our, note: "our public keys"},
			exportFile{name: "partner-key.asc", data: theirs, note: "the partner's public keys"})
	case config.SMIME:
		var ours, theirs []byte
		for _, id := range keys.SMIMESelf {
			ours = append(ours, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: id.Cert.Raw})...)
		}
		partner := keys.SMIMEPartners[r.Partner.Name]
		if keys.Seen != nil {
			if c, _ := keys.Seen.Newest(r.Partner.Name); c != nil {
				partner = append(partner, c)
			}
		}
		for _, c := range partner {
			theirs = append(theirs, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
		}
		files = append(files,
			exportFile{name: "our-cert.pem", data: ours, note: "our certificates"},
			exportFile{name: "partner-cert.pem", data: theirs, note: "the partner's certificates"})
	}
	var rep bytes.Buffer
	r.Write(&rep)
	rep.WriteString("\nFiles:\n")
	for _, f := range files {
		fmt.Fprintf(&rep, "  %-26s %s\n", f.name, f.note)
		if err := safefile.CreateNew(filepath.Join(dir, f.name), f.data); err != nil {
			return err
		}
	}
	sum := func(b []byte) string { s := sha256.Sum256(b); return fmt.Sprintf("%x", s) }
	rep.WriteString("\nSHA-256:\n")
	for _, f := range files {
		fmt.Fprintf(&rep, "  %s  %s\n", sum(f.data), f.name)
	}
	return safefile.CreateNew(filepath.Join(dir, "report.txt"), rep.Bytes())
}

// Write prints the report.
func (r *Report) Write(w interface{ Write([]byte) (int, error) }) {
	m := r.Message
	fmt.Fprintf(w, "Message %d: %s %s, control ID %s, partner %s <%s>, %s, state %s\n", m.ID, m.Direction, m.MessageType,
		m.ControlID, r.Partner.Name, r.Partner.Email, r.Partner.Security, m.State)
	for _, l := range r.Links {
		status := "verified"
		switch {
		case l.Absent:
			status = "absent"
		case !l.OK:
			status = "BROKEN"
		}
		fmt.Fprintf(w, "\n%s: %s\n", l.Name, status)
		for _, line := range l.Lines {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}
	if r.OK() {
		fmt.Fprintln(w, "\nThe chain holds.")
	} else {
		fmt.Fprintf(w, "\nThe chain is broken at: %s\n", strings.Join(r.Broken(), ", "))
	}
}
