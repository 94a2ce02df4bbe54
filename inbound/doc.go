// Package inbound takes partner mail in (draft-ietf-ediint-hl7-02 §6.2,
// §6.4): the Watcher fetches it over IMAP (the MTA pipe hands it over
// directly), and the Receiver journals it, opens and verifies it with the
// partner's suite, and stores the HL7 for the router, records the receipt
// or bounce it carries against what was sent (Reconcile), or quarantines it
// with a reason and, where the partner asked, a refusal receipt.
//
// It imports, of this module, only config, hl7, journal, link, notify,
// security, store.
package inbound
