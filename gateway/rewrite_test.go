package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/smtp"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	gosmtp "github.com/emersion/go-smtp"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

// rewritingRelay is an SMTP relay such as a firewall's mail gateway: it
// forwards every mail to next with From and Message-ID replaced by its own.
type rewritingRelay struct {
	next string
	mu   sync.Mutex
	n    int
	ids  map[string]string // original Message-ID → the one it gave
}

func (r *rewritingRelay) NewSession(*gosmtp.Conn) (gosmtp.Session, error) {
	return &relaySession{r: r}, nil
}

type relaySession struct {
	r  *rewritingRelay
	to []string
}

func (s *relaySession) Reset()                                 {}
func (s *relaySession) Logout() error                          { return nil }
func (s *relaySession) Mail(string, *gosmtp.MailOptions) error { return nil }
func (s *relaySession) Rcpt(to string, _ *gosmtp.RcptOptions) error {
	s.to = append(s.to, to)
	return nil
}

var (
	fromLine  = regexp.MustCompile(`(?im)^From:.*\r\n`)
	msgIDLine = regexp.MustCompile(`(?im)^Message-Id:\s*(<[^>]*>)\r\n`)
)

func (s *relaySession) Data(rd io.Reader) error {
	data, err := io.ReadAll(rd)
	if err != nil {
		return err
	}
	end := bytes.Index(data, []byte("\r\n\r\n"))
	head, body := data[:end+2], data[end+2:]
	s.r.mu.Lock()
	s.r.n++
	newID := fmt.Sprintf("<relay-%d@dmz.hospital.test>", s.r.n)
	if m := msgIDLine.FindSubmatch(head); m != nil {
		s.r.ids[string(m[1])] = newID
	}
	s.r.mu.Unlock()
	head = fromLine.ReplaceAll(head, []byte("From: Hospital relay <relay@dmz.hospital.test>\r\n"))
	head = msgIDLine.ReplaceAll(head, []byte("Message-ID: "+newID+"\r\n"))
	return smtp.SendMail(s.r.next, nil, "relay@dmz.hospital.test", s.to, append(head, body...))
}

// TestRewritingRelay: the hospital's mail leaves through a relay that
// rewrites From and Message-ID. The lab knows the hospital by its
// signature; its receipt names a Message-ID the hospital never used, and
// still closes the right pending row, matched by the MIC.
func TestRewritingRelay(t *testing.T) {
	dir := t.TempDir()
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	relay := &rewritingRelay{next: w.SMTPAddr, ids: map[string]string{}}
	srv := gosmtp.NewServer(relay)
	srv.Domain = "dmz.hospital.test"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()

	hPriv, _, hCert, hKey := keyFiles(t, dir, "edi@hospital.test")
	hPub := filepath.Join(dir, "edi@hospital.test.pub.asc")
	lPriv, lPub, lCert, lKey := keyFiles(t, dir, "lab@partner.test")
	toLab := freeAddr(t)
	hospital := startInstance(t, w, dir, "hospital", "edi@hospital.test", fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: %s}\n", toLab, lPub),
		hPriv, hCert, hKey, func(o *Options) { o.Config.SMTP.Addr = ln.Addr().String() })
	lab := startInstance(t, w, dir, "lab", "lab@partner.test", fmt.Sprintf(
		"  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: %s}\n", freeAddr(t), hPub),
		lPriv, lCert, lKey)

	orders := []string{"RW-1", "RW-2"}
	c, err := mllp.Dial(context.Background(), toLab)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range orders {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		reply, err := c.Send(ctx, []byte("MSH|^~\\&|OE|GH|LAB|TL|20261123||ORM^O01|"+id+"|P|2.3|||AL\rPID|1\rORC|NW|"+id+"\r"))
		cancel()
		if a, perr := hl7.ParseAck(reply); err != nil || perr != nil || a.Code != hl7.CommitAccept {
			t.Fatalf("ACK %q, %v", reply, err)
		}
	}
	c.Close()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		acked, _ := hospital.g.Store().List(ctx, store.Filter{Direction: store.Outbound, State: store.Acknowledged})
		if len(acked) == len(orders) && len(hospital.router.Messages()) == len(orders) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s: %d acknowledged, %d answers at the hospital's router", len(acked), len(hospital.router.Messages()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	out, _ := hospital.g.Store().List(ctx, store.Filter{Direction: store.Outbound})
	for _, m := range out {
		p, err := hospital.g.Store().PendingByMessageID(ctx, m.MessageID)
		if err != nil || p.State != store.PendingMatched || p.MatchedBy != store.MatchByMIC || p.ControlID != m.ControlID {
			t.Errorf("pending row of %s: %+v, %v; want matched by mic", m.ControlID, p, err)
		}
		relay.mu.Lock()
		rewritten := relay.ids[m.MessageID]
		relay.mu.Unlock()
		if rewritten == "" {
			t.Errorf("%s did not pass the relay", m.MessageID)
		}
		if in, err := lab.g.Store().FindInbound(ctx, "hospital", rewritten); err != nil || in.ControlID != m.ControlID {
			t.Errorf("the lab stored %s as %+v, %v", rewritten, in, err)
		}
	}
	if n := len(lab.router.Messages()); n != len(orders) {
		t.Errorf("the lab's router got %d messages, want %d", n, len(orders))
	}
}
