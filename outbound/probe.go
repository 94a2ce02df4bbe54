package outbound

import (
	"context"
	"fmt"
	"time"
)

// Offer is what an SMTP server offers a client after EHLO (and STARTTLS,
// where the submitter uses it).
type Offer struct {
	TLS        bool // the session is encrypted
	Auth       bool // AUTH is offered
	RequireTLS bool // REQUIRETLS (RFC 8689) is offered
}

// Probe connects as Submit would and reports what the server offers,
// without sending anything (hl7mail check). It logs in with nobody's
// password: that is for the real submission to find out.
func (s *SMTPSubmitter) Probe(ctx context.Context, timeout time.Duration) (Offer, error) {
	c, _, stage, release, err := s.open(ctx, timeout)
	if err != nil {
		return Offer{}, fmt.Errorf("smtp %s: %s: %w", s.Addr, stage, err)
	}
	defer release()
	o := Offer{TLS: c.tls, Auth: c.offers("AUTH"), RequireTLS: c.offers("REQUIRETLS")}
	c.quit(timeout)
	return o, nil
}
