package security_test

import (
	"fmt"
	"strings"

	"github.com/hl7mail/hl7mail/security"
)

// An HL7 message travels as a MIME-EDI entity (draft-ietf-ediint-hl7-02
// §2), base64 so that its bare CRs arrive as they left.
func ExampleEncodeEDI() {
	hl7 := []byte("MSH|^~\\&|A|B|C|D|20261201||ADT^A01|1|P|2.5\rPID|1\r")
	entity, err := security.EncodeEDI(hl7, security.EDIOptions{})
	if err != nil {
		panic(err)
	}
	for _, line := range strings.Split(string(entity), "\r\n") {
		if strings.HasPrefix(line, "Content-") {
			fmt.Println(line)
		}
		if line == "" {
			break
		}
	}
	back, _, err := security.DecodeEDI(entity, security.Accept{})
	fmt.Println(string(back) == string(hl7), err)
	// Unordered output:
	// Content-Type: application/edi-hl7
	// Content-Transfer-Encoding: base64
	// true <nil>
}

// A receipt (RFC 8098) names the mail it answers and the MIC of what was
// received; ParseMDN reads what Entity writes.
func ExampleMDN() {
	mic := security.ComputeMIC([]byte("Content-Type: application/edi-hl7\r\n\r\nTVNIfA==\r\n"))
	m := &security.MDN{ReportingUA: "lab.test; hl7mail", FinalRecipient: "lab@lab.test",
		OriginalMessageID: "<1@hospital.test>", Disposition: security.Disposition{Type: security.Processed}, MIC: &mic}
	entity, err := m.Entity()
	if err != nil {
		panic(err)
	}
	got, err := security.ParseMDN(entity)
	if err != nil {
		panic(err)
	}
	fmt.Println(got.OriginalMessageID, got.Disposition.Status(), got.MIC.Equal(mic))
	// Output: <1@hospital.test> processed true
}
