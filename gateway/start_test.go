package gateway

import (
	"context"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/testlog"
)

// TestStartUndoes: when a part fails to start (the second partner's port
// is taken), what started is undone: the first partner's port and the
// store are free again, and a start once the port is free works.
func TestStartUndoes(t *testing.T) {
	s := newSite(t)
	s.key(t, "lab.asc", "lab@partner.test", 0, nil)
	s.key(t, "clinic.asc", "clinic@partner.test", 0, nil)
	first := freeAddr(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	path := s.config(t, [2]string{"lab", first}, [2]string{"clinic", taken.Addr().String()})
	cfg, keys, err := Load(path, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Config: cfg, Keys: keys, Logger: testlog.New(t, slog.LevelInfo), NoDashboard: true}
	if g, err := Start(context.Background(), opts); err == nil {
		g.Shutdown(context.Background())
		t.Fatal("Start with a partner's port taken succeeded")
	}
	ln, err := net.Listen("tcp", first)
	if err != nil {
		t.Fatalf("the first partner's port is still held after the failed start: %v", err)
	}
	ln.Close()
	taken.Close()
	g, err := Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("Start after the port was freed: %v (the store still locked?)", err)
	}
	g.Shutdown(context.Background())
}
