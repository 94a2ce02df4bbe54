package dashboard

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/inbound"
)

// logStream sends the log tail as Server-Sent Events: the kept records
// after Last-Event-ID (or ?since=; by default the last 200), then each new
// one, filtered by ?partner= and ?level= (the lowest level shown).
func (s *Server) logStream(w http.ResponseWriter, r *http.Request) {
	if s.o.Tail == nil {
		http.Error(w, "no log tail", http.StatusNotFound)
		return
	}
	q := r.URL.Query()
	var min slog.Level
	if err := min.UnmarshalText([]byte(strings.ToUpper(q.Get("level")))); err != nil || q.Get("level") == "" {
		min = slog.LevelDebug
	}
	partner := q.Get("partner")
	after, haveAfter := uint64(0), false
	for _, v := range []string{r.Header.Get("Last-Event-ID"), q.Get("since")} {
		if n, err := strconv.ParseUint(v, 10, 64); err == nil {
			after, haveAfter = n, true
			break
		}
	}
	entries, _ := s.o.Tail.Since(after)
	if !haveAfter && len(entries) > 200 {
		after = entries[len(entries)-201].ID
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, "retry: 1000\n\n")
	rc.Flush()
	ping := time.NewTicker(15 * time.Second)
	defer ping.Stop()
	for {
		entries, changed := s.o.Tail.Since(after)
		for _, e := range entries {
			after = e.ID
			var lv slog.Level
			lv.UnmarshalText([]byte(e.Level))
			if lv < min || partner != "" && e.Partner != partner {
				continue
			}
			data, _ := json.Marshal(e)
			fmt.Fprintf(w, "id: %d\nevent: log\ndata: %s\n\n", e.ID, data)
		}
		if err := rc.Flush(); err != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-s.quit:
			return
		case <-changed:
		case <-ping.C:
			fmt.Fprint(w, ": ping\n\n")
		}
	}
}

// ReceiveAnswer is what /api/receive answers for a mail taken in.
type ReceiveAnswer struct {
	Stored      int64  `json:"stored,omitempty"`      // the stored message
	Quarantined string `json:"quarantined,omitempty"` // the reason it was refused
	Replay      bool   `json:"replay,omitempty"`
	Receipt     string `json:"receipt,omitempty"` // what a receipt it carried matched
}

// receive takes in a mail from "hl7mail receive" (pipe mode): 200 once it
// is stored or quarantined, 413 when it is beyond any limit, 503 when
// nothing was decided (the MTA tries again).
func (s *Server) receive(w http.ResponseWriter, r *http.Request) {
	// A mail over the limit comes as its header alone, with its size.
	limit := int64(s.o.Instance.Config().IMAP.MaxMailSize)
	oversize, _ := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
	if oversize > limit {
		limit = 64 << 10
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			http.Error(w, fmt.Sprintf("413: the mail is larger than %d bytes", limit), http.StatusRequestEntityTooLarge)
			return
		}
		http.Error(w, "400: "+err.Error(), http.StatusBadRequest)
		return
	}
	var res inbound.Result
	if oversize > int64(s.o.Instance.Config().IMAP.MaxMailSize) {
		res, err = s.o.Instance.ReceiveOversize(r.Context(), raw, oversize)
	} else {
		res, err = s.o.Instance.Receive(r.Context(), raw, r.URL.Query().Get("to"))
	}
	if err != nil {
		s.log.Error("mail from the MTA not taken; it will be offered again", "err", err)
		http.Error(w, "503: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	a := ReceiveAnswer{Stored: res.ID, Replay: res.Replay}
	if res.Quarantine != nil {
		a.Quarantined = string(res.Quarantine.Reason)
	}
	if res.Receipt != nil {
		a.Receipt = res.Receipt.String()
	}
	writeJSON(w, a)
}
