package spool

import "errors"

// Direction says which way a message travels.
type Direction string

// Directions.
const (
	Outbound Direction = "out" // router → partner (received by a surrogate)
	Inbound  Direction = "in"  // partner → router (received by mail)
)

// Message is a message to take responsibility for.
type Message struct {
	Direction   Direction
	Partner     string
	ControlID   string // MSH-10
	MessageType string // MSH-9
	Payload     []byte
	// MessageID and MIC are those of the mail an inbound message came in:
	// a replay is recognized by the first, the receipt carries the second.
	MessageID string
	MIC       string
	// Kind says what the payload is (the store's kinds; default hl7).
	Kind string
	// InReplyTo is the Message-ID of the mail an outbound response answers.
	InReplyTo string
	// Recipient is the address of ours an inbound message was sent to.
	Recipient string
	// ReceiptNote is a warning for the receipt an inbound message gets
	// (processed/warning), in our own words.
	ReceiptNote string
	// AnswerTo is the partner an inbound request's answer goes to when it
	// is not the sender (a return route, draft-ietf-ediint-hl7-02 §4.1.4).
	AnswerTo string
}

// Accepted is the outcome of Accept.
type Accepted struct {
	ID int64 // the message's id, in the order messages were accepted
}

// CommitStats describe the group commits made since Open.
type CommitStats struct {
	Commits  int64 // syncs of the spool log (or failed attempts)
	Messages int64 // messages in them
}

// Errors of Accept and Open.
var (
	// ErrClosed is returned by Accept after Stop or Close.
	ErrClosed = errors.New("store: closed")
	// ErrLocked is returned by Open when another process has the spool open.
	ErrLocked = errors.New("store: in use by another hl7mail process")
	// ErrBacklog is returned by Accept while more messages wait for the
	// database than Options.MaxBacklog: the message is not taken (a
	// surrogate answers CE, and the router sends it again later), so that a
	// database that stalls for long does not fill the disk with the log.
	ErrBacklog = errors.New("store: too many accepted messages wait for the database; send again later")
)
