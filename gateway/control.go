package gateway

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"

	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/internal/safefile"
)

// The operator's ways in: the dashboard on dashboard.addr (the page, its
// API, /metrics) and the control socket in the store folder that the
// operator commands and pipe mode's hand-over use.

// startDashboard listens on dashboard.addr and serves the page.
func (g *Gateway) startDashboard(opts Options) error {
	cfg := opts.Config
	token := ""
	if cfg.Dashboard.TokenFile != "" {
		t, err := cfg.Secret(cfg.Dashboard.TokenFile, "")
		if err != nil {
			return fmt.Errorf("dashboard token: %w", err)
		}
		token = t
	}
	d, err := dashboard.New(dashboard.Options{Addr: cfg.Dashboard.Addr, Instance: g, Token: token, Tail: opts.Tail,
		Metrics: g.metrics, Logger: opts.Logger.With("component", "dashboard")})
	if err != nil {
		return err
	}
	ln, err := d.Listen()
	if err != nil {
		return err
	}
	ctl, err := listenControl(filepath.Join(cfg.StoreDir(), ControlSocket))
	if err != nil {
		ln.Close()
		return err
	}
	if cfg.Dashboard.TokenFile == "" {
		// The token every change on the page needs, for the operator
		// ("hl7mail dashboard" prints the page's address with it).
		if err := writePrivate(filepath.Join(cfg.StoreDir(), TokenFile), d.Token()+"\n"); err != nil {
			ln.Close()
			ctl.Close()
			return fmt.Errorf("dashboard token: %w", err)
		}
	}
	g.dash, g.dashLn, g.ctlLn = d, ln, ctl
	g.dashWG.Add(2)
	go func() {
		defer g.dashWG.Done()
		if err := d.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.log.Error("dashboard stopped", "err", err)
		}
	}()
	go func() {
		defer g.dashWG.Done()
		if err := d.ServeControl(ctl); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.log.Error("control socket stopped", "err", err)
		}
	}()
	return nil
}

// Files in the store folder for the operator commands.
const (
	// ControlSocket is the unix socket the operator commands and pipe
	// mode's hand-over use (mode 0600: the user running serve only).
	ControlSocket = "hl7mail.sock"
	// TokenFile holds, without dashboard.token_file, the token the page's
	// changes need (mode 0600).
	TokenFile = "dashboard.token"
)

// listenControl listens on the control socket at path, owner only. A
// socket left there by an instance that died is removed (the store's lock
// says no other instance runs); anything else there is refused.
func listenControl(path string) (net.Listener, error) {
	if len(path) > 107 {
		return nil, fmt.Errorf("control socket %s: the path is %d bytes, more than a unix socket allows (107): move the store", path, len(path))
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: something else is there", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, nil
}

// writePrivate writes data to path, mode 0600, refusing a link there.
func writePrivate(path, data string) error {
	f, err := safefile.OpenPrivate(path)
	if err != nil {
		return err
	}
	if err = f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(data), 0)
	}
	return errors.Join(err, f.Close())
}
