// Package embedded holds the parts that stand in for the outside world in
// the demo and in tests: a mail system in one process (an SMTP server that
// delivers into IMAP accounts, and an SMTP server that only records), and an
// HL7 router that records what it receives and answers AA.
//
// It imports, of this module, only hl7, mllp.
package embedded
