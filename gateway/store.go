package gateway

import (
	"context"

	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/deliver"
	"github.com/hl7mail/hl7mail/inbound"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/outbound"
	"github.com/hl7mail/hl7mail/pgstore"
	"github.com/hl7mail/hl7mail/store"
)

// Store is what an instance runs on: the embedded store (*store.Store) of
// a single node, or the shared database of a cluster (*pgstore.Store).
// Each service declares what it needs; this is all of it, with what the
// operators' commands and the dashboard read.
type Store interface {
	outbound.Store
	outbound.Receipts
	deliver.Store
	inbound.Store
	notify.Store
	dashboard.Store
	// OnIngest is told of new messages committed, with their partner and
	// direction; for a cluster, those any node committed.
	OnIngest(f func(partner string, d store.Direction))
	StateOf(ctx context.Context, id int64) (store.State, error)
	Retry(ctx context.Context, id int64) error
	RetryAll(ctx context.Context, partner string) (map[string]int, error)
	List(ctx context.Context, f store.Filter) ([]store.Message, error)
	// Flush returns once every message accepted before it is in the
	// database the queues are read from.
	Flush(ctx context.Context) error
	Close() error
}

var _ Store = (*store.Store)(nil)

// Records returns the instance's store, as the dashboard reads it.
func (g *Gateway) Records() dashboard.Store { return g.store }

var _ Store = (*pgstore.Store)(nil)
