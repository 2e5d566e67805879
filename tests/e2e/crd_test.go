package e2e

import (
	"context"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/natd/client/clientset/versioned"
	"natd.dev/natd/tests/lab"
)

// The generated CRD and typed client work against the real API server, and
// `kubectl get eip` prints the contract's columns.
func TestEgressIPResourceAndColumns(t *testing.T) {
	rc, err := clientcmd.BuildConfigFromFlags("", topo.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	eips, err := versioned.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	obj := &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: "198.18.0.250"},
		Spec: egressv1alpha1.EgressIPSpec{IP: "198.18.0.250"}}
	created, err := eips.EgressV1alpha1().EgressIPs().Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eips.EgressV1alpha1().EgressIPs().Delete(ctx, obj.Name, metav1.DeleteOptions{}) })
	created.Status = egressv1alpha1.EgressIPStatus{Node: "node2", Namespaces: []string{"team-a", "team-b"},
		NamespaceList: "team-a,team-b", Ready: "3/3", Failovers: 1}
	if _, err := eips.EgressV1alpha1().EgressIPs().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := lab.Run(topo.API.KubectlBinary, "--kubeconfig", topo.Kubeconfig, "get", "eip")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if got := strings.Fields(lines[0]); strings.Join(got, " ") != "NAME IP NODE NAMESPACES READY AGE" {
		t.Errorf("kubectl get eip header: %q", lines[0])
	}
	if !strings.Contains(out, "198.18.0.250   198.18.0.250   node2   team-a,team-b   3/3") {
		t.Errorf("kubectl get eip:\n%s", out)
	}
}
