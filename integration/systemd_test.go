package integration

import (
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSystemdNotify: under a Type=notify unit (NOTIFY_SOCKET set, as
// systemd sets it) serve says READY=1 once every surrogate listens,
// RELOADING=1 and READY=1 again around a SIGHUP reload, STOPPING=1 when it
// begins to shut down, and pings the watchdog when WATCHDOG_USEC asks.
func TestSystemdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	got := make(chan string, 64)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(got)
				return
			}
			got <- string(buf[:n])
		}
	}()
	expect := func(want string) {
		t.Helper()
		deadline := time.After(20 * time.Second)
		for {
			select {
			case s, ok := <-got:
				if !ok {
					t.Fatalf("notify socket closed before %s", want)
				}
				if strings.Contains(s, want) {
					return
				}
			case <-deadline:
				t.Fatalf("no %s from serve", want)
			}
		}
	}
	in := newInstance(t, "tucker-lab")
	// Without WATCHDOG_PID (serve's pid is not known before it starts) the
	// watchdog is asked of the process that reads the variable.
	in.env = []string{"NOTIFY_SOCKET=" + sock, "WATCHDOG_USEC=400000"}
	in.start()
	expect("READY=1")
	expect("WATCHDOG=1")
	in.cmd.Process.Signal(syscall.SIGHUP)
	expect("RELOADING=1")
	expect("READY=1")
	in.stop()
	expect("STOPPING=1")
}
