// Package safefile creates and checks the files that hold PHI at rest: the
// store folder and its files, the journals, an evidence export. They are
// private to the user running hl7mail (folders 0700, files 0600), never
// reached through a symbolic link another user planted, and an export never
// writes into a file or folder prepared by someone else.
//
// It imports, of this module, nothing.
package safefile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUnsafe is wrapped by every refusal of this package.
var ErrUnsafe = errors.New("unsafe file")

// OpenPrivate opens path for reading and writing, creating it with mode
// 0600 when missing; a symbolic link at path is refused (O_NOFOLLOW).
func OpenPrivate(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, fmt.Errorf("%w: %s is a symbolic link", ErrUnsafe, path)
	}
	return f, err
}

// CreateNew creates path with mode 0600 and writes data to it; it fails
// when anything (a file, a link) is there already (O_EXCL|O_NOFOLLOW).
func CreateNew(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Problems are what CheckDir found: Refusals stop the use of the folder;
// Warnings are logged.
type Problems struct {
	Refusals []string
	Warnings []string
}

// Err returns the refusals as one error wrapping ErrUnsafe, nil if none.
func (p Problems) Err() error {
	if len(p.Refusals) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrUnsafe, joinLines(p.Refusals))
}

func joinLines(lines []string) string {
	out := lines[0]
	for _, l := range lines[1:] {
		out += "; " + l
	}
	return out
}

// CheckDir checks a folder that holds PHI and what is directly in it: the
// folder must not be a symbolic link, nor it or a file in it be readable
// or writable by group or others (each refusal names the chmod that mends
// it), and nothing in it may be a symbolic link. A folder or file owned by
// another user than the one running is a warning. A missing folder, or an
// empty one of ours, is no problem (MakePrivateDir makes it private).
func CheckDir(dir string) Problems {
	var p Problems
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return p
	}
	if err != nil {
		p.Refusals = append(p.Refusals, err.Error())
		return p
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		p.Refusals = append(p.Refusals, fmt.Sprintf("%s is a symbolic link: name the folder itself", dir))
		return p
	}
	check := func(path string, fi os.FileInfo, want os.FileMode) {
		if fi.Mode().Perm()&0o077 != 0 {
			p.Refusals = append(p.Refusals, fmt.Sprintf("%s is open to group or others (mode %04o): chmod %o %s",
				path, fi.Mode().Perm(), want, path))
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
			p.Warnings = append(p.Warnings, fmt.Sprintf("%s belongs to user %d, not to the user running (%d)", path, st.Uid, os.Geteuid()))
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		p.Refusals = append(p.Refusals, err.Error())
		return p
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); len(entries) > 0 || !ok || int(st.Uid) != os.Geteuid() {
		check(dir, fi, 0o700) // an empty folder of ours is made private (MakePrivateDir)
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		fi, err := os.Lstat(path)
		if err != nil {
			continue
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			p.Refusals = append(p.Refusals, fmt.Sprintf("%s is a symbolic link: the store holds no links (remove it)", path))
		case fi.IsDir():
			check(path, fi, 0o700)
		default:
			check(path, fi, 0o600)
		}
	}
	return p
}

// MakePrivateDir makes dir with mode 0700 (and its parents as needed). An
// empty folder of ours that is already there (made by mkdir, say) is made
// 0700: it holds nothing yet that group or others could have read.
func MakePrivateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil || fi.Mode().Perm()&0o077 == 0 {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Geteuid() {
		return nil // CheckDir refuses it
	}
	if entries, err := os.ReadDir(dir); err != nil || len(entries) > 0 {
		return err
	}
	return os.Chmod(dir, 0o700)
}

// ExportDir prepares dir for an export: made private when missing; when it
// exists, it must be a folder of ours (not a link), private, and empty, so
// that nothing another user prepared is written through.
func ExportDir(dir string) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return MakePrivateDir(dir)
	}
	if err != nil {
		return err
	}
	switch {
	case fi.Mode()&os.ModeSymlink != 0:
		return fmt.Errorf("%w: %s is a symbolic link", ErrUnsafe, dir)
	case !fi.IsDir():
		return fmt.Errorf("%w: %s is not a folder", ErrUnsafe, dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: %s belongs to user %d, not to the user running: name a new folder", ErrUnsafe, dir, st.Uid)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%w: %s is open to group or others (mode %04o): chmod 700 %s, or name a new folder",
			ErrUnsafe, dir, fi.Mode().Perm(), dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if len(entries) > 0 {
		return fmt.Errorf("%w: %s is not empty: name a new or empty folder", ErrUnsafe, dir)
	}
	return nil
}
