package security

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/emersion/go-message/textproto"
)

var update = flag.Bool("update", false, "rewrite the golden files")

func TestMDNRoundTrip(t *testing.T) {
	mic := ComputeMIC([]byte("Content-Type: application/edi-hl7\r\n\r\nTVNI\r\n"))
	for _, d := range []Disposition{
		{Processed, ""}, {Processed, ModError}, {Processed, ModWarning}, {Failed, ""}, {Dispatched, ""},
		{Deleted, ModExpired}, {Deleted, ModSuperseded}, {Denied, ""},
	} {
		in := &MDN{ReportingUA: "lab.partner.test; hl7mail", OriginalRecipient: "lab@partner.test",
			FinalRecipient: "lab@partner.test", OriginalMessageID: "<a1.b2@hospital.test>", Disposition: d, MIC: &mic}
		if d.Modifier == ModError || d.Type == Failed {
			in.Error = "signature did not verify"
		}
		e, err := in.Entity()
		if err != nil {
			t.Fatal(err)
		}
		if Classify(e) != KindMDN {
			t.Errorf("%s: Classify = %s", d, Classify(e))
		}
		out, err := ParseMDN(e)
		if err != nil {
			t.Fatalf("%s: ParseMDN: %v", d, err)
		}
		in.Text = defaultText(d)
		if !reflect.DeepEqual(in, out) {
			t.Errorf("%s: ParseMDN(Entity()) = %+v, want %+v", d, out, in)
		}
	}
}

func TestParseMDNForeign(t *testing.T) {
	// The draft's §5 MDN: LF line ends, other capitalization. Its MIC is
	// written in hex, which no receiver can read: reported as malformed.
	draft := "Content-Type: multipart/report;\n   report-type=\"disposition-notification\";\n   boundary=\"repbound\"\n\n" +
		"--repbound\nContent-Type: text/plain\n\nyour message has been processed\n\n--repbound\n" +
		"Content-Type: message/disposition-notification\nContent-Transfer-Encoding: 7bit\n\n" +
		"Reporting-UA: lab.tucker-general.edu; EDISend v1.0\nFinal-Recipient: rfc822;request@lab.tucker-general.edu\n" +
		"Original-Message-Id: <edi883157166.1607@schadow.practice.net>\n" +
		"Disposition: automatic-action/MDN-sent-automatically; processed\n" +
		"Received-content-MIC: %s\n\n--repbound--\n"
	m, err := ParseMDN([]byte(strings.Replace(draft, "%s", "7v7F++fQaNUKPlsQEHLN1s0rFDo=, SHA1", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if m.FinalRecipient != "request@lab.tucker-general.edu" || m.OriginalMessageID != "<edi883157166.1607@schadow.practice.net>" ||
		!m.Disposition.OK() || m.MIC == nil || m.Text != "your message has been processed" {
		t.Errorf("ParseMDN(draft) = %+v", m)
	}
	if _, err := ParseMDN([]byte(strings.Replace(draft, "%s", "54ee0a959b7a92fdbe766538c948dbfeccdeb2,sha1", 1))); !errors.Is(err, ErrMalformed) {
		t.Errorf("ParseMDN(hex MIC) = %v, want ErrMalformed", err)
	}
	bad := []string{
		strings.Replace(draft, "processed", "exploded", 1),
		strings.Replace(draft, "Final-Recipient", "X-Final", 1),
		strings.Replace(draft, "message/disposition-notification", "text/plain", 1),
		"Content-Type: text/plain\n\nhello\n",
	}
	for _, b := range bad {
		if _, err := ParseMDN([]byte(b)); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseMDN(%q) = %v, want ErrMalformed", b, err)
		}
	}
}

func TestMDNRequest(t *testing.T) {
	header := func(lines ...string) textproto.Header {
		h, err := textproto.ReadHeader(bufio.NewReader(strings.NewReader(strings.Join(lines, "\r\n") + "\r\n\r\n")))
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	to, opts := MDNRequest{To: "edi@hospital.test", Protocol: "pgp-signature"}.Headers()
	r := ParseMDNRequest(header("Disposition-Notification-To: "+to, "Disposition-Notification-Options: "+opts))
	if r == nil || r.Unreadable || r.To != "edi@hospital.test" || r.Protocol != "pgp-signature" ||
		!reflect.DeepEqual(r.MICAlgs, []string{"sha-256"}) || !r.ProtocolFits("pgp") || r.ProtocolFits("smime") {
		t.Errorf("ParseMDNRequest(Headers()) = %+v (options %q)", r, opts)
	}
	// The draft's §5 syntax, folded over lines. MD5 is not computed: no
	// algorithm is known, and it was optional.
	r = ParseMDNRequest(header("Disposition-Notification-To: oe@schadow.practice.net",
		"Disposition-Notification-Options:", "   signed-receipt-protocol=0,application/pgp-signature;",
		"   signed-receipt-micalg=0,pgp-md5"))
	if _, ok := r.MICHash(); r.Unreadable || r.Protocol != "application/pgp-signature" || r.MICAlgs[0] != "pgp-md5" ||
		r.Required || r.MICRequired || ok || !r.ProtocolFits("pgp") {
		t.Errorf("ParseMDNRequest(draft) = %+v", r)
	}
	r = ParseMDNRequest(header("Disposition-Notification-To: \"EDI\" <edi@h.test>",
		"Disposition-Notification-Options: signed-receipt-protocol=required, pkcs7-signature; signed-receipt-micalg=required, sha-512, sha1"))
	if h, ok := r.MICHash(); r.To != "edi@h.test" || !r.Required || !r.MICRequired || h != crypto.SHA512 || !ok ||
		!reflect.DeepEqual(r.MICAlgs, []string{"sha-512", "sha1"}) || !r.ProtocolFits("smime") || r.ProtocolFits("pgp") {
		t.Errorf("ParseMDNRequest(required) = %+v", r)
	}
	if r := ParseMDNRequest(header("Subject: x")); r != nil {
		t.Errorf("ParseMDNRequest(no request) = %+v", r)
	}
	// What cannot be read marks the request, and never refuses it.
	for _, lines := range [][]string{
		{"Disposition-Notification-To: not an address"},
		{"Disposition-Notification-To: edi@h.test", "Disposition-Notification-Options: signed-receipt-protocol"},
		{"Disposition-Notification-To: edi@h.test", "Disposition-Notification-Options: signed-receipt-protocol=required"},
		{"Disposition-Notification-To: edi@h.test", "Disposition-Notification-Options: signed-receipt-protocol=maybe, pgp-signature"},
	} {
		if r := ParseMDNRequest(header(lines...)); r == nil || !r.Unreadable || r.Required {
			t.Errorf("ParseMDNRequest(%q) = %+v, want a request marked unreadable", lines, r)
		}
	}
}

func TestMDNReason(t *testing.T) {
	for _, c := range []struct {
		m    MDN
		want string
	}{
		{MDN{Error: "Decryption-Failed"}, "decryption-failed"},
		{MDN{Failure: "unsupported MIC-algorithms"}, "unsupported mic-algorithms"},
		{MDN{Warning: "duplicate-document"}, "duplicate-document"},
		{MDN{Error: "patient Doe not found in PID-3"}, "a reason of its own (30 bytes)"},
		{MDN{}, ""},
	} {
		if got := c.m.Reason(); got != c.want {
			t.Errorf("%+v.Reason() = %q, want %q", c.m, got, c.want)
		}
	}
}

// draftORM and draftORR are the request and response of the draft's §5
// example (its "..." filled in).
const (
	draftORM = "MSH|^~\\&|OE|DR.SCHADOW|LAB|TUCKER-GENERAL|19971226175948||ORM|RQ-O01-001|P|2.2\r" +
		"PID|||08157411||Doe^John||19690219|M|\rPV1||O|||||0123^SCHADOW^GUNTHER||||||||||||12|\r" +
		"ORC|NW|12345|||F|\rOBR||12345||||||19971226175948||7^ML||||||BLDV\r" +
		"ORC|CH|12345-1|||F||12345|\rOBR||12345-1|||5383-5^THYROID MICROSOMAL AB^LN|\r" +
		"ORC|CH|12345-2|||F||12345|\rOBR||12345-2|||5381-9^THYREOGLOBULIN AB^LN|\r" +
		"ORC|CH|12345-3|||F||12345|\rOBR||12345-3|||5385-0^THYREOTROPIN RECEPTOR AB^LN|\r"
	draftORR = "MSH|^~\\&|LAB|TUCKER-GENERAL|OE|DR.SCHADOW|19971226182611||ORR|RP-O01-831|P|2.2\r" +
		"MSA|AA|RQ-O01-001|ORDER ACCEPTED|\rPID||47110815|08157411||Doe^John||||\r" +
		"PV1||O|||||0123^SCHADOW^GUNTHER||||||||||||12|\rORC|OK|12345|54321||SC\r"
)

var boundaryRE = regexp.MustCompile(`hl7mail-[0-9a-f]{30}`)

// normalizeBoundaries numbers the random boundaries in order of appearance.
func normalizeBoundaries(b []byte) []byte {
	seen := map[string]string{}
	return boundaryRE.ReplaceAllFunc(b, func(m []byte) []byte {
		if _, ok := seen[string(m)]; !ok {
			seen[string(m)] = "BOUNDARY-" + strconv.Itoa(len(seen)+1)
		}
		return []byte(seen[string(m)])
	})
}

// TestGoldenDraftExample follows the draft's §5 example: Dr. Schadow's ORM
// to Tucker General's lab, and the ORR that comes back bundled with the MDN
// for the order. The bundle before signing is compared byte for byte with
// testdata/golden/orr-bundle.eml (boundaries numbered); then the order and
// the bundle travel signed and encrypted with both suites and are read back.
func TestGoldenDraftExample(t *testing.T) {
	pgpKeys(t)
	smimeCerts(t)
	request, err := EncodeEDI([]byte(draftORM), EDIOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, requestMIC, err := PGPSign(request, hospital, now)
	if err != nil {
		t.Fatal(err)
	}
	response, _ := EncodeEDI([]byte(draftORR), EDIOptions{})
	mdn := &MDN{ReportingUA: "lab.tucker-general.edu; hl7mail", FinalRecipient: "lab@tucker-general.edu",
		OriginalMessageID: "<edi883157166.1607@schadow.practice.net>", Disposition: Disposition{Type: Processed},
		MIC: &requestMIC, Text: "your message has been processed"}
	mdnEntity, err := mdn.Entity()
	if err != nil {
		t.Fatal(err)
	}
	bundle := BuildBundle(response, mdnEntity)

	golden := filepath.Join("testdata", "golden", "orr-bundle.eml")
	got := normalizeBoundaries(bundle)
	if *update {
		os.MkdirAll(filepath.Dir(golden), 0o755)
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./security -run Golden -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("bundle differs from %s:\n%s", golden, got)
	}

	check := func(suite string, o *Opened, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: open bundle: %v", suite, err)
		}
		if Classify(o.Entity) != KindBundle {
			t.Fatalf("%s: Classify = %s", suite, Classify(o.Entity))
		}
		b, err := ParseBundle(o.Entity)
		if err != nil {
			t.Fatalf("%s: ParseBundle: %v", suite, err)
		}
		orr, _, err := DecodeEDI(b.Response, Accept{})
		if err != nil || string(orr) != draftORR {
			t.Errorf("%s: response %q, %v", suite, orr, err)
		}
		if b.MDN.OriginalMessageID != mdn.OriginalMessageID || !b.MDN.MIC.Equal(requestMIC) || !b.MDN.Disposition.OK() {
			t.Errorf("%s: MDN %+v", suite, b.MDN)
		}
	}
	// The lab signs the bundle as a whole and encrypts it to the hospital.
	signed, _, _ := PGPSign(bundle, lab, now)
	enc, _ := PGPEncrypt(signed, []*openpgp.Entity{hospital}, now)
	o, err := PGPOpen(mail(enc), PGPKeys{Self: openpgp.EntityList{hospital}, Partners: openpgp.EntityList{lab}}, lab, now)
	check("pgp", o, err)
	ssigned, _, _ := SMIMESign(bundle, sLab.cert, sLab.key)
	senc, _ := SMIMEEncrypt(ssigned, []*x509.Certificate{sHospital.cert}, OAEPSHA256)
	o, err = SMIMEOpen(mail(senc), SMIMEKeys{Self: []SMIMEIdentity{{Cert: sHospital.cert, Key: sHospital.key}}, Partners: []*x509.Certificate{sLab.cert}}, sLab.cert, now)
	check("smime", o, err)
}

func TestParseBundleRejects(t *testing.T) {
	mdnEntity, _ := (&MDN{FinalRecipient: "a@b.test", OriginalMessageID: "<x@y>", Disposition: Disposition{Type: Processed}}).Entity()
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A\r"), EDIOptions{})
	for name, b := range map[string][]byte{
		"no MDN":        BuildBundle(edi, edi),
		"wrong type":    bytes.Replace(BuildBundle(edi, mdnEntity), []byte(TypeEDIResponse), []byte("text/html"), 1),
		"text part":     BuildBundle([]byte("Content-Type: text/html\r\n\r\n<p>\r\n"), mdnEntity),
		"not multipart": edi,
	} {
		if _, err := ParseBundle(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: ParseBundle = %v, want ErrMalformed", name, err)
		}
	}
	b, err := ParseBundle(bytes.Replace(BuildBundle(edi, mdnEntity), []byte(TypeEDIResponse), []byte("application/x-EDI-response"), 1))
	if err != nil || b.Response == nil {
		t.Errorf("ParseBundle(x-EDI-response) = %+v, %v", b, err)
	}
}

func FuzzParseMDN(f *testing.F) {
	e, _ := (&MDN{ReportingUA: "x", FinalRecipient: "a@b.test", OriginalMessageID: "<x@y>",
		Disposition: Disposition{Type: Processed, Modifier: ModError}, Error: "e"}).Entity()
	f.Add(e)
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseMDN(b)
		if err == nil && (m.FinalRecipient == "" || m.Disposition.Type == "") {
			t.Fatalf("ParseMDN accepted an MDN without recipient or disposition: %+v", m)
		}
	})
}

func FuzzParseBundle(f *testing.F) {
	mdnEntity, _ := (&MDN{FinalRecipient: "a@b.test", OriginalMessageID: "<x@y>", Disposition: Disposition{Type: Processed}}).Entity()
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A\r"), EDIOptions{})
	f.Add(BuildBundle(edi, mdnEntity))
	f.Fuzz(func(t *testing.T, b []byte) {
		if bundle, err := ParseBundle(b); err == nil && bundle.MDN == nil {
			t.Fatal("ParseBundle accepted a bundle without an MDN")
		}
	})
}

func FuzzDecodeEDI(f *testing.F) {
	edi, _ := EncodeEDI([]byte("MSH|^~\\&|A\rPID|1\r"), EDIOptions{})
	f.Add(edi)
	f.Add([]byte("Content-Type: application/edi-hl7\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nMSH|=0D\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		DecodeEDI(b, Accept{Consent: true})
	})
}

// TestDecodeDraftQuotedPrintable reads the ORR as the draft's §5 sends it:
// quoted-printable, segment CRs as =0D, soft line breaks.
func TestDecodeDraftQuotedPrintable(t *testing.T) {
	qp := "Content-Type: application/edi-hl7\nContent-Transfer-Encoding: quoted-printable\n\n" +
		"MSH|^~\\&|LAB|TUCKER-GENERAL|OE|DR.SCHADOW|19971226182611||O=\n" +
		"RR|RP-O01-883157170|P|2.2=0DMSA|AA|RQ-O01-001|ORDER ACCEPTE=\n" +
		"D|=0DPID||47110815|08157411||Doe^John||||=0DPV1||O|||||0123=\n" +
		"^SCHADOW^GUNTHER||||||||||||12|=0DORC|OK|12345|54321||SC=0D=\n"
	want := "MSH|^~\\&|LAB|TUCKER-GENERAL|OE|DR.SCHADOW|19971226182611||ORR|RP-O01-883157170|P|2.2\r" +
		"MSA|AA|RQ-O01-001|ORDER ACCEPTED|\rPID||47110815|08157411||Doe^John||||\r" +
		"PV1||O|||||0123^SCHADOW^GUNTHER||||||||||||12|\rORC|OK|12345|54321||SC\r"
	got, _, err := DecodeEDI([]byte(qp), Accept{})
	if err != nil || string(got) != want {
		t.Errorf("DecodeEDI(draft quoted-printable) = %q, %v; want %q", got, err, want)
	}
}
