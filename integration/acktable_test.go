package integration

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/mllp"
)

// variant rewrites a corpus message's MSH: control ID id, version, MSH-15
// and MSH-16 (empty: original mode), and, with noType, no MSH-9 (a message
// the surrogate refuses).
func variant(m []byte, id, version, msh15, msh16 string, noType bool) []byte {
	seg, rest, _ := strings.Cut(string(m), "\r")
	f := strings.Split(seg, "|")
	for len(f) < 16 {
		f = append(f, "")
	}
	f[9], f[11], f[14], f[15] = id, version, msh15, msh16
	if noType {
		f[8] = ""
	}
	return []byte(strings.Join(f[:16], "|") + "\r" + rest)
}

// TestAckTable: the surrogate's answers, through Debian's mllp_send, for
// messages of HL7 v2.1, v2.3, v2.5 and v2.8 in original and enhanced
// mode: CA once stored whatever the mode (AA, AE, AR to an original-mode
// sender only with accept_ack: AA), CR for a message it refuses, and no
// answer where MSH-15 says none (NE; ER when accepted; SU when refused).
// Each answer carries the request's version, and its message type as that
// version writes it.
func TestAckTable(t *testing.T) {
	mllpSend := requireTool(t, "/usr/bin/mllp_send")
	in := newInstance(t, "ca", "aa")
	in.edit("{name: aa, ", "{name: aa, accept_ack: AA, ")
	in.start()
	defer in.stop()
	msgs, err := corpus.Default()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// send runs mllp_send with frames and returns its output; it is ended
	// after wait, for a message that gets no answer (mllp_send waits).
	send := func(addr string, frames [][]byte, wait time.Duration) string {
		t.Helper()
		var b []byte
		for _, f := range frames {
			b = mllp.AppendFrame(b, f)
		}
		file := filepath.Join(dir, "msgs.mllp")
		os.WriteFile(file, b, 0o600)
		host, port, _ := net.SplitHostPort(addr)
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		out, _ := exec.CommandContext(ctx, mllpSend, "-p", port, "-f", file, host).Output()
		return string(out)
	}
	type row struct {
		name           string
		msh15, msh16   string
		refused        bool
		wantCA, wantAA string // the answer's MSA-1 for the partners ca and aa; "" for none
	}
	rows := []row{
		{"original mode", "", "", false, "CA", "AA"},
		{"enhanced AL/AL", "AL", "AL", false, "CA", "CA"},
		{"enhanced AL/NE", "AL", "NE", false, "CA", "CA"},
		{"SU, accepted", "SU", "AL", false, "CA", "CA"},
		{"original mode, refused", "", "", true, "CR", "AR"},
		{"ER, refused", "ER", "AL", true, "CR", "CR"},
		{"NE", "NE", "NE", false, "", ""},
		{"ER, accepted", "ER", "AL", false, "", ""},
		{"SU, refused", "SU", "AL", true, "", ""},
	}
	n := 0
	for _, version := range []string{"2.1", "2.3", "2.5", "2.8"} {
		for _, partner := range []string{"ca", "aa"} {
			var answered [][]byte
			var want []string
			for _, r := range rows {
				n++
				id := fmt.Sprintf("T%s-%s-%d", strings.ReplaceAll(version, ".", ""), partner, n)
				m := variant(msgs[n%len(msgs)], id, version, r.msh15, r.msh16, r.refused)
				code := r.wantCA
				if partner == "aa" {
					code = r.wantAA
				}
				if code == "" {
					if out := send(in.listen[partner], [][]byte{m}, time.Second); strings.Contains(out, "MSA|") {
						t.Errorf("v%s %s to %s: answered %q, want no answer", version, r.name, partner, out)
					}
					continue
				}
				answered = append(answered, m)
				want = append(want, code+"|"+id)
			}
			out := send(in.listen[partner], answered, 30*time.Second)
			acks := strings.Split(strings.TrimSpace(out), "\n")
			var got []string
			for _, a := range acks {
				a = strings.ReplaceAll(a, "\x0b", "")
				if i := strings.Index(a, "\rMSA|"); i >= 0 {
					f := strings.Split(a[i+1:], "\r")[0]
					parts := strings.Split(f, "|")
					got = append(got, parts[1]+"|"+parts[2])
					h, err := hl7.ParseHeader([]byte(a[strings.Index(a, "MSH|"):]))
					wantType := "ACK"
					if version == "2.5" || version == "2.8" {
						wantType = "ACK^"
					}
					if err != nil || h.Version != version || !strings.HasPrefix(h.MessageType, wantType) ||
						(wantType == "ACK" && h.MessageType != "ACK") {
						t.Errorf("v%s answer header: %v, %v; want version %s and type %s…", version, h, err, version, wantType)
					}
				}
			}
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("v%s to %s: answers\n %v\nwant\n %v", version, partner, got, want)
			}
		}
	}
	stored := 0
	for _, m := range in.messages() {
		if !bytes.HasPrefix([]byte(m.ControlID), []byte("T")) {
			continue
		}
		stored++
	}
	// Every message but the refused ones is stored, answered or not.
	if want := 4 * 2 * 6; stored != want {
		t.Errorf("%d messages stored, want %d", stored, want)
	}
}
