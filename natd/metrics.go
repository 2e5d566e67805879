package natd

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the agent's Prometheus metrics and health state.
type Metrics struct {
	Registry         *prometheus.Registry
	SyncDuration     prometheus.Histogram
	SyncFailures     prometheus.Counter
	LastSuccessfulAt prometheus.Gauge
	EgressIPsHeld    prometheus.Gauge
	MembersAlive     prometheus.Gauge
	Failovers        prometheus.Counter
	synced           atomic.Bool
}

// NewMetrics registers natd's metrics in a fresh registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		SyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "natd_sync_duration_seconds", Help: "Time to compute and apply the node's state.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
		SyncFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_sync_failures_total", Help: "Syncs that failed and were retried."}),
		LastSuccessfulAt: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "natd_last_successful_sync_timestamp_seconds", Help: "Unix time of the last successful sync."}),
		EgressIPsHeld: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "natd_egress_ips_held", Help: "Egress IPs this node holds."}),
		MembersAlive: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "natd_gossip_members_alive", Help: "natd agents this node's gossip sees alive, itself included."}),
		Failovers: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_failovers_total", Help: "Egress IPs this node took over from another node."}),
	}
	m.Registry.MustRegister(m.SyncDuration, m.SyncFailures, m.LastSuccessfulAt, m.EgressIPsHeld, m.MembersAlive, m.Failovers,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *Metrics) observeSync(d time.Duration, err error) {
	if m == nil {
		return
	}
	m.SyncDuration.Observe(d.Seconds())
	if err != nil {
		m.SyncFailures.Inc()
		return
	}
	m.LastSuccessfulAt.SetToCurrentTime()
	m.synced.Store(true)
}

// Handler serves /metrics, /healthz and /readyz (ready once the first sync succeeded).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !m.synced.Load() {
			http.Error(w, errNotReady.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	return mux
}
