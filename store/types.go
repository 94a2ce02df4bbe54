package store

import (
	"errors"
	"log/slog"
	"time"

	"github.com/hl7mail/hl7mail/spool"
)

// Direction says which way a message travels.
type Direction = spool.Direction

// Directions.
const (
	Outbound = spool.Outbound // router → partner (received by a surrogate)
	Inbound  = spool.Inbound  // partner → router (received by mail)
)

// State is where a message is in its life.
type State string

// States.
const (
	// Queued: durable and waiting to be sent.
	Queued State = "queued"
	// Duplicate: a resend of a message already stored (same partner,
	// direction, control ID and payload); kept as evidence, never sent.
	Duplicate State = "duplicate"
	// Sent: handed to the SMTP server; its receipt is pending.
	Sent State = "sent"
	// Failed: refused for good (an SMTP 5xx reply, or no usable key).
	Failed State = "failed"
	// Expired: not delivered within the partner's expire_after
	// (deleted/expired, draft-ietf-ediint-hl7-02 §4.1.3 table 5).
	Expired State = "expired"
	// Bounced: the mail was sent, and a mail server reported it could not
	// be delivered (a DSN, RFC 3464, with Action: failed).
	Bounced State = "bounced"
	// Acknowledged: the partner's receipt matched (Message-ID and MIC).
	Acknowledged State = "acknowledged"
	// Delivered: an inbound message the router acknowledged.
	Delivered State = "delivered"
)

// ErrClosed is returned by Accept after Close.
var ErrClosed = spool.ErrClosed

// ErrLocked is returned by Open when another process has the store open.
var ErrLocked = spool.ErrLocked

// ErrBacklog is returned by Accept while too many accepted messages wait
// for the database (Options.MaxBacklog).
var ErrBacklog = spool.ErrBacklog

// ErrReadOnly is returned by Accept on a store opened with OpenReadOnly.
var ErrReadOnly = errors.New("store: opened read-only")

// ErrNotFound is returned when no message has the given id.
var ErrNotFound = errors.New("store: no such message")

// FileName is the database file inside the store folder.
const FileName = "hl7mail.db"

// NewMessage is a message to take responsibility for.
type NewMessage = spool.Message

// Message kinds.
const (
	// KindHL7: an HL7 message from the router to a partner.
	KindHL7 = "hl7"
	// KindBundle: a response bundle to a partner (HL7 response and MDN,
	// draft-ietf-ediint-hl7-02 §4.1.4), signed and encrypted as it is.
	KindBundle = "bundle"
	// KindRequest: an HL7 message from a partner; it gets a response.
	KindRequest = "request"
	// KindResponse: a partner's HL7 response to one of ours; it gets none.
	KindResponse = "response"
)

// Accepted is the outcome of Accept.
type Accepted = spool.Accepted

// CommitStats describe the group commits made since Open.
type CommitStats = spool.CommitStats

// Message is a stored message. Payload is filled only by Get.
type Message struct {
	ID          int64     `json:"id"`
	Direction   Direction `json:"direction"`
	Partner     string    `json:"partner"`
	ControlID   string    `json:"control_id"`
	MessageType string    `json:"message_type"`
	MessageID   string    `json:"message_id"`
	State       State     `json:"state"`
	DuplicateOf int64     `json:"duplicate_of,omitempty"`
	Size        int       `json:"size"`
	SHA256      []byte    `json:"sha256"`
	Received    time.Time `json:"received"`
	Updated     time.Time `json:"updated"`
	MIC         string    `json:"mic,omitempty"`
	Kind        string    `json:"kind"`
	InReplyTo   string    `json:"in_reply_to,omitempty"`
	// Retried is when an operator last put the message back in its queue;
	// expire_after counts from then.
	Retried   time.Time `json:"retried,omitzero"`
	Recipient string    `json:"recipient,omitempty"`
	// ReceiptNote and AnswerTo: see NewMessage.
	ReceiptNote string `json:"receipt_note,omitempty"`
	AnswerTo    string `json:"answer_to,omitempty"`
	Payload     []byte `json:"-"`
}

// Options configure Open.
type Options struct {
	// Dir is the store folder (required); it is created when missing.
	Dir string
	// Logger receives the store's records (default slog.Default()).
	Logger *slog.Logger
	// MaxBatch bounds how many messages share one sync (default 256).
	MaxBatch int
	// MaxBacklog bounds the messages accepted and not yet in the database
	// (default spool.DefaultMaxBacklog); past it Accept returns ErrBacklog.
	MaxBacklog int64
	// Now returns the current time (default time.Now).
	Now func() time.Time

	segmentSize int64 // spool log segment size (tests)
}

// directionIs is the SQL condition that a message goes in direction d,
// with d written in, not bound. Bound, it would make SQLite plan the
// statement again at every run: a plan that may use a partial index (those
// on direction) depends on the value, so SQLite marks the statement to be
// prepared again whenever that parameter is bound. An unknown direction
// matches nothing.
func directionIs(d Direction) string {
	switch d {
	case Inbound:
		return "direction = 'in'"
	case Outbound:
		return "direction = 'out'"
	}
	return "0"
}
