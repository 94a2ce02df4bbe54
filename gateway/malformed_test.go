package gateway

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/smtp"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

// TestMalformedInputHoldsNoPatientData sends what an outside probe sends:
// over MLLP, a frame with no CR whose MSH-1 does not recur, a frame that
// is not HL7, a message with a stray 0x0B inside, a 60,000-character
// MSH-10; by mail, from a partner's address, a header that runs straight
// into HL7, a Content-Type made of HL7, and an unencrypted message asking
// for a receipt. Every frame gets exactly one answer. Then no log line, API
// answer, page, log stream, ACK or MDN of either instance holds a patient
// name or ID of the messages used.
func TestMalformedInputHoldsNoPatientData(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	used := msgs[300:306]
	phi := corpus.PatientData(used)
	if len(phi) < 6 {
		t.Fatalf("only %d patient names and IDs", len(phi))
	}
	pw := newPHIWorld(t)
	w, hospital, lab, listenLab := pw.w, pw.hospital, pw.lab, pw.listenLab
	// MLLP: each frame and its answers.
	noCR := strings.Replace(strings.ReplaceAll(string(used[0]), "\r", ""), "MSH|", "MSH#", 1)
	notHL7 := string(used[1][bytes.Index(used[1], []byte("PID|")):])
	stray := strings.Replace(string(used[2]), "PID|", "NTE|1||pasted\x0bline\rPID|", 1)
	seg, rest, _ := strings.Cut(string(used[3]), "\r")
	fields := strings.Split(seg, "|")
	fields[9] = strings.Repeat("8", 60000) // MSH-10
	longID := strings.Join(fields, "|") + "\r" + rest
	nc, err := net.Dial("tcp", listenLab)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	rd := mllp.NewReader(nc, 1<<20)
	var acks []string
	for i, frame := range []string{noCR, notHL7, stray, longID} {
		if err := mllp.WriteFrame(nc, []byte(frame)); err != nil {
			t.Fatal(err)
		}
		nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		ack, err := rd.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d: no answer: %v", i, err)
		}
		acks = append(acks, string(ack))
	}
	nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if extra, err := rd.ReadFrame(); err == nil {
		t.Errorf("an answer more than the frames sent: %q", extra)
	}
	for i, want := range []string{"MSA|CR|", "MSA|CR|", "MSA|CA|", "MSA|CR|"} {
		if !strings.Contains(acks[i], "\r"+want) || len(acks[i]) > 1000 {
			t.Errorf("answer %d (%d bytes): %.120q, want %s", i, len(acks[i]), acks[i], want)
		}
	}

	// Mail from the hospital's address to the lab.
	send := func(msg string) {
		t.Helper()
		if err := smtp.SendMail(w.SMTPAddr, nil, "edi@hospital.test", []string{"lab@partner.test"}, []byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	head := func(id string) string {
		return "From: edi@hospital.test\r\nTo: lab@partner.test\r\nMessage-ID: <" + id + "@hospital.test>\r\n" +
			"Disposition-Notification-To: edi@hospital.test\r\nSubject: HL7\r\n"
	}
	// A header that runs into HL7 does not pass the embedded mail servers:
	// it comes as an MTA hands it over (pipe mode), the same path.
	if _, err := lab.g.Receive(context.Background(), []byte(head("run-in")+strings.ReplaceAll(string(used[4]), "\r", "\r\n")), ""); err != nil {
		t.Fatal(err)
	}
	send(head("ctype") + "Content-Type: " + strings.ReplaceAll(string(used[5]), "\r", " ") + "\r\n\r\nbody\r\n")
	send(head("plain") + "MIME-Version: 1.0\r\nContent-Type: application/edi-hl7\r\n\r\n" + strings.ReplaceAll(string(used[4]), "\r", "\r\n"))
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		q, _ := lab.g.Store().QuarantineList(ctx, 0)
		if len(q) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s %d mails quarantined, want 3", len(q))
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(time.Second) // the refusal receipts go out and come in

	seen := pw.seen(t)
	for i, a := range acks {
		seen[fmt.Sprint("ACK ", i)] = a
	}
	for _, in := range []*instance{hospital, lab} {
		base := in.g.DashboardURL()
		// The MDNs the instance made (its outbound receipts, as sent).
		list, _ := in.g.Store().List(ctx, store.Filter{Direction: store.Outbound, Limit: 1000})
		for _, m := range list {
			if full, err := in.g.Store().Get(ctx, m.ID); err == nil && m.MessageType == "MDN" {
				seen[fmt.Sprint(base, " MDN ", m.ID)] = string(full.Payload)
			}
		}
	}
	q := seen[lab.g.DashboardURL()+"api/quarantine"]
	for _, want := range []string{"is not a header field", "malformed", "not-encrypted"} {
		if !strings.Contains(q, want) {
			t.Errorf("the lab's quarantine lacks %q:\n%s", want, q)
		}
	}
	mdns := 0
	for where, text := range seen {
		if strings.Contains(where, " MDN ") {
			mdns++
		}
		for _, p := range phi {
			if strings.Contains(text, p) {
				t.Errorf("%s holds patient data %q", where, p)
			}
		}
	}
	if mdns == 0 {
		t.Errorf("no refusal receipt was made")
	}
	t.Logf("%d log bytes and %d answers, pages and MDNs checked for %d patient names and IDs", len(seen["log"]), len(seen)-1, len(phi))
}
