package journal

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestAppendRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "outgoing.mbox")
	j, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	mails := [][]byte{
		[]byte("From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n"),
		[]byte("Subject: tricky\r\n\r\nFrom here on\r\n>From there\r\n>>From afar\r\nFromage\r\n"),
		[]byte("Subject: no final newline\r\n\r\nend"),
		[]byte("Subject: empty body\r\n\r\n"),
	}
	var offs []int64
	for _, m := range mails {
		off, err := j.Append("edi@hospital.test", at, m)
		if err != nil {
			t.Fatal(err)
		}
		offs = append(offs, off)
	}
	j.Close()
	entries, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(mails) {
		t.Fatalf("Read = %d entries, want %d", len(entries), len(mails))
	}
	for i, e := range entries {
		if !bytes.Equal(e.Mail, mails[i]) || e.Offset != offs[i] || e.From != "edi@hospital.test" || !e.Time.Equal(at) {
			t.Errorf("entry %d = %+v (%q), want %q at %d", i, e, e.Mail, mails[i], offs[i])
		}
	}
	// Reopening appends after what is there.
	j, _ = Open(path)
	j.Append("", at, []byte("Subject: later\r\n\r\nx\r\n"))
	j.Close()
	if entries, _ := Read(path); len(entries) != 5 || entries[4].From != "MAILER-DAEMON" {
		t.Errorf("after reopen: %d entries", len(entries))
	}
}

func TestConcurrentAppend(t *testing.T) {
	path := filepath.Join(t.TempDir(), "j.mbox")
	j, _ := Open(path)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			j.Append("x@y", time.Now(), bytes.Repeat([]byte("line\r\n"), i+1))
		}()
	}
	wg.Wait()
	j.Close()
	entries, err := Read(path)
	if err != nil || len(entries) != 20 {
		t.Fatalf("Read = %d, %v", len(entries), err)
	}
}

func TestNotMbox(t *testing.T) {
	if _, err := ReadFrom(bytes.NewReader([]byte("Subject: x\n\nbody\n"))); err != ErrFormat {
		t.Errorf("ReadFrom(no From line) = %v, want ErrFormat", err)
	}
}

// TestMailProgramReadsIt: Python's mailbox module, as a mail program would,
// finds every message and its subject.
func TestMailProgramReadsIt(t *testing.T) {
	py := "/usr/bin/python3"
	if _, err := os.Stat(py); err != nil {
		t.Skip("no /usr/bin/python3")
	}
	path := filepath.Join(t.TempDir(), "j.mbox")
	j, _ := Open(path)
	j.Append("a@b", time.Now(), []byte("Subject: one\r\n\r\nFrom me\r\n"))
	j.Append("a@b", time.Now(), []byte("Subject: two\r\n\r\nbye\r\n"))
	j.Close()
	out, err := exec.Command(py, "-c", "import mailbox,sys; print([m['subject'] for m in mailbox.mbox(sys.argv[1])])", path).CombinedOutput()
	if err != nil || string(bytes.TrimSpace(out)) != "['one', 'two']" {
		t.Errorf("python mailbox: %v %s", err, out)
	}
}

func FuzzReadFrom(f *testing.F) {
	f.Add([]byte("From a Mon Jan  2 15:04:05 2006\nSubject: x\n\n>From y\n\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ReadFrom(bytes.NewReader(b))
	})
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte("Subject: x\r\n\r\nFrom y\r\n"))
	f.Fuzz(func(t *testing.T, mail []byte) {
		path := filepath.Join(t.TempDir(), "j")
		j, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		j.Append("a", time.Unix(0, 0), mail)
		j.Append("b", time.Unix(0, 0), []byte("x\n"))
		j.Close()
		entries, err := Read(path)
		if err != nil || len(entries) != 2 || !bytes.Equal(entries[0].Mail, mail) {
			t.Fatalf("round trip of %q: %d entries, %v", mail, len(entries), err)
		}
	})
}

// TestAppendAll: a group appended with one sync reads back as the same
// entries, each at the offset returned, after what was there.
func TestAppendAll(t *testing.T) {
	path := filepath.Join(t.TempDir(), "outgoing.mbox")
	j, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	at := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	first, _ := j.Append("edi@hospital.test", at, []byte("Subject: before\r\n\r\nx\r\n"))
	group := []Mail{
		{From: "edi@hospital.test", Time: at, Bytes: []byte("Subject: one\r\n\r\nFrom the lab\r\n")},
		{From: "edi@hospital.test", Time: at, Bytes: []byte("Subject: two\r\n\r\nno final newline")},
		{From: "", Time: at, Bytes: []byte("Subject: three\r\n\r\n")},
	}
	offs, err := j.AppendAll(group)
	if err != nil || len(offs) != 3 {
		t.Fatalf("AppendAll: %v, %v", offs, err)
	}
	entries, err := Read(path)
	if err != nil || len(entries) != 4 || entries[0].Offset != first {
		t.Fatalf("Read: %d entries, %v", len(entries), err)
	}
	for i, e := range entries[1:] {
		if !bytes.Equal(e.Mail, group[i].Bytes) || e.Offset != offs[i] {
			t.Errorf("entry %d = %q at %d, want %q at %d", i, e.Mail, e.Offset, group[i].Bytes, offs[i])
		}
	}
}
