package hl7

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/corpus"
)

// batchOf writes msgs as a batch: FHS and FTS when file, the BHS with
// batch control ID id, BTS with count (-1: left empty).
func batchOf(msgs [][]byte, id string, count int, file bool) []byte {
	var b bytes.Buffer
	if file {
		b.WriteString("FHS|^~\\&|LAB|TL|HIS|GH|20261201\r")
	}
	fmt.Fprintf(&b, "BHS|^~\\&|LAB|TL|HIS|GH|20261201||||%s\r", id)
	for _, m := range msgs {
		b.Write(bytes.TrimRight(m, "\r\n"))
		b.WriteByte('\r')
	}
	if count >= 0 {
		fmt.Fprintf(&b, "BTS|%d\r", count)
	} else {
		b.WriteString("BTS\r")
	}
	if file {
		b.WriteString("FTS|1\r")
	}
	return b.Bytes()
}

func TestParseBatch(t *testing.T) {
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	twenty := msgs[:20]
	for _, c := range []struct {
		name string
		data []byte
	}{
		{"batch", batchOf(twenty, "B1", 20, false)},
		{"file", batchOf(twenty, "B1", 20, true)},
		{"no count", batchOf(twenty, "B1", -1, false)},
		{"LF line ends", bytes.ReplaceAll(batchOf(twenty, "B1", 20, true), []byte("\r"), []byte("\n"))},
	} {
		b, err := ParseBatch(c.data)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if len(b.Messages) != 20 || b.Header.ControlID != "B1" || b.Header.SendingApp != "LAB" || b.Header.ReceivingFacility != "GH" {
			t.Errorf("%s: %d messages, header %+v", c.name, len(b.Messages), b.Header)
		}
		for i, m := range b.Messages {
			want := strings.ReplaceAll(strings.ReplaceAll(string(twenty[i]), "\r\n", "\r"), "\n", "\r")
			if string(m) != strings.TrimRight(want, "\r")+"\r" || b.Headers[i].ControlID == "" {
				t.Errorf("%s: message %d differs from the one put in", c.name, i+1)
				break
			}
		}
	}
	// Without BHS-11 the first message's control ID names the batch.
	if b, err := ParseBatch(batchOf(twenty[:2], "", 2, false)); err != nil || b.Header.ControlID != b.Headers[0].ControlID {
		t.Errorf("batch without BHS-11: %+v, %v", b, err)
	}
	for _, c := range []struct {
		name string
		data []byte
		want string
	}{
		{"count wrong", batchOf(twenty, "B1", 19, false), "BTS-1 says 19 messages, the batch holds 20"},
		{"no trailer", bytes.TrimSuffix(batchOf(twenty, "B1", 20, false), []byte("BTS|20\r")), "no BTS segment"},
		{"empty", batchOf(nil, "B1", 0, false), "no message in the batch"},
		{"segment before the first message", []byte("BHS|^~\\&|A\rPID|1\rMSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rBTS|1\r"), "segment 2 (a segment of a message) out of place"},
		{"a message without MSH-10", []byte("BHS|^~\\&|A\rMSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5\rBTS|1\r"), "message 1 of the batch"},
		{"two batches", append(batchOf(twenty[:1], "B1", 1, false), batchOf(twenty[1:2], "B2", 1, false)...), "(BHS) out of place"},
	} {
		if _, err := ParseBatch(c.data); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	if _, err := ParseBatch(batchOf(twenty, "B1", 19, false)); !errors.Is(err, ErrBadBatch) {
		t.Errorf("a wrong count is not ErrBadBatch: %v", err)
	}
	// Errors name no content, not even three letters of a broken line.
	if _, err := ParseBatch([]byte("BHS|^~\\&|A\rSMITH^JOHN\rBTS\r")); err == nil || strings.Contains(err.Error(), "SMI") {
		t.Errorf("error %v", err)
	}
}

func TestBatchAck(t *testing.T) {
	msgs, _ := corpus.Default()
	b, err := ParseBatch(batchOf(msgs[:3], "B7", 3, false))
	if err != nil {
		t.Fatal(err)
	}
	var acks [][]byte
	for i, h := range b.Headers {
		code := ApplicationAccept
		if i == 1 {
			code = ApplicationError
		}
		acks = append(acks, BuildAck(h, Ack{Code: code, ControlID: fmt.Sprint("K", i)}))
	}
	data := BuildBatchAck(b, "R1", acks, time.Now())
	r, err := ParseBatchAck(data)
	if err != nil {
		t.Fatal(err)
	}
	if r.Reference != "B7" || r.ControlID != "R1" || len(r.Acks) != 3 || r.Acks[1].ControlID != b.Headers[1].ControlID ||
		r.Accepted() || r.Code() != ApplicationError {
		t.Errorf("batch ack %+v, accepted %v, code %s", r, r.Accepted(), r.Code())
	}
	if !bytes.HasPrefix(data, []byte("BHS|^~\\&|HIS|GH|LAB|TL|")) {
		t.Errorf("BHS not addressed back to the sender: %q", data[:40])
	}
	// An empty batch acknowledgement accepts the whole batch.
	empty, err := ParseBatchAck(BuildBatchAck(b, "R2", nil, time.Now()))
	if err != nil || !empty.Accepted() || empty.Reference != "B7" || empty.Code() != ApplicationAccept {
		t.Errorf("empty batch ack %+v, %v", empty, err)
	}
}
