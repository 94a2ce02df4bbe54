// Package surrogate runs the MLLP listeners that stand in for remote
// partners (draft-ietf-ediint-hl7-02 §6.3, figure 9): the router connects to
// a partner's surrogate as if the partner were a local system, and the
// surrogate answers each message with an accept ACK (§6.5.1) once the
// message is durably stored — CA when stored, CE when it could not be stored
// (send again), CR when it is not acceptable (do not send again).
//
// It imports, of this module, only hl7, mllp, spool: the CA path needs the
// spool alone, never the database.
package surrogate

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/spool"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = mllp.ErrServerClosed

// Spool takes durable responsibility for a message; *store.Store and
// *spool.Spool are one.
type Spool interface {
	Accept(ctx context.Context, m spool.Message) (spool.Accepted, error)
}

// Options configure a Server. Partner and Spool are required.
type Options struct {
	Partner        string        // partner name, recorded with each message
	Spool          Spool         // where messages are stored before CA
	Logger         *slog.Logger  // default slog.Default()
	MaxMessageSize int           // bytes (default mllp.DefaultMaxSize)
	MaxConnections int           // simultaneous connections (default 16)
	IdleTimeout    time.Duration // close a silent connection (default 10m)
	// FirstFrameTimeout closes a connection that sends no complete frame
	// this long after it was opened (default 30s): idle sockets cannot
	// hold the connection slots for IdleTimeout.
	FirstFrameTimeout time.Duration
	// MaxConnectionsPerHost bounds the connections from one source
	// address (default MaxConnections), so that one host cannot take all.
	MaxConnectionsPerHost int
	// OriginalModeAA answers a sender in original mode (MSH-15 and MSH-16
	// empty) with AA, AE or AR instead of CA, CE or CR, for senders that
	// take no other answer (partners[].accept_ack: AA). By default the
	// answer is the accept acknowledgement whatever the mode
	// (draft-ietf-ediint-hl7-02 §6.5.1: the surrogate "mimics an accept
	// ACK"; no application has seen the message yet).
	OriginalModeAA bool
	// BatchAckEach answers an HL7 batch with a batch acknowledgement of
	// one ACK per message (partners[].batch_ack: each) instead of one ACK
	// for the whole batch.
	BatchAckEach  bool
	CommitTimeout time.Duration // longest wait for the store before CE (default 10s)
	WriteTimeout  time.Duration // longest wait to write an ACK (default 30s)
	IDs           *hl7.IDGen    // control IDs of ACKs (default NewIDGen("HM", now))
	// Observe, when set, is told of each ACK written: its code and the time
	// from the end of the frame to the ACK (metrics).
	Observe func(code hl7.AckCode, d time.Duration)
	// LimitHit, when set, is told each time a limit refuses something:
	// LimitConnections or LimitMessageSize (metrics).
	LimitHit func(limit string)
	// Rendezvous, when set, answers a stored message with the partner's
	// own application response instead of CA (draft-ietf-ediint-hl7-02
	// §4.1.4): it blocks until the response is there and returns it, with
	// a function to call once it was written (nil: written), or returns an
	// error when none came in time; the router then gets CE ("timed out",
	// AE in original mode) and the message is delivered all the same.
	Rendezvous func(ctx context.Context, id int64) (response []byte, written func(error), err error)
}

// Limits a surrogate enforces, as named to Options.LimitHit.
const (
	LimitConnections = "connections"  // max_connections reached: connection closed
	LimitMessageSize = "message_size" // max_message_size exceeded: message rejected (CR)
	// LimitConnectionsPerHost: max_connections_per_host reached: connection closed.
	LimitConnectionsPerHost = "connections_per_host"
)

func (s *Server) limitHit(limit string) {
	if s.opts.LimitHit != nil {
		s.opts.LimitHit(limit)
	}
}

// Limits are the settings of a running Server that SetLimits changes.
type Limits struct {
	MaxMessageSize        int           // bytes
	MaxConnections        int           // simultaneous connections
	MaxConnectionsPerHost int           // simultaneous connections from one source address
	IdleTimeout           time.Duration // close a silent connection
	FirstFrameTimeout     time.Duration // close a connection without a frame this long after it opened
}

// SetLimits changes the limits of a running server (a reload): new
// connections, and every read after it, follow them; zero fields keep
// their value.
func (s *Server) SetLimits(l Limits) {
	cur := *s.lim.Load()
	if l.MaxMessageSize > 0 {
		cur.MaxMessageSize = l.MaxMessageSize
	}
	if l.MaxConnections > 0 {
		cur.MaxConnections = l.MaxConnections
	}
	if l.IdleTimeout > 0 {
		cur.IdleTimeout = l.IdleTimeout
	}
	if l.MaxConnectionsPerHost > 0 {
		cur.MaxConnectionsPerHost = l.MaxConnectionsPerHost
	}
	if l.FirstFrameTimeout > 0 {
		cur.FirstFrameTimeout = l.FirstFrameTimeout
	}
	s.lim.Store(&cur)
}

func (s *Server) limits() Limits { return *s.lim.Load() }

// Server is one partner's surrogate listener.
type Server struct {
	opts Options
	lim  atomic.Pointer[Limits]
	log  *slog.Logger
	// srv accepts the connections; its context is the context of every
	// connection's waits (the store's commit, a rendezvous), which Close
	// cancels, so that nothing waits on after.
	srv      mllp.Server
	mu       sync.Mutex
	conns    map[*conn]struct{}
	perHost  map[string]int // open connections by source address
	closing  atomic.Bool
	nextConn atomic.Uint64
	panics   atomic.Int64
}

// New returns a Server; it listens once Serve or ListenAndServe is called.
func New(opts Options) (*Server, error) {
	if opts.Partner == "" || opts.Spool == nil {
		return nil, errors.New("surrogate: Options.Partner and Options.Spool are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxMessageSize <= 0 {
		opts.MaxMessageSize = mllp.DefaultMaxSize
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 16
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 10 * time.Minute
	}
	if opts.FirstFrameTimeout <= 0 {
		opts.FirstFrameTimeout = 30 * time.Second
	}
	if opts.MaxConnectionsPerHost <= 0 {
		opts.MaxConnectionsPerHost = opts.MaxConnections
	}
	if opts.CommitTimeout <= 0 {
		opts.CommitTimeout = 10 * time.Second
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 30 * time.Second
	}
	if opts.IDs == nil {
		opts.IDs = hl7.NewIDGen("HM", time.Now())
	}
	s := &Server{opts: opts, log: opts.Logger.With("partner", opts.Partner), conns: map[*conn]struct{}{},
		perHost: map[string]int{}}
	s.srv.Logger = s.log
	s.srv.Handler = mllp.HandlerFunc(func(_ context.Context, nc net.Conn) { s.startConn(nc) })
	s.lim.Store(&Limits{MaxMessageSize: opts.MaxMessageSize, MaxConnections: opts.MaxConnections,
		MaxConnectionsPerHost: opts.MaxConnectionsPerHost, IdleTimeout: opts.IdleTimeout, FirstFrameTimeout: opts.FirstFrameTimeout})
	return s, nil
}

// Listen opens a TCP listener on addr with keepalive probes, so that a router
// that vanished without closing is noticed.
func Listen(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: time.Minute, Interval: 15 * time.Second, Count: 4}}
	return lc.Listen(ctx, "tcp", addr)
}

// ListenAndServe listens on addr and serves.
func (s *Server) ListenAndServe(addr string) error {
	ln, err := Listen(context.Background(), addr)
	if err != nil {
		return fmt.Errorf("surrogate %s: %w", s.opts.Partner, err)
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln until Shutdown or Close; it then returns
// ErrServerClosed.
func (s *Server) Serve(ln net.Listener) error {
	if s.closing.Load() {
		ln.Close()
		return ErrServerClosed
	}
	s.log.Info("surrogate listening", "addr", ln.Addr().String())
	err := s.srv.Serve(ln)
	if errors.Is(err, ErrServerClosed) {
		return err
	}
	return fmt.Errorf("surrogate %s: %w", s.opts.Partner, err)
}

// startConn serves one connection, within the limits, until it ends.
func (s *Server) startConn(nc net.Conn) {
	id := "c" + strconv.FormatUint(s.nextConn.Add(1), 10)
	host, _, _ := net.SplitHostPort(nc.RemoteAddr().String())
	c := &conn{s: s, nc: nc, log: s.log.With("conn", id), host: host, opened: time.Now()}
	s.mu.Lock()
	if s.closing.Load() {
		s.mu.Unlock()
		nc.Close()
		return
	}
	lim := s.limits()
	if len(s.conns) >= lim.MaxConnections {
		s.mu.Unlock()
		c.log.Warn("connection refused: limit reached", "remote", nc.RemoteAddr().String(), "limit", lim.MaxConnections)
		s.limitHit(LimitConnections)
		nc.Close()
		return
	}
	if s.perHost[c.host] >= lim.MaxConnectionsPerHost {
		s.mu.Unlock()
		c.log.Warn("connection refused: limit per host reached", "remote", nc.RemoteAddr().String(),
			"limit", lim.MaxConnectionsPerHost)
		s.limitHit(LimitConnectionsPerHost)
		nc.Close()
		return
	}
	s.perHost[c.host]++
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	c.serve()
}

// Shutdown stops accepting, lets every connection finish the message it is
// committing and answer it, closes idle connections, and waits for all of
// them until ctx ends; then it closes what is left and returns ctx.Err().
// Messages half received when Shutdown starts are not answered; the router
// sends them again.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closing.Store(true)
	s.mu.Lock()
	for c := range s.conns {
		c.interrupt()
	}
	s.mu.Unlock()
	return s.srv.Shutdown(ctx)
}

// Close closes the listener and every connection at once, and ends what
// they wait for.
func (s *Server) Close() error {
	s.closing.Store(true)
	return s.srv.Close()
}

// Panics returns how many connection panics were recovered.
func (s *Server) Panics() int64 { return s.panics.Load() + s.srv.Panics() }

// Connections returns the number of open router connections.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

type conn struct {
	s   *Server
	nc  net.Conn
	log *slog.Logger
	mu  sync.Mutex
	// busy is set while a received message is being stored and answered;
	// Shutdown lets that finish.
	busy bool
	// read is when the frame being answered was read.
	read time.Time
	// host is the source address; opened when the connection came, and
	// framed whether a complete frame has come since (first_frame_timeout).
	host   string
	opened time.Time
	framed bool
}

// interrupt makes an idle connection's pending read return at once.
func (c *conn) interrupt() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.busy {
		c.nc.SetReadDeadline(time.Now())
	}
}

// beginRead arms the idle timeout for the next frame; it reports false when
// the server is shutting down.
func (c *conn) beginRead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.s.closing.Load() {
		return false
	}
	c.busy = false
	lim := c.s.limits()
	deadline := time.Now().Add(lim.IdleTimeout)
	if first := c.opened.Add(lim.FirstFrameTimeout); !c.framed && first.Before(deadline) {
		deadline = first
	}
	c.nc.SetReadDeadline(deadline)
	return true
}

func (c *conn) setBusy() {
	c.mu.Lock()
	c.busy = true
	c.mu.Unlock()
}

func (c *conn) serve() {
	s := c.s
	var current *hl7.Header
	defer func() {
		if v := recover(); v != nil {
			s.panics.Add(1)
			c.log.Error("panic in connection; closing it", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if current != nil {
				c.answer(current, hl7.CommitError, "internal error, send again", hl7.ErrApplicationIntern)
			}
		}
		s.mu.Lock()
		delete(s.conns, c)
		if s.perHost[c.host]--; s.perHost[c.host] <= 0 {
			delete(s.perHost, c.host)
		}
		s.mu.Unlock()
	}()
	c.log.Info("router connected", "remote", c.nc.RemoteAddr().String())
	rd := mllp.NewReader(c.nc, s.limits().MaxMessageSize)
	for {
		current = nil
		if !c.beginRead() {
			c.log.Info("connection closed for shutdown")
			return
		}
		frame, err := rd.ReadFrame()
		c.read = time.Now()
		c.framed = c.framed || err == nil
		c.setBusy()
		if rd.Junk > 0 {
			c.log.Warn("skipped bytes before a start block", "bytes", rd.Junk)
		}
		if err != nil {
			if !c.frameError(err) {
				return
			}
			continue
		}
		if hl7.IsBatch(frame) {
			c.handleBatch(frame)
			continue
		}
		h, perr := hl7.ParseHeader(frame)
		current = h
		if perr != nil {
			c.log.Warn("message rejected", "reason", perr.Error(), "size", len(frame))
			c.answer(h, hl7.CommitReject, perr.Error(), rejectCode(perr))
			continue
		}
		c.handle(h, frame)
	}
}

// frameError handles a read error; it reports whether to go on reading.
func (c *conn) frameError(err error) bool {
	var fe *mllp.FrameError
	switch {
	case errors.Is(err, io.EOF):
		c.log.Info("router disconnected")
		return false
	case errors.As(err, &fe) && (errors.Is(err, mllp.ErrTooLarge) || errors.Is(err, mllp.ErrNoEndBlock)):
		h, _ := hl7.ParseHeader(fe.Prefix)
		reason := "frame has no end block"
		if errors.Is(err, mllp.ErrTooLarge) {
			reason = fmt.Sprintf("message of %d bytes exceeds the limit of %d", fe.Size, c.s.limits().MaxMessageSize)
			c.s.limitHit(LimitMessageSize)
		}
		attrs := []any{"reason", reason, "size", fe.Size}
		if h != nil {
			attrs = append(attrs, "control_id", h.ControlID)
		}
		c.log.Warn("message rejected", attrs...)
		c.answer(h, hl7.CommitReject, reason, hl7.ErrApplicationIntern)
		return true
	case c.s.closing.Load():
		c.log.Info("connection closed for shutdown")
	case isTimeout(err) && !c.framed:
		c.log.Warn("closing a connection that sent no message", "first_frame_timeout", c.s.limits().FirstFrameTimeout.String())
	case isTimeout(err):
		c.log.Info("closing idle connection", "idle_timeout", c.s.limits().IdleTimeout.String())
	default:
		c.log.Warn("connection ended", "err", err)
	}
	return false
}

// notStored is the text of the CE that answers what could not be stored.
const notStored = "message could not be stored, send it again later"

// spool stores frame for the partner, within the commit timeout.
func (c *conn) spool(controlID, messageType string, frame []byte) (spool.Accepted, error) {
	ctx, cancel := context.WithTimeout(c.s.srv.Context(), c.s.opts.CommitTimeout)
	defer cancel()
	return c.s.opts.Spool.Accept(ctx, spool.Message{Direction: spool.Outbound, Partner: c.s.opts.Partner,
		ControlID: controlID, MessageType: messageType, Payload: bytes.Clone(frame)})
}

// handle stores a well-formed message and answers it.
func (c *conn) handle(h *hl7.Header, frame []byte) {
	log := c.log.With("control_id", h.ControlID)
	res, err := c.spool(h.ControlID, h.MessageType, frame)
	if err != nil {
		log.Error("message not stored; answering CE", "err", err)
		c.answer(h, hl7.CommitError, notStored, hl7.ErrApplicationIntern)
		return
	}
	log.Info("message accepted", "id", res.ID, "type", h.MessageCode()+"^"+h.TriggerEvent(), "size", len(frame))
	if c.s.opts.Rendezvous == nil || h.IsAck() {
		c.answer(h, hl7.CommitAccept, "", "")
		return
	}
	c.rendezvous(log, h, res.ID)
}

// rejectCode maps a header parse error to an HL7 error code (table 0357).
func rejectCode(err error) string {
	switch {
	case errors.Is(err, hl7.ErrMissingField):
		return hl7.ErrRequiredField
	case errors.Is(err, hl7.ErrFieldTooLong):
		return hl7.ErrDataType
	}
	return hl7.ErrSegmentSequence
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}
