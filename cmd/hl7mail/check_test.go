package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hl7mail/hl7mail/internal/embedded"
	"github.com/hl7mail/hl7mail/store"
)

// TestCheckWarnsOfTheServer: check connects to the SMTP server and warns
// when it offers no AUTH though smtp.username is set; a configuration that
// is otherwise fine still passes, and -offline does not connect.
func TestCheckWarnsOfTheServer(t *testing.T) {
	srv := &embedded.SMTP{}
	addr, err := srv.Serve("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "pw"), []byte("x\n"), 0o600)
	path := filepath.Join(dir, "partners.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: h, email: edi@hospital.test}
router: {addr: 127.0.0.1:6661}
smtp: {addr: %s, tls: none, username: edi@hospital.test, password_file: pw}
imap: {addr: 127.0.0.1:1143, tls: none}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: none, allow_unencrypted: true}
`, addr)), 0o600)
	var out, errOut bytes.Buffer
	if code := run([]string{"check", "-config", path}, &out, &errOut); code != 0 {
		t.Fatalf("check = %d\n%s%s", code, out.String(), errOut.String())
	}
	if !strings.Contains(errOut.String(), "smtp.username is set but "+addr+" offers no AUTH") {
		t.Errorf("check warnings:\n%s", errOut.String())
	}
	errOut.Reset()
	srv.Close()
	if code := run([]string{"check", "-offline", "-config", path}, &out, &errOut); code != 0 || errOut.Len() != 0 {
		t.Errorf("check -offline = %d, warnings:\n%s", code, errOut.String())
	}
}

// TestRetryBulkStopped: with the instance stopped, "retry -partner" puts
// back that partner's failed messages and "retry -all" everyone's, on the
// store.
func TestRetryBulkStopped(t *testing.T) {
	dir := t.TempDir()
	dash := closedPort(t)
	path := filepath.Join(dir, "partners.yaml")
	os.WriteFile(path, []byte(fmt.Sprintf(`self: {name: h, email: edi@hospital.test}
store: var
router: {addr: 127.0.0.1:6661}
smtp: {addr: 127.0.0.1:2525, tls: none}
imap: {addr: 127.0.0.1:1143, tls: none}
dashboard: {addr: %s}
partners:
  - {name: lab, listen: 127.0.0.1:9012, email: lab@partner.test, security: none, allow_unencrypted: true}
  - {name: clinic, listen: 127.0.0.1:9013, email: edi@clinic.test, security: none, allow_unencrypted: true}
`, dash)), 0o600)
	st, err := store.Open(store.Options{Dir: filepath.Join(dir, "var")})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var ids []int64
	for i, p := range []string{"lab", "clinic", "lab"} {
		a, err := st.Accept(ctx, store.NewMessage{Direction: store.Outbound, Partner: p, ControlID: fmt.Sprint("F", i),
			MessageType: "ORM^O01", Payload: []byte(fmt.Sprint("MSH|", i))})
		if err != nil {
			t.Fatal(err)
		}
		st.MarkFinal(ctx, a.ID, store.Failed, "550 no such user")
		ids = append(ids, a.ID)
	}
	st.Close()
	states := func() string {
		ro, err := store.OpenReadOnly(filepath.Join(dir, "var"))
		if err != nil {
			t.Fatal(err)
		}
		defer ro.Close()
		var s []string
		for _, id := range ids {
			m, _ := ro.Get(ctx, id)
			s = append(s, string(m.State))
		}
		return strings.Join(s, " ")
	}
	for _, tt := range []struct {
		args   []string
		code   int
		out    string
		states string
	}{
		{[]string{"-all", "7"}, 2, "", "failed failed failed"},
		{[]string{"-partner", "nobody"}, 1, "", "failed failed failed"},
		{[]string{"-partner", "lab"}, 0, "2 messages queued again", "queued failed queued"},
		{[]string{"-all"}, 0, "1 messages queued again", "queued queued queued"},
	} {
		var out, errOut bytes.Buffer
		code := run(append([]string{"retry", "-config", path}, tt.args...), &out, &errOut)
		if code != tt.code || !strings.Contains(out.String(), tt.out) || states() != tt.states {
			t.Errorf("retry %v = %d %q %q, states %s; want %d %q, %s", tt.args, code, out.String(), errOut.String(), states(),
				tt.code, tt.out, tt.states)
		}
	}
}

func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestTermEscapes: control characters in control IDs, Message-IDs and
// alert texts never reach the terminal raw.
func TestTermEscapes(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"ORM-1", "ORM-1"},
		{"", "-"},
		{"A\x1b[2J\x07B", `"A\x1b[2J\aB"`},
		{"ID\rFAKE", `"ID\rFAKE"`},
		{"tab\there", `"tab\there"`},
		{"bad\xffutf8", `"bad\xffutf8"`},
		{"Müller-ID", "Müller-ID"},
	} {
		if got := dash(tt.in); got != tt.want {
			t.Errorf("dash(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// TestReadMail: a piped mail within the limit comes back whole (without
// the mbox From line), one over it as its header alone, with its size.
func TestReadMail(t *testing.T) {
	head := "From: lab@partner.test\r\nSubject: x\r\n\r\n"
	body := strings.Repeat("0123456789abcdef", 20000) // 320,000 bytes
	for _, tt := range []struct {
		name, in string
		max      int64
		raw      string
		size     int64
	}{
		{"small", "From lab@partner.test Mon Dec  1 08:00:00 2026\n" + head + "hi\r\n", 1000, head + "hi\r\n", int64(len(head) + 4)},
		{"spooled, within", head + body, 1 << 20, head + body, int64(len(head) + len(body))},
		{"over, after spooling", head + body, 100000, head, int64(len(head) + len(body))},
		{"over, in the first block", head + body, 1000, head, int64(len(head) + len(body))},
	} {
		raw, size, err := readMail(strings.NewReader(tt.in), tt.max)
		if err != nil || string(raw) != tt.raw || size != tt.size {
			t.Errorf("%s: readMail = %d bytes, size %d, %v; want %d bytes, size %d", tt.name, len(raw), size, err, len(tt.raw), tt.size)
		}
	}
}
