package e2e

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"natd.dev/natd/tests/lab"
)

func partnerAddr() string { return fmt.Sprintf("%s:%d", topo.Partner.IP, topo.Partner.Port) }

// partnerAddr6 is the partner's IPv6 address and port (dual network mode).
func partnerAddr6() string {
	return net.JoinHostPort(topo.Partner.IP6, strconv.Itoa(topo.Partner.Port))
}

// partnerFor is the partner's address (and port) in the family of egress IP ip.
func partnerFor(ip string) string {
	if strings.Contains(ip, ":") {
		return partnerAddr6()
	}
	return partnerAddr()
}

// dualOnly skips a test unless the lab is dual-stack.
func dualOnly(t *testing.T) {
	t.Helper()
	if !topo.Dual() {
		t.Skipf("needs the dual-stack lab (NATD_E2E_NETWORK=dual); this one is %q", topo.Network)
	}
}

// newPod creates a lab pod and removes it when the test ends (unless the test did).
func newPod(t testing.TB, ns, name, node string, opts ...lab.PodOption) *lab.Pod {
	t.Helper()
	p, err := lab.CreatePod(context.Background(), labDir, ns, name, node, opts...)
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", ns, name, err)
	}
	t.Cleanup(func() {
		if cur, err := lab.LoadTopology(labDir); err == nil {
			if _, err := cur.Pod(ns, name); err != nil {
				return // deleted by the test
			}
		}
		if err := lab.DeletePod(context.Background(), labDir, ns, name); err != nil {
			t.Errorf("deleting pod %s/%s: %v", ns, name, err)
		}
	})
	return p
}

// annotate sets (or with ip "" removes) a namespace's egress annotation.
func annotate(t testing.TB, ns, ip string) {
	t.Helper()
	value := "null"
	if ip != "" {
		value = fmt.Sprintf("%q", ip)
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{"egress.natd.dev/ip":%s}}}`, value)
	if _, err := client.CoreV1().Namespaces().Patch(context.Background(), ns, types.MergePatchType,
		[]byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("annotating %s: %v", ns, err)
	}
}

// ensureNamespace creates ns (lab pods create theirs; some tests need one without pods).
func ensureNamespace(t testing.TB, ns string) {
	t.Helper()
	_, err := client.CoreV1().Namespaces().Create(context.Background(),
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// unpinOnCleanup removes the annotation when the test ends, so tests stay independent.
func unpinOnCleanup(t *testing.T, ns string) {
	t.Cleanup(func() { annotate(t, ns, "") })
}

type proto string

const (
	tcp proto = "tcp"
	udp proto = "udp"
)

// seen asks the partner which source address it sees from pod p now.
func seen(p *lab.Pod, pr proto, timeout time.Duration) (string, error) {
	return seenAt(p, pr, partnerAddr(), timeout)
}

// seenAt is seen through addr, e.g. a Service's ClusterIP whose endpoint is the partner.
func seenAt(p *lab.Pod, pr proto, addr string, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return lab.SourceSeen(ctx, p.Netns, string(pr), addr)
}

// waitSeen waits until the partner sees want from p, and fails if it ever sees an
// address in forbidden meanwhile.
func waitSeen(t testing.TB, p *lab.Pod, pr proto, want string, forbidden ...string) {
	t.Helper()
	waitSeenAt(t, p, pr, partnerAddr(), want, forbidden...)
}

// waitSeenAt is waitSeen through addr.
func waitSeenAt(t testing.TB, p *lab.Pod, pr proto, addr, want string, forbidden ...string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	var last string
	var lastErr error
	for time.Now().Before(deadline) {
		got, err := seenAt(p, pr, addr, time.Second)
		if err == nil {
			for _, f := range forbidden {
				if got == f {
					t.Fatalf("%s/%s over %s to %s reached the partner from %s (forbidden)", p.Namespace, p.Name, pr, addr, got)
				}
			}
			if got == want {
				return
			}
		}
		last, lastErr = got, err
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("natd's kernel state when the partner never saw %s:\n%s", want, kernelState())
	t.Fatalf("%s/%s over %s to %s: partner never saw %s (last: %q, %v)", p.Namespace, p.Name, pr, addr, want, last, lastErr)
}

// kernelState is what natd left in every node's kernel (its ip table without the
// pinned pods' elements, ip rules, routes, addresses, conntrack toward the partner):
// logged when a wait fails, so that a failure in CI explains itself.
func kernelState() string {
	var b strings.Builder
	for _, n := range topo.Nodes {
		fmt.Fprintf(&b, "--- %s\n", n.Name)
		for _, cmd := range [][]string{
			{"nft", "-t", "list", "table", "ip", "natd"},
			{"nft", "list", "set", "ip", "natd", "held_marks"},
			{"nft", "list", "map", "ip", "natd", "held_snat"},
			{"ip", "rule", "show", "priority", "7000"},
			{"ip", "route", "show", "table", "all", "proto", "78"},
			{"ip", "-4", "-o", "addr", "show", "dev", "eth0"},
		} {
			out, err := lab.NsRun(n.Netns, cmd...)
			if err != nil {
				out = err.Error()
			}
			fmt.Fprintf(&b, "$ %s\n%s\n", strings.Join(cmd, " "), out)
		}
	}
	return b.String()
}

// assertSeen checks both protocols now, with no waiting for convergence.
func assertSeen(t *testing.T, p *lab.Pod, want string) {
	t.Helper()
	for _, pr := range []proto{tcp, udp} {
		got, err := seen(p, pr, 3*time.Second)
		if err != nil || got != want {
			t.Errorf("%s/%s on %s over %s: partner saw %q (%v), want %s", p.Namespace, p.Name, p.Node, pr, got, err, want)
		}
	}
}

// assertBlocked checks that pod p cannot reach the partner at all.
func assertBlocked(t *testing.T, p *lab.Pod) {
	t.Helper()
	for _, pr := range []proto{tcp, udp} {
		if got, err := seen(p, pr, 1500*time.Millisecond); err == nil {
			t.Errorf("%s/%s over %s reached the partner from %s; want it dropped", p.Namespace, p.Name, pr, got)
		}
	}
}

func nodeIP(name string) string {
	n, err := topo.Node(name)
	if err != nil {
		panic(err)
	}
	return n.IP
}

func nodeIPs() []string {
	var out []string
	for _, n := range topo.Nodes {
		out = append(out, n.IP)
	}
	return out
}

// holdersOf lists the nodes that have ip on their uplink. While an IP moves, the old
// and the new holder may both have it for a moment.
func holdersOf(t testing.TB, ip string) []string {
	t.Helper()
	var holders []string
	for _, n := range topo.Nodes {
		out, err := lab.NsRun(n.Netns, "ip", "-o", "addr", "show", "dev", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, " "+ip+"/32 ") || strings.Contains(out, " "+ip+"/128 ") {
			holders = append(holders, n.Name)
		}
	}
	return holders
}

// waitHolder waits until exactly one node holds ip and returns it.
func waitHolder(t testing.TB, ip string) string {
	t.Helper()
	var h []string
	for i := 0; i < 100; i++ {
		if h = holdersOf(t, ip); len(h) == 1 {
			return h[0]
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s is not held by exactly one node: %v", ip, h)
	return ""
}

// waitNoHolder waits until no node has ip.
func waitNoHolder(t *testing.T, ip string) {
	t.Helper()
	var h []string
	for i := 0; i < 100; i++ {
		if h = holdersOf(t, ip); len(h) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s is still held by %v", ip, h)
}

// setNodeLabel sets or (value "") removes the egress label of a node.
func setEgressLabel(t testing.TB, node, value string) {
	t.Helper()
	v := "null"
	if value != "" {
		v = fmt.Sprintf("%q", value)
	}
	patch := fmt.Sprintf(`{"metadata":{"labels":{"egress.natd.dev/node":%s}}}`, v)
	if _, err := client.CoreV1().Nodes().Patch(context.Background(), node, types.MergePatchType, []byte(patch),
		metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// notHolding is a node that does not hold the egress IP holder holds: its pinned pods'
// traffic goes through natd's tunnel.
func notHolding(holder string) string {
	if holder == "node1" {
		return "node2"
	}
	return "node1"
}
