package safefile

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheckDir(t *testing.T) {
	dir := t.TempDir()
	store := filepath.Join(dir, "store")
	if p := CheckDir(store); len(p.Refusals) != 0 {
		t.Errorf("missing folder: %v", p.Refusals)
	}
	os.Mkdir(store, 0o755)
	if p := CheckDir(store); len(p.Refusals) != 0 {
		t.Errorf("empty folder of ours: %v", p.Refusals)
	}
	if err := MakePrivateDir(store); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(store); fi.Mode().Perm() != 0o700 {
		t.Errorf("MakePrivateDir left mode %04o", fi.Mode().Perm())
	}
	f, err := OpenPrivate(filepath.Join(store, "hl7mail.db"))
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if fi, _ := os.Stat(filepath.Join(store, "hl7mail.db")); fi.Mode().Perm() != 0o600 {
		t.Errorf("OpenPrivate made mode %04o", fi.Mode().Perm())
	}
	if p := CheckDir(store); len(p.Refusals) != 0 {
		t.Errorf("private store: %v", p.Refusals)
	}
	// A folder opened to others, a file readable by them, a planted link.
	os.Chmod(store, 0o755)
	os.WriteFile(filepath.Join(store, "outgoing.mbox"), nil, 0o644)
	os.Chmod(filepath.Join(store, "outgoing.mbox"), 0o644)
	os.Symlink("/etc/passwd", filepath.Join(store, "incoming.mbox"))
	p := CheckDir(store)
	got := strings.Join(p.Refusals, "\n")
	for _, want := range []string{"chmod 700 " + store, "chmod 600 " + filepath.Join(store, "outgoing.mbox"),
		filepath.Join(store, "incoming.mbox") + " is a symbolic link"} {
		if !strings.Contains(got, want) {
			t.Errorf("CheckDir refusals lack %q:\n%s", want, got)
		}
	}
	if !errors.Is(p.Err(), ErrUnsafe) {
		t.Errorf("Err = %v", p.Err())
	}
	if _, err := OpenPrivate(filepath.Join(store, "incoming.mbox")); !errors.Is(err, ErrUnsafe) {
		t.Errorf("OpenPrivate through a link = %v, want ErrUnsafe", err)
	}
	if err := MakePrivateDir(store); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(store); fi.Mode().Perm() != 0o755 {
		t.Errorf("MakePrivateDir changed a folder that holds files")
	}
}

func TestExport(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	if err := ExportDir(out); err != nil {
		t.Fatal(err)
	}
	if err := CreateNew(filepath.Join(out, "report.txt"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := CreateNew(filepath.Join(out, "report.txt"), []byte("y")); err == nil {
		t.Errorf("CreateNew over an existing file succeeded")
	}
	os.Symlink("/etc/hostname", filepath.Join(out, "planted.eml"))
	if err := CreateNew(filepath.Join(out, "planted.eml"), []byte("y")); err == nil {
		t.Errorf("CreateNew through a planted link succeeded")
	}
	if err := ExportDir(out); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("ExportDir of a non-empty folder = %v", err)
	}
	link := filepath.Join(dir, "link")
	os.Symlink(out, link)
	if err := ExportDir(link); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("ExportDir of a link = %v", err)
	}
	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := ExportDir(open); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("ExportDir of a folder others can read = %v", err)
	}
}
