package mailbox

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"

	"github.com/emersion/go-smtp"
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
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", s.Addr)
	if err != nil {
		return Offer{}, fmt.Errorf("smtp %s: %w", s.Addr, err)
	}
	conn.SetDeadline(time.Now().Add(timeout))
	tlsConfig := s.TLSConfig
	if tlsConfig == nil {
		host, _, _ := net.SplitHostPort(s.Addr)
		tlsConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	var c *smtp.Client
	var o Offer
	switch s.TLS {
	case "tls":
		c, o.TLS = smtp.NewClient(tls.Client(conn, tlsConfig)), true
	case "none":
		c = smtp.NewClient(conn)
	default:
		if c, err = smtp.NewClientStartTLS(conn, tlsConfig); err != nil {
			conn.Close()
			return Offer{}, fmt.Errorf("smtp %s: STARTTLS: %w", s.Addr, err)
		}
		o.TLS = true
	}
	defer c.Close()
	c.CommandTimeout = timeout
	if err := c.Hello("localhost"); err != nil {
		return Offer{}, fmt.Errorf("smtp %s: EHLO: %w", s.Addr, err)
	}
	o.Auth, _ = c.Extension("AUTH")
	o.RequireTLS, _ = c.Extension("REQUIRETLS")
	c.Quit()
	return o, nil
}
