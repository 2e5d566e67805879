package e2e

import (
	"slices"
	"testing"
	"time"

	"natd.dev/natd/tests/lab"
)

// routedOnly skips a test outside the routed lab (NATD_E2E_NETWORK=routed).
func routedOnly(t *testing.T) {
	t.Helper()
	if topo.Network != lab.NetworkRouted {
		t.Skip("needs the routed lab (NATD_E2E_NETWORK=routed)")
	}
}

// On a routed fabric a holder cut off from the other nodes, but not from the router,
// withdraws its BGP route once its lease runs out: afterwards the router knows only the
// new holder's route for the IP, so it never has two to choose from, and it sends the
// IP's traffic there.
func TestRoutedCutOffHolderWithdraws(t *testing.T) {
	routedOnly(t)
	const ip = "198.18.0.224"
	p := newPod(t, "routed-withdraw", "app", "node1")
	annotate(t, "routed-withdraw", ip)
	unpinOnCleanup(t, "routed-withdraw")
	waitSeen(t, p, tcp, ip)
	holder := waitServedBy(t, ip, 10*time.Second)
	announcers := func() []string {
		got, err := lab.BGPAnnouncers(topo, ip)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	var got []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !slices.Equal(got, []string{holder}); time.Sleep(50 * time.Millisecond) {
		got = announcers()
	}
	if !slices.Equal(got, []string{holder}) {
		t.Fatalf("before the partition the router has routes from %v, want only %s", got, holder)
	}
	heal := partition(t, holder)
	defer heal()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = announcers(); len(got) == 1 && got[0] != holder {
			break
		}
	}
	if len(got) != 1 || got[0] == holder {
		t.Fatalf("5 s into the partition the router has routes for %s from %v; want one, not from the cut-off %s", ip, got, holder)
	}
	checkRouterPointsAt(t, ip, got[0])
	waitSeen(t, p, udp, ip)
	t.Logf("%s cut off: its route withdrawn, the router sends %s to %s", holder, ip, got[0])
}

// IPv6 egress IPs on a routed fabric: the holder announces the /128 with its IPv6
// address as next hop over its BGP session (multiprotocol), the router's BIRD puts it
// in its kernel table, and pinned pods on every node reach the partner with the IPv6
// egress IP (and the IPv4 one over IPv4). The holder's uplink cut, the router's
// route moves to the new holder: the partner sees the stream again from the IPv6
// egress IP only, never two nodes serving it.
func TestRoutedIPv6EgressIP(t *testing.T) {
	routedOnly(t)
	if !topo.IPv6() || topo.EgressCIDR6 == "" {
		t.Fatalf("the routed lab has no IPv6 (egressCIDR6 %q)", topo.EgressCIDR6)
	}
	const ns, ip4, ip6 = "routed-six", "198.18.0.225", "2001:db8:18::e9"
	pin(t, ns, ip4+","+ip6)
	holder := waitServedBy(t, ip6, 10*time.Second)
	var got []string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !slices.Equal(got, []string{holder}); time.Sleep(50 * time.Millisecond) {
		var err error
		if got, err = lab.BGPAnnouncers(topo, ip6); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(got, []string{holder}) {
		t.Fatalf("the router has routes for %s from %v, want only %s", ip6, got, holder)
	}
	checkRouterPointsAt(t, ip6, holder)
	for _, n := range topo.Nodes {
		p := newPod(t, ns, "app-"+n.Name, n.Name)
		waitSeen(t, p, tcp, ip4, nodeIPs()...)
		waitSeenAt(t, p, tcp, partnerAddr6(), ip6, nodeIP6s()...)
		for _, pr := range []proto{tcp, udp} {
			if got, err := seen6(p, pr, 3*time.Second); err != nil || got != ip6 {
				t.Errorf("%s on %s over IPv6 %s: partner saw %q (%v), want %s", p.Name, p.Node, pr, got, err, ip6)
			}
		}
	}
	_, after, o := failover(t, "routed6", "2001:db8:18::ea", cutUplink, mustMove)
	afterwards(t, "2001:db8:18::ea", after)
	t.Logf("routed IPv6 failover: recovery %s, %d leaked", o.recovery.Round(time.Millisecond), o.leaked)
}
