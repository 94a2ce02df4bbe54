package mllp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrServerClosed is returned by Server.Serve after Shutdown or Close.
var ErrServerClosed = errors.New("mllp: server closed")

// A Handler serves one MLLP connection until it returns; the Server closes
// the connection then. ctx ends when the Server is closed: whatever the
// handler waits for on the connection's behalf should wait under it.
type Handler interface {
	ServeMLLP(ctx context.Context, c net.Conn)
}

// HandlerFunc is a function used as a Handler.
type HandlerFunc func(ctx context.Context, c net.Conn)

// ServeMLLP calls f(ctx, c).
func (f HandlerFunc) ServeMLLP(ctx context.Context, c net.Conn) { f(ctx, c) }

// Server accepts MLLP connections and serves each with Handler in its own
// goroutine, after go-smtp's Server: accept errors that pass (a timeout,
// too many open files) are retried with backoff, a handler's panic closes
// its connection only, Shutdown stops accepting and waits for the
// handlers within its bound, Close ends them at once.
type Server struct {
	Handler Handler
	Logger  *slog.Logger // default slog.Default()

	once    sync.Once
	base    context.Context
	cancel  context.CancelFunc
	mu      sync.Mutex
	ln      net.Listener
	conns   map[net.Conn]struct{}
	closing atomic.Bool
	wg      sync.WaitGroup
	panics  atomic.Int64
}

func (s *Server) init() {
	s.once.Do(func() {
		s.base, s.cancel = context.WithCancel(context.Background())
		s.conns = map[net.Conn]struct{}{}
		if s.Logger == nil {
			s.Logger = slog.Default()
		}
	})
}

// Context is the context the handlers get: Close cancels it.
func (s *Server) Context() context.Context {
	s.init()
	return s.base
}

// Panics returns how many handler panics were recovered.
func (s *Server) Panics() int64 { return s.panics.Load() }

// Serve accepts connections on ln until Shutdown or Close; it then returns
// ErrServerClosed. Another accept error ends it with that error.
func (s *Server) Serve(ln net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.ln = ln
	s.mu.Unlock()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.closing.Load() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.Logger.Warn("accept failed; retrying", "err", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("mllp: accept: %w", err)
		}
		delay = 0
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.conns[nc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(nc)
	}
}

func (s *Server) serve(nc net.Conn) {
	defer func() {
		if v := recover(); v != nil {
			s.panics.Add(1)
			s.Logger.Error("panic in connection; closing it", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
		}
		nc.Close()
		s.mu.Lock()
		delete(s.conns, nc)
		s.mu.Unlock()
		s.wg.Done()
	}()
	s.Handler.ServeMLLP(s.base, nc)
}

// Shutdown stops accepting and waits for the handlers to return until ctx
// ends; then it closes what is left (Close), waits for those handlers to
// return, and returns ctx.Err(). A handler waiting on a read is not woken
// by Shutdown: the caller wakes the idle ones (as the surrogate does).
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.closing.Store(true)
	s.mu.Lock()
	if s.ln != nil {
		s.ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.Close()
		<-done
		return ctx.Err()
	}
}

// Close closes the listener and every connection at once and cancels the
// handlers' context. It does not wait for the handlers.
func (s *Server) Close() error {
	s.init()
	s.closing.Store(true)
	s.cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	var err error
	if s.ln != nil {
		err = s.ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	return err
}

// Wait waits for every handler to return.
func (s *Server) Wait() { s.wg.Wait() }
