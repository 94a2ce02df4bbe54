package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hl7mail/hl7mail/dashboard"
	"github.com/hl7mail/hl7mail/gateway"
)

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("serve", "[-config FILE]", `
Runs the gateway: one surrogate MLLP listener per partner of the
configuration, answering CA once each message is stored, and the sender that
mails stored messages to their partners (signed, encrypted, journalled in
outgoing.mbox, retried while the SMTP server is unreachable); the IMAP
watcher that takes partner mail in and delivers it to the router; and the
dashboard (dashboard.addr: the page, /metrics, /healthz, /readyz). Stops on
SIGINT or SIGTERM, finishing the messages being stored and the mail being
sent. SIGHUP (or "hl7mail reload") reads the configuration, the keys and the
secret files again and applies them without dropping router connections; a
configuration with problems is refused and the running one kept.`, stderr)
	cfgPath := fs.String("config", "partners.yaml", "configuration `file`")
	level := fs.String("log-level", "info", "log level: debug, info, warn, error")
	format := fs.String("log-format", "auto", "log format: auto (text on a terminal, else JSON), json, text")
	grace := fs.Duration("shutdown-timeout", 30*time.Second, "how long to let in-flight messages finish on shutdown")
	if code := parse(fs, args); code >= 0 {
		return code
	}
	log, err := newLogger(stderr, *level, *format)
	if err != nil {
		fmt.Fprintln(stderr, "hl7mail serve:", err)
		return 2
	}
	// The dashboard's live log shows the records written to stderr.
	tail := dashboard.NewTail(0)
	var lv slog.Level
	lv.UnmarshalText([]byte(*level))
	log = slog.New(tail.Handler(log.Handler(), lv))
	cfg, keys, err := loadChecked(*cfgPath)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	for _, w := range keys.Warnings {
		log.Warn("key or certificate expires soon", "detail", w)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// A signal during the start is acted on once the start is done: the
	// start itself is not cut short (it would leave work half begun).
	g, err := gateway.Start(context.Background(), gateway.Options{Config: cfg, Keys: keys, Logger: log, Tail: tail, ConfigPath: *cfgPath})
	if err != nil {
		log.Error("start failed", "err", err)
		return 1
	}
	// Every surrogate listens: systemd may start what comes after us.
	sdNotify(log, daemon.SdNotifyReady)
	go watchdog(ctx, log)
	// SIGHUP reloads partners.yaml, the keys and the secret files.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-hup:
			log.Info("SIGHUP: reloading the configuration", "config", *cfgPath)
			sdNotify(log, daemon.SdNotifyReloading)
			g.Reload(ctx) // refused reloads are logged with every problem
			sdNotify(log, daemon.SdNotifyReady)
		}
	}
	log.Info("shutting down")
	sdNotify(log, daemon.SdNotifyStopping)
	sctx, cancel := context.WithTimeout(context.Background(), *grace)
	defer cancel()
	if err := g.Shutdown(sctx); err != nil {
		log.Error("shutdown", "err", err)
		return 1
	}
	return 0
}
