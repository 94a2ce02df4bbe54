package inbound

import (
	"context"

	"github.com/hl7mail/hl7mail/journal"
	"github.com/hl7mail/hl7mail/notify"
	"github.com/hl7mail/hl7mail/store"
)

// Store is what the Receiver needs of the store; *store.Store is one. It
// is declared here, where it is used, so that another backend can stand in.
type Store interface {
	journal.Index
	notify.Alerts
	Receipts
	Positions
	Accept(ctx context.Context, m store.NewMessage) (store.Accepted, error)
	FindInbound(ctx context.Context, partner, messageID string) (store.Message, error)
	FindOutbound(ctx context.Context, messageID string) (store.Message, error)
	FindResponse(ctx context.Context, partner, inReplyTo string) (store.Message, error)
	MarkBounced(ctx context.Context, id int64, reason string) (bool, error)
	Requeue(ctx context.Context, id int64) error
	Quarantine(ctx context.Context, q store.Quarantined) (int64, error)
	QuarantineGet(ctx context.Context, id int64) (store.Quarantined, error)
	MarkReleased(ctx context.Context, id int64, by, note string, as int64) error
}

// Receipts is what Reconcile needs of the store: the receipts awaited and
// the reports that came.
type Receipts interface {
	PendingByMessageID(ctx context.Context, messageID string) (store.Pending, error)
	PendingByMIC(ctx context.Context, partner, mic string) ([]store.Pending, error)
	SetReceipt(ctx context.Context, messageID, state, rule string, unsigned bool) (store.Pending, error)
	AddReport(ctx context.Context, r store.Report) (int64, error)
	Reports(ctx context.Context, f store.ReportFilter) ([]store.Report, error)
}

// Positions keeps named values: the Watcher's place in a mailbox.
type Positions interface {
	Value(ctx context.Context, key string) (string, error)
	SetValue(ctx context.Context, key, value string) error
}
