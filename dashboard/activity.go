package dashboard

import (
	"net/http"
	"time"

	"github.com/hl7mail/hl7mail/store"
)

// ActivityWindow and ActivityStep shape the charts: the last 24 hours in
// steps of 5 minutes.
const (
	ActivityWindow = 24 * time.Hour
	ActivityStep   = 5 * time.Minute
)

// activityView is GET /api/activity: every configured partner's activity
// (empty series for one without traffic), and the alerts of no partner.
type activityView struct {
	Start    time.Time                  `json:"start"`
	End      time.Time                  `json:"end"`
	StepSecs float64                    `json:"step_secs"`
	Partners map[string]*store.Activity `json:"partners"`
	Others   []store.AlertMark          `json:"other_alerts"`
}

func (s *Server) activity(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	since := now.Add(-ActivityWindow)
	acts, err := s.o.Instance.Records().Activity(r.Context(), since, now, ActivityStep)
	if err != nil {
		fail(w, err)
		return
	}
	v := activityView{Start: since, End: now, StepSecs: ActivityStep.Seconds(), Partners: map[string]*store.Activity{},
		Others: []store.AlertMark{}}
	for _, p := range s.o.Instance.Config().Partners {
		if a := acts[p.Name]; a != nil {
			v.Partners[p.Name] = a
		} else {
			v.Partners[p.Name] = store.NewActivity(since, now, ActivityStep)
		}
	}
	if a := acts[""]; a != nil {
		v.Others = a.Alerts
	}
	writeJSON(w, v)
}
