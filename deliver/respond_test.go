package deliver

import (
	"testing"

	"github.com/hl7mail/hl7mail/internal/mailtest"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestReceiptNote: a request whose Disposition-Notification-Options could
// not be read is answered, not refused: processed/warning, with the Warning
// field saying so, and the MIC of what came.
func TestReceiptNote(t *testing.T) {
	cfg, st := mailtest.LabConfig(t, "127.0.0.1:1")
	r := &Responder{Config: cfg, Store: st}
	mic := security.ComputeMIC([]byte("what came"))
	m := store.Message{Partner: "hospital", MessageID: "<n1@h.test>", ControlID: "n1", Kind: store.KindRequest, MIC: mic.String(),
		ReceiptNote: "disposition-notification-options unreadable"}
	ack := []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ACK|k1|P|2.3\rMSA|AA|n1\r")
	entity, _, err := r.bundle(m, ack)
	if err != nil {
		t.Fatal(err)
	}
	b, err := security.ParseBundle(entity)
	if err != nil || b.MDN.Disposition.Status() != "processed/warning" || b.MDN.Warning != m.ReceiptNote ||
		b.MDN.MIC == nil || !b.MDN.MIC.Equal(mic) {
		t.Errorf("bundle MDN %+v, %v; want processed/warning with the note and the MIC", b.MDN, err)
	}
}
