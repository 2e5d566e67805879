package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"natd.dev/natd/tests/lab"
)

// realNodesOnly skips a test that needs the real-node lab (natd-lab up --kubelet,
// NATD_E2E_KUBELET=1): natd as the DaemonSet, the kubelet stopping and starting it.
func realNodesOnly(t *testing.T) {
	t.Helper()
	if !topo.Kubelet {
		t.Skip("needs the real-node lab (NATD_E2E_KUBELET=1)")
	}
}

// natdPods are the DaemonSet's pods by node, as "name/uid".
func natdPods(t testing.TB) map[string]string {
	t.Helper()
	pods, err := client.CoreV1().Pods(lab.ServiceAccountNamespace).List(context.Background(),
		metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=natd"})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			out[p.Spec.NodeName] = p.Name + "/" + string(p.UID)
		}
	}
	return out
}

// `kubectl rollout restart` replaces natd on every node, one after the other, while a
// pinned pod streams through the holder: nothing moves, no datagram is lost or leaves
// with another source, the long-lived TCP connection survives.
func TestRollingRestartMovesNothing(t *testing.T) {
	realNodesOnly(t)
	const ip = "198.18.0.239"
	before := natdPods(t)
	start := time.Now()
	var rolled time.Duration
	_, _, o := failover(t, "rollout", ip, func(t testing.TB, holder string) func() {
		kubectl(t, "-n", lab.ServiceAccountNamespace, "rollout", "restart", "daemonset/natd")
		kubectl(t, "-n", lab.ServiceAccountNamespace, "rollout", "status", "daemonset/natd", "--timeout", "5m")
		rolled = time.Since(start)
		return func() {}
	}, mustStay)
	after := natdPods(t)
	for node, p := range before {
		if after[node] == p || after[node] == "" {
			t.Errorf("natd on %s was not replaced: %q before, %q after", node, p, after[node])
		}
	}
	if o.lost > 0 {
		t.Errorf("the rolling restart lost %d of %d datagrams", o.lost, o.sent)
	}
	t.Logf("rolling restart of %d natd pods in %s: %d of %d datagrams lost, %d leaked; %s",
		len(before), rolled.Round(100*time.Millisecond), o.lost, o.sent, o.leaked, o.tcp)
}

// Uninstalling is the README's one step, `kubectl delete -k manifests/`: every natd is
// stopped by its kubelet, sees it is being uninstalled, and removes what it put on its
// node. Afterwards every node is as it was before natd was installed (tables, rules,
// routes, addresses, links, the CNI configuration and plugins, sysctls), pods of the
// formerly pinned namespace leave with their node's address, as without natd, and new
// pods work at once. natd is installed again afterwards.
func TestUninstallFromRealNodesLeavesNothing(t *testing.T) {
	realNodesOnly(t)
	const ip = "198.18.0.213"
	p := newPod(t, "pin-uninstall", "app", "node1")
	annotate(t, "pin-uninstall", ip)
	t.Cleanup(func() { annotate(t, "pin-uninstall", "") })
	waitSeen(t, p, tcp, ip)

	start := time.Now()
	kubectl(t, "delete", "-k", manifestsDir(), "--wait=true", "--timeout=3m")
	t.Cleanup(func() { reinstallNatd(t) })
	deleted := time.Since(start)
	// The kubelets have stopped every natd once their pods are gone.
	for deadline := time.Now().Add(2 * time.Minute); len(natdPods(t)) > 0 || anyNatdRunning(); time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("natd still runs 2 minutes after the uninstall: pods %v", natdPods(t))
		}
	}
	for _, n := range topo.Nodes {
		diff, err := lab.NodeDiffSinceInstall(labDir, &n)
		if err != nil {
			t.Fatal(err)
		}
		if diff != "" {
			t.Errorf("%s differs from before natd was installed:\n%s", n.Name, diff)
		}
	}
	waitSeen(t, p, tcp, nodeIP("node1"))
	waitSeen(t, p, udp, nodeIP("node1"))
	fresh := newPod(t, "pin-uninstall", "fresh", "node2")
	assertSeen(t, fresh, nodeIP("node2"))
	t.Logf("uninstalled in %s (kubectl delete -k returned); every node as before natd", deleted.Round(100*time.Millisecond))
}

func anyNatdRunning() bool {
	for _, n := range topo.Nodes {
		if lab.NatdPid(topo, &n) != 0 {
			return true
		}
	}
	return false
}

// reinstallNatd installs natd again as the README says, and waits until every node's
// natd is ready.
func reinstallNatd(t *testing.T) {
	for _, f := range []string{"namespace.yaml", "crd/egress.natd.dev_egressips.yaml", "rbac.yaml", "serviceaccount.yaml"} {
		kubectl(t, "apply", "--server-side", "-f", manifestsDir()+"/"+f)
	}
	kubectl(t, "wait", "--for", "condition=Established", "--timeout", "60s", "crd/egressips.egress.natd.dev")
	if err := lab.InstallNatd(context.Background(), topo, labDir); err != nil {
		t.Fatal(err)
	}
	for i := range topo.Nodes {
		if err := lab.WaitNatdReady(context.Background(), &topo.Nodes[i], 2*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	waitGossipHealthy(t)
	if !strings.Contains(kubectl(t, "-n", lab.ServiceAccountNamespace, "get", "daemonset", "natd"), "natd") {
		t.Fatal("natd's DaemonSet is not back")
	}
}
