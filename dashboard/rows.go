package dashboard

import (
	"context"
	"time"

	"github.com/hl7mail/hl7mail/config"
	"github.com/hl7mail/hl7mail/link"
	"github.com/hl7mail/hl7mail/store"
)

// PartnerRow is one partner as the page and "hl7mail status" show it.
type PartnerRow struct {
	Name     string `json:"name"`
	Email    string `json:"email"`
	Security string `json:"security"`
	Listen   string `json:"listen"`
	// Connections is the number of open router connections; -1 when the
	// instance is not running.
	Connections int `json:"connections"`
	store.Summary
	SMTP link.Status `json:"smtp"`
	IMAP link.Status `json:"imap"`
}

// Live is what only a running instance knows.
type Live interface {
	Connections(partner string) int
	SMTPStatus() link.Status
	IMAPStatus() link.Status
	// IMAPStatusFor is the state of the account partner's mail comes to
	// (its local address's own account, or the imap section's).
	IMAPStatusFor(partner string) link.Status
}

// Rows returns a row per configured partner, in the configuration's order,
// with the counts of st ("today" since local midnight). live may be nil for
// a stopped instance.
func Rows(ctx context.Context, cfg *config.Config, st Store, live Live) ([]PartnerRow, error) {
	now := time.Now()
	midnight := time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, now.Location())
	sums, err := st.Summaries(ctx, midnight)
	if err != nil {
		return nil, err
	}
	rows := make([]PartnerRow, 0, len(cfg.Partners))
	for _, p := range cfg.Partners {
		row := PartnerRow{Name: p.Name, Email: p.Email, Security: string(p.Security), Listen: p.Listen, Connections: -1,
			SMTP: link.Status{State: "stopped"}, IMAP: link.Status{State: "stopped"}}
		if s := sums[p.Name]; s != nil {
			row.Summary = *s
		}
		row.Partner = p.Name
		if live != nil {
			row.Connections = live.Connections(p.Name)
			row.SMTP, row.IMAP = live.SMTPStatus(), live.IMAPStatusFor(p.Name)
		}
		rows = append(rows, row)
	}
	return rows, nil
}

// Store is what the dashboard, the status and /metrics read: the embedded
// store of a node, or a cluster's shared one.
type Store interface {
	Summaries(ctx context.Context, since time.Time) (map[string]*store.Summary, error)
	Counts(ctx context.Context) ([]store.Count, error)
	Activity(ctx context.Context, since, now time.Time, step time.Duration) (map[string]*store.Activity, error)
	Alerts(ctx context.Context, all bool, limit int) ([]store.Alert, error)
	AckAlert(ctx context.Context, id int64, who string) error
	OpenAlerts(ctx context.Context) (int, error)
	Search(ctx context.Context, q string, limit int) ([]store.Message, error)
	Reports(ctx context.Context, f store.ReportFilter) ([]store.Report, error)
	QuarantineList(ctx context.Context, limit int) ([]store.Quarantined, error)
	QuarantineReasons(ctx context.Context) (map[string]int, error)
	// Backlog is the number of messages accepted and not yet in the
	// database; Stats the commits made and the messages in them.
	Backlog() int64
	Stats() store.CommitStats
}

// ClusterView is a cluster as any of its nodes shows it (GET /api/cluster,
// the page, "hl7mail status", /metrics).
type ClusterView struct {
	Node  string        `json:"node"`  // the node answering
	Lease string        `json:"lease"` // how long a role may go unrenewed
	Nodes []ClusterNode `json:"nodes"`
	Roles []ClusterRole `json:"roles"`
}

// ClusterNode is one node: its last heartbeat, whether that is within the
// lease, how many roles it holds, and what it took today.
type ClusterNode struct {
	Name  string    `json:"name"`
	Seen  time.Time `json:"seen"`
	Live  bool      `json:"live"`
	Roles int       `json:"roles"`
	// TakenToday are the messages the node took today (from the router
	// and from mail), counted once however many nodes were sent one.
	TakenToday int `json:"taken_today"`
}

// ClusterRole is a role and the node holding it ("" while none does);
// Running once that node runs it (after the fence wait), as of its last
// heartbeat.
type ClusterRole struct {
	Role    string `json:"role"`
	Node    string `json:"node"`
	Running bool   `json:"running"`
}
