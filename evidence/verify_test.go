package evidence

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// world is a store with its journals, our key and a lab's, and one mail
// sent to the lab: in the outgoing journal, with its digest, and in the
// store as sent.
type world struct {
	o        Options
	dir      string
	outgoing string
	msgID    string
	id       int64
	mic      security.MIC // of the mail sent
	lab      *openpgp.Entity
}

func newWorld(t *testing.T) *world {
	t.Helper()
	dir := t.TempDir()
	cfg, err := config.Parse(filepath.Join(dir, "partners.yaml"), []byte(`self: {name: H, email: edi@hospital.test, pgp_key: k}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: pgp, pgp_key: k}
`))
	if err != nil {
		t.Fatal(err)
	}
	self, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "H", Email: "edi@hospital.test"})
	lab, _ := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	keys := &security.Keyring{PGPSelf: []*openpgp.Entity{self}, PGPPartners: map[string][]*openpgp.Entity{"lab": {lab}}}
	st, err := store.Open(store.Options{Dir: cfg.StoreDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	w := &world{o: Options{Config: cfg, Keys: keys, Store: st}, dir: cfg.StoreDir(),
		outgoing: filepath.Join(cfg.StoreDir(), OutgoingJournal), msgID: "<1@hospital.test>", lab: lab}
	ctx := context.Background()
	payload := []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORU^R01|c1|P|2.5\rPID|1\r")
	a, err := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "c1", MessageType: "ORU^R01",
		Payload: payload})
	if err != nil {
		t.Fatal(err)
	}
	w.id = a.ID
	edi, err := security.EncodeEDI(payload, security.EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sealed, mic, err := keys.Suite(security.SuitePGP, "lab", "").Seal(edi, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	w.mic = mic
	mail := append([]byte("From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: "+w.msgID+"\r\nSubject: HL7\r\n"), sealed...)
	if err := st.Prepare(ctx, a.ID, w.msgID, &store.Pending{Partner: "lab", ControlID: "c1", MIC: mic.String(),
		Sent: time.Now(), Due: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(w.outgoing)
	if err != nil {
		t.Fatal(err)
	}
	off, err := j.Append("edi@hospital.test", time.Now(), mail)
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
	sum := sha256.Sum256(mail)
	if err := st.RecordJournal(ctx, OutgoingJournal, off, w.msgID, sum[:]); err != nil {
		t.Fatal(err)
	}
	if err := st.MarkSent(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *world) audit(t *testing.T) *Audit {
	t.Helper()
	a, err := VerifyJournals(context.Background(), w.o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestVerifyJournals: a journal as written verifies; an entry altered
// afterwards, one of unknown origin, and a sent message missing from the
// journal are each found and named.
func TestVerifyJournals(t *testing.T) {
	w := newWorld(t)
	if a := w.audit(t); !a.OK() || a.Verified != 1 || a.Entries[OutgoingJournal] != 1 {
		t.Fatalf("audit of a journal as written: %+v", a)
	}

	// One byte of the sealed mail changed on disk.
	data, err := os.ReadFile(w.outgoing)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.LastIndex(data, []byte("-----END PGP MESSAGE-----")) - 10
	altered := append([]byte(nil), data...)
	altered[i] ^= 1
	os.WriteFile(w.outgoing, altered, 0o600)
	a := w.audit(t)
	if a.OK() || !strings.Contains(strings.Join(a.Problems, "\n"), "altered after it was written") {
		t.Errorf("audit of an altered entry: %+v", a.Problems)
	}

	// The journal gone: the message the store says was mailed is missing.
	os.WriteFile(w.outgoing, nil, 0o600)
	a = w.audit(t)
	joined := strings.Join(a.Problems, "\n")
	if !strings.Contains(joined, "was mailed as "+w.msgID+", which is not in "+OutgoingJournal) ||
		!strings.Contains(joined, "recorded as written, but no entry starts there") {
		t.Errorf("audit of an emptied journal: %+v", a.Problems)
	}
}

// TestVerifyStranger: an incoming entry from no partner, with no
// quarantine record, is a problem; with one it is a note.
func TestVerifyStranger(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	incoming := filepath.Join(w.dir, IncomingJournal)
	mail := []byte("From: who@else.test\r\nTo: edi@hospital.test\r\nMessage-ID: <s1@else.test>\r\n\r\nhello\r\n")
	j, err := journal.Open(incoming)
	if err != nil {
		t.Fatal(err)
	}
	off, _ := j.Append("who@else.test", time.Now(), mail)
	j.Close()
	sum := sha256.Sum256(mail)
	w.o.Store.(*store.Store).RecordJournal(ctx, IncomingJournal, off, "<s1@else.test>", sum[:])
	if a := w.audit(t); a.OK() || !strings.Contains(strings.Join(a.Problems, "\n"), "who@else.test is not a partner") {
		t.Errorf("a stranger's mail without a record: %+v", a.Problems)
	}
	if _, err := w.o.Store.(*store.Store).Quarantine(ctx, store.Quarantined{Sender: "who@else.test", MessageID: "<s1@else.test>",
		Reason: "unknown-sender", Detail: "not a partner", Raw: mail}); err != nil {
		t.Fatal(err)
	}
	if a := w.audit(t); !a.OK() || !strings.Contains(strings.Join(a.Notes, "\n"), "not a partner: quarantined") {
		t.Errorf("a quarantined stranger's mail: problems %v, notes %v", a.Problems, a.Notes)
	}
}
