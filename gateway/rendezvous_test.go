package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/internal/testlog"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
)

// TestRendezvous: with ack_mode rendezvous the hospital's router gets, on
// the connection it sent on, the lab router's own AA instead of CA; the
// response is not delivered again. With the lab down it gets CE ("timed
// out"); the order reaches the lab once it is back, and the late response
// reaches the hospital's router as a message of its own.
func TestRendezvous(t *testing.T) {
	dir := t.TempDir()
	w, err := embedded.NewWorld("edi@hospital.test", "lab@partner.test")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	hPriv, _, hCert, hKey := keyFiles(t, dir, "edi@hospital.test")
	hPub := filepath.Join(dir, "edi@hospital.test.pub.asc")
	lPriv, lPub, lCert, lKey := keyFiles(t, dir, "lab@partner.test")
	toLab := freeAddr(t)
	hospital := startInstance(t, w, dir, "hospital", "edi@hospital.test", fmt.Sprintf(
		"  - {name: lab, listen: %s, email: lab@partner.test, security: pgp, pgp_key: %s, ack_mode: rendezvous, rendezvous_timeout: 2s}\n",
		toLab, lPub), hPriv, hCert, hKey)
	labPartners := fmt.Sprintf("  - {name: hospital, listen: %s, email: edi@hospital.test, security: pgp, pgp_key: %s}\n", freeAddr(t), hPub)
	lab := startInstance(t, w, dir, "lab", "lab@partner.test", labPartners, lPriv, lCert, lKey)

	c, err := mllp.Dial(context.Background(), toLab)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	send := func(id string) hl7.AckResult {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		reply, err := c.Send(ctx, []byte("MSH|^~\\&|OE|GH|LAB|TL|20261123||ORM^O01|"+id+"|P|2.3|||AL\rPID|1\rORC|NW|"+id+"\r"))
		if err != nil {
			t.Fatal(err)
		}
		a, err := hl7.ParseAck(reply)
		if err != nil {
			t.Fatalf("answer %q: %v", reply, err)
		}
		return a
	}
	a := send("RDV-1")
	if a.Code != hl7.ApplicationAccept || a.ControlID != "RDV-1" || !strings.HasPrefix(a.Header.ControlID, "RT") {
		t.Fatalf("rendezvous answer = %+v; want the lab router's own AA for RDV-1", a)
	}
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for {
		in, _ := hospital.g.Store().List(ctx, store.Filter{Direction: store.Inbound})
		if len(in) == 1 && in[0].State == store.Delivered {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the response is not recorded as delivered: %+v", in)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if n := len(hospital.router.Messages()); n != 0 {
		t.Errorf("the hospital's router got %d messages besides the rendezvous answer, want 0", n)
	}

	// The lab is down: the router hears that the wait timed out.
	lab.g.Shutdown(ctx)
	lab.g = nil
	a = send("RDV-2")
	if a.Code != hl7.CommitError || !strings.Contains(a.Text, "timed out") {
		t.Fatalf("answer with the lab down = %+v; want CE, timed out", a)
	}
	lab = startInstance(t, w, dir, "lab", "lab@partner.test", labPartners, lPriv, lCert, lKey)
	deadline = time.Now().Add(30 * time.Second)
	for len(lab.router.Messages()) == 0 || len(hospital.router.Messages()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after 30s: %d at the lab's router, %d at the hospital's", len(lab.router.Messages()), len(hospital.router.Messages()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if h, _ := hl7.ParseHeader(lab.router.Messages()[0]); h.ControlID != "RDV-2" {
		t.Errorf("the lab's router got %s, want RDV-2", h.ControlID)
	}
	if a, err := hl7.ParseAck(hospital.router.Messages()[0]); err != nil || a.ControlID != "RDV-2" || a.Code != hl7.ApplicationAccept {
		t.Errorf("the late response at the hospital's router: %+v, %v", a, err)
	}
}

// TestRendezvousHub: a response is held while a connection waits for it
// and while it is marked delivered; after it was written, or after a wait
// ended without it, the hub holds nothing (the store's state decides:
// TestLeaveAlone).
func TestRendezvousHub(t *testing.T) {
	r := newRendezvous()
	if r.offer(1, response{written: func(error) {}}) || r.holds(1) {
		t.Fatal("an offer with nobody waiting was taken")
	}
	got := make(chan []byte)
	var result error
	go func() {
		payload, written, err := r.wait(context.Background(), 1, 5*time.Second)
		if err != nil {
			t.Error(err)
		}
		got <- payload
		written(nil)
	}()
	for !r.holds(1) {
		time.Sleep(time.Millisecond)
	}
	done := make(chan struct{})
	heldWhileMarked := false
	if !r.offer(1, response{payload: []byte("AA"), written: func(err error) {
		result, heldWhileMarked = err, r.holds(1)
		close(done)
	}}) {
		t.Fatal("the waiting connection did not take the response")
	}
	if string(<-got) != "AA" {
		t.Fatal("wrong payload")
	}
	<-done
	if result != nil || !heldWhileMarked {
		t.Errorf("marking delivered: err %v, held meanwhile %v", result, heldWhileMarked)
	}
	if r.holds(1) {
		t.Error("a written response is still held by the hub")
	}
	// A wait that timed out holds nothing: a late response is refused, and
	// the deliverer takes it.
	if _, _, err := r.wait(context.Background(), 2, time.Millisecond); err == nil {
		t.Error("wait without an offer returned no error")
	}
	if r.holds(2) || r.offer(2, response{written: func(error) {}}) {
		t.Error("a response after the wait ended is held or taken")
	}
}

// TestLeaveAlone: the deliverer leaves a response alone while a connection
// waits for it, and once a connection wrote it (the store has it delivered,
// however stale the deliverer's read of its queue); with nobody waiting it
// delivers it.
func TestLeaveAlone(t *testing.T) {
	st, err := store.Open(store.Options{Dir: t.TempDir(), Logger: testlog.New(t, slog.LevelWarn)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	out, err := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: "lab", ControlID: "q1", Payload: []byte("MSH|q1")})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Prepare(ctx, out.ID, "<q1@h>", &store.Pending{Partner: "lab", ControlID: "q1", Sent: time.Now(),
		Due: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	in, err := st.Accept(ctx, store.NewMessage{Direction: store.Inbound, Partner: "lab", ControlID: "r1",
		Payload: []byte("MSH|r1"), Kind: store.KindResponse, InReplyTo: "<q1@h>", MessageID: "<r1@l>"})
	if err != nil {
		t.Fatal(err)
	}
	stale, err := st.Get(ctx, in.ID) // what the deliverer read of its queue
	if err != nil {
		t.Fatal(err)
	}
	r := newRendezvous()
	if r.leaveAlone(ctx, st, stale) {
		t.Error("a response nobody waits for is left alone")
	}
	waited := make(chan error, 1)
	go func() {
		_, written, err := r.wait(ctx, out.ID, 5*time.Second)
		if err == nil {
			// What rendezvousResponse does once written: delivered,
			// then out of flight.
			err = st.MarkDelivered(ctx, in.ID, nil)
			written(nil)
		}
		waited <- err
	}()
	for !r.holds(out.ID) {
		time.Sleep(time.Millisecond)
	}
	if !r.leaveAlone(ctx, st, stale) {
		t.Error("a response a connection waits for is not left alone")
	}
	if !r.offer(out.ID, response{payload: stale.Payload, written: func(error) {}}) {
		t.Fatal("offer refused")
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if r.holds(out.ID) || !r.leaveAlone(ctx, st, stale) {
		t.Error("a response a connection wrote is not left alone by a deliverer with a stale read")
	}
	if err := st.MarkDelivered(ctx, in.ID, nil); !errors.Is(err, store.ErrStateChanged) {
		t.Errorf("delivering it again = %v, want ErrStateChanged", err)
	}
}
