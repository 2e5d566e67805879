package e2e

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"natd.dev/natd/tests/lab"
)

// kube-proxy runs on every lab node: an unpinned pod that reaches the partner through
// a Service's ClusterIP (a Service without selector whose EndpointSlice names the
// partner) arrives there with its node's IP, over TCP and UDP. kube-proxy DNATs the
// ClusterIP to the partner and the node's CNI masquerade rewrites the source.
func TestServiceClusterIPToPartner(t *testing.T) {
	const ns = "svc-plain"
	p := newPod(t, ns, "app", "node1")
	ctx := context.Background()
	ip, err := lab.CreateEndpointService(ctx, labDir, ns, "partner", partnerAddr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.DeleteEndpointService(context.Background(), labDir, ns, "partner"); err != nil {
			t.Error(err)
		}
	})
	if a, err := netip.ParseAddr(ip); err != nil || !netip.MustParsePrefix(lab.ServiceCIDR).Contains(a) {
		t.Fatalf("ClusterIP %q is not in the service CIDR %s", ip, lab.ServiceCIDR)
	}
	t.Logf("kube-proxy in %s mode; ClusterIP %s → %s", topo.ProxyMode, ip, partnerAddr())
	addr := net.JoinHostPort(ip, strconv.Itoa(topo.Partner.Port))
	for _, pr := range []proto{tcp, udp} {
		waitSeenAt(t, p, pr, addr, nodeIP("node1"))
	}
	// Directly, too.
	assertSeen(t, p, nodeIP("node1"))
}
