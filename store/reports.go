package store

import (
	"context"
	"database/sql"
	"time"
)

// Report is a report that came back about a mail of ours: a partner's MDN
// (RFC 8098; draft-ietf-ediint-hl7-02 §4.1.3) or a mail server's
// delivery-status notification (RFC 3464). Every one is recorded, matched
// or not, so that the evidence of what came back is complete: a message
// can get several (processed, then dispatched), and a receipt that matches
// nothing is kept with why. The mail itself is in the incoming journal
// under MailMessageID.
type Report struct {
	ID       int64     `json:"id"`
	Received time.Time `json:"received"`
	Type     string    `json:"type"` // ReportMDN or ReportDSN
	Partner  string    `json:"partner,omitempty"`
	// Message is the stored outbound message the report is about, 0 when
	// it names none of ours.
	Message int64 `json:"message,omitempty"`
	// OriginalMessageID is the Message-ID of our mail the report names.
	OriginalMessageID string `json:"original_message_id,omitempty"`
	// MailMessageID is the Message-ID of the report's own mail.
	MailMessageID string `json:"mail_message_id,omitempty"`
	// Disposition is an MDN's disposition ("processed/warning"), or a
	// DSN's action ("failed", "delayed").
	Disposition string `json:"disposition"`
	// Detail is an MDN's error, failure or warning, or a DSN's status and
	// diagnostic code, in bounded words.
	Detail string `json:"detail,omitempty"`
	// Outcome is what hl7mail made of it: matched, mic-mismatch,
	// error-disposition, unknown for an MDN; bounced, delayed, unknown for
	// a DSN.
	Outcome   string `json:"outcome"`
	MatchedBy string `json:"matched_by,omitempty"`
	Unsigned  bool   `json:"unsigned,omitempty"`
	// FinalDelivery is set for a dispatched MDN that says the message
	// reached its final destination (Direct's
	// X-DIRECT-FINAL-DESTINATION-DELIVERY).
	FinalDelivery bool `json:"final_delivery,omitempty"`
}

// Report types.
const (
	ReportMDN = "mdn"
	ReportDSN = "dsn"
)

const reportColumns = `id, received, type, partner, message, original_message_id, mail_message_id, disposition, detail,
	outcome, matched_by, unsigned, final_delivery`

func scanReport(scan func(...any) error) (Report, error) {
	var r Report
	var received int64
	err := scan(&r.ID, &received, &r.Type, &r.Partner, &r.Message, &r.OriginalMessageID, &r.MailMessageID,
		&r.Disposition, &r.Detail, &r.Outcome, &r.MatchedBy, &r.Unsigned, &r.FinalDelivery)
	r.Received = time.UnixMicro(received)
	return r, err
}

// AddReport records a report and returns its id.
func (s *Store) AddReport(ctx context.Context, r Report) (int64, error) {
	var id int64
	err := s.update(ctx, 0, func(tx *sql.Tx, now int64) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO reports (received, type, partner, message, original_message_id,
			mail_message_id, disposition, detail, outcome, matched_by, unsigned, final_delivery)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, now, r.Type, r.Partner, r.Message, r.OriginalMessageID,
			r.MailMessageID, r.Disposition, r.Detail, r.Outcome, r.MatchedBy, r.Unsigned, r.FinalDelivery)
		if err != nil {
			return err
		}
		id, err = res.LastInsertId()
		return err
	})
	return id, err
}

// ReportFilter selects reports; zero fields select all.
type ReportFilter struct {
	Partner string
	Message int64
	// MailMessageID selects the report that came in that mail.
	MailMessageID string
	Limit         int // default 100
}

// Reports lists reports, newest first.
func (s *Store) Reports(ctx context.Context, f ReportFilter) ([]Report, error) {
	q := `SELECT ` + reportColumns + ` FROM reports WHERE 1 = 1`
	var args []any
	if f.Partner != "" {
		q += ` AND partner = ?`
		args = append(args, f.Partner)
	}
	if f.Message != 0 {
		q += ` AND message = ?`
		args = append(args, f.Message)
	}
	if f.MailMessageID != "" {
		q += ` AND mail_message_id = ?`
		args = append(args, f.MailMessageID)
	}
	if f.Limit <= 0 {
		f.Limit = 100
	}
	q += ` ORDER BY id DESC LIMIT ?`
	args = append(args, f.Limit)
	return queryAll(ctx, s.db, "reports", scanReport, q, args...)
}
