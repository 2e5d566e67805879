package dataplane

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A pinned pod's node re-points its tunnel from one holder to the next while the pod
// sends: every datagram the node takes in leaves through the tunnel, to one holder or
// the other. With the old holder's neighbour and forwarding entries removed before the
// route moved, a datagram routed a moment earlier waited in an unresolvable neighbour's
// queue and was lost (about one in 20 of the lab's planned moves).
func TestKernelRepointingTheTunnelLosesNothing(t *testing.T) {
	l := newPathLab(t)
	n3 := netip.MustParseAddr("198.18.0.13")
	// A third egress node, by address only: node1's frames to it need a neighbour on
	// the uplink; the bridge drops them, the test counts them as they leave node1.
	l.sh(l.node1, "ip neigh replace 198.18.0.13 lladdr 02:00:00:00:00:13 dev eth0 nud permanent")
	l.applyNatd(0, 0)
	s1, _ := l.states(0, 0)
	s1.NodeIPs = append(s1.NodeIPs, n3)
	s1.ClusterDestinations = append(s1.ClusterDestinations, netip.PrefixFrom(n3, 32))
	s1.Peers = append(s1.Peers, Peer{IP: n3, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}})
	holders := []netip.Addr{netip.MustParseAddr("198.18.0.12"), n3}
	apply := func(holder netip.Addr) {
		t.Helper()
		s := s1
		s.Egress = []EgressIP{s1.Egress[0]}
		s.Egress[0].HolderIP = holder
		if _, err := l.d1.Apply(s); err != nil {
			t.Fatal(err)
		}
	}
	apply(holders[0])
	// What node1 takes in from the pod, and what leaves it through the tunnels.
	l.sh(l.node1, `nft -f - <<'EOF'
table inet natd-test-move {
	chain in {
		type filter hook prerouting priority -500; policy accept;
		iifname "cni0" ip saddr 10.244.1.11 udp dport 7008 counter
	}
	chain out {
		type filter hook postrouting priority 500; policy accept;
		udp dport 4799 ip daddr { 198.18.0.12, 198.18.0.13 } counter
	}
}
EOF`)

	var c net.Conn
	if err := inNetns(&l.pinnedOther.ns.h, func() (err error) {
		c, err = net.Dial("udp4", net.JoinHostPort(pathPartner, fmt.Sprint(sinkPort)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var stop atomic.Bool
	done := make(chan int)
	go func() {
		sent := 0
		for !stop.Load() {
			if _, err := c.Write([]byte("move")); err == nil {
				sent++
			}
			// Paced (about 50,000 a second), so that no queue on the way overflows.
			for until := time.Now().Add(20 * time.Microsecond); time.Now().Before(until); {
			}
		}
		done <- sent
	}()
	const moves = 40
	for i := range moves {
		time.Sleep(5 * time.Millisecond)
		apply(holders[(i+1)%2])
	}
	time.Sleep(5 * time.Millisecond)
	stop.Store(true)
	sent := <-done
	time.Sleep(100 * time.Millisecond)

	counters := counterValues(t, l.sh(l.node1, "nft list table inet natd-test-move"))
	if len(counters) != 2 {
		t.Fatalf("counters %v, want two", counters)
	}
	in, out := counters[0], counters[1]
	t.Logf("%d moves: the pod sent %d datagrams, node1 took in %d, %d left through the tunnels", moves, sent, in, out)
	if in < sent*9/10 {
		t.Fatalf("node1 took in %d of %d datagrams: the test lost them before natd", in, sent)
	}
	if out != in {
		t.Errorf("%d moves of the tunnel lost %d of %d datagrams", moves, in-out, in)
	}
}

// counterValues returns the packet counts of nft's listing, in order.
func counterValues(t *testing.T, listing string) []int {
	t.Helper()
	var out []int
	for _, f := range strings.Split(listing, "counter packets ")[1:] {
		n, err := strconv.Atoi(strings.Fields(f)[0])
		if err != nil {
			t.Fatalf("reading counter %q: %v", f, err)
		}
		out = append(out, n)
	}
	return out
}
