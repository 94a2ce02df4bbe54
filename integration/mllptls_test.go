package integration

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
	"github.com/hl7mail/hl7mail/security"
)

// testPKI makes, with OpenSSL, a CA and certificates it signs (a server
// certificate for 127.0.0.1, client certificates), and a second CA whose
// client certificate no one trusts.
type testPKI struct {
	t       *testing.T
	openssl string
	dir     string
}

func (p *testPKI) run(args ...string) {
	p.t.Helper()
	cmd := exec.Command(p.openssl, args...)
	cmd.Dir = p.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		p.t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
}

func (p *testPKI) ca(name string) {
	p.run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN="+name, "-keyout", name+".key", "-out", name+".pem")
}

// issue makes name.pem and name.key signed by ca, for a server (IP
// 127.0.0.1) or a client.
func (p *testPKI) issue(ca, name string, server bool) {
	p.run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN="+name, "-keyout", name+".key", "-out", name+".csr")
	ext := "extendedKeyUsage=clientAuth\n"
	if server {
		ext = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
	}
	os.WriteFile(filepath.Join(p.dir, name+".ext"), []byte(ext), 0o600)
	p.run("x509", "-req", "-in", name+".csr", "-CA", ca+".pem", "-CAkey", ca+".key", "-CAcreateserial", "-days", "2",
		"-extfile", name+".ext", "-out", name+".pem")
	os.Chmod(filepath.Join(p.dir, name+".key"), 0o600)
}

func (p *testPKI) path(name string) string { return filepath.Join(p.dir, name) }

// sClient sends one framed message to addr through "openssl s_client" with
// the client certificate cert (none for ""), and returns what came back
// within a few seconds.
func sClient(t *testing.T, openssl string, pki *testPKI, addr, cert string, msg []byte) string {
	t.Helper()
	args := []string{"s_client", "-connect", addr, "-CAfile", pki.path("ca.pem"), "-verify_return_error", "-quiet"}
	if cert != "" {
		args = append(args, "-cert", pki.path(cert+".pem"), "-key", pki.path(cert+".key"))
	}
	cmd := exec.Command(openssl, args...)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	stdin.Write(mllp.AppendFrame(nil, msg))
	got := make(chan string, 1)
	go func() {
		rd := mllp.NewReader(bufio.NewReader(stdout), 0)
		frame, err := rd.ReadFrame()
		if err != nil {
			got <- ""
			return
		}
		got <- string(frame)
	}()
	select {
	case s := <-got:
		return s
	case <-time.After(10 * time.Second):
		return ""
	}
}

// TestMLLPOverTLS: a surrogate with listen_tls answers OpenSSL's s_client
// (the router) presenting a client certificate of the configured CA, and
// refuses one of another CA, or none, storing nothing; delivery with
// router.tls reaches a TLS-wrapped python3-hl7 router that requires our
// client certificate, and a client certificate it does not trust leaves
// the message queued until a reload brings the right one.
func TestMLLPOverTLS(t *testing.T) {
	openssl := requireTool(t, "/usr/bin/openssl")
	python := requireTool(t, "/usr/bin/python3")
	pki := &testPKI{t: t, openssl: openssl, dir: t.TempDir()}
	pki.ca("ca")
	pki.ca("other-ca")
	pki.issue("ca", "surrogate", true)
	pki.issue("ca", "router-client", false)
	pki.issue("other-ca", "stranger", false)
	pki.issue("ca", "router-server", true)
	pki.issue("ca", "hl7mail-client", false)
	pki.issue("other-ca", "hl7mail-stranger", false)

	router := startPyRouterEnv(t, python, filepath.Join(t.TempDir(), "router"), []string{"ROUTER_TLS_CERT=" + pki.path("router-server.pem"),
		"ROUTER_TLS_KEY=" + pki.path("router-server.key"), "ROUTER_TLS_CA=" + pki.path("ca.pem")})
	in := newInstance(t, "tucker-lab")
	addr := in.listen["tucker-lab"]
	in.edit("listen: "+addr+",", fmt.Sprintf("listen: %s, listen_tls: {cert_file: %s, key_file: %s, client_ca_file: %s},",
		addr, pki.path("surrogate.pem"), pki.path("surrogate.key"), pki.path("ca.pem")))
	data, _ := os.ReadFile(in.config)
	routerLine := string(data)[strings.Index(string(data), "router: {addr: "):]
	routerLine = routerLine[:strings.Index(routerLine, "}")+1]
	tlsRouter := func(client string) string {
		return fmt.Sprintf("router: {addr: %s, ack_timeout: 5s, tls: {ca_file: %s, cert_file: %s, key_file: %s}}", router.addr,
			pki.path("ca.pem"), pki.path(client+".pem"), pki.path(client+".key"))
	}
	in.edit(routerLine, tlsRouter("hl7mail-client"))
	in.start()
	in.waitReady("")
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}

	// The surrogate over TLS.
	if ack := sClient(t, openssl, pki, addr, "router-client", msgs[20]); !strings.Contains(ack, "\rMSA|CA|") {
		t.Fatalf("s_client with the router's certificate got %q, want CA\n%s", ack, in.log)
	}
	for _, cert := range []string{"stranger", ""} {
		if ack := sClient(t, openssl, pki, addr, cert, msgs[21]); ack != "" {
			t.Errorf("s_client with client certificate %q got an answer %q; want the handshake refused", cert, ack)
		}
	}
	if list := in.messages(); len(list) != 1 {
		t.Errorf("%d messages stored, want only the one over the trusted certificate", len(list))
	}

	// Delivery to the router over TLS: a plain MIME-EDI mail from the
	// partner (security none) handed in as an MTA would.
	receive := func(i int) {
		t.Helper()
		edi, _ := security.EncodeEDI(msgs[30+i], security.EDIOptions{})
		mail := fmt.Sprintf("From: tucker-lab@partner.test\r\nTo: edi@hospital.test\r\nMessage-ID: <tls%d@partner.test>\r\nSubject: HL7\r\n", i)
		cmd := exec.Command(binary, "receive", "-config", in.config)
		cmd.Stdin = bytes.NewReader(append([]byte(mail), edi...))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("hl7mail receive: %v\n%s", err, out)
		}
	}
	receive(0)
	deadline := time.Now().Add(30 * time.Second)
	for len(router.messages()) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("nothing reached the TLS router after 30s\n%s", in.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if string(router.messages()[0]) != string(msgs[30]) {
		t.Errorf("the router got %q", router.messages()[0])
	}
	// A client certificate the router does not trust: the message waits.
	in.edit(tlsRouter("hl7mail-client"), tlsRouter("hl7mail-stranger"))
	in.reload()
	time.Sleep(time.Second)
	receive(1)
	time.Sleep(3 * time.Second)
	if n := len(router.messages()); n != 1 {
		t.Fatalf("the router took %d messages with an untrusted client certificate, want still 1", n)
	}
	waiting := false
	for _, m := range in.messages() {
		waiting = waiting || m.Direction == "in" && m.State == "queued"
	}
	if !waiting {
		t.Errorf("the refused delivery is not waiting in the queue")
	}
	in.edit(tlsRouter("hl7mail-stranger"), tlsRouter("hl7mail-client"))
	in.reload()
	deadline = time.Now().Add(30 * time.Second)
	for len(router.messages()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("the waiting message did not reach the router after the reload\n%s", in.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
