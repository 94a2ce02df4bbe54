package security

import (
	"crypto"
	"fmt"
	netmail "net/mail"
	"strings"

	"github.com/emersion/go-message/textproto"
)

// MDNRequest is what a sender asks for with Disposition-Notification-To and
// Disposition-Notification-Options (RFC 8098 §2.1; RFC 3335 §4, RFC 4130
// §7.3).
type MDNRequest struct {
	To string // the address the MDN is asked for at
	// Protocol is the signed-receipt-protocol: pgp-signature or
	// pkcs7-signature; empty for an unsigned receipt.
	Protocol string
	// MICAlgs are the signed-receipt-micalg values in order of preference.
	MICAlgs []string
	// Required is true when the signed receipt was asked for as required;
	// MICRequired when the MIC algorithms were.
	Required, MICRequired bool
	// Unreadable is set when the options (or the address) could not be
	// read: the receipt is then made as the partner's configuration says,
	// with a warning, rather than the mail refused.
	Unreadable bool
}

// Headers returns the two header field values.
func (r MDNRequest) Headers() (to, options string) {
	if r.Protocol == "" {
		return r.To, ""
	}
	imp := "optional"
	if r.Required {
		imp = "required"
	}
	algs := r.MICAlgs
	if len(algs) == 0 {
		algs = []string{"sha-256"}
	}
	return r.To, fmt.Sprintf("signed-receipt-protocol=%s, %s; signed-receipt-micalg=%s, %s",
		imp, r.Protocol, imp, strings.Join(algs, ", "))
}

// ParseMDNRequest reads the request from a mail header: nil when none was
// made. The draft's older "0,<protocol>" syntax is accepted as well. What
// cannot be read sets Unreadable: a sender's odd options header costs it
// its preferences, never its message.
func ParseMDNRequest(h textproto.Header) *MDNRequest {
	to := h.Get("Disposition-Notification-To")
	if to == "" {
		return nil
	}
	r := &MDNRequest{}
	if addr, err := netmail.ParseAddress(to); err == nil {
		r.To = addr.Address
	} else {
		r.Unreadable = true
	}
	opts := h.Get("Disposition-Notification-Options")
	for _, p := range strings.Split(opts, ";") {
		if strings.TrimSpace(p) == "" {
			continue
		}
		name, v, ok := strings.Cut(p, "=")
		vals := strings.Split(v, ",")
		for i := range vals {
			vals[i] = strings.ToLower(strings.TrimSpace(vals[i]))
		}
		if !ok || len(vals) < 2 || vals[1] == "" {
			r.Unreadable = true
			continue
		}
		required := vals[0] == "required" || vals[0] == "1"
		if !required && vals[0] != "optional" && vals[0] != "0" {
			r.Unreadable = true
			continue
		}
		switch strings.ToLower(strings.TrimSpace(name)) {
		case "signed-receipt-protocol":
			r.Protocol, r.Required = vals[1], required
		case "signed-receipt-micalg":
			r.MICAlgs, r.MICRequired = vals[1:], required
		}
		// Other parameters (Direct's X-DIRECT-FINAL-DESTINATION-DELIVERY)
		// ask for nothing this gateway must refuse.
	}
	return r
}

// ProtocolFits reports whether a receipt signed with suite ("pgp" or
// "smime") is one of the requested signed-receipt-protocol, or none was
// named.
func (r MDNRequest) ProtocolFits(suite string) bool {
	switch strings.TrimPrefix(r.Protocol, "application/") {
	case "":
		return true
	case "pgp-signature":
		return suite == "pgp"
	case "pkcs7-signature", "x-pkcs7-signature":
		return suite == "smime"
	}
	return false
}

// MICHash returns the first requested signed-receipt-micalg this package
// computes, and false when none was asked for or none is known (or one is
// known only as weak, md5).
func (r MDNRequest) MICHash() (crypto.Hash, bool) {
	for _, a := range r.MICAlgs {
		if h, err := parseDigestName(a); err == nil {
			return h, true
		}
	}
	return 0, false
}
