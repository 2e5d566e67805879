package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/natd/client/clientset/versioned"
	"natd.dev/natd/tests/lab"
)

func newEIPClient() (versioned.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", topo.Kubeconfig)
	if err != nil {
		return nil, err
	}
	return versioned.NewForConfig(rc)
}

func eipClient(t testing.TB) versioned.Interface {
	t.Helper()
	c, err := newEIPClient()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func kubectl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := lab.Run(topo.API.KubectlBinary, append([]string{"--kubeconfig", topo.Kubeconfig}, args...)...)
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// waitEIP waits until the EgressIP of ip satisfies ok (nil object: it does not exist).
func waitEIP(t testing.TB, ip, what string, ok func(*egressv1alpha1.EgressIP) bool) *egressv1alpha1.EgressIP {
	t.Helper()
	c := eipClient(t)
	var last *egressv1alpha1.EgressIP
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		obj, err := c.EgressV1alpha1().EgressIPs().Get(context.Background(), eipName(ip), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			obj = nil
		case err != nil:
			continue // the API may be coming back
		}
		if last = obj; ok(obj) {
			return obj
		}
	}
	t.Fatalf("EgressIP %s: %s did not happen; last seen: %+v", ip, what, last)
	return nil
}

// eipName is the name of ip's EgressIP object (CONTRACT.md: an IPv6 address's ':'
// become '-').
func eipName(ip string) string { return strings.ReplaceAll(ip, ":", "-") }

// getEIPRow returns the fields of ip's row in `kubectl get eip` (args add e.g. -o wide),
// and the header's fields.
func getEIPRow(t testing.TB, ip string, args ...string) (header, row []string) {
	t.Helper()
	out := kubectl(t, append([]string{"get", "eip"}, args...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	// Columns are separated by at least two spaces (LAST FAILOVER has one inside).
	split := func(s string) []string { return regexp.MustCompile(`\s{2,}`).Split(strings.TrimSpace(s), -1) }
	header = split(lines[0])
	for _, l := range lines[1:] {
		if f := split(l); f[0] == eipName(ip) {
			return header, f
		}
	}
	return header, nil
}

// eventsAbout lists Events in ns about the object named name, of the given reason.
func eventsAbout(t testing.TB, ns, kind, name, reason string) []corev1.Event {
	t.Helper()
	list, err := client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{
		FieldSelector: "involvedObject.kind=" + kind + ",involvedObject.name=" + name + ",reason=" + reason})
	if err != nil {
		t.Fatal(err)
	}
	return list.Items
}

func waitEventAbout(t testing.TB, ns, kind, name, reason, contains string) corev1.Event {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		for _, e := range eventsAbout(t, ns, kind, name, reason) {
			if strings.Contains(e.Message, contains) {
				return e
			}
		}
	}
	t.Fatalf("no %s Event about %s %s (in %s) saying %q", reason, kind, name, ns, contains)
	return corev1.Event{}
}

// snatPackets is the holder's natd_snat_packets_total for ip (-1: no series).
func snatPackets(node, ip string) int {
	n, _ := topo.Node(node)
	m := regexp.MustCompile(`(?m)^natd_snat_packets_total\{egress_ip="` + regexp.QuoteMeta(ip) + `"\} (\S+)$`).
		FindStringSubmatch(metrics(n.Netns))
	if m == nil {
		return -1
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return int(v)
}

func readyAll() string { return fmt.Sprintf("%d/%d", len(topo.Nodes), len(topo.Nodes)) }

// What an operator sees: kubectl get eip, -o wide and describe; Events on the Namespace
// and the EgressIP; the holder's SNAT counters; the object gone when no namespace uses
// the IP.
func TestOperatorView(t *testing.T) {
	const ip = "198.18.0.220"
	waitGossipHealthy(t)
	p := newPod(t, "eip-a", "app", "node1")
	annotate(t, "eip-a", ip)
	unpinOnCleanup(t, "eip-a")
	waitSeen(t, p, tcp, ip)
	holder := waitHolder(t, ip)

	waitEIP(t, ip, "holder and every node ready", func(o *egressv1alpha1.EgressIP) bool {
		return o != nil && o.Status.Node == holder && o.Status.Ready == readyAll()
	})
	header, row := getEIPRow(t, ip)
	if strings.Join(header, "|") != "NAME|IP|NODE|NAMESPACES|READY|AGE" {
		t.Errorf("kubectl get eip header: %q", header)
	}
	if len(row) < 5 || row[1] != ip || row[2] != holder || row[3] != "eip-a" || row[4] != readyAll() {
		t.Errorf("kubectl get eip row: %q; want %s %s eip-a %s", row, ip, holder, readyAll())
	}
	t.Logf("kubectl get eip: %q", row)
	if header, _ := getEIPRow(t, ip, "-o", "wide"); strings.Join(header, "|") != "NAME|IP|NODE|NAMESPACES|READY|PREVIOUS|FAILOVERS|LAST FAILOVER|AGE" {
		t.Errorf("kubectl get eip -o wide header: %q", header)
	}
	describe := kubectl(t, "describe", "eip", ip)
	for _, want := range []string{"Type:    Assigned", "Reason:  Held", "Type:    Ready", "Reason:  Programmed", "EgressIPAssigned"} {
		if !strings.Contains(strings.Join(strings.Fields(describe), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("kubectl describe eip lacks %q:\n%s", want, describe)
		}
	}
	waitEventAbout(t, "eip-a", "Namespace", "eip-a", "EgressIPAssigned", "held by node "+holder)

	// The holder counts what it SNATs; the other nodes have no series for the IP.
	before := snatPackets(holder, ip)
	for i := 0; i < 3; i++ {
		assertSeen(t, p, ip)
	}
	if after := snatPackets(holder, ip); after < before+3*3 { // a TCP exchange is several packets
		t.Errorf("natd_snat_packets_total on %s: %d before, %d after three connections", holder, before, after)
	}
	for _, n := range topo.Nodes {
		if n.Name != holder && snatPackets(n.Name, ip) != -1 {
			t.Errorf("%s, which does not hold %s, exports SNAT packets for it", n.Name, ip)
		}
	}

	// Move it: the status follows, failovers counts it, Events record it, and the old
	// holder's series for the IP goes away.
	setEgressLabel(t, holder, "")
	t.Cleanup(func() { setEgressLabel(t, holder, "true") })
	obj := waitEIP(t, ip, "a new holder, every node ready", func(o *egressv1alpha1.EgressIP) bool {
		return o != nil && o.Status.Node != "" && o.Status.Node != holder && o.Status.Ready == readyAll()
	})
	moved := obj.Status.Node
	if got := waitHolder(t, ip); got != moved {
		t.Errorf("status says %s holds %s, the uplinks say %s", moved, ip, got)
	}
	if obj.Status.Failovers != 1 || obj.Status.PreviousNode != holder || obj.Status.LastFailoverTime == nil {
		t.Errorf("status after the move: %+v", obj.Status)
	}
	_, row = getEIPRow(t, ip, "-o", "wide")
	if len(row) < 7 || row[2] != moved || row[5] != holder || row[6] != "1" {
		t.Errorf("kubectl get eip -o wide after the move: %q", row)
	}
	msg := fmt.Sprintf("moved from node %s to node %s", holder, moved)
	waitEventAbout(t, "eip-a", "Namespace", "eip-a", "EgressIPFailover", msg)
	waitEventAbout(t, "default", "EgressIP", ip, "EgressIPFailover", msg)
	if n := snatPackets(holder, ip); n != -1 {
		t.Errorf("%s no longer holds %s but still exports %d SNAT packets for it", holder, ip, n)
	}
	assertSeen(t, p, ip)

	// No namespace uses it any more: the object goes away.
	annotate(t, "eip-a", "")
	waitEIP(t, ip, "deletion", func(o *egressv1alpha1.EgressIP) bool { return o == nil })
}

// A rejected annotation that still names an address gets an object whose Assigned
// condition says why; the IPs of other namespaces are not disturbed.
func TestRejectedIPHasCondition(t *testing.T) {
	const good, outside = "198.18.0.221", "198.18.2.10"
	p := newPod(t, "eip-good", "app", "node2")
	annotate(t, "eip-good", good)
	unpinOnCleanup(t, "eip-good")
	waitSeen(t, p, tcp, good)
	ensureNamespace(t, "eip-outside")
	annotate(t, "eip-outside", outside)
	unpinOnCleanup(t, "eip-outside")

	obj := waitEIP(t, outside, "a rejection condition", func(o *egressv1alpha1.EgressIP) bool {
		c := (*metav1.Condition)(nil)
		if o != nil {
			c = meta.FindStatusCondition(o.Status.Conditions, "Assigned")
		}
		return c != nil && c.Status == metav1.ConditionFalse && c.Reason == "OutsideEgressCIDR"
	})
	if obj.Status.Node != "" || obj.Status.NamespaceList != "eip-outside" {
		t.Errorf("rejected IP's status: %+v", obj.Status)
	}
	ev := waitEvent(t, "eip-outside", "OutsideEgressCIDR")
	if ev.Type != corev1.EventTypeWarning {
		t.Errorf("event type %s, want Warning", ev.Type)
	}
	assertSeen(t, p, good)
	annotate(t, "eip-outside", "")
	waitEIP(t, outside, "deletion", func(o *egressv1alpha1.EgressIP) bool { return o == nil })
	waitEIP(t, good, "still there", func(o *egressv1alpha1.EgressIP) bool { return o != nil && o.Status.Ready == readyAll() })
}
