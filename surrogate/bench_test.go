package surrogate

import (
	"context"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

// BenchmarkRoundTrip measures one connection sending messages one after the
// other through a surrogate with a real store (in $HL7MAIL_BENCH_DIR when
// set, e.g. on tmpfs to leave out the disk) and logs encoded as JSON.
func BenchmarkRoundTrip(b *testing.B) {
	msgs, err := corpus.Default()
	if err != nil {
		b.Fatal(err)
	}
	dir := os.Getenv("HL7MAIL_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	log := slog.New(slog.NewJSONHandler(io.Discard, nil))
	st, err := store.Open(store.Options{Dir: dir, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	s, err := New(Options{Partner: "lab", Spool: st, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	ln, err := Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(ln)
	defer s.Close()
	c, err := mllp.Dial(context.Background(), ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		if _, err := c.Send(ctx, msgs[i%len(msgs)]); err != nil {
			b.Fatal(err)
		}
	}
}
