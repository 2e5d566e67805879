// Package natd is the agent: it watches Namespaces, Pods and Nodes, computes what this
// node's kernel must do so that pinned namespaces leave the cluster with their egress
// IP, and hands that to the dataplane.
package natd

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/bgp"
	"natd.dev/natd/natd/dataplane"
)

// Names of the user interface (see CONTRACT.md).
const (
	AnnotationEgressIP = "egress.natd.dev/ip"
	LabelEgressNode    = "egress.natd.dev/node"
)

// Config is the agent's configuration, from flags.
type Config struct {
	NodeName     string
	NodeIP       netip.Addr // optional: taken from the Node object when unset
	Kubeconfig   string
	EgressCIDRs  []netip.Prefix
	ClusterCIDRs []netip.Prefix
	ServiceCIDRs []netip.Prefix
	ExcludeCIDRs []netip.Prefix
	FailOpen     bool
	MetricsAddr  string
	ResyncPeriod time.Duration
	FwmarkMask   uint32
	RulePriority int
	TableBase    int
	StateDir     string
	// The chained CNI plugin: natd keeps it installed on the node (off when CNIConfDir
	// is empty).
	CNIBinDir  string
	CNIConfDir string
	CNIPlugin  string

	GossipPort          int
	TunnelPort          int
	GossipKeyFile       string
	InsecureGossip      bool
	GossipProbeInterval time.Duration
	GossipProbeTimeout  time.Duration
	GossipSuspicionMult int
	Lease               time.Duration
	HeartbeatInterval   time.Duration
	// HandoverInterval is how often a holder reads the NAT bindings its successors
	// must continue (0: never; connections of two pods with one source port to one
	// partner port then break when the IP moves).
	HandoverInterval time.Duration
	DaemonSet        string // namespace/name of the DaemonSet natd runs from (uninstall detection)
	MaxEgressIPs     int
	// Nice is the scheduling niceness natd gives all its threads at start.
	Nice int
	// RealtimePriority is the round-robin real-time priority natd gives all its
	// threads at start (0: none).
	RealtimePriority int
	// Profiling serves Go's profiles (/debug/pprof/) beside /metrics.
	Profiling       bool
	RestartGrace    time.Duration
	HandoverTimeout time.Duration
	DrainTimeout    time.Duration
	// BGP (a routed fabric): the holder announces its egress IPs to these peers.
	BGPASN      uint32
	BGPPeers    []bgp.Peer
	BGPHoldTime time.Duration
}

// prefixList is a repeatable flag of CIDRs; commas also separate values.
type prefixList struct{ list *[]netip.Prefix }

func (p prefixList) String() string {
	if p.list == nil {
		return ""
	}
	var s []string
	for _, x := range *p.list {
		s = append(s, x.String())
	}
	return strings.Join(s, ",")
}

func (p prefixList) Set(v string) error {
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		pr, err := netip.ParsePrefix(part)
		if err != nil {
			return fmt.Errorf("not a CIDR: %q", part)
		}
		if pr != pr.Masked() {
			return fmt.Errorf("%s has host bits set (did you mean %s?)", pr, pr.Masked())
		}
		*p.list = append(*p.list, pr)
	}
	return nil
}

type addrFlag struct{ a *netip.Addr }

func (f addrFlag) String() string {
	if f.a == nil || !f.a.IsValid() {
		return ""
	}
	return f.a.String()
}

func (f addrFlag) Set(v string) error {
	a, err := netip.ParseAddr(v)
	if err != nil {
		return fmt.Errorf("not an IP address: %q", v)
	}
	*f.a = a
	return nil
}

type hexUint32 struct{ v *uint32 }

func (h hexUint32) String() string {
	if h.v == nil {
		return ""
	}
	return fmt.Sprintf("%#08x", *h.v)
}

func (h hexUint32) Set(s string) error {
	var v uint32
	if _, err := fmt.Sscan(s, &v); err != nil {
		return fmt.Errorf("not a number: %q", s)
	}
	*h.v = v
	return nil
}

// RegisterFlags binds the agent's flags to fs with their defaults.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	c.NodeName = os.Getenv("NODE_NAME")
	c.MetricsAddr = ""
	c.ResyncPeriod = 30 * time.Second
	c.FwmarkMask = 0x00ff0000
	c.RulePriority = 7000
	c.TableBase = 7100
	c.StateDir = "/run/natd"
	c.GossipPort = 7946
	c.TunnelPort = 4799
	c.GossipProbeInterval = 150 * time.Millisecond
	c.GossipProbeTimeout = 75 * time.Millisecond
	c.GossipSuspicionMult = 3
	c.Lease = 150 * time.Millisecond
	c.HeartbeatInterval = 15 * time.Millisecond
	c.HandoverInterval = time.Second
	c.RealtimePriority = 1
	c.MaxEgressIPs = 32
	c.RestartGrace = 30 * time.Second
	c.HandoverTimeout = 3 * time.Second
	c.DrainTimeout = 10 * time.Second
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "name of this node's Node object (default $NODE_NAME)")
	fs.Var(addrFlag{&c.NodeIP}, "node-ip", "this node's IP (default: the Node's InternalIP)")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster config)")
	fs.StringVar(&c.DaemonSet, "daemonset", "", "namespace/name of the DaemonSet natd runs from: on SIGTERM, when it is gone or being deleted (an uninstall), natd removes everything it put on the node instead of keeping its IPs for a restart")
	fs.Var(prefixList{&c.EgressCIDRs}, "egress-cidr", "CIDR egress IPs may be taken from (repeatable, required)")
	fs.Var(prefixList{&c.ClusterCIDRs}, "cluster-cidr", "pod CIDR of the cluster, never SNATed (repeatable, required)")
	fs.Var(prefixList{&c.ServiceCIDRs}, "service-cidr", "service CIDR of the cluster, never SNATed (repeatable)")
	fs.Var(prefixList{&c.ExcludeCIDRs}, "exclude-cidr", "more destinations that are never SNATed (repeatable)")
	fs.BoolVar(&c.FailOpen, "fail-open", false, "when no egress node is healthy, send pinned traffic the normal way instead of dropping it")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "address of /metrics, /healthz and /readyz (default: port 9793 on the node IP (--node-ip or $NODE_IP) and on 127.0.0.1; on every address only when neither is known)")
	fs.IntVar(&c.RealtimePriority, "realtime-priority", c.RealtimePriority, "real-time priority (SCHED_RR, 1 to 99) natd gives its threads, so that its heartbeats and lease renewals run as soon as they are due even when workloads in other cgroups saturate the CPUs, as corosync's do (needs CAP_SYS_NICE, and a kernel without real-time group scheduling or with real-time time given to natd's cgroup; without them natd logs it and runs as started); 0: natd stays in the normal class")
	fs.BoolVar(&c.Profiling, "profiling", false, "serve Go's CPU, heap and goroutine profiles at /debug/pprof/ beside /metrics (as kube-proxy's --profiling)")
	fs.DurationVar(&c.ResyncPeriod, "resync-period", c.ResyncPeriod, "how often the node is re-synced to repair drift")
	fs.Var(hexUint32{&c.FwmarkMask}, "fwmark-mask", "bits of the packet mark natd owns (one contiguous run of at least 8 bits)")
	fs.IntVar(&c.RulePriority, "rule-priority", c.RulePriority, "priority of natd's ip rules")
	fs.IntVar(&c.TableBase, "route-table-base", c.TableBase, "natd uses route tables base+1 .. base+255")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "where natd keeps what it must restore on cleanup and shares with its CNI plugin (tmpfs)")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", "", "the node's CNI configuration directory: natd chains natd-cni onto the conflist there and keeps it chained (empty: the CNI chain is managed elsewhere)")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", "/opt/cni/bin", "the node's CNI plugin directory, where natd installs natd-cni")
	fs.StringVar(&c.CNIPlugin, "cni-plugin", "", "the natd-cni binary to install (default: natd-cni beside the natd binary)")
	fs.IntVar(&c.GossipPort, "gossip-port", c.GossipPort, "memberlist port (TCP and UDP) on the node IP")
	fs.IntVar(&c.TunnelPort, "tunnel-port", c.TunnelPort, "UDP port of natd's VXLAN tunnels, which carry pinned traffic from a pod's node to the egress IP's holder (must differ from the CNI's VXLAN port)")
	fs.StringVar(&c.GossipKeyFile, "gossip-key-file", "", "file with the base64 gossip encryption key (16, 24 or 32 bytes; `natd gen-key` makes one)")
	fs.BoolVar(&c.InsecureGossip, "insecure-gossip", false, "allow unencrypted, unauthenticated gossip (no --gossip-key-file)")
	fs.DurationVar(&c.GossipProbeInterval, "gossip-probe-interval", c.GossipProbeInterval, "how often each member is probed")
	fs.DurationVar(&c.GossipProbeTimeout, "gossip-probe-timeout", c.GossipProbeTimeout, "how long a probe may take before it counts as failed")
	fs.IntVar(&c.GossipSuspicionMult, "gossip-suspicion-mult", c.GossipSuspicionMult, "probe intervals a suspected member has to refute before it is declared dead")
	fs.DurationVar(&c.Lease, "lease", c.Lease, "how long a holder's kernel keeps serving its egress IPs without natd renewing them (renewed only while a majority of voters is in touch)")
	fs.DurationVar(&c.HandoverInterval, "handover-interval", c.HandoverInterval, "how often a holder reads the NAT bindings whose ports it changed from conntrack and hands them to the nodes that may take its egress IPs next, so that those connections survive a move (0: never)")
	fs.DurationVar(&c.HeartbeatInterval, "heartbeat-interval", c.HeartbeatInterval, "how often voters (egress nodes, and witnesses when there are fewer than three) send each other a heartbeat; a holder is reported down, and its IPs taken over, after 1.1 × (lease + 11 intervals) without one")
	fs.IntVar(&c.MaxEgressIPs, "max-egress-ips", c.MaxEgressIPs, "most egress IPs one node is given")
	fs.IntVar(&c.Nice, "nice", -10, "scheduling niceness of natd's threads (-20 to 19): below 0 its heartbeats go ahead of the node's workloads when the CPUs are saturated, as corosync's and keepalived's do (needs CAP_SYS_NICE; without it natd keeps the niceness it was started with); 0 leaves it")
	fs.DurationVar(&c.RestartGrace, "restart-grace", c.RestartGrace, "on SIGTERM, how long the kernel keeps serving this node's IPs and the others wait for natd to come back")
	fs.DurationVar(&c.HandoverTimeout, "handover-timeout", c.HandoverTimeout, "in a planned move, how long the old holder keeps an IP waiting for the new one to claim it")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "on SIGUSR1 (drain), how long natd waits for its IPs to be taken over before it exits")
	fs.Var(bgpPeerList{&c.BGPPeers}, "bgp-peer", "a router to announce held egress IPs to over BGP, as ADDRESS:ASN (repeatable; a routed fabric, where gratuitous ARP does not reach the router)")
	fs.Func("bgp-asn", "the nodes' own AS number for --bgp-peer", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n == 0 {
			return fmt.Errorf("not an AS number: %q", v)
		}
		c.BGPASN = uint32(n)
		return nil
	})
	fs.DurationVar(&c.BGPHoldTime, "bgp-hold-time", 3*time.Second, "BGP hold time: how long a router keeps the routes of a node that vanished without closing its session (at least 3s)")
}

// bgpPeerList is the repeatable --bgp-peer flag.
type bgpPeerList struct{ list *[]bgp.Peer }

func (p bgpPeerList) String() string {
	if p.list == nil {
		return ""
	}
	var s []string
	for _, x := range *p.list {
		s = append(s, fmt.Sprintf("%s:%d", x.Addr, x.ASN))
	}
	return strings.Join(s, ",")
}

func (p bgpPeerList) Set(v string) error {
	addr, asn, ok := strings.Cut(v, ":")
	a, err := netip.ParseAddr(addr)
	n, nerr := strconv.ParseUint(asn, 10, 32)
	if !ok || err != nil || !a.Is4() || nerr != nil || n == 0 {
		return fmt.Errorf("want IPv4-ADDRESS:ASN, got %q", v)
	}
	*p.list = append(*p.list, bgp.Peer{Addr: a, ASN: uint32(n)})
	return nil
}

// Gossip is the gossip configuration the flags describe, for a member on nodeIP with
// keys (the first primary; none: plain text).
func (c *Config) Gossip(nodeIP netip.Addr, keys [][]byte) election.GossipConfig {
	gc := election.GossipConfig{NodeName: c.NodeName, BindIP: nodeIP, Port: c.GossipPort,
		ProbeInterval: c.GossipProbeInterval, ProbeTimeout: c.GossipProbeTimeout, SuspicionMult: c.GossipSuspicionMult,
		Heartbeat: c.Heartbeat()}
	if len(keys) > 0 {
		gc.Key, gc.OtherKeys = keys[0], keys[1:]
	}
	return gc
}

// MetricsAddrs are where /metrics, /healthz and /readyz listen: --metrics-addr, or by
// default port 9793 on the node IP and on loopback, never on every address — a pod
// must not read natd's metrics through some other interface of the node.
func (c *Config) MetricsAddrs() []string {
	if c.MetricsAddr != "" {
		return []string{c.MetricsAddr}
	}
	ip := c.NodeIP
	if !ip.IsValid() {
		ip, _ = netip.ParseAddr(os.Getenv("NODE_IP"))
	}
	if !ip.IsValid() {
		return []string{":9793"}
	}
	return []string{net.JoinHostPort(ip.String(), "9793"), "127.0.0.1:9793"}
}

// Heartbeat is the voters' heartbeat schedule the flags describe.
func (c *Config) Heartbeat() election.HeartbeatTiming {
	return election.NewHeartbeatTiming(c.HeartbeatInterval, c.Lease)
}

// maxEgressIPs is the most egress IPs a node may be given: every node routes every
// egress IP in use by a mark slot of its own (dataplane.Marks.MaxIndex, 252), far below
// what gossip can announce for one node (election.MaxClaims).
const maxEgressIPs = 252

// Validate checks the configuration for the agent.
func (c *Config) Validate() error {
	switch {
	case len(c.BGPPeers) > 0 && c.BGPASN == 0:
		return fmt.Errorf("--bgp-peer needs --bgp-asn, the nodes' own AS number")
	case c.BGPASN != 0 && len(c.BGPPeers) == 0:
		return fmt.Errorf("--bgp-asn without --bgp-peer: no router to announce to")
	case c.NodeName == "":
		return fmt.Errorf("--node-name (or $NODE_NAME) is required")
	case len(c.EgressCIDRs) == 0:
		return fmt.Errorf("at least one --egress-cidr is required")
	case len(c.ClusterCIDRs) == 0:
		return fmt.Errorf("at least one --cluster-cidr is required")
	case c.ResyncPeriod <= 0:
		return fmt.Errorf("--resync-period must be positive")
	case c.GossipKeyFile == "" && !c.InsecureGossip:
		return fmt.Errorf("--gossip-key-file is required (or --insecure-gossip, which lets anyone on the network take egress IPs)")
	case c.DaemonSet != "" && !validDaemonSetRef(c.DaemonSet):
		return fmt.Errorf("--daemonset %q: want namespace/name", c.DaemonSet)
	case c.HandoverInterval < 0:
		return fmt.Errorf("--handover-interval (%s) must not be negative", c.HandoverInterval)
	case c.HeartbeatInterval < 10*time.Millisecond || c.HeartbeatInterval > time.Second:
		return fmt.Errorf("--heartbeat-interval (%s) must be between 10ms and 1s", c.HeartbeatInterval)
	case c.Lease < 2*c.HeartbeatInterval || c.Lease > 10*time.Second:
		// Leases are renewed every lease/4; shorter than two heartbeats they would be
		// renewed on evidence they cannot outlive.
		return fmt.Errorf("--lease (%s) must be between two heartbeat intervals (%s) and 10s", c.Lease, 2*c.HeartbeatInterval)
	case c.GossipProbeTimeout >= c.GossipProbeInterval:
		return fmt.Errorf("--gossip-probe-timeout must be shorter than --gossip-probe-interval")
	case c.TunnelPort < 1 || c.TunnelPort > 65535 || c.TunnelPort == c.GossipPort:
		return fmt.Errorf("--tunnel-port (%d) must be a UDP port other than --gossip-port", c.TunnelPort)
	case c.RealtimePriority < 0 || c.RealtimePriority > 99:
		return fmt.Errorf("--realtime-priority (%d) must be between 0 and 99", c.RealtimePriority)
	case c.Nice < -20 || c.Nice > 19:
		return fmt.Errorf("--nice (%d) must be between -20 and 19", c.Nice)
	case c.MaxEgressIPs < 1 || c.MaxEgressIPs > maxEgressIPs:
		return fmt.Errorf("--max-egress-ips must be between 1 and %d (the egress IPs a cluster can route)", maxEgressIPs)
	}
	// Each egress IP's tunnel is told apart by the IP's last three bytes (TunnelVNI).
	for _, p := range c.EgressCIDRs {
		if p.Addr().Is4In6() || p.Addr().Zone() != "" {
			return fmt.Errorf("--egress-cidr %s: give an IPv4 or an IPv6 prefix", p)
		}
		if p.Addr().Is6() && p.Bits() < 104 {
			return fmt.Errorf("--egress-cidr %s: an IPv6 egress CIDR must be a /104 or longer (its addresses must differ in their last three bytes, which name their tunnels)", p)
		}
	}
	is6 := func(p netip.Prefix) bool { return p.Addr().Is6() }
	if slices.ContainsFunc(c.EgressCIDRs, is6) && !slices.ContainsFunc(c.ClusterCIDRs, is6) {
		// Without it natd cannot tell a pod's IPv6 address from the outside: pinned
		// pods' IPv6 traffic would neither reach the holder nor stay inside the cluster.
		return fmt.Errorf("an IPv6 --egress-cidr needs the cluster's IPv6 --cluster-cidr")
	}
	if a, b, overlap := dataplane.VNIOverlap(c.EgressCIDRs); overlap {
		return fmt.Errorf("--egress-cidr %s and %s hold addresses with the same last three bytes; natd's tunnels cannot tell them apart", a, b)
	}
	if !slices.ContainsFunc(c.ClusterCIDRs, func(p netip.Prefix) bool { return p.Addr().Is4() }) {
		return fmt.Errorf("at least one IPv4 --cluster-cidr is required")
	}
	return nil
}

func validDaemonSetRef(s string) bool {
	ns, name, ok := strings.Cut(s, "/")
	return ok && ns != "" && name != "" && !strings.Contains(name, "/")
}
