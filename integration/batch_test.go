package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/mllp"
)

// TestBatches: a batch of 20 corpus messages, sent by mllp_send as one
// frame to the hospital's surrogate, reaches the lab's router (python-hl7)
// as the one batch; with batch_ack: each at the hospital and batch_split at
// the lab (after a reload), another reaches it as 20 messages. The router
// gets the ACKs the settings say: one ACK naming the batch, or a batch
// acknowledgement of 20; the lab's router's answers come back to the
// hospital's router as one batch acknowledgement each time.
func TestBatches(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	python := requireTool(t, "/usr/bin/python3")
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	dir := t.TempDir()
	siteKeys(t, dir, "hospital", "edi@hospital.test", "pgp")
	siteKeys(t, dir, "lab", "lab@partner.test", "pgp")
	hRouter := startPyRouter(t, python, filepath.Join(dir, "hospital-router"))
	labRouter := startPyRouter(t, python, filepath.Join(dir, "lab-router"))
	toLab := freePort(t)
	site := func(name, email, router, partners string, listen map[string]string) *instance {
		return worldSite(t, w, dir, name, email, router, partners, listen)
	}
	hospital := site("hospital", "edi@hospital.test", hRouter.addr,
		fmt.Sprintf("  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: ../lab/public.asc}\n", toLab),
		map[string]string{"lab": toLab})
	lab := site("lab", "lab@partner.test", labRouter.addr,
		fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: ../hospital/public.asc}\n", freePort(t)),
		map[string]string{})
	hospital.start()
	lab.start()

	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	batchOf := func(id string, ms [][]byte) []byte {
		var b bytes.Buffer
		fmt.Fprintf(&b, "FHS|^~\\&|HIS|GH|LAB|TL|20261201\rBHS|^~\\&|HIS|GH|LAB|TL|20261201||||%s\r", id)
		for _, m := range ms {
			b.Write(bytes.TrimRight(bytes.ReplaceAll(m, []byte("\n"), []byte("\r")), "\r"))
			b.WriteByte('\r')
		}
		fmt.Fprintf(&b, "BTS|%d\rFTS|1", len(ms))
		return b.Bytes()
	}
	// send frames the batch into a file and hands it to mllp_send, which
	// sends each frame as it is and prints each answer.
	send := func(batch []byte) string {
		file := filepath.Join(dir, "batch.mllp")
		os.WriteFile(file, mllp.AppendFrame(nil, batch), 0o600)
		_, port, _ := strings.Cut(toLab, ":")
		out, err := exec.Command(mllpSend, "-p", port, "-f", file, "127.0.0.1").Output()
		if err != nil {
			t.Fatalf("mllp_send: %v", err)
		}
		return strings.Trim(string(out), "\v\x1c\r\n") // it prints the answer with its frame
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("after 60s, still waiting for %s\nhospital:\n%s\nlab:\n%s", what, hospital.log, lab.log)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	controlIDs := func(ms [][]byte) []string {
		var ids []string
		for _, m := range ms {
			h, _ := hl7.ParseHeader(m)
			ids = append(ids, h.ControlID)
		}
		return ids
	}

	// batch_ack: batch (the default), delivered whole.
	first := msgs[400:420]
	ack := send(batchOf("BATCH1", first))
	if a, err := hl7.ParseAck([]byte(ack)); err != nil || a.Code != hl7.CommitAccept || a.ControlID != "BATCH1" {
		t.Fatalf("batch_ack batch: mllp_send printed %q; want one CA naming BATCH1", ack)
	}
	wait("the first batch at the lab's router", func() bool { return len(labRouter.messages()) == 1 })
	got, err := hl7.ParseBatch(labRouter.messages()[0])
	if err != nil || got.Header.ControlID != "BATCH1" || fmt.Sprint(controlIDs(got.Messages)) != fmt.Sprint(controlIDs(first)) {
		t.Fatalf("the lab's router got %v (%v), want the batch of 20", got, err)
	}
	wait("the lab router's answer at the hospital's", func() bool { return len(hRouter.messages()) == 1 })
	if r, err := hl7.ParseBatchAck(hRouter.messages()[0]); err != nil || r.Reference != "BATCH1" || len(r.Acks) != 20 || !r.Accepted() {
		t.Errorf("the hospital's router got %+v, %v; want the lab router's batch acknowledgement of BATCH1", r, err)
	}

	// batch_ack: each at the hospital, batch_split at the lab.
	hospital.edit("pgp_key: ../lab/public.asc}", "pgp_key: ../lab/public.asc, batch_ack: each}")
	lab.edit("pgp_key: ../hospital/public.asc}", "pgp_key: ../hospital/public.asc, batch_split: true}")
	hospital.stop()
	hospital.start()
	lab.reload()
	wait("the lab's reload", func() bool { return strings.Contains(lab.log.String(), "configuration reloaded") })
	second := msgs[420:440]
	ack = send(batchOf("BATCH2", second))
	r, err := hl7.ParseBatchAck([]byte(ack))
	if err != nil || r.Reference != "BATCH2" || len(r.Acks) != 20 || r.Code() != hl7.CommitAccept {
		t.Fatalf("batch_ack each: mllp_send printed %q (%v); want a batch acknowledgement of 20 CAs", ack, err)
	}
	for i, a := range r.Acks {
		if h, _ := hl7.ParseHeader(second[i]); a.ControlID != h.ControlID {
			t.Errorf("ACK %d names %s, want %s", i+1, a.ControlID, h.ControlID)
		}
	}
	wait("the 20 messages at the lab's router", func() bool { return len(labRouter.messages()) == 21 })
	split := labRouter.messages()[1:]
	if fmt.Sprint(controlIDs(split)) != fmt.Sprint(controlIDs(second)) {
		t.Errorf("the lab's router got %v, want the batch's messages one by one %v", controlIDs(split), controlIDs(second))
	}
	for _, m := range split {
		if hl7.IsBatch(m) {
			t.Errorf("a frame at the lab's router is still a batch")
		}
	}
	wait("the second answer at the hospital's router", func() bool { return len(hRouter.messages()) == 2 })
	if r, err := hl7.ParseBatchAck(hRouter.messages()[1]); err != nil || r.Reference != "BATCH2" || len(r.Acks) != 20 || !r.Accepted() {
		t.Errorf("the hospital's router got %+v, %v; want one batch acknowledgement of the 20 answers", r, err)
	}
}
