package dashboard

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hl7mail/hl7mail/store"
)

// The JSON API: what the page and the operator commands read and change.

func (s *Server) overview(w http.ResponseWriter, r *http.Request) {
	rows, err := Rows(r.Context(), s.o.Instance.Config(), s.o.Instance.Records(), s.o.Instance)
	if err != nil {
		fail(w, err)
		return
	}
	n, err := s.o.Instance.Records().OpenAlerts(r.Context())
	if err != nil {
		fail(w, err)
		return
	}
	cv, err := s.o.Instance.Cluster(r.Context())
	if err != nil {
		fail(w, err)
		return
	}
	cfg := s.o.Instance.Config()
	writeJSON(w, Overview{Self: cfg.Self.Name, Email: cfg.Self.Email, Now: time.Now(), SMTP: s.o.Instance.SMTPStatus(),
		IMAP: s.o.Instance.IMAPStatus(), OpenAlerts: n, Partners: rows, Cluster: cv})
}

// cluster is GET /api/cluster: the nodes, their last heartbeat and who
// holds which role (ClusterView); 404 for an instance that runs alone.
func (s *Server) cluster(w http.ResponseWriter, r *http.Request) {
	cv, err := s.o.Instance.Cluster(r.Context())
	switch {
	case err != nil:
		fail(w, err)
	case cv == nil:
		http.Error(w, "not a node of a cluster", http.StatusNotFound)
	default:
		writeJSON(w, cv)
	}
}

func (s *Server) partners(w http.ResponseWriter, r *http.Request) {
	rows, err := Rows(r.Context(), s.o.Instance.Config(), s.o.Instance.Records(), s.o.Instance)
	if err != nil {
		fail(w, err)
		return
	}
	writeJSON(w, rows)
}

func (s *Server) alerts(w http.ResponseWriter, r *http.Request) {
	list, err := s.o.Instance.Records().Alerts(r.Context(), r.URL.Query().Get("all") != "", limit(r, 500))
	writeList(w, list, err)
}

// keys is GET /api/keys: every key and certificate, ours and the
// partners', with its state (KeyRow).
func (s *Server) keys(w http.ResponseWriter, r *http.Request) {
	writeList(w, s.o.Instance.Keys(), nil)
}

// Who and why, sent with an acknowledgement or a release.
type actBody struct {
	By   string `json:"by"`
	Note string `json:"note"`
}

func readAct(r *http.Request) (actBody, error) {
	var b actBody
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 16<<10))
	if err := dec.Decode(&b); err != nil {
		return b, fmt.Errorf("%w: body: %v", errBadRequest, err)
	}
	b.By, b.Note = strings.TrimSpace(b.By), strings.TrimSpace(b.Note)
	if b.By == "" {
		return b, fmt.Errorf("%w: say who you are (\"by\")", errBadRequest)
	}
	return b, nil
}

func pathID(r *http.Request) (int64, error) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil || id <= 0 {
		return 0, fmt.Errorf("%w: bad id %q", errBadRequest, r.PathValue("id"))
	}
	return id, nil
}

func (s *Server) ackAlert(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r)
	if err != nil {
		fail(w, err)
		return
	}
	b, err := readAct(r)
	if err != nil {
		fail(w, err)
		return
	}
	if err := s.o.Instance.Records().AckAlert(r.Context(), id, b.By); err != nil {
		fail(w, err)
		return
	}
	s.log.Info("alert acknowledged", "alert_id", id, "by", b.By)
	writeJSON(w, map[string]any{"acknowledged": id})
}

func (s *Server) messages(w http.ResponseWriter, r *http.Request) {
	list, err := s.o.Instance.Records().Search(r.Context(), r.URL.Query().Get("q"), limit(r, 200))
	writeList(w, list, err)
}

// reports lists the receipts and delivery-status reports that came back,
// newest first; ?message=ID those about one message.
func (s *Server) reports(w http.ResponseWriter, r *http.Request) {
	f := store.ReportFilter{Partner: r.URL.Query().Get("partner"), Limit: limit(r, 200)}
	if v := r.URL.Query().Get("message"); v != "" {
		id, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			fail(w, fmt.Errorf("%w: message must be a number", errBadRequest))
			return
		}
		f.Message = id
	}
	list, err := s.o.Instance.Records().Reports(r.Context(), f)
	writeList(w, list, err)
}

func (s *Server) retry(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r)
	if err != nil {
		fail(w, err)
		return
	}
	if err := s.o.Instance.Retry(r.Context(), id); err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			err = fmt.Errorf("%w: %v", errConflict, err)
		}
		fail(w, err)
		return
	}
	writeJSON(w, map[string]any{"requeued": id})
}

// retryAll puts the failed and expired messages of the partner named in
// the body ({"partner": "tucker-lab"}), or of all ({"partner": ""}), back
// in their queues.
func (s *Server) retryAll(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Partner string `json:"partner"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 4096)).Decode(&body); err != nil {
		fail(w, fmt.Errorf("%w: a JSON body {\"partner\": NAME or \"\"} is required", errBadRequest))
		return
	}
	n, err := s.o.Instance.RetryAll(r.Context(), body.Partner)
	if err != nil {
		fail(w, err)
		return
	}
	writeJSON(w, map[string]any{"requeued": n})
}

// reload applies the configuration file again, or says why it was refused.
func (s *Server) reload(w http.ResponseWriter, r *http.Request) {
	if err := s.o.Instance.Reload(r.Context()); err != nil {
		fail(w, fmt.Errorf("%w: %v", errConflict, err))
		return
	}
	writeJSON(w, map[string]any{"reloaded": true})
}
