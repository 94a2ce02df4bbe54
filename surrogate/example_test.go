package surrogate_test

import (
	"context"
	"fmt"
	"os"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/store"
	"github.com/hl7mail/hl7mail/surrogate"
)

// A surrogate stands in for one partner: it stores each message the router
// sends, durably, then answers CA (draft-ietf-ediint-hl7-02 §6.5.1).
func Example() {
	dir, _ := os.MkdirTemp("", "surrogate")
	defer os.RemoveAll(dir)
	st, err := store.Open(store.Options{Dir: dir})
	if err != nil {
		panic(err)
	}
	defer st.Close()
	srv, err := surrogate.New(surrogate.Options{Partner: "tucker-lab", Spool: st})
	if err != nil {
		panic(err)
	}
	ln, err := surrogate.Listen(context.Background(), "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go srv.Serve(ln)
	defer srv.Close()

	c, err := mllp.Dial(context.Background(), ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer c.Close()
	reply, err := c.Send(context.Background(), []byte("MSH|^~\\&|HIS|GH|LAB|TL|20261201||ORU^R01|42|P|2.5|||AL\rPID|1\r"))
	if err != nil {
		panic(err)
	}
	ack, _ := hl7.ParseAck(reply)
	list, _ := st.List(context.Background(), store.Filter{})
	fmt.Println(ack.Code, ack.ControlID, len(list), list[0].Partner, list[0].State)
	// Output: CA 42 1 tucker-lab queued
}
