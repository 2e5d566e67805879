package natd

import (
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	goruntime "runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	"natd.dev/natd/election/memnet"
	"natd.dev/natd/natd/dataplane"
)

// The scale harness runs natd's real agents — planner, lease rules, heartbeats,
// memberlist gossip — for many members in one process: each agent reads one shared
// fake API, gossips over an in-memory network (memnet) that can partition, drop, delay
// and duplicate packets, and programs a leaseKernel, which serves an egress IP exactly
// as long as the real kernel's leases would. Time is real; only the network and the
// kernel are simulated.

// leaseKernel is a kernel that keeps leases as natd's nftables elements do, and records
// when it served each egress IP: the harness sums the time two kernels served one IP.
type leaseKernel struct {
	mu     sync.Mutex
	lease  time.Duration
	self   netip.Addr
	frozen bool // natd stopped for a restart: the leases stand as set
	dead   bool // the node lost power: it serves nothing, for good
	held   map[netip.Addr]*serving
	past   map[netip.Addr][]serving   // intervals that ended
	routes map[netip.Addr]netip.Addr  // egress IP -> the node IP its traffic goes to
	gens   map[netip.Addr]uint32      // egress IP -> this node's claim, while held
	routed map[netip.Addr]routedSince // when the route to the current holder was set
	now    func() time.Time
}

type serving struct{ from, until time.Time }

type routedSince struct {
	to netip.Addr
	at time.Time
}

func newLeaseKernel(self netip.Addr, lease time.Duration) *leaseKernel {
	return &leaseKernel{lease: lease, self: self, held: map[netip.Addr]*serving{}, past: map[netip.Addr][]serving{},
		routes: map[netip.Addr]netip.Addr{}, gens: map[netip.Addr]uint32{}, routed: map[netip.Addr]routedSince{}, now: time.Now}
}

// leaseUntil is the end of a lease granted now for until, as the dataplane computes it.
func (k *leaseKernel) leaseUntil(now, until time.Time) time.Time {
	if until.IsZero() {
		return now.Add(k.lease)
	}
	return now.Add(min(max(until.Sub(now), time.Millisecond), k.lease))
}

// serve starts or extends serving ip until until. A lease that ran out is a new
// interval: the kernel deleted the element and this adds it again.
func (k *leaseKernel) serve(ip netip.Addr, now, until time.Time) {
	s, ok := k.held[ip]
	if ok && s.until.After(now) {
		s.until = until
		return
	}
	if ok {
		k.past[ip] = append(k.past[ip], *s)
	}
	k.held[ip] = &serving{from: now, until: until}
}

func (k *leaseKernel) stop(ip netip.Addr, now time.Time) {
	s, ok := k.held[ip]
	if !ok {
		return
	}
	if s.until.After(now) {
		s.until = now
	}
	k.past[ip] = append(k.past[ip], *s)
	delete(k.held, ip)
	delete(k.gens, ip)
}

func (k *leaseKernel) Apply(st dataplane.State) (dataplane.Result, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dead || k.frozen {
		return dataplane.Result{}, nil
	}
	now := k.now()
	until := k.leaseUntil(now, st.LeaseUntil)
	local := map[netip.Addr]bool{}
	var res dataplane.Result
	for _, e := range st.Egress {
		to := e.HolderIP
		if e.Local {
			local[e.IP] = true
			if _, ok := k.held[e.IP]; !ok {
				res.Announced = append(res.Announced, e.IP)
			}
			k.serve(e.IP, now, until)
			k.gens[e.IP] = e.Gen
			to = k.self
		}
		if r := k.routed[e.IP]; r.to != to {
			k.routed[e.IP] = routedSince{to: to, at: now}
		}
		k.routes[e.IP] = to
	}
	for ip := range k.held {
		if !local[ip] {
			res.Released = append(res.Released, ip)
			k.stop(ip, now)
		}
	}
	return res, nil
}

func (k *leaseKernel) RenewLeases(until time.Time) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dead || k.frozen {
		return nil
	}
	now := k.now()
	if until.Sub(now) <= time.Millisecond {
		return dataplane.ErrLeaseDeadlinePassed
	}
	u := k.leaseUntil(now, until)
	for ip := range k.held {
		k.serve(ip, now, u)
	}
	return nil
}

func (k *leaseKernel) HoldLeases(grace time.Duration) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.dead {
		return nil
	}
	k.frozen = true
	now := k.now()
	for ip := range k.held {
		k.serve(ip, now, now.Add(grace))
	}
	return nil
}

func (k *leaseKernel) Verify() (bool, time.Duration, error)               { return false, 0, nil }
func (k *leaseKernel) WatchChanges(<-chan struct{}, func()) error         { return nil }
func (k *leaseKernel) KernelClaims() ([]election.Claim, error)            { return nil, nil }
func (k *leaseKernel) Bindings([]netip.Addr) ([]dataplane.Binding, error) { return nil, nil }
func (k *leaseKernel) powerOff(now time.Time) {
	k.mu.Lock()
	k.dead = true
	k.stopAll(now)
	k.mu.Unlock()
}
func (k *leaseKernel) stopAll(now time.Time) {
	for ip := range k.held {
		k.stop(ip, now)
	}
}

// servingNow lists the IPs whose lease is current.
func (k *leaseKernel) servingNow(now time.Time) []netip.Addr {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []netip.Addr
	for ip, s := range k.held {
		if !k.dead && s.until.After(now) {
			out = append(out, ip)
		}
	}
	return out
}

// intervals returns every time this kernel served ip, the current lease up to now.
func (k *leaseKernel) intervals(ip netip.Addr, now time.Time) []serving {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := slices.Clone(k.past[ip])
	if s, ok := k.held[ip]; ok {
		c := *s
		if c.until.After(now) {
			c.until = now
		}
		out = append(out, c)
	}
	return out
}

// routeTo says where this kernel sends ip's traffic now, and since when.
func (k *leaseKernel) routeTo(ip netip.Addr) routedSince {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.routed[ip]
}

// overlap is the total time during which at least two of the interval lists (one per
// node) cover the same moment.
func overlap(perNode [][]serving) time.Duration {
	type edge struct {
		at    time.Time
		delta int
	}
	var edges []edge
	for _, list := range perNode {
		// Merge a node's own intervals first: one node serving twice is not two holders.
		sort.Slice(list, func(i, j int) bool { return list[i].from.Before(list[j].from) })
		var merged []serving
		for _, s := range list {
			if !s.until.After(s.from) {
				continue
			}
			if n := len(merged); n > 0 && !s.from.After(merged[n-1].until) {
				if s.until.After(merged[n-1].until) {
					merged[n-1].until = s.until
				}
				continue
			}
			merged = append(merged, s)
		}
		for _, s := range merged {
			edges = append(edges, edge{s.from, +1}, edge{s.until, -1})
		}
	}
	sort.Slice(edges, func(i, j int) bool {
		if !edges[i].at.Equal(edges[j].at) {
			return edges[i].at.Before(edges[j].at)
		}
		return edges[i].delta < edges[j].delta // an end before a start at the same moment
	})
	var total time.Duration
	depth := 0
	var since time.Time
	for _, e := range edges {
		if depth >= 2 && e.delta < 0 && depth+e.delta < 2 {
			total += e.at.Sub(since)
		}
		if depth < 2 && depth+e.delta >= 2 {
			since = e.at
		}
		depth += e.delta
	}
	return total
}

// scaleOptions shape a harness cluster.
type scaleOptions struct {
	Members int // natd agents
	Egress  int // of which egress-eligible (the voters)
	IPs     int // egress IPs, one namespace each
	Seed    uint64
}

type scaleMember struct {
	name   string
	ip     netip.Addr
	kernel *leaseKernel
	agent  *Agent
	mu     sync.Mutex
	gossip *election.Gossip
	cancel context.CancelFunc
	drain  chan struct{}
	done   chan struct{}
}

func (m *scaleMember) view() election.View {
	m.mu.Lock()
	g := m.gossip
	m.mu.Unlock()
	if g == nil {
		return election.View{}
	}
	return g.View()
}

// scaleCluster is a harness cluster.
type scaleCluster struct {
	tb      testing.TB
	opts    scaleOptions
	net     *memnet.Network
	members []*scaleMember
	ips     []netip.Addr
	client  *k8sfake.Clientset
	// lastSettled is when the cluster last settled: a fault's two-holder time counts
	// from there.
	lastSettled time.Time
	// probeInterval overrides --gossip-probe-interval (timeout: half of it).
	probeInterval time.Duration
}

// quietKlog keeps a thousand agents' logs out of the test output
// (NATD_HARNESS_LOGS=1 shows them).
func quietKlog(tb testing.TB) {
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	if v := os.Getenv("NATD_HARNESS_LOGS"); v != "" {
		_ = fs.Set("v", v)
		return
	}
	_ = fs.Set("logtostderr", "false")
	_ = fs.Set("alsologtostderr", "false")
	_ = fs.Set("stderrthreshold", "FATAL")
	klog.SetOutput(io.Discard)
	tb.Cleanup(func() { _ = fs.Set("logtostderr", "true"); klog.SetOutput(nil) })
}

// startWave is how many natds the harness starts a second.
const startWave = 25

func scaleNodeIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 0, byte(i / 250), byte(i%250 + 1)})
}

func scaleEgressIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{198, 18, byte(4 + i/250), byte(i%250 + 1)})
}

// newScaleCluster starts opts.Members agents; the first opts.Egress are egress nodes.
func newScaleCluster(tb testing.TB, opts scaleOptions) *scaleCluster {
	tb.Helper()
	quietKlog(tb)
	c := &scaleCluster{tb: tb, opts: opts, net: memnet.New(opts.Seed)}
	if s := os.Getenv("NATD_SCALE_PROBE_INTERVAL"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			tb.Fatalf("NATD_SCALE_PROBE_INTERVAL: %v", err)
		}
		c.probeInterval = d
	}
	var objs []runtime.Object
	for i := range opts.Members {
		name := fmt.Sprintf("n%04d", i)
		n := node(name, scaleNodeIP(i).String(), i < opts.Egress, true)
		n.Spec.PodCIDRs = []string{fmt.Sprintf("10.%d.%d.0/24", 128+i/256, i%256)}
		objs = append(objs, n)
		c.members = append(c.members, &scaleMember{name: name, ip: scaleNodeIP(i)})
	}
	for i := range opts.IPs {
		ip := scaleEgressIP(i)
		c.ips = append(c.ips, ip)
		objs = append(objs, ns(fmt.Sprintf("team-%04d", i), ip.String()))
	}
	c.client = k8sfake.NewSimpleClientset(objs...)
	key := []byte("0123456789abcdef0123456789abcdef")
	tb.Cleanup(c.stop)
	// The natds start in waves, as a DaemonSet's pods come up node by node: a thousand
	// memberlists started in the same instant spend two cores on joining each other.
	for i, m := range c.members {
		c.start(m, key)
		if i%startWave == startWave-1 {
			time.Sleep(time.Second)
		}
	}
	return c
}

// config is the agent's configuration as natd's flags default it.
func (c *scaleCluster) config(m *scaleMember) *Config {
	cfg := &Config{}
	cfg.RegisterFlags(flag.NewFlagSet("natd", flag.ContinueOnError))
	cfg.NodeName, cfg.NodeIP = m.name, m.ip
	cfg.EgressCIDRs = []netip.Prefix{netip.MustParsePrefix("198.18.4.0/22")}
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.128.0.0/9")}
	cfg.ServiceCIDRs = []netip.Prefix{netip.MustParsePrefix("10.96.0.0/16")}
	cfg.MaxEgressIPs = maxEgressIPs
	cfg.ResyncPeriod = time.Minute
	if c.probeInterval > 0 {
		cfg.GossipProbeInterval, cfg.GossipProbeTimeout = c.probeInterval, c.probeInterval/2
	}
	return cfg
}

func (c *scaleCluster) start(m *scaleMember, key []byte) {
	cfg := c.config(m)
	if m.kernel == nil {
		m.kernel = newLeaseKernel(m.ip, cfg.Lease)
	}
	newMembership := func(ip netip.Addr) (Membership, error) {
		tr, err := c.net.Transport(netip.AddrPortFrom(ip, uint16(cfg.GossipPort)))
		if err != nil {
			return nil, err
		}
		gc := cfg.Gossip(ip, [][]byte{key})
		gc.Transport = tr
		g, err := election.NewGossip(gc)
		if err != nil {
			return nil, err
		}
		m.mu.Lock()
		m.gossip = g
		m.mu.Unlock()
		return g, nil
	}
	m.agent = NewAgent(cfg, c.client, nil, m.kernel, newMembership, nil, NewMetrics())
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel, m.done, m.drain = cancel, make(chan struct{}), make(chan struct{})
	go func() {
		defer close(m.done)
		if err := m.agent.Run(ctx, m.drain); err != nil && ctx.Err() == nil {
			c.tb.Errorf("%s: %v", m.name, err)
		}
	}()
}

func (c *scaleCluster) stop() {
	for _, m := range c.members {
		m.cancel()
	}
	for _, m := range c.members {
		<-m.done
	}
}

func (c *scaleCluster) egress() []*scaleMember { return c.members[:c.opts.Egress] }

// holders maps each egress IP to the members whose kernel serves it now.
func (c *scaleCluster) holders(now time.Time) map[netip.Addr][]*scaleMember {
	out := map[netip.Addr][]*scaleMember{}
	for _, m := range c.egress() {
		for _, ip := range m.kernel.servingNow(now) {
			out[ip] = append(out[ip], m)
		}
	}
	return out
}

// settled reports whether every IP is served by exactly one member and every live
// member routes it there.
func (c *scaleCluster) settled() bool {
	now := time.Now()
	h := c.holders(now)
	for _, ip := range c.ips {
		if len(h[ip]) != 1 {
			return false
		}
	}
	for _, m := range c.members {
		for _, ip := range c.ips {
			if m.kernel.routeTo(ip).to != h[ip][0].ip {
				return false
			}
		}
	}
	return true
}

func (c *scaleCluster) waitSettled(timeout time.Duration) time.Duration {
	c.tb.Helper()
	start := time.Now()
	defer func() { c.lastSettled = time.Now() }()
	for !c.settled() {
		if time.Since(start) > timeout {
			h := c.holders(time.Now())
			unheld, multi := 0, 0
			for _, ip := range c.ips {
				switch len(h[ip]) {
				case 0:
					unheld++
				case 1:
				default:
					multi++
				}
			}
			c.tb.Fatalf("cluster of %d not settled after %s: %d IPs unheld, %d with several holders", len(c.members), timeout, unheld, multi)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// servedSince lists, per egress node but skip, the times its kernel served ip that
// end after from.
func (c *scaleCluster) servedSince(ip netip.Addr, from time.Time, skip *scaleMember) (per [][]serving, who []*scaleMember) {
	now := time.Now()
	for _, m := range c.egress() {
		if m == skip {
			continue
		}
		var mine []serving
		for _, s := range m.kernel.intervals(ip, now) {
			if s.until.After(from) {
				mine = append(mine, s)
			}
		}
		per, who = append(per, mine), append(who, m)
	}
	return per, who
}

// twoHolderTime sums, over all egress IPs, the time two kernels served one IP since from.
func (c *scaleCluster) twoHolderTime(from time.Time) time.Duration {
	return c.twoHolderTimeWithout(from, nil)
}

// twoHolderTimeWithout is twoHolderTime over every kernel but skip's.
func (c *scaleCluster) twoHolderTimeWithout(from time.Time, skip *scaleMember) time.Duration {
	var total time.Duration
	for _, ip := range c.ips {
		per, _ := c.servedSince(ip, from, skip)
		total += overlap(per)
	}
	return total
}

// faultKind is how the harness takes a holder away.
type faultKind string

const (
	// powerOff: the node stops at once, its kernel with it.
	powerOff faultKind = "power-off"
	// cutOff: the node is cut off from every other node both ways but keeps running
	// (it still reaches the router): it must stop serving before anyone takes over.
	cutOff faultKind = "cut-off"
	// deaf: the node hears nobody, the others still hear it.
	deaf faultKind = "deaf"
	// mute: nobody hears the node, it still hears everyone.
	mute faultKind = "mute"
	// Planned moves: the node's egress label is removed, or it drains (SIGUSR1). The
	// old holder keeps serving until the new one claims the IP (make-before-break); a
	// second new holder would be two holders.
	unlabel faultKind = "unlabel"
	drain   faultKind = "drain"
)

func (k faultKind) planned() bool { return k == unlabel || k == drain }

// failoverResult is what one fault of a holder cost, counted from the fault.
type failoverResult struct {
	Kind  faultKind
	Start time.Time
	Moved int // the victim's egress IPs
	// DetectVoters: every other voter reports the victim down. DetectAll: every other
	// member's gossip says it is dead.
	DetectVoters, DetectAll time.Duration
	// Takeover: every moved IP is served by another node.
	Takeover time.Duration
	// Routed: every live member's kernel sends every moved IP to its new holder.
	Routed time.Duration
	// Ready: each new holder's gossip view counts every live member as routing its
	// IPs to it (what READY in `kubectl get eip` shows).
	Ready time.Duration
	// TwoHolders: time, summed over IPs, that two kernels served one IP (in a
	// planned move: two kernels other than the old holder's).
	TwoHolders time.Duration
	// Handover: in a planned move, the time, summed over IPs, that the old and the new
	// holder both served one IP.
	Handover time.Duration
}

// reach cuts the victim off as kind says.
func reach(victim netip.Addr, kind faultKind) func(from, to netip.Addr) bool {
	return func(from, to netip.Addr) bool {
		switch kind {
		case deaf:
			return to != victim
		case mute:
			return from != victim
		default:
			return from != victim && to != victim
		}
	}
}

// failover takes the egress node that serves the most IPs away as kind says, measures
// until the cluster has moved its IPs (or timeout), then heals the network and waits
// until the cluster has settled again.
func (c *scaleCluster) failover(kind faultKind, timeout time.Duration) failoverResult {
	c.tb.Helper()
	c.waitQuiet()
	var victim *scaleMember
	var moved []netip.Addr
	for _, m := range c.egress() {
		if s := m.kernel.servingNow(time.Now()); victim == nil || len(s) > len(moved) {
			victim, moved = m, s
		}
	}
	t0 := time.Now()
	res := failoverResult{Kind: kind, Moved: len(moved), Start: t0}
	switch kind {
	case unlabel:
		c.setEgressLabel(victim, false)
	case drain:
		close(victim.drain)
	default:
		c.net.SetReach(reach(victim.ip, kind))
	}
	if kind == powerOff {
		victim.kernel.powerOff(t0)
	}
	others := func(yield func(*scaleMember) bool) {
		for _, m := range c.members {
			if m != victim && !yield(m) {
				return
			}
		}
	}
	var detectAllNext int // members are checked in turn: a thousand views per poll would starve the agents
	detected := func() bool { return kind.planned() || (res.DetectVoters != 0 && res.DetectAll != 0) }
	for time.Since(t0) < timeout && (!detected() || res.Takeover == 0 || res.Routed == 0 || res.Ready == 0) {
		time.Sleep(5 * time.Millisecond)
		now := time.Now()
		if !kind.planned() && res.DetectVoters == 0 && c.votersReportDown(victim) {
			res.DetectVoters = now.Sub(t0)
		}
		if !kind.planned() && res.DetectAll == 0 {
			for detectAllNext < len(c.members) {
				m := c.members[detectAllNext]
				if m != victim && m.view().Alive(victim.name) {
					break
				}
				detectAllNext++
			}
			if detectAllNext == len(c.members) {
				res.DetectAll = now.Sub(t0)
			}
		}
		h := c.holders(now)
		newHolder := func(ip netip.Addr) *scaleMember {
			for _, m := range h[ip] {
				if m != victim {
					return m
				}
			}
			return nil
		}
		if res.Takeover == 0 && !slices.ContainsFunc(moved, func(ip netip.Addr) bool { return newHolder(ip) == nil }) {
			res.Takeover = now.Sub(t0)
		}
		if res.Takeover == 0 {
			continue
		}
		if res.Routed == 0 {
			var last time.Time
			all := true
			for m := range others {
				for _, ip := range moved {
					r := m.kernel.routeTo(ip)
					if nh := newHolder(ip); nh == nil || r.to != nh.ip {
						all = false
						break
					}
					last = later(last, r.at)
				}
				if !all {
					break
				}
			}
			if all {
				res.Routed = last.Sub(t0)
			}
		}
		if res.Ready == 0 && c.allReady(victim, moved, newHolder) {
			res.Ready = now.Sub(t0)
		}
	}
	if kind.planned() {
		res.TwoHolders = c.twoHolderTimeWithout(c.lastSettled, victim)
		res.Handover = c.twoHolderTime(c.lastSettled) - res.TwoHolders
	} else {
		res.TwoHolders = c.twoHolderTime(c.lastSettled)
	}
	c.net.SetReach(nil)
	switch kind {
	case powerOff, drain:
		c.restart(victim)
	case unlabel:
		c.setEgressLabel(victim, true)
	}
	return res
}

// setEgressLabel labels a member's Node as an egress node, or removes the label.
func (c *scaleCluster) setEgressLabel(m *scaleMember, on bool) {
	c.tb.Helper()
	nodes := c.client.CoreV1().Nodes()
	n, err := nodes.Get(context.Background(), m.name, metav1.GetOptions{})
	if err != nil {
		c.tb.Fatal(err)
	}
	if on {
		n.Labels[LabelEgressNode] = "true"
	} else {
		delete(n.Labels, LabelEgressNode)
	}
	if _, err := nodes.Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		c.tb.Fatal(err)
	}
}

// waitQuiet waits until every egress node has had its quorum for a while, as in a
// cluster whose last fault is not seconds old: a node that has just come back takes
// nothing new for the silence bound, and the IPs whose rendezvous winner it is wait
// for it meanwhile.
func (c *scaleCluster) waitQuiet() {
	const quiet = 3 * time.Second
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		ok := true
		for _, m := range c.egress() {
			m.mu.Lock()
			g := m.gossip
			m.mu.Unlock()
			if ev := g.Evidence(); !ev.Quorum() || time.Since(ev.QuorumSince) < quiet {
				ok = false
				break
			}
		}
		if ok {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// votersReportDown reports whether every voter but the victim has it down.
func (c *scaleCluster) votersReportDown(victim *scaleMember) bool {
	for _, m := range c.egress() {
		if m != victim && !m.view().Evidence.Down[victim.name] {
			return false
		}
	}
	return true
}

// allReady reports whether every new holder of the moved IPs sees, in gossip, every
// live member routing them to its claim.
func (c *scaleCluster) allReady(victim *scaleMember, moved []netip.Addr, newHolder func(netip.Addr) *scaleMember) bool {
	live := map[string]bool{}
	for _, m := range c.members {
		if m != victim {
			live[m.name] = true
		}
	}
	views := map[*scaleMember]election.View{}
	for _, ip := range moved {
		h := newHolder(ip)
		if h == nil {
			return false
		}
		v, ok := views[h]
		if !ok {
			v = h.view()
			views[h] = v
		}
		h.kernel.mu.Lock()
		gen := h.kernel.gens[ip]
		h.kernel.mu.Unlock()
		if readyNodes(v, ip, gen, live) != len(live) {
			return false
		}
	}
	return true
}

// restart starts a member's natd again on the same kernel, powered back on.
func (c *scaleCluster) restart(m *scaleMember) {
	m.cancel()
	<-m.done
	m.kernel.mu.Lock()
	m.kernel.dead, m.kernel.frozen = false, false
	m.kernel.mu.Unlock()
	c.start(m, []byte("0123456789abcdef0123456789abcdef"))
}

// TestScaleHarnessPartitions runs natd's agents at a size CI affords in real time and
// takes the busiest holder away in every way the network can, then again on a lossy,
// duplicating, delaying network: its IPs move, every member routes them to the new
// holders, READY counts every member, and no IP is served by two nodes at any moment.
func TestScaleHarnessPartitions(t *testing.T) {
	if testing.Short() {
		t.Skip("runs real agents for a minute")
	}
	partitionScenarios(t, scaleOptions{Members: 30, Egress: 5, IPs: 300, Seed: 1})
}

// TestScaleHarnessPartitionsInVirtualTime is the same at 200 members in a synctest
// bubble (see TestScaleInVirtualTime): the protocol at a size whose real-time run
// would saturate CI's two cores.
func TestScaleHarnessPartitionsInVirtualTime(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 200 agents")
	}
	inVirtualTime(t, func(t *testing.T) {
		partitionScenarios(t, scaleOptions{Members: 200, Egress: 5, IPs: 500, Seed: 2})
	})
}

func partitionScenarios(t *testing.T, opts scaleOptions) {
	begin := time.Now()
	c := newScaleCluster(t, opts)
	t.Logf("settled in %s", c.waitSettled(60*time.Second).Round(time.Millisecond))
	if d := c.twoHolderTime(begin); d != 0 {
		t.Errorf("while the cluster formed, two nodes served one egress IP for %s:\n%s", d, strings.Join(c.overlaps(begin), "\n"))
	}
	check := func(kind faultKind, network string) {
		t.Helper()
		r := c.failover(kind, 20*time.Second)
		t.Logf("%-9s %s moved %3d IPs: voters detect %4s, all %4s, takeover %4s, routed %4s, ready %4s, two holders %s, handover %s",
			kind, network, r.Moved, ms(r.DetectVoters), ms(r.DetectAll), ms(r.Takeover), ms(r.Routed), ms(r.Ready), r.TwoHolders, ms(r.Handover))
		if r.TwoHolders != 0 {
			t.Errorf("%s (%s): two nodes served one egress IP for %s:\n%s", kind, network, r.TwoHolders, strings.Join(c.overlaps(r.Start.Add(-time.Second)), "\n"))
		}
		if r.Moved == 0 || r.Takeover == 0 || r.Routed == 0 || r.Ready == 0 || (!kind.planned() && r.DetectVoters == 0) {
			t.Errorf("%s (%s): the cluster did not move the holder's IPs within 20 s: %+v", kind, network, r)
		}
		c.waitSettled(60 * time.Second)
	}
	for _, kind := range []faultKind{cutOff, mute, deaf, powerOff, unlabel, drain} {
		check(kind, "clean")
	}
	// A bad network on top: 5 % of datagrams lost, 5 % duplicated, each delayed 1–11 ms.
	c.net.SetLoss(0.05)
	c.net.SetDuplicate(0.05)
	c.net.SetDelay(time.Millisecond, 10*time.Millisecond)
	for _, kind := range []faultKind{cutOff, powerOff, unlabel} {
		check(kind, "lossy")
	}
	t.Logf("network: %d datagrams sent, %d dropped, %d duplicated, %d overflowed", c.net.Sent.Load(), c.net.Dropped.Load(), c.net.Duplicated.Load(), c.net.Overflowed.Load())
	c.stop()
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// overlaps describes, for the test log, each IP that two kernels served at once since
// from: who served it when.
func (c *scaleCluster) overlaps(from time.Time) []string {
	var out []string
	for _, ip := range c.ips {
		per, members := c.servedSince(ip, from, nil)
		d := overlap(per)
		if d == 0 {
			continue
		}
		var who []string
		for i, list := range per {
			for _, s := range list {
				who = append(who, fmt.Sprintf("%s %s..%s", members[i].name, ms(s.from.Sub(from)), ms(s.until.Sub(from))))
			}
		}
		out = append(out, fmt.Sprintf("%s for %s: %v", ip, ms(d), who))
	}
	return out
}

// BenchmarkScale runs the harness at NATD_SCALE_SIZES members (default 10,50,100; 5
// egress nodes, NATD_SCALE_IPS egress IPs, default 500; NATD_SCALE_PROBE_INTERVAL
// overrides --gossip-probe-interval) in real time, and takes the busiest holder away
// once per kind and iteration. Figures are per fault; two-holder time must stay 0.
// Every member shares this machine's cores: at 100 members and more the figures are
// the cores', not natd's (see TestScaleInVirtualTime).
func BenchmarkScale(b *testing.B) {
	ips := scaleIPs(b)
	for _, n := range scaleSizes(b, "NATD_SCALE_SIZES", []int{10, 50, 100}) {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			var f scaleFigures
			b.ResetTimer()
			for range b.N {
				f = measureScale(b, n, ips)
			}
			b.StopTimer()
			for _, m := range f.metrics() {
				b.ReportMetric(m.value, m.unit)
			}
			if f.worst > 0 {
				b.Errorf("two nodes served one egress IP for %s", f.worst)
			}
		})
	}
}

// TestScaleInVirtualTime runs the harness at NATD_SCALE_VIRTUAL members (a list of
// sizes; skipped without it) in a synctest bubble: every clock, timer and sleep of
// every agent, memberlist, informer and network delay is the bubble's, which moves on
// only when every goroutine waits. Time then passes as if each member had a CPU of its
// own, however long the two cores take to do all members' work: the figures are the
// protocol's (detection, takeover, gossip and READY latencies) at sizes the real-time
// harness cannot reach on this machine. `make bench-scale` runs it at 10 to 1,000.
func TestScaleInVirtualTime(t *testing.T) {
	if os.Getenv("NATD_SCALE_VIRTUAL") == "" {
		t.Skip("NATD_SCALE_VIRTUAL names the sizes (make bench-scale)")
	}
	ips := scaleIPs(t)
	for _, n := range scaleSizes(t, "NATD_SCALE_VIRTUAL", nil) {
		t.Run(fmt.Sprintf("members=%d", n), func(t *testing.T) {
			wall := time.Now()
			inVirtualTime(t, func(t *testing.T) {
				f := measureScale(t, n, ips)
				var line []string
				for _, m := range f.metrics() {
					line = append(line, fmt.Sprintf("%.4g %s", m.value, m.unit))
				}
				t.Logf("%d members, %d IPs, virtual time: %s", n, ips, strings.Join(line, ", "))
				if f.worst > 0 {
					t.Errorf("two nodes served one egress IP for %s", f.worst)
				}
			})
			t.Logf("%d members took %s of this machine's time", n, time.Since(wall).Round(time.Second))
		})
	}
}

// inVirtualTime runs f in a synctest bubble (see TestScaleInVirtualTime). Stopped
// memberlists leave probes and streams behind that end on their timeouts: the bubble's
// time must pass after f for them to go, or the bubble would end in a deadlock.
func inVirtualTime(t *testing.T, f func(*testing.T)) {
	synctest.Test(t, func(t *testing.T) {
		f(t)
		time.Sleep(time.Minute)
	})
}

func scaleSizes(tb testing.TB, env string, def []int) []int {
	s := os.Getenv(env)
	if s == "" {
		return def
	}
	var sizes []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			tb.Fatalf("%s: %v", env, err)
		}
		sizes = append(sizes, n)
	}
	return sizes
}

func scaleIPs(tb testing.TB) int {
	s := os.Getenv("NATD_SCALE_IPS")
	if s == "" {
		return 500
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		tb.Fatalf("NATD_SCALE_IPS: %v", err)
	}
	return n
}

// scaleFigures are one size's figures, averaged over its faults.
type scaleFigures struct {
	sums      map[string]float64
	unplanned int
	planned   int
	worst     time.Duration
	bootstrap time.Duration
	heapInuse uint64
	members   int
}

type scaleMetric struct {
	value float64
	unit  string
}

func (f scaleFigures) metrics() []scaleMetric {
	var out []scaleMetric
	names := slices.Sorted(maps.Keys(f.sums))
	for _, name := range names {
		per := float64(f.unplanned)
		if strings.HasPrefix(name, "planned") {
			per = float64(f.planned)
		}
		out = append(out, scaleMetric{f.sums[name] / per, name})
	}
	return append(out, scaleMetric{msf(f.worst), "two-holders-ms"}, scaleMetric{f.bootstrap.Seconds(), "bootstrap-s"},
		scaleMetric{float64(f.heapInuse) / float64(f.members) / 1024, "heap-KiB/member"})
}

// measureScale starts a cluster of n members with ips egress IPs, takes the busiest
// holder away once per kind (cut off, powered off, unlabelled) and measures each.
func measureScale(tb testing.TB, n, ips int) scaleFigures {
	start := time.Now()
	c := newScaleCluster(tb, scaleOptions{Members: n, Egress: 5, IPs: ips, Seed: uint64(n)})
	c.waitSettled(10 * time.Minute)
	f := scaleFigures{sums: map[string]float64{}, bootstrap: time.Since(start), members: n}
	var mem goruntime.MemStats
	goruntime.ReadMemStats(&mem)
	f.heapInuse = mem.HeapInuse
	for _, k := range []faultKind{cutOff, powerOff, unlabel} {
		r := c.failover(k, 60*time.Second)
		tb.Logf("%d members, %-9s moved %3d IPs: voters detect %s, all %s, takeover %s, routed %s, ready %s, two holders %s",
			n, k, r.Moved, ms(r.DetectVoters), ms(r.DetectAll), ms(r.Takeover), ms(r.Routed), ms(r.Ready), r.TwoHolders)
		f.worst = max(f.worst, r.TwoHolders)
		if !k.planned() {
			f.unplanned++
			f.sums["detect-voters-ms"] += msf(r.DetectVoters)
			f.sums["detect-all-ms"] += msf(r.DetectAll)
			f.sums["takeover-ms"] += msf(r.Takeover)
			f.sums["routed-ms"] += msf(r.Routed)
			f.sums["ready-ms"] += msf(r.Ready)
		} else {
			f.planned++
			f.sums["planned-takeover-ms"] += msf(r.Takeover)
			f.sums["planned-ready-ms"] += msf(r.Ready)
		}
		c.waitSettled(5 * time.Minute)
	}
	c.stop()
	return f
}

func msf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
