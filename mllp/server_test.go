package mllp

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

func startServer(t *testing.T, h HandlerFunc) (*Server, string, chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Handler: h, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() { s.Close() })
	return s, ln.Addr().String(), done
}

// TestServerEcho: each connection gets the handler; a panic closes that
// connection only, is counted, and the server goes on accepting.
func TestServerEcho(t *testing.T) {
	s, addr, _ := startServer(t, func(ctx context.Context, c net.Conn) {
		rd := NewReader(c, 0)
		for {
			f, err := rd.ReadFrame()
			if err != nil {
				return
			}
			if string(f) == "panic" {
				panic("handler bug")
			}
			WriteFrame(c, f)
		}
	})
	exchange := func(msg string) (string, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return "", err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := WriteFrame(c, []byte(msg)); err != nil {
			return "", err
		}
		f, err := NewReader(c, 0).ReadFrame()
		return string(f), err
	}
	if got, err := exchange("MSH|1"); err != nil || got != "MSH|1" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	if _, err := exchange("panic"); err == nil {
		t.Error("a panicking handler's connection answered")
	}
	if got, err := exchange("MSH|2"); err != nil || got != "MSH|2" {
		t.Fatalf("after a panic: echo = %q, %v", got, err)
	}
	if s.Panics() != 1 {
		t.Errorf("Panics = %d, want 1", s.Panics())
	}
}

// TestServerShutdown: Shutdown stops accepting and waits for a handler
// that finishes; one that does not is closed at the deadline, its context
// cancelled, and Serve returns ErrServerClosed.
func TestServerShutdown(t *testing.T) {
	release, started := make(chan struct{}), make(chan struct{})
	ended := make(chan error, 2)
	s, addr, done := startServer(t, func(ctx context.Context, c net.Conn) {
		buf := make([]byte, 1)
		if _, err := c.Read(buf); err != nil {
			ended <- err
			return
		}
		if buf[0] == 'w' {
			close(started)
			<-release
			ended <- nil
			return
		}
		<-ctx.Done()
		ended <- ctx.Err()
	})
	dial := func(b byte) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.Write([]byte{b})
		return c
	}
	dial('w')
	<-started
	// The handler finishes when released, during Shutdown.
	time.AfterFunc(50*time.Millisecond, func() { close(release) })
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-ended; err != nil {
		t.Errorf("finished handler: %v", err)
	}
	if err := <-done; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("a shut down server accepts")
	}

	s2, addr2, _ := startServer(t, func(ctx context.Context, c net.Conn) {
		<-ctx.Done()
		ended <- ctx.Err()
	})
	c, err := net.Dial("tcp", addr2)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for s2.Context().Err() == nil && connections(s2) == 0 {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s2.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown past its deadline = %v", err)
	}
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Errorf("handler's context: %v, want cancelled", err)
	}
}

func connections(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}
