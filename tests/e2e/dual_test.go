package e2e

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/tests/lab"
)

// natd's IPv6 promise, in the dual-stack lab (NATD_E2E_NETWORK=dual): a pod of a
// pinned namespace never sends IPv6 traffic to the outside (its egress IP is IPv4: the
// traffic is dropped and counted as no_ipv6_egress), while pods of namespaces nobody
// pinned keep their IPv6 access, leaving with their node's IPv6 address through the
// lab CNI's masquerade. Every verdict is read from the partner's records.

// seen6 asks the partner's IPv6 address which source it sees from pod p.
func seen6(p *lab.Pod, pr proto, timeout time.Duration) (string, error) {
	return seenAt(p, pr, partnerAddr6(), timeout)
}

// assertNoIPv6Egress streams from pinned pod p to the partner's IPv6 address (UDP
// datagrams and TCP requests) and fails if anything of it arrived there, with any
// source; with countOn set, that node's natd must have counted drops meanwhile.
func assertNoIPv6Egress(t *testing.T, p *lab.Pod, id string, countOn string) {
	t.Helper()
	before := 0
	if countOn != "" {
		before = droppedBy(t, countOn, "no_ipv6_egress")
	}
	s := startStreamTo(t, p, id, partnerAddr6())
	for _, pr := range []proto{tcp, udp} {
		if got, err := seen6(p, pr, time.Second); err == nil {
			t.Errorf("%s/%s on %s: IPv6 over %s reached the partner from %s; want it dropped", p.Namespace, p.Name, p.Node, pr, got)
		}
	}
	time.Sleep(500 * time.Millisecond)
	s.halt()
	udp, tcp := arrivals(t, s.id)
	for _, a := range append(udp, tcp...) {
		t.Errorf("%s/%s on %s: IPv6 datagram/request %d of %s arrived at the partner from %s; want nothing", p.Namespace,
			p.Name, p.Node, a.Seq, s.id, a.Src)
	}
	if countOn == "" {
		return
	}
	after := droppedBy(t, countOn, "no_ipv6_egress")
	t.Logf("%s/%s on %s: nothing of %d IPv6 datagrams arrived; no_ipv6_egress on %s %d → %d", p.Namespace, p.Name, p.Node,
		len(s.sent), countOn, before, after)
	// Every datagram is dropped once, on the pod's node: the counter counts the
	// traffic (not merely, say, the pod's neighbour solicitations).
	if after-before < len(s.sent)/2 {
		t.Errorf("natd_pinned_packets_dropped_total{reason=\"no_ipv6_egress\"} on %s grew %d → %d for %d datagrams sent",
			countOn, before, after, len(s.sent))
	}
}

// The dual-stack lab itself, and unpinned pods: nodes and pods have both families in
// the API and in topology.json; a pod of a namespace nobody pinned reaches the
// partner's IPv6 address with its node's IPv6 address (TCP and UDP), and pod to pod
// across nodes keeps the pod's own IPv6 address.
func TestDualStackUnpinnedPodsKeepIPv6(t *testing.T) {
	dualOnly(t)
	if topo.Partner.IP6 == "" || topo.EgressCIDR6 == "" {
		t.Errorf("topology.json: partner.ip6 %q, egressCIDR6 %q", topo.Partner.IP6, topo.EgressCIDR6)
	}
	ctx := context.Background()
	for _, n := range topo.Nodes {
		obj, err := client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var internal []string
		for _, a := range obj.Status.Addresses {
			if a.Type == "InternalIP" {
				internal = append(internal, a.Address)
			}
		}
		if want := []string{n.PodCIDR, n.PodCIDR6}; !slices.Equal(obj.Spec.PodCIDRs, want) || n.IP6 == "" {
			t.Errorf("%s: spec.podCIDRs %v, want %v", n.Name, obj.Spec.PodCIDRs, want)
		}
		if want := []string{n.IP, n.IP6}; !slices.Equal(internal, want) {
			t.Errorf("%s: InternalIPs %v, want %v", n.Name, internal, want)
		}
	}
	a := newPod(t, "dual-plain", "a", "node1")
	b := newPod(t, "dual-plain", "b", "node3")
	obj, err := client.CoreV1().Pods(a.Namespace).Get(ctx, a.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(obj.Status.PodIPs); a.IP6 == "" || got != fmt.Sprintf("[{%s} {%s}]", a.IP, a.IP6) {
		t.Errorf("pod status podIPs %s; want %s and %s", got, a.IP, a.IP6)
	}
	for _, p := range []*lab.Pod{a, b} {
		want6 := nodeIP6(p.Node)
		for _, pr := range []proto{tcp, udp} {
			// At once: the pod is new, and nothing may hold an unpinned pod back.
			if got, err := seen6(p, pr, 3*time.Second); err != nil || got != want6 {
				t.Errorf("%s on %s over IPv6 %s: partner saw %q (%v), want the node's %s", p.Name, p.Node, pr, got, err, want6)
			}
		}
		assertSeen(t, p, nodeIP(p.Node))
	}
	if got := remoteSeenBy(t, b.Netns, b.IP6, a); got != a.IP6 {
		t.Errorf("IPv6 pod-to-pod across nodes: %s saw %s, want the pod's own %s", b.Name, got, a.IP6)
	}
}

// A pinned namespace's pods, on a node that may not hold egress IPs and on the
// holder: IPv4 leaves with the egress IP; IPv6 to the partner never arrives, over TCP
// or UDP, and the pod's node counts the drops. IPv6 inside the cluster (pod to pod
// across nodes: the IPv6 --cluster-cidr natd is given) keeps flowing, and an
// unpinned pod on the same node keeps its IPv6 access.
func TestDualStackPinnedPodsNeverLeaveOverIPv6(t *testing.T) {
	dualOnly(t)
	const ns, eip = "dual-pinned", "198.18.0.224"
	ensureNamespace(t, ns)
	annotate(t, ns, eip)
	unpinOnCleanup(t, ns)
	holder := waitHolder(t, eip)
	plain := newPod(t, "dual-pinned-neighbour", "app", "node1")
	peer := newPod(t, "dual-pinned-peer", "server", "node3")
	for _, node := range []string{"node1", holder} {
		p := newPod(t, ns, "app-"+node, node)
		waitSeen(t, p, tcp, eip, nodeIPs()...)
		assertSeen(t, p, eip)
		assertNoIPv6Egress(t, p, "dual-pinned-"+node, node)
		if p.Node != peer.Node {
			if got := remoteSeenBy(t, peer.Netns, peer.IP6, p); got != p.IP6 {
				t.Errorf("IPv6 from pinned %s to a pod on %s: seen from %s, want the pod's own %s", p.Name, peer.Node, got, p.IP6)
			}
		}
	}
	for _, pr := range []proto{tcp, udp} {
		if got, err := seen6(plain, pr, 3*time.Second); err != nil || got != nodeIP6("node1") {
			t.Errorf("unpinned neighbour over IPv6 %s: partner saw %q (%v), want %s", pr, got, err, nodeIP6("node1"))
		}
	}
}

// Pods created while natd on their node is dead (SIGKILL): natd-cni classifies them
// from what natd last wrote. The pinned pod never reaches the partner over IPv6 (and
// over IPv4 only with the egress IP); the unpinned one reaches it over IPv6 at once
// with its node's IPv6 address. After natd is back, the pinned pod's IPv6 is still
// dropped, and counted.
func TestDualStackNewPodsWhileNatdDead(t *testing.T) {
	dualOnly(t)
	const ns, plainNS, eip = "dual-dead", "dual-dead-plain", "198.18.0.225"
	ensureNamespace(t, ns)
	annotate(t, ns, eip)
	unpinOnCleanup(t, ns)
	waitHolder(t, eip)
	// natd on node1 has written the pinning for natd-cni once the namespace's first
	// pod there is pinned.
	first := newPod(t, ns, "first", "node1")
	waitSeen(t, first, tcp, eip)
	if err := lab.KillNatd(topo, "node1"); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			restartNatd(t, "node1")
		}
	})
	pinned := newPod(t, ns, "late", "node1")
	plain := newPod(t, plainNS, "late", "node1")
	for _, pr := range []proto{tcp, udp} {
		if got, err := seen6(plain, pr, 900*time.Millisecond); err != nil || got != nodeIP6("node1") {
			t.Errorf("natd dead: a new unpinned pod's first IPv6 %s exchange: %q (%v); want %s at once", pr, got, err, nodeIP6("node1"))
		}
	}
	assertNoIPv6Egress(t, pinned, "dual-dead-natd-dead", "")
	s := startStream(t, pinned, "dual-dead-v4")
	time.Sleep(time.Second)
	s.halt()
	if n := onlyFrom(t, s, eip); n == 0 {
		t.Errorf("natd dead: nothing of the new pinned pod's IPv4 stream arrived (want it with %s)", eip)
	}

	restartNatd(t, "node1")
	restarted = true
	assertNoIPv6Egress(t, pinned, "dual-dead-natd-back", "node1")
	if got, err := seen6(plain, tcp, 3*time.Second); err != nil || got != nodeIP6("node1") {
		t.Errorf("natd back: unpinned pod over IPv6: %q (%v), want %s", got, err, nodeIP6("node1"))
	}
}

func nodeIP6(name string) string {
	n, err := topo.Node(name)
	if err != nil {
		panic(err)
	}
	return n.IP6
}

// natd's ip6 table deleted, or the whole ruleset flushed, on a pinned pod's node: the
// pod guard keeps the pod's IPv6 to the outside in until natd has repaired its table
// (without it, the pod's datagrams would leave with its own IPv6 address).
func TestDualStackTablesGoneKeepPinnedIPv6In(t *testing.T) {
	dualOnly(t)
	const ns, eip = "dual-tamper", "198.18.0.226"
	ensureNamespace(t, ns)
	annotate(t, ns, eip)
	unpinOnCleanup(t, ns)
	waitHolder(t, eip)
	p := newPod(t, ns, "app", "node1")
	waitSeen(t, p, tcp, eip, nodeIPs()...)
	n, err := topo.Node(p.Node)
	if err != nil {
		t.Fatal(err)
	}
	// (Without the pod guard — its filter deleted with the table — 2 of 60 datagrams
	// reached the partner from the node's IPv6 address before the repair.)
	for i, cmd := range []string{"nft delete table ip6 natd", "nft flush ruleset"} {
		s := startStreamTo(t, p, fmt.Sprintf("dual-tamper-%d", i), partnerAddr6())
		repaired, _ := tamperWhileStreaming(t, n, cmd, s)
		udp, tcp := arrivals(t, s.id)
		for _, a := range append(udp, tcp...) {
			t.Errorf("%s: IPv6 datagram/request %d of the pinned pod arrived at the partner from %s; want nothing", cmd, a.Seq, a.Src)
		}
		t.Logf("%-26s on %s: repaired in %s, %d IPv6 datagrams sent, none arrived", cmd, p.Node, repaired.Round(time.Millisecond), len(s.sent))
	}
	assertSeen(t, p, eip)
}

// nodeIP6s are every node's IPv6 address: what a leak over IPv6 would show.
func nodeIP6s() []string {
	var out []string
	for _, n := range topo.Nodes {
		out = append(out, n.IP6)
	}
	return out
}

// assertOnlyFrom6 streams IPv6 datagrams and TCP requests from p to the partner for a
// second and fails unless some arrived and every one of them came from want.
func assertOnlyFrom6(t *testing.T, p *lab.Pod, id, want string) {
	t.Helper()
	s := startStreamTo(t, p, id, partnerAddr6())
	time.Sleep(time.Second)
	s.halt()
	if n := onlyFrom(t, s, want); n == 0 {
		t.Errorf("%s/%s on %s: nothing of %d IPv6 datagrams arrived (want them from %s)", p.Namespace, p.Name, p.Node, len(s.sent), want)
	}
}

// IPv6 egress IPs (issue 11, item 4): a namespace pinned to an IPv4 and an IPv6 egress
// IP reaches the partner with the one of each family, from the holders and from nodes
// that may hold nothing (through natd's tunnel), over TCP and UDP, every datagram with
// exactly that source; `kubectl get eip` lists both IPs with their holders and every
// node programmed. A namespace pinned to an IPv6 egress IP only never reaches the
// partner over IPv4 (dropped and counted as no_ipv4_egress on the pod's node).
func TestDualStackEgressIPs(t *testing.T) {
	dualOnly(t)
	const ns, eip4, eip6 = "dual-both", "198.18.0.227", "2001:db8:18::e3"
	pin(t, ns, eip4+","+eip6)
	holder4, holder6 := waitHolder(t, eip4), waitHolder(t, eip6)
	for _, n := range topo.Nodes {
		p := newPod(t, ns, "app-"+n.Name, n.Name)
		waitSeen(t, p, tcp, eip4, nodeIPs()...)
		waitSeenAt(t, p, tcp, partnerAddr6(), eip6, nodeIP6s()...)
		for _, pr := range []proto{tcp, udp} {
			if got, err := seen6(p, pr, 3*time.Second); err != nil || got != eip6 {
				t.Errorf("%s on %s over IPv6 %s: partner saw %q (%v), want %s", p.Name, p.Node, pr, got, err, eip6)
			}
		}
		assertSeen(t, p, eip4)
		assertOnlyFrom6(t, p, "dual-both-"+n.Name, eip6)
	}
	for ip, holder := range map[string]string{eip4: holder4, eip6: holder6} {
		waitEIP(t, ip, "holder and every node programmed", func(o *egressv1alpha1.EgressIP) bool {
			return o != nil && o.Status.Node == holder && o.Status.Ready == readyAll()
		})
		header, row := getEIPRow(t, ip)
		if len(row) < 5 || row[1] != ip || row[2] != holder || row[3] != ns || row[4] != readyAll() {
			t.Errorf("kubectl get eip: %v / %v; want %s held by %s for %s, READY %s", header, row, ip, holder, ns, readyAll())
		}
		t.Logf("kubectl get eip: %v", row)
	}
	checkRouterPointsAt(t, eip6, holder6)
	// The holder's own IPv6 and an unpinned pod's there (the CNI's masquerade picks
	// the node's source address) never leave with the IPv6 egress IP on the uplink.
	plain := newPod(t, "dual-both-plain", "app", holder6)
	for _, pr := range []proto{tcp, udp} {
		if got, err := seen6(plain, pr, 3*time.Second); err != nil || got != nodeIP6(holder6) {
			t.Errorf("unpinned pod on the IPv6 holder %s over IPv6 %s: partner saw %q (%v), want the node's %s", holder6, pr, got, err, nodeIP6(holder6))
		}
	}

	// IPv6 only: its pods' IPv4 to the outside is dropped, never sent with another
	// source; their IPv6 leaves with the egress IP.
	const ns6, only6 = "dual-six", "2001:db8:18::e4"
	pin(t, ns6, only6)
	waitHolder(t, only6)
	p := newPod(t, ns6, "app", "node1")
	waitSeenAt(t, p, tcp, partnerAddr6(), only6, nodeIP6s()...)
	before := droppedBy(t, "node1", "no_ipv4_egress")
	s := startStream(t, p, "dual-six-v4")
	time.Sleep(time.Second)
	s.halt()
	udpA, tcpA := arrivals(t, s.id)
	for _, a := range append(udpA, tcpA...) {
		t.Errorf("IPv6-only namespace: IPv4 datagram/request %d arrived at the partner from %s; want nothing", a.Seq, a.Src)
	}
	if after := droppedBy(t, "node1", "no_ipv4_egress"); after-before < len(s.sent)/2 {
		t.Errorf("no_ipv4_egress on node1 grew %d → %d for %d datagrams sent", before, after, len(s.sent))
	}
}

// droppedBy is natd_pinned_packets_dropped_total{reason} of the node's natd.
func droppedBy(t *testing.T, node, reason string) int {
	t.Helper()
	n, err := topo.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^natd_pinned_packets_dropped_total\{reason="` + reason + `"\} (\S+)$`).FindStringSubmatch(metrics(n.Netns))
	if m == nil {
		t.Fatalf("natd on %s has no %s drop counter", node, reason)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return int(v)
}

// An IPv6 egress IP fails over as an IPv4 one does (same leases, same election): the
// holder's uplink cut or its natd killed, the partner sees the pod's IPv6 stream again
// from the new holder well within a second or so, never with another source, never
// served by two nodes; the router's neighbour entry follows the unsolicited neighbour
// advertisement; the long-lived IPv6 connection survives.
func TestDualStackIPv6Failover(t *testing.T) {
	dualOnly(t)
	for _, c := range []struct {
		name, ip string
		f        fault
	}{
		{"uplink6", "2001:db8:18::e5", cutUplink},
		{"sigkill6", "2001:db8:18::e6", killNatd},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, after, o := failover(t, c.name, c.ip, c.f, mustMove)
			afterwards(t, c.ip, after)
			if o.recovery > 2*time.Second {
				t.Errorf("%s: IPv6 recovery took %s", c.name, o.recovery)
			}
		})
	}
}

// No node may hold egress IPs: a pinned namespace's IPv6 to the outside is dropped
// (fail closed), never sent with the pod's or a node's IPv6 address; with an egress
// node back it leaves with the IPv6 egress IP again.
func TestDualStackIPv6FailsClosed(t *testing.T) {
	dualOnly(t)
	const ns, eip6 = "dual-closed", "2001:db8:18::e7"
	pin(t, ns, eip6)
	waitHolder(t, eip6)
	p := newPod(t, ns, "app", "node1")
	waitSeenAt(t, p, tcp, partnerAddr6(), eip6, nodeIP6s()...)
	var labelled []string
	for _, n := range topo.Nodes {
		obj, err := client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if obj.Labels["egress.natd.dev/node"] == "true" {
			labelled = append(labelled, n.Name)
			setEgressLabel(t, n.Name, "")
		}
	}
	t.Cleanup(func() {
		for _, n := range labelled {
			setEgressLabel(t, n, "true")
		}
	})
	waitNoHolder(t, eip6)
	s := startStreamTo(t, p, "dual-closed", partnerAddr6())
	time.Sleep(time.Second)
	s.halt()
	udpA, tcpA := arrivals(t, s.id)
	for _, a := range append(udpA, tcpA...) {
		t.Errorf("no egress node: IPv6 datagram/request %d arrived at the partner from %s; want nothing", a.Seq, a.Src)
	}
	for _, n := range labelled {
		setEgressLabel(t, n, "true")
	}
	labelled = nil
	waitSeenAt(t, p, tcp, partnerAddr6(), eip6, nodeIP6s()...)
}

// An IPv6 egress IP's traffic while natd's tables are gone — the ip6 table deleted,
// or the whole ruleset flushed — on the pinned pod's node or on the holder, until natd
// has repaired them: it arrives with the IPv6 egress IP or not at all (the IPv6 route
// guard: the pod guard's origin rule on the pod's node, a rule per tunnel device of an
// IPv6 egress IP on the holder; and the lapsed-lease output filter).
func TestDualStackIPv6TablesGone(t *testing.T) {
	dualOnly(t)
	const ns, eip6 = "dual-tamper6", "2001:db8:18::e8"
	pin(t, ns, eip6)
	holder := waitHolder(t, eip6)
	pods := []*lab.Pod{newPod(t, ns, "app-remote", notHolding(holder)), newPod(t, ns, "app-holder", holder)}
	for _, p := range pods {
		waitSeenAt(t, p, tcp, partnerAddr6(), eip6, nodeIP6s()...)
	}
	for _, p := range pods {
		for _, where := range []string{p.Node, holder} {
			n, err := topo.Node(where)
			if err != nil {
				t.Fatal(err)
			}
			for i, cmd := range []string{"nft delete table ip6 natd", "nft flush ruleset"} {
				s := startStreamTo(t, p, fmt.Sprintf("dual-tamper6-%s-%s-%d", p.Name, where, i), partnerAddr6())
				repaired, _ := tamperWhileStreaming(t, n, cmd, s)
				good := onlyFrom(t, s, eip6)
				t.Logf("%s on %s, pod on %s: repaired in %s, %d datagrams and requests arrived (%d datagrams sent), all from %s", cmd, where, p.Node,
					repaired.Round(time.Millisecond), good, len(s.sent), eip6)
			}
			if where == holder {
				break // the holder's own pod: tampered once
			}
		}
	}
}

// A pod created while natd on its node is dead (SIGKILL), in a namespace pinned in both
// families: natd-cni classifies both of its addresses from what natd last wrote, and
// its very first IPv6 exchanges leave with the IPv6 egress IP, its IPv4 ones with the
// IPv4 one, never with the pod's or the node's addresses.
func TestDualStackIPv6NewPodsWhileNatdDead(t *testing.T) {
	dualOnly(t)
	const ns, eip4, eip6 = "dual-dead6", "198.18.0.228", "2001:db8:18::ec"
	pin(t, ns, eip4+","+eip6)
	waitHolder(t, eip4)
	waitHolder(t, eip6)
	first := newPod(t, ns, "first", "node1")
	waitSeenAt(t, first, tcp, partnerAddr6(), eip6, nodeIP6s()...)
	if err := lab.KillNatd(topo, "node1"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { restartNatd(t, "node1") })
	late := newPod(t, ns, "late", "node1")
	for _, pr := range []proto{udp, tcp} {
		if got, err := seen6(late, pr, 2*time.Second); err != nil || got != eip6 {
			t.Errorf("natd dead: the new pinned pod's first IPv6 %s exchange: partner saw %q (%v); want %s", pr, got, err, eip6)
		}
		if got, err := seen(late, pr, 2*time.Second); err != nil || got != eip4 {
			t.Errorf("natd dead: the new pinned pod's first IPv4 %s exchange: partner saw %q (%v); want %s", pr, got, err, eip4)
		}
	}
	assertOnlyFrom6(t, late, "dual-dead6-late", eip6)
}
