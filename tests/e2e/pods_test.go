package e2e

import (
	"context"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"natd.dev/natd/tests/lab"
)

// Lab pods are wired by each node's CNI chain: the Pod's status has the address the
// chain gave, a pod may ask for a given IP (and so take a deleted pod's), a taken IP
// is refused, and a pod reusing an IP reaches the partner at once.
func TestPodsFromCNIChain(t *testing.T) {
	const ns = "cni-pods"
	ctx := context.Background()
	first, err := lab.CreatePod(ctx, labDir, ns, "first", "node2")
	if err != nil {
		t.Fatal(err)
	}
	obj, err := client.CoreV1().Pods(ns).Get(ctx, "first", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if obj.Status.PodIP != first.IP || first.ContainerID == "" {
		t.Errorf("Pod status IP %q, CNI result %q, container ID %q", obj.Status.PodIP, first.IP, first.ContainerID)
	}
	n2, _ := topo.Node("node2")
	if out, err := lab.NsRun(n2.Netns, "ip", "-o", "link", "show", "master", "cni0"); err != nil || !strings.Contains(out, "veth") {
		t.Errorf("no veth of the bridge plugin on node2's cni0: %q %v", out, err)
	}
	assertSeen(t, first, nodeIP("node2"))

	if _, err := lab.CreatePod(ctx, labDir, ns, "same-ip", "node2", lab.WithIP(first.IP)); err == nil {
		t.Errorf("a second pod got %s, which %s has", first.IP, first.Name)
		_ = lab.DeletePod(ctx, labDir, ns, "same-ip")
	}
	if err := lab.DeletePod(ctx, labDir, ns, "first"); err != nil {
		t.Fatal(err)
	}
	if out, _ := lab.NsRun(n2.Netns, "ip", "-o", "link", "show", "master", "cni0"); strings.Contains(out, "veth") {
		t.Errorf("the pod's veth is still on cni0 after CNI DEL: %s", out)
	}
	reuse := newPod(t, ns, "reuse", "node2", lab.WithIP(first.IP))
	if reuse.IP != first.IP {
		t.Fatalf("asked for %s, got %s", first.IP, reuse.IP)
	}
	assertSeen(t, reuse, nodeIP("node2"))
	// The same name again, after a delete.
	again := newPod(t, ns, "first", "node2")
	assertSeen(t, again, nodeIP("node2"))
}
