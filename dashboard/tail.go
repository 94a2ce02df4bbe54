package dashboard

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Entry is one log record as the page shows it: the message and its
// attributes flattened ("component", "partner", "control_id", ...). Log
// records carry no payloads and no patient data, so neither does an Entry.
type Entry struct {
	ID      uint64         `json:"id"`
	Time    time.Time      `json:"time"`
	Level   string         `json:"level"`
	Msg     string         `json:"msg"`
	Partner string         `json:"partner,omitempty"`
	Attrs   map[string]any `json:"attrs,omitempty"`
}

// Tail keeps the latest log records for the page's live log: the same
// records the process writes to stderr, numbered so that a reconnecting
// page resumes where it left off (Server-Sent Events, Last-Event-ID).
type Tail struct {
	mu      sync.Mutex
	ring    []Entry // once full, written over in a circle: the oldest at start
	start   int
	next    uint64 // id of the next entry
	changed chan struct{}
}

// NewTail returns a Tail keeping the last size records (default 5000).
func NewTail(size int) *Tail {
	if size <= 0 {
		size = 5000
	}
	return &Tail{ring: make([]Entry, 0, size), next: 1, changed: make(chan struct{})}
}

func (t *Tail) add(e Entry) {
	t.mu.Lock()
	e.ID = t.next
	t.next++
	if len(t.ring) < cap(t.ring) {
		t.ring = append(t.ring, e)
	} else {
		t.ring[t.start] = e
		t.start = (t.start + 1) % len(t.ring)
	}
	close(t.changed)
	t.changed = make(chan struct{})
	t.mu.Unlock()
}

// Since returns the kept entries with an id above after, oldest first, and
// a channel closed when the next entry is added.
func (t *Tail) Since(after uint64) ([]Entry, <-chan struct{}) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := len(t.ring)
	// Ids run on without gaps: the newest k are those after after.
	k := 0
	if last := t.next - 1; after < last {
		k = int(min(last-after, uint64(n)))
	}
	out := make([]Entry, 0, k)
	for i := n - k; i < n; i++ {
		out = append(out, t.ring[(t.start+i)%n])
	}
	return out, t.changed
}

// Handler returns a slog.Handler that passes every record to next and
// keeps those at level or above in the tail.
func (t *Tail) Handler(next slog.Handler, level slog.Leveler) slog.Handler {
	return &tailHandler{tail: t, next: next, level: level}
}

type tailHandler struct {
	tail   *Tail
	next   slog.Handler
	level  slog.Leveler
	attrs  []slog.Attr // from WithAttrs, group-qualified
	groups []string
}

func (h *tailHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.level.Level() || h.next.Enabled(ctx, l)
}

func (h *tailHandler) Handle(ctx context.Context, r slog.Record) error {
	var err error
	if h.next.Enabled(ctx, r.Level) {
		err = h.next.Handle(ctx, r)
	}
	if r.Level < h.level.Level() {
		return err
	}
	e := Entry{Time: r.Time, Level: r.Level.String(), Msg: r.Message, Attrs: map[string]any{}}
	for _, a := range h.attrs {
		flatten(e.Attrs, "", a)
	}
	prefix := groupPrefix(h.groups)
	r.Attrs(func(a slog.Attr) bool {
		flatten(e.Attrs, prefix, a)
		return true
	})
	if p, ok := e.Attrs["partner"].(string); ok {
		e.Partner = p
	}
	if len(e.Attrs) == 0 {
		e.Attrs = nil
	}
	h.tail.add(e)
	return err
}

func (h *tailHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.next = h.next.WithAttrs(as)
	prefix := groupPrefix(h.groups)
	c.attrs = append([]slog.Attr(nil), h.attrs...)
	for _, a := range as {
		c.attrs = append(c.attrs, slog.Attr{Key: prefix + a.Key, Value: a.Value})
	}
	return &c
}

func (h *tailHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.next = h.next.WithGroup(name)
	c.groups = append(append([]string(nil), h.groups...), name)
	return &c
}

func groupPrefix(groups []string) string {
	p := ""
	for _, g := range groups {
		p += g + "."
	}
	return p
}

// flatten puts a into m, groups as dotted keys, values as JSON-friendly
// scalars (errors and other values as their text).
func flatten(m map[string]any, prefix string, a slog.Attr) {
	v := a.Value.Resolve()
	if v.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, g := range v.Group() {
			flatten(m, p, g)
		}
		return
	}
	if a.Key == "" {
		return
	}
	switch v.Kind() {
	case slog.KindString:
		m[prefix+a.Key] = v.String()
	case slog.KindInt64:
		m[prefix+a.Key] = v.Int64()
	case slog.KindUint64:
		m[prefix+a.Key] = v.Uint64()
	case slog.KindFloat64:
		m[prefix+a.Key] = v.Float64()
	case slog.KindBool:
		m[prefix+a.Key] = v.Bool()
	case slog.KindDuration:
		m[prefix+a.Key] = v.Duration().String()
	case slog.KindTime:
		m[prefix+a.Key] = v.Time().Format(time.RFC3339Nano)
	default:
		m[prefix+a.Key] = v.String()
	}
}
