package deliver

import (
	"context"
	"time"

	"github.com/hl7mail/hl7mail/internal/partnerq"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/store"
)

// Store is what the Deliverer and the Responder need of the store;
// *store.Store is one. It is declared here, where it is used, so that
// another backend can stand in.
type Store interface {
	partnerq.Source
	notify.Alerts
	Stuck
	Accept(ctx context.Context, m store.NewMessage) (store.Accepted, error)
	QueuedHeads(ctx context.Context, partner string, d store.Direction, limit int) ([]store.QueuedMessage, error)
	Get(ctx context.Context, id int64) (store.Message, error)
	ByMessageID(ctx context.Context, id string) (store.Message, error)
	Unanswered(ctx context.Context) ([]store.Message, error)
	MarkDelivered(ctx context.Context, id int64, ack []byte) error
	MarkRetry(ctx context.Context, id int64, reason string, next time.Time) error
	MarkFinal(ctx context.Context, id int64, state store.State, reason string) error
	Value(ctx context.Context, key string) (string, error)
	SetValue(ctx context.Context, key, value string) error
}

// Stuck is what SweepStuck needs of the store.
type Stuck interface {
	Stuck(ctx context.Context, partner string, d store.Direction, cutoff time.Time) ([]store.Message, error)
	Delivery(ctx context.Context, id int64) (attempts int, next time.Time, lastError string, err error)
	RaiseOnceEver(ctx context.Context, key string, a store.Alert) (raised bool, err error)
}
