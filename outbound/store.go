package outbound

import (
	"context"
	"time"

	"github.com/hl7mail/hl7mail/internal/partnerq"
	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/store"
)

// Store is what the Sender needs of the store; *store.Store is one. It is
// declared here, where it is used, so that another backend can stand in.
type Store interface {
	partnerq.Source
	journal.Index
	notify.Alerts
	QueuedAfter(ctx context.Context, partner string, d store.Direction, now time.Time, after int64, limit int) ([]store.Message, error)
	PrepareAll(ctx context.Context, ps []store.Preparation) error
	MarkSentAll(ctx context.Context, ids []int64) error
	MarkRetry(ctx context.Context, id int64, reason string, next time.Time) error
	MarkFinal(ctx context.Context, id int64, state store.State, reason string) error
	Delivery(ctx context.Context, id int64) (attempts int, next time.Time, lastError string, err error)
	RaiseOnce(ctx context.Context, key string, a store.Alert) (id int64, raised bool, err error)
	ClearAlert(ctx context.Context, key string) (bool, error)
	OpenAlertKeys(ctx context.Context, prefix string) ([]string, error)
	Reschedule(ctx context.Context, d store.Direction, partner string) error
}

// Receipts is what Sweep needs of the store; *store.Store is one.
type Receipts interface {
	notify.Alerts
	Overdue(ctx context.Context, now time.Time) ([]store.Pending, error)
}
