package dataplane

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"natd.dev/natd/tests/iperf"
)

// BenchmarkPinnedPath measures what natd's data path costs a packet, on the real
// kernel: two nodes on one router, a partner behind it, natd's dataplane programmed on
// both nodes, and iperf3 (TCP throughput, UDP packets per second) and a UDP
// ping-pong (round trip p50/p99) from three pods: an unpinned one, a pinned one on a
// node that does not hold the egress IP (its packets go through natd's tunnel to the
// holder), and a pinned one on the holder. Each runs with 0, 1k, 10k and 50k other
// pinned pod IPs in the nodes' maps, once with 200 more egress IPs in use (every node
// has a tunnel device, a slot rule and a guard rule per IP), and next to baselines
// without natd: plain
// forwarding (without and with connection tracking, which natd turns on and every
// real node has anyway), and one iptables SNAT rule on the holder.
//
// The namespaces share this machine's cores with iperf3 at both ends, so the figures
// compare paths with each other, not with a real network.
func BenchmarkPinnedPath(b *testing.B) {
	for _, tool := range []string{"iperf3", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			requireKernel(b, tool+" is not installed")
		}
	}
	secs, rounds := 3, 3
	if v := os.Getenv("NATD_PATH_SECONDS"); v != "" {
		fmt.Sscan(v, &secs)
	}
	if v := os.Getenv("NATD_PATH_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	l := newPathLab(b)
	type key struct {
		path string
		size int // pinned pod IPs in the maps; -1: natd is not there
	}
	var order []key
	samples := map[key][]pathFigures{}
	add := func(k key, f pathFigures) {
		if _, ok := samples[k]; !ok {
			order = append(order, k)
		}
		samples[k] = append(samples[k], f)
	}
	for b.Loop() {
		// Rounds interleave every path, so that a slow moment of the machine does not
		// fall on one path only; the table shows each path's median.
		for range rounds {
			for _, v := range []struct {
				size, extraIPs int
				suffix         string
			}{{0, 0, ""}, {1000, 0, ""}, {10000, 0, ""}, {50000, 0, ""}, {0, 200, ", 201 IPs"}} {
				l.applyNatd(v.size, v.extraIPs)
				for _, c := range []struct {
					name string
					pod  *pathPod
					src  string
				}{
					{"unpinned pod", l.unpinned, l.unpinned.ip},
					{"pinned, other node", l.pinnedOther, pathEgressIP},
					{"pinned, on holder", l.pinnedHolder, pathEgressIP},
				} {
					add(key{c.name + v.suffix, v.size}, l.measure(c.pod, secs, c.src))
				}
			}
			l.removeNatd()
			add(key{"no natd: forwarding", -1}, l.measure(l.unpinned, secs, l.unpinned.ip))
			// Every real node tracks connections (kube-proxy, the CNI's masquerade):
			// the fair baseline for an unpinned pod beside natd.
			l.sh(l.node1, "nft add table ip pathbench && nft add chain ip pathbench pre '{ type filter hook prerouting priority 0; }' && nft add rule ip pathbench pre ct state new counter")
			add(key{"no natd: fwd + conntrack", -1}, l.measure(l.unpinned, secs, l.unpinned.ip))
			l.sh(l.node1, "nft delete table ip pathbench")
			undo := l.iptablesSNAT(l.pinnedHolder)
			add(key{"no natd: 1 iptables SNAT", -1}, l.measure(l.pinnedHolder, secs, pathEgressIP))
			// The classic design: a rule per pinned pod that every packet walks (a
			// mark per pod for policy routing), the measured pod's last.
			for _, n := range []int{1000, 10000, 50000} {
				undoRules := l.iptablesRulePerPod(l.pinnedHolder, n)
				add(key{"iptables: a rule per pod", n}, l.measure(l.pinnedHolder, secs, pathEgressIP))
				undoRules()
			}
			undo()
		}
	}
	fmt.Printf("medians of %d rounds (min-max)\n", rounds)
	fmt.Printf("%-26s %10s %18s %18s %10s %10s  %s\n", "path", "pinned IPs", "TCP Gbit/s", "UDP kpps", "RTT p50", "RTT p99", "partner saw")
	for _, k := range order {
		fs := samples[k]
		size := "-"
		if k.size >= 0 {
			size = fmt.Sprint(k.size)
		}
		tcp := spread(fs, func(f pathFigures) float64 { return f.tcpGbps })
		udp := spread(fs, func(f pathFigures) float64 { return f.udpKpps })
		p50 := spread(fs, func(f pathFigures) float64 { return float64(f.rttP50) })
		p99 := spread(fs, func(f pathFigures) float64 { return float64(f.rttP99) })
		fmt.Printf("%-26s %10s %18s %18s %10s %10s  %s\n", k.path, size,
			fmt.Sprintf("%.1f (%.1f-%.1f)", tcp[1], tcp[0], tcp[2]), fmt.Sprintf("%.0f (%.0f-%.0f)", udp[1], udp[0], udp[2]),
			time.Duration(p50[1]).Round(time.Microsecond), time.Duration(p99[1]).Round(time.Microsecond), fs[0].source)
		if k.size == 50000 || k.size < 0 {
			name := strings.NewReplacer(" ", "-", ",", "", ":", "", "+", "").Replace(k.path)
			b.ReportMetric(tcp[1], name+"-Gbit/s")
			b.ReportMetric(udp[1], name+"-kpps")
			b.ReportMetric(float64(time.Duration(p99[1]).Microseconds()), name+"-rtt-p99-us")
		}
	}
}

// spread is the min, median and max of one figure over samples.
func spread(fs []pathFigures, v func(pathFigures) float64) [3]float64 {
	vals := make([]float64, len(fs))
	for i, f := range fs {
		vals[i] = v(f)
	}
	slices.Sort(vals)
	return [3]float64{vals[0], vals[len(vals)/2], vals[len(vals)-1]}
}

// pathFigures are one path's measurements.
type pathFigures struct {
	tcpGbps float64
	udpKpps float64 // datagrams of 64 bytes received per second
	rttP50  time.Duration
	rttP99  time.Duration
	source  string // the source address the partner saw
}

// pathLab is the benchmark's network: namespaces for a router, a partner, two nodes
// and three pods.
type pathLab struct {
	b                                   testing.TB
	suffix                              string
	router, partner, node1, node2       *pathNS
	unpinned, pinnedOther, pinnedHolder *pathPod
	d1, d2                              *Dataplane
	echo                                net.PacketConn // the partner's UDP echo
	// unrecorded: applyNatd writes no pod records (pods older than natd-cni).
	unrecorded bool
}

type pathNS struct {
	name string
	h    netns.NsHandle
}

type pathPod struct {
	ns   *pathNS
	ip   string
	node *pathNS
}

const (
	pathPartner  = "203.0.113.10"
	pathEgressIP = "198.18.0.200"
	pathEchoPort = 7007
)

func newPathLab(b testing.TB) *pathLab {
	b.Helper()
	rb := make([]byte, 3)
	rand.Read(rb)
	l := &pathLab{b: b, suffix: hex.EncodeToString(rb)}
	l.router, l.partner = l.netns("rt"), l.netns("partner")
	l.node1, l.node2 = l.netns("n1"), l.netns("n2")
	l.sh(l.router, "ip link add br0 type bridge && ip addr add 198.18.0.1/24 dev br0 && ip link set br0 up",
		"sysctl -qw net.ipv4.ip_forward=1",
		"ip route add 10.244.1.0/24 via 198.18.0.11 && ip route add 10.244.2.0/24 via 198.18.0.12")
	l.link(l.router, "eth-partner", l.partner, "eth0")
	l.sh(l.router, "ip addr add 203.0.113.1/24 dev eth-partner")
	l.sh(l.partner, "ip addr add "+pathPartner+"/24 dev eth0 && ip route add default via 203.0.113.1")
	for i, n := range []*pathNS{l.node1, l.node2} {
		port := fmt.Sprintf("n%d", i+1)
		l.link(l.router, port, n, "eth0")
		l.sh(l.router, "ip link set "+port+" master br0")
		l.sh(n, fmt.Sprintf("ip addr add 198.18.0.1%d/24 dev eth0 && ip route add default via 198.18.0.1", i+1),
			fmt.Sprintf("ip link add cni0 type bridge && ip addr add 10.244.%d.1/24 dev cni0 && ip link set cni0 up", i+1),
			"sysctl -qw net.ipv4.ip_forward=1",
			// host-gw routes to the other node's pods, as the lab's flat network has
			fmt.Sprintf("ip route add 10.244.%d.0/24 via 198.18.0.1%d", 2-i, 2-i))
	}
	l.unpinned = l.pod("p1a", l.node1, "10.244.1.10")
	l.pinnedOther = l.pod("p1b", l.node1, "10.244.1.11")
	l.pinnedHolder = l.pod("p2", l.node2, "10.244.2.10")

	var err error
	if err = inNetns(&l.partner.h, func() error {
		l.echo, err = net.ListenPacket("udp4", net.JoinHostPort(pathPartner, fmt.Sprint(pathEchoPort)))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.echo.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := l.echo.ReadFrom(buf)
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(from.String())
			l.echo.WriteTo(append([]byte(host+" "), buf[:n]...), from)
		}
	}()
	l.d1, l.d2 = l.dataplane(l.node1), l.dataplane(l.node2)
	return l
}

func (l *pathLab) netns(role string) *pathNS {
	l.b.Helper()
	name := "natd-pb-" + role + "-" + l.suffix
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		requireKernel(l.b, "ip netns add: "+err.Error()+": "+string(out))
	}
	l.b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		l.b.Fatal(err)
	}
	l.b.Cleanup(func() { h.Close() })
	ns := &pathNS{name: name, h: h}
	l.sh(ns, "ip link set lo up")
	return ns
}

// sh runs shell commands inside ns.
func (l *pathLab) sh(ns *pathNS, cmds ...string) string {
	l.b.Helper()
	var out strings.Builder
	for _, c := range cmds {
		o, err := exec.Command("ip", "netns", "exec", ns.name, "sh", "-c", c).CombinedOutput()
		if err != nil {
			l.b.Fatalf("%s: %s: %v\n%s", ns.name, c, err, o)
		}
		out.Write(o)
	}
	return out.String()
}

// link joins a and b with a veth pair (aName in a, bName in b), both up.
func (l *pathLab) link(a *pathNS, aName string, b *pathNS, bName string) {
	l.b.Helper()
	l.sh(a, fmt.Sprintf("ip link add %s type veth peer name %s netns %s && ip link set %s up", aName, bName, b.name, aName))
	l.sh(b, "ip link set "+bName+" up")
}

func (l *pathLab) pod(name string, node *pathNS, ip string) *pathPod {
	ns := l.netns(name)
	l.link(node, "v"+name, ns, "eth0")
	l.sh(node, "ip link set v"+name+" master cni0")
	gw := ip[:strings.LastIndex(ip, ".")] + ".1"
	l.sh(ns, "ip addr add "+ip+"/24 dev eth0 && ip route add default via "+gw)
	return &pathPod{ns: ns, ip: ip, node: node}
}

func (l *pathLab) dataplane(n *pathNS) *Dataplane {
	marks, _ := NewMarks(0x00ff0000)
	d, err := New(Config{Marks: marks, RulePriority: 7000, TableBase: 7100, NetNS: &n.h,
		EgressCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("198.19.0.0/24")}, StateDir: l.b.TempDir(),
		Lease: time.Hour, GossipPort: 7946, TunnelPort: 4799})
	if err != nil {
		l.b.Fatal(err)
	}
	l.b.Cleanup(d.Close)
	return d
}

// applyNatd programs both nodes: node2 holds the egress IP, both pinned pods are pinned
// to it, and each node's maps hold `others` more pinned pod IPs; extraIPs more egress
// IPs (no pods) are in use, held by node2.
func (l *pathLab) applyNatd(others, extraIPs int) {
	l.b.Helper()
	s1, s2 := l.states(others, extraIPs)
	// The pinned pods as natd-cni records them: their devices carry the pod guard.
	if !l.unrecorded {
		l.record(l.d1, l.pinnedOther, "vp1b")
		l.record(l.d2, l.pinnedHolder, "vp2")
	}
	if _, err := l.d2.Apply(s2); err != nil {
		l.b.Fatal(err)
	}
	if _, err := l.d1.Apply(s1); err != nil {
		l.b.Fatal(err)
	}
}

// states are applyNatd's states of node1 and node2.
func (l *pathLab) states(others, extraIPs int) (s1, s2 State) {
	eip, n1, n2 := netip.MustParseAddr(pathEgressIP), netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12")
	fake := make([]netip.Addr, 0, others)
	a := netip.MustParseAddr("10.250.0.1")
	for range others {
		fake = append(fake, a)
		a = a.Next()
	}
	base := State{
		ClusterDestinations: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12"),
			netip.MustParsePrefix("198.18.0.11/32"), netip.MustParsePrefix("198.18.0.12/32")},
		PodCIDRs:         []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		NodeIPs:          []netip.Addr{n1, n2},
		PinnedNamespaces: map[string]NamespaceEgress{"pinned": {V4: eip}},
	}
	s1 = base
	s1.NodeIP, s1.LocalPodCIDRs = n1, []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}
	s1.Peers = []Peer{{IP: n2, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}}}
	s1.Egress = []EgressIP{{IP: eip, HolderIP: n2, Pods: append([]netip.Addr{netip.MustParseAddr(l.pinnedOther.ip)}, fake...)}}
	s2 = base
	s2.NodeIP, s2.LocalPodCIDRs = n2, []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}
	s2.Peers = []Peer{{IP: n1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}}}
	s2.Egress = []EgressIP{{IP: eip, HolderIP: n2, Local: true, Gen: 1,
		Pods: append([]netip.Addr{netip.MustParseAddr(l.pinnedHolder.ip)}, fake...)}}
	if extraIPs > 0 {
		x := netip.MustParseAddr("198.19.0.1")
		for range extraIPs {
			s1.Egress = append(s1.Egress, EgressIP{IP: x, HolderIP: n2})
			s2.Egress = append(s2.Egress, EgressIP{IP: x, HolderIP: n2, Local: true, Gen: 1})
			x = x.Next()
		}
	}
	return s1, s2
}

// record writes the pod store record natd-cni would write for pod p of the pinned
// namespace, whose host device is dev.
func (l *pathLab) record(d *Dataplane, p *pathPod, dev string) {
	l.b.Helper()
	idx, err := strconv.Atoi(strings.TrimSpace(l.sh(p.node, "cat /sys/class/net/"+dev+"/ifindex")))
	if err != nil {
		l.b.Fatal(err)
	}
	if err := d.store.Put(PodRecord{ContainerID: dev, Namespace: "pinned", Name: dev, HostIf: dev, HostIfIndex: idx,
		IPs: []netip.Addr{netip.MustParseAddr(p.ip)}}); err != nil {
		l.b.Fatal(err)
	}
}

// removeNatd deletes everything natd made on both nodes.
func (l *pathLab) removeNatd() {
	l.b.Helper()
	for _, d := range []*Dataplane{l.d1, l.d2} {
		if err := d.Cleanup(); err != nil {
			l.b.Fatal(err)
		}
	}
}

// iptablesSNAT is the cheapest pinning there is: the egress IP on the pod's node and
// one SNAT rule for the pod. It returns what undoes it.
func (l *pathLab) iptablesSNAT(p *pathPod) (undo func()) {
	rule := "POSTROUTING -s " + p.ip + " -o eth0 -j SNAT --to-source " + pathEgressIP
	l.sh(p.node, "ip addr add "+pathEgressIP+"/32 dev eth0", "iptables -t nat -A "+rule)
	l.sh(l.router, "ip neigh replace "+pathEgressIP+" lladdr $(ip netns exec "+p.node.name+" cat /sys/class/net/eth0/address) dev br0")
	return func() {
		l.sh(p.node, "iptables -t nat -D "+rule, "ip addr del "+pathEgressIP+"/32 dev eth0")
		l.sh(l.router, "ip neigh del "+pathEgressIP+" dev br0")
	}
}

// iptablesRulePerPod is the classic way to pin pods: one rule per pinned pod in the
// mangle table's PREROUTING, which every packet walks until its pod's rule (here n−1
// other pods' rules, then p's: the worst place). It returns what undoes it.
func (l *pathLab) iptablesRulePerPod(p *pathPod, n int) (undo func()) {
	l.b.Helper()
	var rules strings.Builder
	rules.WriteString("*mangle\n:NATDBENCH - [0:0]\n-A PREROUTING -j NATDBENCH\n")
	a := netip.MustParseAddr("10.250.0.1")
	for range n - 1 {
		fmt.Fprintf(&rules, "-A NATDBENCH -s %s/32 -j MARK --set-xmark 0x1/0xff\n", a)
		a = a.Next()
	}
	fmt.Fprintf(&rules, "-A NATDBENCH -s %s/32 -j MARK --set-xmark 0x1/0xff\nCOMMIT\n", p.ip)
	file := filepath.Join(l.b.TempDir(), "rules")
	if err := os.WriteFile(file, []byte(rules.String()), 0o600); err != nil {
		l.b.Fatal(err)
	}
	l.sh(p.node, "iptables-restore --noflush < "+file)
	return func() {
		l.sh(p.node, "iptables -t mangle -D PREROUTING -j NATDBENCH && iptables -t mangle -F NATDBENCH && iptables -t mangle -X NATDBENCH")
	}
}

// measure runs the three measurements from pod p; the partner must see wantSource.
func (l *pathLab) measure(p *pathPod, secs int, wantSource string) pathFigures {
	l.b.Helper()
	var f pathFigures
	f.rttP50, f.rttP99, f.source = l.pingPong(p, 2000)
	if f.source != wantSource {
		l.b.Fatalf("the partner saw %s from pod %s, want %s", f.source, p.ip, wantSource)
	}
	var err error
	if f.tcpGbps, err = iperf.TCP(p.ns.name, l.partner.name, pathPartner, secs); err != nil {
		l.b.Fatalf("from %s: %v", p.ip, err)
	}
	if f.udpKpps, err = iperf.UDP(p.ns.name, l.partner.name, pathPartner, secs); err != nil {
		l.b.Fatalf("from %s: %v", p.ip, err)
	}
	return f
}

// pingPong sends n datagrams from the pod to the partner's echo, one at a time, and
// returns the round trips' p50 and p99 and the source address the partner saw.
func (l *pathLab) pingPong(p *pathPod, n int) (p50, p99 time.Duration, source string) {
	l.b.Helper()
	var c net.Conn
	if err := inNetns(&p.ns.h, func() (err error) {
		c, err = net.Dial("udp4", net.JoinHostPort(pathPartner, fmt.Sprint(pathEchoPort)))
		return err
	}); err != nil {
		l.b.Fatal(err)
	}
	defer c.Close()
	rtts := make([]time.Duration, 0, n)
	buf := make([]byte, 1500)
	for i := range n {
		start := time.Now()
		fmt.Fprintf(c, "ping %d", i)
		c.SetReadDeadline(time.Now().Add(time.Second))
		k, err := c.Read(buf)
		if err != nil {
			l.b.Fatalf("ping-pong from %s: %v", p.ip, err)
		}
		rtts = append(rtts, time.Since(start))
		source, _, _ = strings.Cut(string(buf[:k]), " ")
	}
	slices.Sort(rtts)
	return rtts[n/2], rtts[n*99/100], source
}
