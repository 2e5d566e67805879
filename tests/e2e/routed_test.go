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
