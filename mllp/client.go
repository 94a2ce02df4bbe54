package mllp

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"time"
)

// Client sends messages over one MLLP connection and reads the answers. It
// is not safe for concurrent use.
type Client struct {
	conn net.Conn
	r    *Reader
	wbuf []byte
}

// Dial connects to an MLLP server at addr (host:port).
func Dial(ctx context.Context, addr string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mllp: dial %s: %w", addr, err)
	}
	return NewClient(conn), nil
}

// DialTLS connects to an MLLP server at addr over TLS (MLLP over TLS, as
// HL7 v2 routers offer it for links between hosts), verifying the server
// with config.
func DialTLS(ctx context.Context, addr string, config *tls.Config) (*Client, error) {
	d := tls.Dialer{Config: config}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("mllp: dial %s over TLS: %w", addr, err)
	}
	return NewClient(conn), nil
}

// NewClient returns a Client on an established connection.
func NewClient(conn net.Conn) *Client {
	return &Client{conn: conn, r: NewReader(conn, 0)}
}

// Send writes payload as one frame and returns the payload of the frame that
// answers it. The returned slice is valid until the next call. The context's
// deadline bounds the exchange.
func (c *Client) Send(ctx context.Context, payload []byte) ([]byte, error) {
	if err := c.Write(ctx, payload); err != nil {
		return nil, err
	}
	return c.Read(ctx)
}

// Write writes payload as one frame.
func (c *Client) Write(ctx context.Context, payload []byte) error {
	c.setDeadline(ctx)
	c.wbuf = AppendFrame(c.wbuf[:0], payload)
	if _, err := c.conn.Write(c.wbuf); err != nil {
		return fmt.Errorf("mllp: write: %w", err)
	}
	return nil
}

// Read reads the next frame's payload, valid until the next call.
func (c *Client) Read(ctx context.Context) ([]byte, error) {
	c.setDeadline(ctx)
	frame, err := c.r.ReadFrame()
	if err != nil {
		return nil, fmt.Errorf("mllp: read answer: %w", err)
	}
	return frame, nil
}

func (c *Client) setDeadline(ctx context.Context) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Time{}
	}
	c.conn.SetDeadline(dl)
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
