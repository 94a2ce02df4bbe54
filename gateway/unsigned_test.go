package gateway

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"

	"github.com/hl7mail/hl7mail/evidence"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestUnsignedReceiptEvidence: a partner with mdn: unsigned answers with a
// plain receipt (as software that signs nothing does). It closes the
// message, is recorded as unsigned, and the journals still verify, the
// receipt noted as weaker evidence.
func TestUnsignedReceiptEvidence(t *testing.T) {
	s := newSite(t)
	lab, err := security.GeneratePGPKey(security.PGPKeyOptions{Name: "Lab", Email: "lab@partner.test"})
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := security.ArmorPGPPublic(lab)
	os.WriteFile(filepath.Join(s.dir, "lab.asc"), pub, 0o600)
	path := s.config(t, [2]string{"lab", freeAddr(t)})
	os.WriteFile(path, []byte(strings.Replace(readFile(t, path), "pgp_key: lab.asc}", "pgp_key: lab.asc, mdn: unsigned}", 1)), 0o600)
	g := s.start(t, path)
	sendAll(t, g.SurrogateAddr("lab"), "U1")
	waitUntil(t, "the mail", 20*time.Second, func() bool { return s.smtp.Count() == 1 })
	sent := s.smtp.Mails()[0].Data
	opened, err := security.PGPOpen(sent, security.PGPKeys{Self: openpgp.EntityList{lab}, Partners: openpgp.EntityList{s.self}}, s.self, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	msgID := messageIDOf(t, sent)
	mdn, _ := (&security.MDN{ReportingUA: "partner.test; other software", FinalRecipient: "lab@partner.test",
		OriginalMessageID: msgID, Disposition: security.Disposition{Type: security.Processed}, MIC: &opened.MIC}).Entity()
	plain := append([]byte("From: lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: <r1@partner.test>\r\nSubject: receipt\r\n"), mdn...)
	ctx := context.Background()
	res, err := g.Receive(ctx, plain, "")
	if err != nil || res.Receipt == nil || res.Receipt.String() != "matched" {
		t.Fatalf("Receive(plain receipt) = %+v, %v; want matched", res, err)
	}
	p, _ := g.Store().PendingByMessageID(ctx, msgID)
	m, _ := g.Store().Get(ctx, p.ID)
	if p.State != store.PendingMatched || !p.Unsigned || m.State != store.Acknowledged {
		t.Errorf("receipt %+v, message %s; want matched, unsigned, acknowledged", p, m.State)
	}
	audit, err := evidence.VerifyJournals(ctx, evidence.Options{Config: g.Config(), Keys: &g.side().keys.Keyring, Store: g.Store().(*store.Store)})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	audit.Write(&b)
	if !audit.OK() || !strings.Contains(b.String(), "unsigned receipt") {
		t.Errorf("journal verify after an unsigned receipt:\n%s", b.String())
	}
}

// messageIDOf returns the Message-ID header of a raw mail.
func messageIDOf(t *testing.T, raw []byte) string {
	t.Helper()
	for _, line := range strings.Split(string(raw), "\r\n") {
		if line == "" {
			break
		}
		if v, ok := strings.CutPrefix(line, "Message-Id: "); ok {
			return strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Message-ID: "); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatal("no Message-ID")
	return ""
}
