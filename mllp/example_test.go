package mllp_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/mllp"
)

// A frame is the payload between a start block (0x0B) and an end block
// and carriage return (0x1C 0x0D).
func ExampleAppendFrame() {
	frame := mllp.AppendFrame(nil, []byte("MSH|^~\\&|A|B|C|D|20261201||ADT^A01|1|P|2.5\r"))
	fmt.Printf("%q ... %q\n", frame[:4], frame[len(frame)-3:])
	// Output: "\vMSH" ... "\r\x1c\r"
}

// A router's side of MLLP: Dial, Send a message, read the ACK. The peer
// here reads frames with a Reader and answers with WriteFrame, as a
// listener does.
func ExampleClient_Send() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := mllp.NewReader(c, 1<<20)
		msg, err := r.ReadFrame()
		if err != nil {
			return
		}
		id := strings.Split(string(bytes.SplitN(msg, []byte("\r"), 2)[0]), "|")[9]
		mllp.WriteFrame(c, []byte("MSH|^~\\&|C|D|A|B|20261201||ACK|K1|P|2.5\rMSA|CA|"+id+"\r"))
	}()
	c, err := mllp.Dial(context.Background(), ln.Addr().String())
	if err != nil {
		panic(err)
	}
	defer c.Close()
	ack, err := c.Send(context.Background(), []byte("MSH|^~\\&|A|B|C|D|20261201||ADT^A01|MSG1|P|2.5\rPID|1\r"))
	if err != nil {
		panic(err)
	}
	fmt.Println(strings.Split(string(ack), "\r")[1])
	// Output: MSA|CA|MSG1
}

// A listener's side: a Server serves each connection with a Handler; here
// every message is answered CA. Shutdown stops it within its bound.
func ExampleServer() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := &mllp.Server{Handler: mllp.HandlerFunc(func(ctx context.Context, c net.Conn) {
		r := mllp.NewReader(c, 1<<20)
		for {
			msg, err := r.ReadFrame()
			if err != nil {
				return
			}
			id := strings.Split(string(bytes.SplitN(msg, []byte("\r"), 2)[0]), "|")[9]
			mllp.WriteFrame(c, []byte("MSH|^~\\&|C|D|A|B|20261201||ACK|K1|P|2.5\rMSA|CA|"+id+"\r"))
		}
	})}
	go srv.Serve(ln)
	c, err := mllp.Dial(context.Background(), ln.Addr().String())
	if err != nil {
		panic(err)
	}
	ack, err := c.Send(context.Background(), []byte("MSH|^~\\&|A|B|C|D|20261201||ADT^A01|MSG2|P|2.5\rPID|1\r"))
	if err != nil {
		panic(err)
	}
	fmt.Println(strings.Split(string(ack), "\r")[1])
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fmt.Println(srv.Shutdown(ctx))
	// Output:
	// MSA|CA|MSG2
	// <nil>
}
