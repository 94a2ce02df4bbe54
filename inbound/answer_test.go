package inbound

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestAnswerTo: the return address rules of draft-ietf-ediint-hl7-02
// §4.1.4, in their order, and only ever to a configured partner; the
// deliver.Responder queues the answer for the partner chosen, and a crash before
// that is mended without a second answer.
func TestAnswerTo(t *testing.T) {
	cfg, err := config.Parse(filepath.Join(t.TempDir(), "partners.yaml"), []byte(`self: {name: Lab, email: lab@partner.test, pgp_key: k}
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
return_routes:
  - {application: LABAPP, facility: TUCKER, partner: clinic}
  - {application: ANYWHERE, partner: results}
partners:
  - {name: hospital, listen: 127.0.0.1:9012, email: edi@hospital.test, security: pgp, pgp_key: k}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: pgp, pgp_key: k}
  - {name: open, listen: 127.0.0.1:9014, email: open@partner.test, security: none, allow_unencrypted: true}
  - {name: results, listen: 127.0.0.1:9015, email: results@partner.test, security: none, allow_unencrypted: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	header := func(msh string) *hl7.Header {
		h, err := hl7.ParseHeader([]byte(msh + "\r"))
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	plain := header("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORU^R01|1|P|2.5")
	routed := header("MSH|^~\\&|LABAPP^1.2.3^ISO|TUCKER|HIS|GH|20261201||ORU^R01|2|P|2.5")
	odd := header("MSH#$%*@#ANYWHERE$x#ELSEWHERE#HIS#GH#20261201##ORU$R01#3#P#2.5")
	hospital, open := cfg.Partner("hospital"), cfg.Partner("open")
	for _, c := range []struct {
		name       string
		in         Incoming
		want, rule string
	}{
		{"a return route by MSH-3 and MSH-4", Incoming{Partner: hospital, Signer: "fp", Header: routed}, "clinic", "return-route"},
		{"a return route by MSH-3 alone, odd delimiters", Incoming{Partner: hospital, Signer: "fp", Header: odd}, "results", "return-route"},
		{"the signer", Incoming{Partner: hospital, Signer: "fp", Header: plain, ReplyTo: "results@partner.test",
			MDNRequest: &security.MDNRequest{To: "edi@clinic.test"}}, "hospital", "signer"},
		{"Disposition-Notification-To of unsigned mail", Incoming{Partner: open, Header: plain, ReplyTo: "results@partner.test",
			MDNRequest: &security.MDNRequest{To: "edi@clinic.test"}}, "clinic", "disposition-notification-to"},
		{"Reply-To of unsigned mail", Incoming{Partner: open, Header: plain, ReplyTo: "results@partner.test",
			MDNRequest: &security.MDNRequest{To: "someone@elsewhere.test"}}, "results", "reply-to"},
		{"From, no other address a partner's", Incoming{Partner: open, Header: plain, ReplyTo: "x@elsewhere.test",
			MDNRequest: &security.MDNRequest{To: "y@elsewhere.test"}}, "open", "from"},
	} {
		if p, rule := AnswerTo(cfg, &c.in); p.Name != c.want || rule != c.rule {
			t.Errorf("%s: %s by %s, want %s by %s", c.name, p.Name, rule, c.want, c.rule)
		}
	}

	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	payload := []byte("MSH|^~\\&|LABAPP|TUCKER|HIS|GH|20261201||ORU^R01|r1|P|2.5\r")
	a, err := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "hospital", ControlID: "r1", MessageType: "ORU^R01",
		Payload: payload, MessageID: "<r1@h.test>", Kind: store.KindRequest, AnswerTo: "clinic"})
	if err != nil {
		t.Fatal(err)
	}
	ack := []byte("MSH|^~\\&|HIS|GH|LABAPP|TUCKER|20261201||ACK^R01|k1|P|2.5\rMSA|AA|r1\r")
	if err := st.MarkDelivered(ctx, a.ID, ack); err != nil {
		t.Fatal(err)
	}
	r := &deliver.Responder{Config: cfg, Store: st, Logger: testlog.New(t, slog.LevelInfo)}
	if err := r.Recover(ctx); err != nil { // as after a crash between the delivery and the answer
		t.Fatal(err)
	}
	if err := r.Recover(ctx); err != nil { // once answered, nothing more
		t.Fatal(err)
	}
	out, _ := st.List(ctx, store.Filter{Direction: store.Outbound})
	if len(out) != 1 || out[0].Partner != "clinic" || out[0].InReplyTo != "<r1@h.test>" {
		t.Errorf("answers %+v, want one, for the clinic, in reply to <r1@h.test>", out)
	}
}
