package dataplane

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
)

func flow(src, dst, replyDst string) *netlink.ConntrackFlow {
	return &netlink.ConntrackFlow{
		Forward: netlink.IPTuple{SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst)},
		Reverse: netlink.IPTuple{SrcIP: net.ParseIP(dst), DstIP: net.ParseIP(replyDst)},
	}
}

func TestStaleFlows(t *testing.T) {
	s := &staleFlows{
		pinnedTo: map[netip.Addr]netip.Addr{netip.MustParseAddr("10.244.1.10"): netip.MustParseAddr("198.18.0.200")},
		released: map[netip.Addr]bool{netip.MustParseAddr("198.18.0.201"): true},
		taken:    map[netip.Addr]bool{netip.MustParseAddr("198.18.0.200"): true},
	}
	for _, c := range []struct {
		f     *netlink.ConntrackFlow
		stale bool
		why   string
	}{
		{flow("10.244.1.10", "203.0.113.10", "10.244.1.10"), true, "identity binding of a pod of an IP just taken"},
		{flow("10.244.1.10", "203.0.113.10", "198.18.0.11"), true, "masqueraded before the namespace was pinned"},
		{flow("10.244.1.10", "203.0.113.10", "198.18.0.200"), false, "already SNATed to the IP"},
		{flow("10.244.2.10", "203.0.113.10", "198.18.0.201"), true, "SNATed to an IP given up"},
		{flow("10.244.2.10", "203.0.113.10", "10.244.2.10"), false, "another pod's flow"},
		{flow("203.0.113.10", "198.18.0.200", "203.0.113.10"), true, "a partner's segment forwarded while the IP was not held"},
		{flow("203.0.113.10", "198.18.0.202", "203.0.113.10"), false, "to an egress IP this node did not just take"},
	} {
		if got := s.MatchConntrackFlow(c.f); got != c.stale {
			t.Errorf("%s: stale = %v, want %v", c.why, got, c.stale)
		}
	}
}
