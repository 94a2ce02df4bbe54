// Package deliver hands stored partner messages to the hospital's router
// over MLLP (draft-ietf-ediint-hl7-02 §6.2): the Deliverer, one partner at
// a time in the order received (or by sequence number), splitting batches
// where configured; the Responder that answers each with a signed receipt
// bundled with the router's response; and SweepStuck, which alerts
// messages the router does not take.
//
// It imports, of this module, only config, hl7, internal/partnerq, mllp,
// notify, security, store.
package deliver
