package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"natd.dev/natd/tests/lab"
)

// A pinned namespace leaves with its egress IP from every node: a node that may not
// hold egress IPs, the holder itself, and the other egress node. Unpinned pods keep
// leaving with their node's IP.
func TestPinnedPodsLeaveWithEgressIPFromEveryNode(t *testing.T) {
	const ip = "198.18.0.200"
	var pods []*lab.Pod
	for _, n := range topo.Nodes {
		pods = append(pods, newPod(t, "pin-a", "app-"+n.Name, n.Name))
	}
	other := newPod(t, "pin-a-neighbour", "app", "node1")
	annotate(t, "pin-a", ip)
	unpinOnCleanup(t, "pin-a")

	for _, p := range pods {
		waitSeen(t, p, tcp, ip)
	}
	holder := waitHolder(t, ip)
	if holder == "node1" {
		t.Fatalf("%s is held by node1, which is not egress-eligible", ip)
	}
	t.Logf("%s is held by %s", ip, holder)
	for _, p := range pods {
		assertSeen(t, p, ip)
	}
	assertSeen(t, other, nodeIP("node1"))
}

// Traffic inside the cluster is never natd's: pod to pod across nodes keeps the pod
// IP, and pod to node arrives as the CNI sends it — from the pod IP (flat), or
// masqueraded to the pod's node (overlay, as flannel does) — never from an egress IP.
func TestClusterTrafficKeepsPodIP(t *testing.T) {
	const ip = "198.18.0.201"
	client := newPod(t, "pin-internal", "client", "node1")
	server := newPod(t, "pin-internal-peer", "server", "node3")
	annotate(t, "pin-internal", ip)
	unpinOnCleanup(t, "pin-internal")
	waitSeen(t, client, tcp, ip)

	if got := remoteSeenBy(t, server.Netns, server.IP, client); got != client.IP {
		t.Errorf("pod-to-pod across nodes: server saw %s, want the pod IP %s", got, client.IP)
	}
	node3, _ := topo.Node("node3")
	want := client.IP
	if topo.Network == lab.NetworkOverlay {
		want = nodeIP("node1")
	}
	if got := remoteSeenBy(t, node3.Netns, node3.IP, client); got != want {
		t.Errorf("pod-to-node: node saw %s, want %s (the CNI's choice)", got, want)
	}
}

// remoteSeenBy listens on ip:9000 (either family) in netns ns, connects from pod p, and
// returns the source address the listener saw.
func remoteSeenBy(t *testing.T, ns, ip string, p *lab.Pod) string {
	t.Helper()
	addr := net.JoinHostPort(ip, "9000")
	ln, err := lab.ListenIn(ns, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
		fmt.Fprintln(c, host)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := lab.DialIn(ctx, p.Netns, "tcp", addr)
	if err != nil {
		t.Fatalf("connecting from %s to %s: %v", p.Name, ip, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(line)
}

// Removing the annotation returns the namespace to its node IP; changing it switches
// to the new IP.
func TestAnnotationRemovedOrChanged(t *testing.T) {
	p := newPod(t, "pin-change", "app", "node1")
	annotate(t, "pin-change", "198.18.0.202")
	unpinOnCleanup(t, "pin-change")
	waitSeen(t, p, tcp, "198.18.0.202")

	annotate(t, "pin-change", "198.18.0.203")
	waitSeen(t, p, tcp, "198.18.0.203", nodeIP("node1"))
	assertSeen(t, p, "198.18.0.203")
	waitHolder(t, "198.18.0.203")
	waitNoHolder(t, "198.18.0.202") // no namespace uses it any more

	annotate(t, "pin-change", "")
	waitSeen(t, p, tcp, nodeIP("node1"))
	assertSeen(t, p, nodeIP("node1"))
}

// Two namespaces with two IPs each leave with their own.
func TestTwoNamespacesTwoIPs(t *testing.T) {
	a := newPod(t, "pin-two-a", "app", "node1")
	b := newPod(t, "pin-two-b", "app", "node1")
	annotate(t, "pin-two-a", "198.18.0.204")
	annotate(t, "pin-two-b", "198.18.0.205")
	unpinOnCleanup(t, "pin-two-a")
	unpinOnCleanup(t, "pin-two-b")
	waitSeen(t, a, tcp, "198.18.0.204")
	waitSeen(t, b, tcp, "198.18.0.205")
	assertSeen(t, a, "198.18.0.204")
	assertSeen(t, b, "198.18.0.205")
}

// A pod created in a namespace that is already pinned is pinned from its first packet:
// the partner never sees it with its node's IP.
func TestPodCreatedAfterAnnotationIsPinnedFromTheStart(t *testing.T) {
	const ip = "198.18.0.206"
	ensureNamespace(t, "pin-late")
	annotate(t, "pin-late", ip)
	unpinOnCleanup(t, "pin-late")
	first := newPod(t, "pin-late", "first", "node2")
	waitSeen(t, first, tcp, ip)

	for _, n := range topo.Nodes {
		p := newPod(t, "pin-late", "late-"+n.Name, n.Name)
		// Probe at once and keep probing: every answer must carry the egress IP.
		waitSeen(t, p, udp, ip, nodeIPs()...)
		waitSeen(t, p, tcp, ip, nodeIPs()...)
	}
}

// With no egress-eligible node, pinned traffic is dropped, never sent with a node IP;
// when a node becomes eligible again, it flows with the egress IP.
func TestNoEligibleNodeFailsClosed(t *testing.T) {
	const ip = "198.18.0.207"
	pods := []*lab.Pod{newPod(t, "pin-closed", "app-1", "node1"), newPod(t, "pin-closed", "app-2", "node2")}
	annotate(t, "pin-closed", ip)
	unpinOnCleanup(t, "pin-closed")
	for _, p := range pods {
		waitSeen(t, p, tcp, ip)
	}
	eligible := []string{}
	for _, n := range topo.Nodes {
		if n.Egress {
			eligible = append(eligible, n.Name)
		}
	}
	t.Cleanup(func() {
		for _, n := range eligible {
			setEgressLabel(t, n, "true")
		}
	})
	for _, n := range eligible {
		setEgressLabel(t, n, "")
	}
	waitNoHolder(t, ip)
	for _, p := range pods {
		assertBlocked(t, p)
	}
	// Other namespaces are unaffected.
	free := newPod(t, "pin-closed-free", "app", "node1")
	assertSeen(t, free, nodeIP("node1"))

	setEgressLabel(t, eligible[0], "true")
	for _, p := range pods {
		waitSeen(t, p, tcp, ip, nodeIPs()...)
		assertSeen(t, p, ip)
	}
	if h := waitHolder(t, ip); h != eligible[0] {
		t.Errorf("%s held by %s, want %s (the only eligible node)", ip, h, eligible[0])
	}
}

// Invalid annotations produce a Warning Event on the namespace, and disturb nothing else.
func TestInvalidAnnotationsWarnAndDisturbNothing(t *testing.T) {
	good := newPod(t, "pin-good", "app", "node1")
	annotate(t, "pin-good", "198.18.0.208")
	unpinOnCleanup(t, "pin-good")
	waitSeen(t, good, tcp, "198.18.0.208")

	cases := map[string]struct{ value, reason string }{
		"bad-not-ip":  {"not-an-ip", "InvalidEgressIP"},
		"bad-outside": {"203.0.113.50", "OutsideEgressCIDR"},
		"bad-node-ip": {nodeIP("node2"), "EgressIPIsNodeIP"},
		"bad-list":    {"198.18.0.209,198.18.0.210", "InvalidEgressIP"}, // two of one family
		"bad-ipv6":    {"2001:db8:99::1", "OutsideEgressCIDR"},
	}
	for ns, c := range cases {
		p := newPod(t, ns, "app", "node1")
		annotate(t, ns, c.value)
		unpinOnCleanup(t, ns)
		_ = p
	}
	for ns, c := range cases {
		ev := waitEvent(t, ns, c.reason)
		if ev.Type != corev1.EventTypeWarning || ev.InvolvedObject.Kind != "Namespace" || ev.InvolvedObject.Name != ns {
			t.Errorf("%s: event %s/%s on %s %s; want a Warning on the Namespace", ns, ev.Type, ev.Reason,
				ev.InvolvedObject.Kind, ev.InvolvedObject.Name)
		}
		if !strings.Contains(ev.Message, strings.Split(c.value, ",")[0]) {
			t.Errorf("%s: event message %q does not name the value", ns, ev.Message)
		}
		t.Logf("%s: %s: %s", ns, ev.Reason, ev.Message)
	}
	// The rejected namespaces leave the normal way; the good one keeps its IP.
	for ns := range cases {
		p, _ := topoPod(ns, "app")
		assertSeen(t, p, nodeIP("node1"))
	}
	assertSeen(t, good, "198.18.0.208")
	for _, n := range topo.Nodes {
		if !lab.Alive(currentNatdPid(t, n.Name)) {
			t.Errorf("natd on %s is not running", n.Name)
		}
	}
}

func topoPod(ns, name string) (*lab.Pod, error) {
	t, err := lab.LoadTopology(labDir)
	if err != nil {
		return nil, err
	}
	return t.Pod(ns, name)
}

func currentNatdPid(t *testing.T, node string) int {
	t.Helper()
	cur, err := lab.LoadTopology(labDir)
	if err != nil {
		t.Fatal(err)
	}
	n, err := cur.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	return lab.NatdPid(cur, n)
}

func waitEvent(t *testing.T, ns, reason string) corev1.Event {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		list, err := client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range list.Items {
			if e.Reason == reason && e.InvolvedObject.Kind == "Namespace" {
				return e
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("no %s event in namespace %s", reason, ns)
	return corev1.Event{}
}
