package gateway

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"sync"
	"time"

	"github.com/hl7mail/hl7mail/inbound"
)

// seenCerts remembers, in the store, the newest certificate each S/MIME
// partner signed with that its trust anchors accepted, with the
// intermediates that came with it: what mail to a partner without a
// pinned certificate is encrypted to (security.CertMemory).
type seenCerts struct {
	st  inbound.Positions
	log *slog.Logger

	mu sync.Mutex
	m  map[string][]*x509.Certificate // leaf first; read from the store once per partner
}

func seenKey(partner string) string { return "smime-seen:" + partner }

func (s *seenCerts) Newest(partner string) (*x509.Certificate, []*x509.Certificate) {
	l := s.list(partner)
	if len(l) == 0 {
		return nil, nil
	}
	return l[0], l[1:]
}

func (s *seenCerts) list(partner string) []*x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l, ok := s.m[partner]; ok {
		return l
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var l []*x509.Certificate
	if v, err := s.st.Value(ctx, seenKey(partner)); err == nil && v != "" {
		rest := []byte(v)
		for {
			var b *pem.Block
			if b, rest = pem.Decode(rest); b == nil {
				break
			}
			if c, err := x509.ParseCertificate(b.Bytes); err == nil {
				l = append(l, c)
			}
		}
	}
	s.m[partner] = l
	return l
}

func (s *seenCerts) Saw(partner string, c *x509.Certificate, carried []*x509.Certificate) {
	if old, _ := s.Newest(partner); old != nil && (bytes.Equal(old.Raw, c.Raw) || !c.NotBefore.After(old.NotBefore)) {
		return
	}
	l := []*x509.Certificate{c}
	var b bytes.Buffer
	pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	for _, x := range carried {
		if !bytes.Equal(x.Raw, c.Raw) {
			l = append(l, x)
			pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: x.Raw})
		}
	}
	s.mu.Lock()
	s.m[partner] = l
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.st.SetValue(ctx, seenKey(partner), b.String()); err != nil && s.log != nil {
		s.log.Error("the partner's new certificate is not recorded; mail to it keeps the one before", "partner", partner, "err", err)
	}
}

// Attach gives keys what only a running store has: the memory of the
// certificates partners signed with, and the log of revocation checks.
func (k *Keys) Attach(st inbound.Positions, log *slog.Logger) {
	if st != nil && k.Seen == nil {
		k.Seen = &seenCerts{st: st, log: log, m: map[string][]*x509.Certificate{}}
	}
	if k.Revocations != nil && log != nil {
		k.Revocations.SetLog(log.With("component", "revocation"))
	}
}
