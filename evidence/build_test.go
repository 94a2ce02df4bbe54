package evidence

import (
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// receive journals, as the incoming journal holds it, the lab's signed and
// encrypted answer to the world's mail: its receipt with mic, bundled with
// an acknowledgement of ackFor when ackFor is not "".
func (w *world) receive(t *testing.T, mic security.MIC, ackFor string) {
	t.Helper()
	mdn := security.ReceiptFrom("lab@partner.test", w.msgID, security.Disposition{Type: security.Processed})
	mdn.MIC = &mic
	entity, err := mdn.Entity()
	if err != nil {
		t.Fatal(err)
	}
	if ackFor != "" {
		ack, err := security.EncodeEDI([]byte("MSH|^~\\&|LAB|TL|HIS|GH|20261201||ACK|k1|P|2.5\rMSA|AA|"+ackFor+"\r"),
			security.EDIOptions{})
		if err != nil {
			t.Fatal(err)
		}
		entity = security.BuildBundle(ack, entity)
	}
	lab := &security.Keyring{PGPSelf: []*openpgp.Entity{w.lab}, PGPPartners: map[string][]*openpgp.Entity{"hospital": w.o.Keys.PGPSelf}}
	sealed, _, err := lab.Suite(security.SuitePGP, "hospital", "").Seal(entity, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	mail := append([]byte("From: lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: <r1@partner.test>\r\n"+
		"In-Reply-To: "+w.msgID+"\r\nSubject: HL7 response\r\n"), sealed...)
	j, err := journal.Open(filepath.Join(w.dir, IncomingJournal))
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	off, err := j.Append("lab@partner.test", time.Now(), mail)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(mail)
	if err := w.o.Store.(*store.Store).RecordJournal(context.Background(), IncomingJournal, off, "<r1@partner.test>", sum[:]); err != nil {
		t.Fatal(err)
	}
}

func (w *world) build(t *testing.T) *Report {
	t.Helper()
	m, err := w.o.Store.Get(context.Background(), w.id)
	if err != nil {
		t.Fatal(err)
	}
	r, err := Build(context.Background(), w.o, m)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func lines(r *Report, link string) string {
	for _, l := range r.Links {
		if l.Name == link {
			return strings.Join(l.Lines, "\n")
		}
	}
	return ""
}

// TestBuildChain: the mail sent, the partner's signed receipt with the
// message's MIC and its acceptance in the same mail are each verified from
// the journals, and Export writes what a third party checks them with.
func TestBuildChain(t *testing.T) {
	w := newWorld(t)
	w.receive(t, w.mic, "c1")
	r := w.build(t)
	if !r.OK() || len(r.Links) != 3 {
		t.Fatalf("chain broken: %v\n%s\n%s\n%s", r.Broken(), lines(r, "sent"), lines(r, "receipt"), lines(r, "commitment"))
	}
	for link, want := range map[string]string{
		"sent":       "identical to stored message",
		"receipt":    "Received-Content-MIC " + w.mic.String() + " matches",
		"commitment": "MSA-1 AA for c1",
	} {
		if got := lines(r, link); !strings.Contains(got, want) {
			t.Errorf("%s link:\n%s\nwant %q", link, got, want)
		}
	}
	dir := filepath.Join(t.TempDir(), "export")
	if err := r.Export(dir, w.o.Keys); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"1-sent.eml", "1-sent-content.mime", "1-sent-signature.asc", "2-receipt.eml",
		"2-receipt-content.mime", "2-receipt-signature.asc", "our-key.asc", "partner-key.asc", "report.txt"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Size() == 0 {
			t.Errorf("export lacks %s: %v", f, err)
		}
	}
}

// TestBuildBroken: each broken link is named with its reason: a receipt
// whose MIC is not the message's, no receipt at all, an acceptance of
// another message. A receipt without a response leaves the commitment
// absent, which is not a break.
func TestBuildBroken(t *testing.T) {
	other := security.ComputeMIC([]byte("another message"))
	for _, tc := range []struct {
		name       string
		receive    func(w *world, t *testing.T)
		broken     string
		why        string
		absentOnly bool
	}{
		{"MIC differs", func(w *world, t *testing.T) { w.receive(t, other, "c1") }, "receipt", "does not match the MIC of the message", false},
		{"no receipt", func(w *world, t *testing.T) {}, "receipt", "no signed receipt for <1@hospital.test>", false},
		{"acceptance of another", func(w *world, t *testing.T) { w.receive(t, w.mic, "c9") }, "commitment", "acknowledges c9, not c1", false},
		{"receipt only", func(w *world, t *testing.T) { w.receive(t, w.mic, "") }, "", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			tc.receive(w, t)
			r := w.build(t)
			if tc.absentOnly {
				if !r.OK() || !r.Links[2].Absent || !strings.Contains(lines(r, "commitment"), "without an application response") {
					t.Errorf("receipt without a response: OK %v, broken %v", r.OK(), r.Broken())
				}
				return
			}
			if r.OK() || !strings.Contains(strings.Join(r.Broken(), ","), tc.broken) {
				t.Fatalf("broken = %v, want %s", r.Broken(), tc.broken)
			}
			if got := lines(r, tc.broken); !strings.Contains(got, "BROKEN: ") || !strings.Contains(got, tc.why) {
				t.Errorf("%s link:\n%s\nwant %q", tc.broken, got, tc.why)
			}
		})
	}
}
