package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// sdNotify tells systemd of the service's state (sd_notify(3)) when it runs
// as a Type=notify unit: NOTIFY_SOCKET is set then; elsewhere it does
// nothing.
func sdNotify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notification not sent", "state", state, "err", err)
	}
}

// watchdog pings systemd's watchdog (WatchdogSec= in the unit) at half the
// interval it asks for, until ctx ends; without a watchdog it returns at
// once.
func watchdog(ctx context.Context, log *slog.Logger) {
	every, err := daemon.SdWatchdogEnabled(false)
	if err != nil || every <= 0 {
		return
	}
	t := time.NewTicker(every / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			sdNotify(log, daemon.SdNotifyWatchdog)
		}
	}
}
