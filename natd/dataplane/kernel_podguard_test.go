package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The pod guard: with natd's table deleted, or the whole ruleset flushed, on a pinned
// pod's own node, not one datagram of the pod reaches the partner — on a node that
// relays to the holder and on the holder itself — while an unpinned pod on the same
// node is untouched. With the tables in place, everything works under strict reverse
// path filtering (the guard must not cost replies). Without the guard the same
// deletion lets the pinned pod's datagrams out with another source: the test can fail.
func TestKernelPodGuardKeepsPinnedPodsIn(t *testing.T) {
	l := newPathLab(t)
	for _, n := range []*pathNS{l.node1, l.node2} {
		// A CNI's masquerade, and reverse path filtering as strict as it gets.
		l.sh(n, "iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE",
			"sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1",
			"for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 1 > $f; done")
	}
	// The holder's pod has an ingress qdisc already, as the CNI bandwidth plugin gives
	// one (it excludes a clsact qdisc): the guard goes there.
	l.sh(l.node2, "tc qdisc add dev vp2 ingress")
	l.applyNatd(0, 0)
	register := func(n *pathNS, p *pathPod, namespace, dev string) {
		t.Helper()
		idx, err := strconv.Atoi(strings.TrimSpace(l.sh(n, "cat /sys/class/net/"+dev+"/ifindex")))
		if err != nil {
			t.Fatal(err)
		}
		d := l.d1
		if n == l.node2 {
			d = l.d2
		}
		rec := PodRecord{ContainerID: dev, Namespace: namespace, Name: dev, IPs: []netip.Addr{netip.MustParseAddr(p.ip)},
			HostIf: dev, HostIfIndex: idx, Added: time.Now().UnixNano()}
		if err := inNetns(&n.h, func() error { _, err := RegisterPod(d.store, rec); return err }); err != nil {
			t.Fatalf("RegisterPod(%s): %v", dev, err)
		}
	}
	filters := func(n *pathNS, dev string) string {
		return l.sh(n, "tc filter show dev "+dev+" ingress")
	}
	// natd guarded the pinned pods it found recorded; the plugin guards a new one.
	if f := filters(l.node1, "vp1b"); !strings.Contains(f, podGuardName) {
		t.Fatalf("natd put no guard on the pinned pod's device:\n%s", f)
	}
	l.sh(l.node1, "tc filter del dev vp1b ingress")
	register(l.node1, l.pinnedOther, "pinned", "vp1b")
	register(l.node1, l.unpinned, "plain", "vp1a")
	register(l.node2, l.pinnedHolder, "pinned", "vp2")
	if f := filters(l.node1, "vp1b"); !strings.Contains(f, podGuardName) {
		t.Fatalf("the plugin put no guard on the pinned pod's device:\n%s", f)
	}
	if f := filters(l.node1, "vp1a"); strings.Contains(f, podGuardName) {
		t.Fatalf("the plugin guarded an unpinned pod:\n%s", f)
	}

	// With the tables: every pod reaches the partner as it should, replies included.
	sink := newSourceSink(t, l)
	expect := func(p *pathPod, want string) {
		t.Helper()
		if got := sink.exchange(p, 20); got != want {
			t.Fatalf("pod %s: the partner saw %q, want %q", p.ip, got, want)
		}
	}
	expect(l.pinnedOther, pathEgressIP)
	expect(l.pinnedHolder, pathEgressIP)
	expect(l.unpinned, "198.18.0.11")

	for _, tc := range []struct {
		node *pathNS
		pod  *pathPod
		cmd  string
	}{
		{l.node1, l.pinnedOther, "nft delete table ip natd"},
		{l.node2, l.pinnedHolder, "nft delete table ip natd"},
		{l.node1, l.pinnedOther, "nft flush ruleset"},
		{l.node2, l.pinnedHolder, "nft flush ruleset"},
	} {
		l.sh(tc.node, tc.cmd)
		if got := sink.count(tc.pod, 50); len(got) != 0 {
			t.Errorf("%s on the pod's node: %v reached the partner from the pinned pod %s; want none", tc.cmd, got, tc.pod.ip)
		}
		if tc.node == l.node1 {
			// The unpinned pod next to it does not notice (without the masquerade the
			// flush also took, with its own address).
			if got := sink.count(l.unpinned, 20); len(got) != 1 || got["198.18.0.11"]+got[l.unpinned.ip] != 20 {
				t.Errorf("%s: the unpinned pod's datagrams arrived as %v; want all 20", tc.cmd, got)
			}
		}
		l.applyNatd(0, 0) // natd's repair
		l.sh(tc.node, "iptables -t nat -C POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE 2>/dev/null || "+
			"iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE")
		expect(tc.pod, pathEgressIP)
		expect(l.unpinned, "198.18.0.11")
	}
	if drifted, _, err := l.d1.Verify(); err != nil || drifted {
		t.Fatalf("Verify after the repairs = %v, %v", drifted, err)
	}

	// The tables stay, but no map names the pinned pod's address any more (elements
	// deleted by hand; a lookup that misses would be the same): its packets, still
	// carrying the guard's mark, are dropped and counted, never sent unclassified,
	// that is, with the node's address. (Clearing the mark before classifying let
	// all 20 out as 198.18.0.11.)
	l.sh(l.node1, "nft delete element ip natd cni_pods { "+l.pinnedOther.ip+" } || true",
		"nft delete element ip natd pod_egress { "+l.pinnedOther.ip+" } || true")
	before, err := l.d1.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if got := sink.count(l.pinnedOther, 20); len(got) != 0 {
		t.Errorf("the pinned pod's address in no map: %v reached the partner; want none", got)
	}
	after, err := l.d1.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if n := after.Drops[DropUnclassified].Packets - before.Drops[DropUnclassified].Packets; n < 20 {
		t.Errorf("%d packets counted as %s; want the 20 sent", n, DropUnclassified)
	}
	expect(l.unpinned, "198.18.0.11")
	l.applyNatd(0, 0)
	expect(l.pinnedOther, pathEgressIP)

	// Someone takes the filter off: Verify notices, the next Apply puts it back.
	l.sh(l.node1, "tc filter del dev vp1b ingress")
	if drifted, _, err := l.d1.Verify(); err != nil || !drifted {
		t.Fatalf("Verify with the pod guard removed = %v, %v; want drift", drifted, err)
	}
	l.applyNatd(0, 0)
	if f := filters(l.node1, "vp1b"); !strings.Contains(f, podGuardName) {
		t.Fatalf("the pod guard was not repaired:\n%s", f)
	}

	// The control: without the guard, deleting the table lets the pinned pod out.
	if err := inNetns(&l.node1.h, func() error {
		link, err := l.d1.pods.nl.LinkByName("vp1b")
		if err != nil {
			return err
		}
		return l.d1.pods.unguard(link)
	}); err != nil {
		t.Fatal(err)
	}
	l.sh(l.node1, "nft delete table ip natd")
	if got := sink.count(l.pinnedOther, 20); len(got) == 0 {
		t.Errorf("without the pod guard nothing reached the partner after the table's deletion: the test proves nothing")
	} else {
		t.Logf("without the pod guard: %v reached the partner", got)
	}
	l.applyNatd(0, 0)

	// A pinned pod natd-cni never recorded (older than natd-cni): natd finds its
	// device behind the bridge by its address.
	if err := l.d1.store.Remove("vp1b"); err != nil {
		t.Fatal(err)
	}
	l.sh(l.node1, "tc filter del dev vp1b ingress")
	l.unrecorded = true
	l.applyNatd(0, 0)
	if f := filters(l.node1, "vp1b"); !strings.Contains(f, podGuardName) {
		t.Fatalf("natd did not find the unrecorded pinned pod's device:\n%s", f)
	}
	l.sh(l.node1, "nft delete table ip natd")
	if got := sink.count(l.pinnedOther, 20); len(got) != 0 {
		t.Errorf("an unrecorded pinned pod: %v reached the partner with natd's table deleted; want none", got)
	}
	l.applyNatd(0, 0)

	// A namespace no longer pinned loses the guard; cleanup leaves no filter, no qdisc.
	s1 := State{NodeIP: netip.MustParseAddr("198.18.0.11"), PinnedNamespaces: map[string]NamespaceEgress{},
		ClusterDestinations: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}}
	if _, err := l.d1.Apply(s1); err != nil {
		t.Fatal(err)
	}
	if f := filters(l.node1, "vp1b"); strings.Contains(f, podGuardName) {
		t.Fatalf("a pod of a namespace no longer pinned keeps the guard:\n%s", f)
	}
	if got := sink.count(l.pinnedOther, 20); got["198.18.0.11"] != 20 {
		t.Errorf("a pod of a namespace no longer pinned: its datagrams arrived as %v; want all 20 from 198.18.0.11", got)
	}
	l.applyNatd(0, 0)
	if err := l.d2.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if q := l.sh(l.node2, "tc qdisc show dev vp2; tc filter show dev vp2 ingress; ip -6 rule; ip rule"); strings.Contains(q, "clsact") ||
		strings.Contains(q, podGuardName) || strings.Contains(q, "0xfd0000") || !strings.Contains(q, "qdisc ingress") {
		t.Fatalf("cleanup left the pod guard behind, or took the bandwidth plugin's qdisc:\n%s", q)
	}
}

// sourceSink is a UDP listener on the partner that counts datagrams by the source
// address it saw, per probe.
type sourceSink struct {
	t    *testing.T
	l    *pathLab
	conn net.PacketConn
	mu   sync.Mutex
	seen map[string]map[string]int // probe ID → source → datagrams
}

const sinkPort = 7008

func newSourceSink(t *testing.T, l *pathLab) *sourceSink {
	s := &sourceSink{t: t, l: l, seen: map[string]map[string]int{}}
	if err := inNetns(&l.partner.h, func() (err error) {
		s.conn, err = net.ListenPacket("udp4", net.JoinHostPort(pathPartner, fmt.Sprint(sinkPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.conn.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := s.conn.ReadFrom(buf)
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(from.String())
			id, _, _ := strings.Cut(string(buf[:n]), " ")
			s.mu.Lock()
			if s.seen[id] == nil {
				s.seen[id] = map[string]int{}
			}
			s.seen[id][host]++
			s.mu.Unlock()
		}
	}()
	return s
}

var probeSeq int

// count sends n datagrams from the pod, 5 ms apart, and returns the sources the
// partner saw them with.
func (s *sourceSink) count(p *pathPod, n int) map[string]int {
	s.t.Helper()
	probeSeq++
	id := fmt.Sprintf("probe%d", probeSeq)
	var c net.Conn
	if err := inNetns(&p.ns.h, func() (err error) {
		c, err = net.Dial("udp4", net.JoinHostPort(pathPartner, fmt.Sprint(sinkPort)))
		return err
	}); err != nil {
		s.t.Fatal(err)
	}
	defer c.Close()
	for i := range n {
		if _, err := fmt.Fprintf(c, "%s %d", id, i); err != nil && !errors.Is(err, net.ErrClosed) {
			// A blackholed route answers the sender with an error: nothing was sent.
			continue
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	s.mu.Lock()
	defer s.mu.Unlock()
	got := map[string]int{}
	for src, k := range s.seen[id] {
		got[src] = k
	}
	return got
}

// exchange sends n datagrams and wants every one to arrive with one source, which it
// returns ("" when not).
func (s *sourceSink) exchange(p *pathPod, n int) string {
	s.t.Helper()
	got := s.count(p, n)
	if len(got) != 1 {
		s.t.Logf("pod %s: sources %v", p.ip, got)
		return ""
	}
	for src, k := range got {
		if k != n {
			s.t.Logf("pod %s: %d of %d arrived", p.ip, k, n)
			return ""
		}
		return src
	}
	return ""
}
