// Package pgtest starts a throwaway PostgreSQL for tests and benchmarks:
// Debian's postgresql package (integration/deps.sh installs it), initdb in
// a new temporary folder as an unprivileged user (postgres when run as
// root), the server on a free loopback port with its socket in that
// folder, fsync and synchronous_commit on as production runs it, stopped
// and removed by Stop. Never the system's own cluster or service.
//
// It imports, of this module, nothing.
package pgtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Server is a running throwaway PostgreSQL.
type Server struct {
	DSN   string // postgres://hl7mail@127.0.0.1:PORT/hl7mail?sslmode=disable
	Port  int
	dir   string
	bin   string
	opts  string // the server's options, to start it again
	cred  *syscall.Credential
	watch *exec.Cmd // stops the server if the process that started it dies
}

// Bin returns the folder of Debian's PostgreSQL programs (the newest
// version installed), or an error naming the package to install.
func Bin() (string, error) {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(found, func(i, j int) bool { return version(found[i]) < version(found[j]) })
	if len(found) == 0 {
		return "", errors.New("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql package (integration/deps.sh does)")
	}
	return filepath.Dir(found[len(found)-1]), nil
}

func version(initdb string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(initdb))))
	return v
}

// Start makes a new cluster and starts it; the caller must Stop it.
func Start() (*Server, error) {
	bin, err := Bin()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "hl7mail-pg")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, bin: bin}
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root.
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root, and no postgres user to run PostgreSQL as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := s.run("initdb", "-D", data, "-U", "hl7mail", "-A", "trust", "-E", "UTF8", "--no-locale"); err != nil {
		s.remove()
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	port, err := freePort()
	if err != nil {
		s.remove()
		return nil, err
	}
	s.Port = port
	s.opts = fmt.Sprintf("-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c max_connections=100", port, dir)
	if err := s.Resume(); err != nil {
		s.remove()
		return nil, err
	}
	s.startWatch()
	if out, err := s.run("createdb", "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "hl7mail", "hl7mail"); err != nil {
		s.Stop()
		return nil, fmt.Errorf("createdb: %v\n%s", err, out)
	}
	s.DSN = fmt.Sprintf("postgres://hl7mail@127.0.0.1:%d/hl7mail?sslmode=disable", port)
	return s, nil
}

func (s *Server) run(prog string, args ...string) ([]byte, error) {
	cmd := exec.Command(filepath.Join(s.bin, prog), args...)
	cmd.Dir = s.dir
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	return cmd.CombinedOutput()
}

// watchScript waits for process $1 to end, then stops the server of
// folder $2 at once (SIGQUIT: immediate shutdown) and removes the folder.
const watchScript = `while kill -0 "$1" 2>/dev/null; do sleep 1; done
pid=$(head -n 1 "$2/data/postmaster.pid" 2>/dev/null) && kill -QUIT "$pid" 2>/dev/null
sleep 2
rm -rf "$2"`

// startWatch starts the watchdog: a test process that dies (a panic, a
// timeout, kill -9) runs none of its cleanups, and would leave the server
// running; the watchdog, in a session of its own, stops it once the
// process is gone.
func (s *Server) startWatch() {
	w := exec.Command("/bin/sh", "-c", watchScript, "watch", strconv.Itoa(os.Getpid()), s.dir)
	w.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if w.Start() == nil {
		s.watch = w
	}
}

// Halt stops the server at once, as a crash of its host would (immediate
// mode: no checkpoint; what committed is in the WAL), keeping its folder
// for Resume.
func (s *Server) Halt() error {
	out, err := s.run("pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop")
	if err != nil {
		return fmt.Errorf("pg_ctl stop: %v\n%s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Resume starts the server (again) on its folder and port, recovering
// from the WAL what a Halt left.
func (s *Server) Resume() error {
	data := filepath.Join(s.dir, "data")
	if out, err := s.run("pg_ctl", "-D", data, "-o", s.opts, "-l", filepath.Join(s.dir, "log"), "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(s.dir, "log"))
		return fmt.Errorf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	return nil
}

// Stop stops the server at once (no clean shutdown needed: the folder
// goes) and removes its folder.
func (s *Server) Stop() error {
	if s.watch != nil {
		s.watch.Process.Kill()
		s.watch.Wait()
	}
	out, err := s.run("pg_ctl", "-D", filepath.Join(s.dir, "data"), "-m", "immediate", "-w", "stop")
	s.remove()
	if err != nil {
		return fmt.Errorf("pg_ctl stop: %v\n%s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (s *Server) remove() { os.RemoveAll(s.dir) }

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// WaitGone waits up to d for nothing to listen on port any more.
func WaitGone(port int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 200*time.Millisecond)
		if err != nil {
			return true
		}
		c.Close()
		time.Sleep(50 * time.Millisecond)
	}
	return false
}
