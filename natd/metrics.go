package natd

import (
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"k8s.io/klog/v2"

	"natd.dev/natd/natd/dataplane"
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
	// Lease renewals this node withheld (it could not prove it may serve) and that
	// failed in the kernel; kernel drift that was repaired.
	LeaseRenewalsWithheld prometheus.Counter
	LeaseRenewalFailures  prometheus.Counter
	DriftRepairs          prometheus.Counter
	// QuorumBreaks counts the times this node lost its quorum of voters (a holder
	// gives its IPs up at each); quorumBreaksSeen is the evidence's count last added.
	QuorumBreaks     prometheus.Counter
	quorumBreaksSeen uint64
	// The gossip keys in use: how many, and the primary's fingerprint (a key rotation
	// waits for every node to show the same).
	GossipKeys       prometheus.Gauge
	GossipPrimaryKey *prometheus.GaugeVec
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
		LeaseRenewalsWithheld: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_lease_renewals_withheld_total",
			Help: "Lease renewals skipped because this node could not show it may serve (stuck or failing sync loop, no quorum of voters in touch)."}),
		LeaseRenewalFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_lease_renewal_failures_total", Help: "Lease renewals the kernel refused (natd's tables were changed); each triggers a repair."}),
		DriftRepairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_kernel_drift_repairs_total", Help: "Times natd found its kernel state changed by someone else and repaired it."}),
		QuorumBreaks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "natd_quorum_breaks_total",
			Help: "Times this node lost touch with a majority of the voters for longer than --lease (a holder gives its egress IPs up at each; on a healthy network, 0)."}),
		GossipKeys: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "natd_gossip_keys", Help: "Gossip keys this node accepts (--gossip-key-file, re-read every 2 s)."}),
		GossipPrimaryKey: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "natd_gossip_primary_key", Help: "1 for the fingerprint (first 8 hex digits of its SHA-256) of the key this node sends with."},
			[]string{"fingerprint"}),
	}
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{Name: "natd_build_info", Help: "1, labelled with the running natd's version, revision and Go version.",
		ConstLabels: prometheus.Labels{"version": Version, "revision": Revision(), "goversion": runtime.Version()}})
	buildInfo.Set(1)
	m.Registry.MustRegister(buildInfo)
	m.Registry.MustRegister(m.SyncDuration, m.SyncFailures, m.LastSuccessfulAt, m.EgressIPsHeld, m.MembersAlive, m.Failovers,
		m.LeaseRenewalsWithheld, m.LeaseRenewalFailures, m.DriftRepairs, m.QuorumBreaks, m.GossipKeys, m.GossipPrimaryKey,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// countQuorumBreaks adds the breaks the evidence counted since the last call (its
// count only grows; the renewal loop, its one caller, reads it every lease/4).
func (m *Metrics) countQuorumBreaks(total uint64) {
	if m == nil || total <= m.quorumBreaksSeen {
		return
	}
	m.QuorumBreaks.Add(float64(total - m.quorumBreaksSeen))
	m.quorumBreaksSeen = total
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
}

// kernelCounters exports natd's nftables counters, read at scrape time: SNATed packets
// and bytes of each egress IP this node holds (an IP it no longer holds has no series),
// and pinned packets dropped, by reason.
type kernelCounters struct {
	read                            func() (dataplane.Counters, error)
	snatPackets, snatBytes, dropped *prometheus.Desc
}

// ExportCounters registers the nftables counters that read returns.
func (m *Metrics) ExportCounters(read func() (dataplane.Counters, error)) {
	m.Registry.MustRegister(&kernelCounters{
		read: read,
		snatPackets: prometheus.NewDesc("natd_snat_packets_total",
			"Pinned packets that left this node with the egress IP (counted while the node holds it).", []string{"egress_ip"}, nil),
		snatBytes: prometheus.NewDesc("natd_snat_bytes_total",
			"Bytes of pinned packets that left this node with the egress IP (counted while the node holds it).", []string{"egress_ip"}, nil),
		dropped: prometheus.NewDesc("natd_pinned_packets_dropped_total",
			"Pinned packets dropped rather than sent with another source IP: fail_closed (no node holds the egress IP), "+
				"leak_guard (would have left with another address), no_ipv4_egress and no_ipv6_egress (traffic of a pinned pod "+
				"whose namespace has no egress IP of that family), "+
				"stray_reply (a reply, in flight when natd deleted its connection, that would have unpinned it), "+
				"unclassified (from a pinned pod's device with an address natd's maps do not name), "+
				"unpinned_transit (another node's pod not known as pinned here yet).", []string{"reason"}, nil),
	})
}

func (k *kernelCounters) Describe(ch chan<- *prometheus.Desc) {
	ch <- k.snatPackets
	ch <- k.snatBytes
	ch <- k.dropped
}

func (k *kernelCounters) Collect(ch chan<- prometheus.Metric) {
	c, err := k.read()
	if err != nil {
		// A scrape must not fail for it; the next one reads again.
		klog.V(2).InfoS("Reading nftables counters failed", "err", err)
		return
	}
	for ip, v := range c.SNAT {
		ch <- prometheus.MustNewConstMetric(k.snatPackets, prometheus.CounterValue, float64(v.Packets), ip.String())
		ch <- prometheus.MustNewConstMetric(k.snatBytes, prometheus.CounterValue, float64(v.Bytes), ip.String())
	}
	for _, reason := range dataplane.DropReasons {
		ch <- prometheus.MustNewConstMetric(k.dropped, prometheus.CounterValue, float64(c.Drops[reason].Packets), reason)
	}
}
