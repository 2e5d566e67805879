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

// droppedNoIPv6 is natd_pinned_packets_dropped_total{reason="no_ipv6_egress"} of the
// node's natd (-1: no answer or no series).
func droppedNoIPv6(t *testing.T, node string) int {
	t.Helper()
	n, err := topo.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^natd_pinned_packets_dropped_total\{reason="no_ipv6_egress"\} (\S+)$`).
		FindStringSubmatch(metrics(n.Netns))
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return int(v)
}

// assertNoIPv6Egress streams from pinned pod p to the partner's IPv6 address (UDP
// datagrams and TCP requests) and fails if anything of it arrived there, with any
// source; with countOn set, that node's natd must have counted drops meanwhile.
func assertNoIPv6Egress(t *testing.T, p *lab.Pod, id string, countOn string) {
	t.Helper()
	before := 0
	if countOn != "" {
		if before = droppedNoIPv6(t, countOn); before < 0 {
			t.Fatalf("natd on %s has no no_ipv6_egress drop counter", countOn)
		}
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
	after := droppedNoIPv6(t, countOn)
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
