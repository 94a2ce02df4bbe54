package dashboard

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/hl7mail/hl7mail/hl7"
	"github.com/hl7mail/hl7mail/store"
)

// Metrics are hl7mail's Prometheus metrics, every name prefixed hl7mail_.
// Counts of messages, receipts and alerts are read from the store at each
// scrape, so they survive restarts and agree with the page; ACK latency is
// observed as the surrogates answer.
type Metrics struct {
	reg    *prometheus.Registry
	ack    *prometheus.HistogramVec
	limits *prometheus.CounterVec
}

// NewMetrics returns the metrics with the Go runtime and process collectors.
func NewMetrics() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.ack = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "hl7mail_ack_latency_seconds",
		Help: "Time from the end of a router's MLLP frame to the surrogate's accept ACK, by partner and ACK code.",
		// The store syncs before CA: a fraction of a millisecond to tens.
		Buckets: []float64{.0002, .0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 10},
	}, []string{"partner", "code"})
	m.limits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "hl7mail_limit_hits_total",
		Help: "Times a limit refused something, by partner and limit (connections, message_size); oversize mail is counted in hl7mail_quarantined_total{reason=\"oversize\"}.",
	}, []string{"partner", "limit"})
	m.reg.MustRegister(m.ack, m.limits)
	prefixed := prometheus.WrapRegistererWithPrefix("hl7mail_", m.reg)
	prefixed.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// AckObserver returns what records the ACKs partner's surrogate writes,
// its label resolved once: it runs on the accept path.
func (m *Metrics) AckObserver(partner string) func(code hl7.AckCode, d time.Duration) {
	vec := m.ack.MustCurryWith(prometheus.Labels{"partner": partner})
	ca := vec.WithLabelValues(string(hl7.CommitAccept)) // the common answer, looked up once
	return func(code hl7.AckCode, d time.Duration) {
		if code == hl7.CommitAccept {
			ca.Observe(d.Seconds())
			return
		}
		vec.WithLabelValues(string(code)).Observe(d.Seconds())
	}
}

// LimitHit counts one refusal by partner's surrogate because of limit.
func (m *Metrics) LimitHit(partner, limit string) {
	m.limits.WithLabelValues(partner, limit).Inc()
}

// Registry returns the registry /metrics serves.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// watch registers the collector that reads inst at each scrape.
func (m *Metrics) watch(inst Instance) error {
	return m.reg.Register(&instanceCollector{inst: inst})
}

var (
	descMessages = prometheus.NewDesc("hl7mail_messages", "Stored messages by partner, direction and state.",
		[]string{"partner", "direction", "state"}, nil)
	descTaken = prometheus.NewDesc("hl7mail_messages_taken_total",
		"Messages hl7mail took responsibility for (CA sent, or mail stored), by partner and direction.",
		[]string{"partner", "direction"}, nil)
	descQueue = prometheus.NewDesc("hl7mail_queue_depth",
		"Messages waiting: to be mailed (out) or delivered to the router (in).", []string{"partner", "direction"}, nil)
	descPending = prometheus.NewDesc("hl7mail_receipts_pending", "Receipts (MDNs) awaited and not yet due.",
		[]string{"partner"}, nil)
	descOverdue = prometheus.NewDesc("hl7mail_receipts_overdue", "Receipts (MDNs) past their partner's mdn_timeout.",
		[]string{"partner"}, nil)
	descMismatch = prometheus.NewDesc("hl7mail_receipts_mismatch", "Receipts whose MIC did not match what was sent.",
		[]string{"partner"}, nil)
	descQuarantined = prometheus.NewDesc("hl7mail_quarantined", "Refused mail not released.",
		[]string{"partner"}, nil)
	descQuarantinedTotal = prometheus.NewDesc("hl7mail_quarantined_total", "Mail refused since the store was made, by reason.",
		[]string{"reason"}, nil)
	descAlerts  = prometheus.NewDesc("hl7mail_alerts_open", "Alerts not acknowledged.", nil, nil)
	descBacklog = prometheus.NewDesc("hl7mail_store_backlog",
		"Messages taken (synced in the spool log) and not yet in the database; it grows while the database fails.", nil, nil)
	descSyncs = prometheus.NewDesc("hl7mail_spool_syncs_total",
		"Syncs of the spool log (group commits), failed attempts included.", nil, nil)
	descSynced = prometheus.NewDesc("hl7mail_spool_synced_messages_total",
		"Messages in those syncs: divided by the syncs, how many messages share one.", nil, nil)
	descConns = prometheus.NewDesc("hl7mail_router_connections", "Open router connections to the partner's surrogate.",
		[]string{"partner"}, nil)
	descLinkUp = prometheus.NewDesc("hl7mail_mail_server_up",
		"1 when the last contact with the mail server succeeded.", []string{"server"}, nil)
	descLinkErrors = prometheus.NewDesc("hl7mail_mail_server_errors_total",
		"Failed connections or submissions, by server (smtp, imap).", []string{"server"}, nil)
	descQueueOldest = prometheus.NewDesc("hl7mail_queue_oldest_seconds",
		"Age of the oldest message waiting to be mailed (out) or delivered to the router (in); 0 when none waits.",
		[]string{"partner", "direction"}, nil)
	descKeyExpiry = prometheus.NewDesc("hl7mail_key_expiry_timestamp_seconds",
		"When a loaded key or certificate expires (Unix time), by party (self or a partner) and the field naming it.",
		[]string{"party", "field"}, nil)
	descNodeSeen = prometheus.NewDesc("hl7mail_cluster_node_heartbeat_timestamp_seconds",
		"When the cluster's database last heard from the node (Unix time).", []string{"node"}, nil)
	descNodeLive = prometheus.NewDesc("hl7mail_cluster_node_live",
		"1 when the node was heard from within the lease.", []string{"node"}, nil)
	descRole = prometheus.NewDesc("hl7mail_cluster_role_held",
		"1 for the node holding the role (node \"\" while none does).", []string{"role", "node"}, nil)
)

type instanceCollector struct{ inst Instance }

func (c *instanceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMessages, descTaken, descQueue, descPending, descOverdue, descMismatch,
		descQuarantined, descQuarantinedTotal, descAlerts, descBacklog, descSyncs, descSynced, descConns, descLinkUp,
		descLinkErrors, descQueueOldest, descKeyExpiry, descNodeSeen, descNodeLive, descRole} {
		ch <- d
	}
}

func (c *instanceCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st := c.inst.Records()
	// Read before the queries below, which wait for the database.
	ch <- prometheus.MustNewConstMetric(descBacklog, prometheus.GaugeValue, float64(st.Backlog()))
	stats := st.Stats()
	ch <- prometheus.MustNewConstMetric(descSyncs, prometheus.CounterValue, float64(stats.Commits))
	ch <- prometheus.MustNewConstMetric(descSynced, prometheus.CounterValue, float64(stats.Messages))
	counts, err := st.Counts(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descMessages, err)
	}
	type pd struct{ partner, direction string }
	taken, queued, oldest := map[pd]int{}, map[pd]int{}, map[pd]time.Time{}
	for _, n := range counts {
		k := pd{n.Partner, string(n.Direction)}
		ch <- prometheus.MustNewConstMetric(descMessages, prometheus.GaugeValue, float64(n.N), n.Partner, k.direction, string(n.State))
		taken[k] += n.N
		if n.State == store.Queued {
			queued[k] += n.N
			oldest[k] = n.Oldest
		}
	}
	cfg := c.inst.Config()
	for _, p := range cfg.Partners {
		for _, d := range []string{string(store.Outbound), string(store.Inbound)} {
			k := pd{p.Name, d}
			ch <- prometheus.MustNewConstMetric(descTaken, prometheus.CounterValue, float64(taken[k]), p.Name, d)
			ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(queued[k]), p.Name, d)
			age := 0.0
			if at, ok := oldest[k]; ok {
				age = max(time.Since(at).Seconds(), 0)
			}
			ch <- prometheus.MustNewConstMetric(descQueueOldest, prometheus.GaugeValue, age, p.Name, d)
		}
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(c.inst.Connections(p.Name)), p.Name)
	}
	// A key and its encryption subkey are named by one field: the first
	// of them to expire is what the field's key expires by.
	type pf struct{ party, field string }
	expires := map[pf]time.Time{}
	for _, x := range c.inst.Keys() {
		if x.To.IsZero() || x.Kind == "anchor" {
			continue
		}
		k := pf{x.Party, x.Field}
		if at, ok := expires[k]; !ok || x.To.Before(at) {
			expires[k] = x.To
		}
	}
	for k, at := range expires {
		ch <- prometheus.MustNewConstMetric(descKeyExpiry, prometheus.GaugeValue, float64(at.Unix()), k.party, k.field)
	}
	sums, err := st.Summaries(ctx, time.Now())
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descPending, err)
	}
	for _, p := range cfg.Partners {
		s := sums[p.Name]
		if s == nil {
			s = &store.Summary{}
		}
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(s.AwaitingReceipt), p.Name)
		ch <- prometheus.MustNewConstMetric(descOverdue, prometheus.GaugeValue, float64(s.Overdue), p.Name)
		ch <- prometheus.MustNewConstMetric(descMismatch, prometheus.GaugeValue, float64(s.ReceiptsMismatch), p.Name)
		ch <- prometheus.MustNewConstMetric(descQuarantined, prometheus.GaugeValue, float64(s.Quarantined), p.Name)
	}
	if s := sums[""]; s != nil { // mail from unknown senders
		ch <- prometheus.MustNewConstMetric(descQuarantined, prometheus.GaugeValue, float64(s.Quarantined), "")
	}
	if byReason, err := st.QuarantineReasons(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descQuarantinedTotal, err)
	} else {
		for reason, n := range byReason {
			ch <- prometheus.MustNewConstMetric(descQuarantinedTotal, prometheus.CounterValue, float64(n), reason)
		}
	}
	if n, err := st.OpenAlerts(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descAlerts, err)
	} else {
		ch <- prometheus.MustNewConstMetric(descAlerts, prometheus.GaugeValue, float64(n))
	}
	if cv, err := c.inst.Cluster(ctx); err != nil {
		ch <- prometheus.NewInvalidMetric(descNodeLive, err)
	} else if cv != nil {
		for _, n := range cv.Nodes {
			live := 0.0
			if n.Live {
				live = 1
			}
			ch <- prometheus.MustNewConstMetric(descNodeLive, prometheus.GaugeValue, live, n.Name)
			ch <- prometheus.MustNewConstMetric(descNodeSeen, prometheus.GaugeValue, float64(n.Seen.UnixMilli())/1000, n.Name)
		}
		for _, r := range cv.Roles {
			ch <- prometheus.MustNewConstMetric(descRole, prometheus.GaugeValue, 1, r.Role, r.Node)
		}
	}
	for name, l := range map[string]func() linkStatus{"smtp": c.inst.SMTPStatus, "imap": c.inst.IMAPStatus} {
		s := l()
		up := 0.0
		if s.State == "up" {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(descLinkUp, prometheus.GaugeValue, up, name)
		ch <- prometheus.MustNewConstMetric(descLinkErrors, prometheus.CounterValue, float64(s.Errors), name)
	}
}
