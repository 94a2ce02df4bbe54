package gateway

import (
	"bytes"
	"crypto/x509"
	"log/slog"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/security"
	"github.com/hl7mail/hl7mail/store"
)

// TestSeenCerts: the certificate a partner last signed with, with what came
// with it, is remembered across a restart; an older one does not replace
// a newer one.
func TestSeenCerts(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	_, older, _ := security.GenerateCert(security.CertOptions{Name: "C", Email: "c@c.test", RSABits: 2048, NotBefore: time.Now().Add(-48 * time.Hour)})
	_, newer, _ := security.GenerateCert(security.CertOptions{Name: "C", Email: "c@c.test", RSABits: 2048})
	_, inter, _ := security.GenerateCert(security.CertOptions{Name: "CA", Email: "ca@c.test", RSABits: 2048})
	s := &seenCerts{st: st, m: map[string][]*x509.Certificate{}}
	s.Saw("clinic", newer, []*x509.Certificate{newer, inter})
	s.Saw("clinic", older, nil)
	st.Close()

	st, err = store.Open(store.Options{Dir: dir, Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s = &seenCerts{st: st, m: map[string][]*x509.Certificate{}}
	c, carried := s.Newest("clinic")
	if c == nil || !bytes.Equal(c.Raw, newer.Raw) || len(carried) != 1 || !bytes.Equal(carried[0].Raw, inter.Raw) {
		t.Errorf("after a restart: %v with %d more, want the newer certificate and its intermediate", c, len(carried))
	}
	if c, _ := s.Newest("lab"); c != nil {
		t.Errorf("a partner never seen: %v", c.Subject)
	}
}
