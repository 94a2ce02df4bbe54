package bench

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/hl7mail/hl7mail/internal/corpus"
	"github.com/hl7mail/hl7mail/internal/demo"
)

// RealMail starts a real Postfix and Dovecot on loopback ports, in a new
// folder of their own that their users can reach, with an account
// (password "secret") for each of the demo's addresses, through the
// integration tests' integration/mailservers.sh (found above the working
// directory, in the source tree). stop ends them and removes the folder.
// It needs root and Debian's postfix, dovecot-imapd and dovecot-lmtpd
// (integration/deps.sh installs them).
func RealMail() (ms demo.MailSystem, stop func(), err error) {
	for _, tool := range []string{"postfix", "dovecot"} {
		if _, err := exec.LookPath(tool); err != nil {
			return ms, nil, fmt.Errorf("-real needs Postfix and Dovecot (integration/deps.sh installs them): %w", err)
		}
	}
	if os.Geteuid() != 0 {
		return ms, nil, errors.New("-real needs root: Postfix and Dovecot drop to their own users")
	}
	script, err := corpus.SourceFile(filepath.Join("integration", "mailservers.sh"))
	if err != nil {
		return ms, nil, fmt.Errorf("-real runs from hl7mail's source tree: %w", err)
	}
	ports := demo.Ports{}
	port := func() string { _, p, _ := net.SplitHostPort(ports.Free()); return p }
	smtp, imap, lmtp := port(), port(), port()
	dir, err := os.MkdirTemp("", "hl7mail-bench-mail")
	if err != nil {
		return ms, nil, err
	}
	// Postfix and Dovecot run as users of their own, who must reach it.
	if err := os.Chmod(dir, 0o755); err != nil {
		os.RemoveAll(dir)
		return ms, nil, err
	}
	servers := filepath.Join(dir, "servers")
	stop = func() {
		exec.Command("bash", script, "stop", servers).Run()
		os.RemoveAll(dir)
	}
	start := exec.Command("bash", append([]string{script, "start", servers, smtp, imap, lmtp}, demo.Addresses...)...)
	start.Dir = filepath.Dir(script)
	if out, err := start.CombinedOutput(); err != nil {
		stop()
		return ms, nil, fmt.Errorf("mailservers.sh start: %v\n%s", err, out)
	}
	return demo.MailSystem{SMTP: "127.0.0.1:" + smtp, IMAP: "127.0.0.1:" + imap}, stop, nil
}
