package bgp

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"
)

// A node that may no longer serve must not draw the traffic: announcements end with
// their lease unless it is extended, and Serve withdraws what is no longer held.
func TestSpeakerWithdrawsWhenTheLeaseRunsOut(t *testing.T) {
	s, err := Start(context.Background(), Config{ASN: 64512, NodeIP: netip.MustParseAddr("127.0.0.1"),
		Peers: []Peer{{Addr: netip.MustParseAddr("127.0.0.2"), ASN: 64513}}, HoldTime: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ip1, ip2 := netip.MustParseAddr("198.18.0.200"), netip.MustParseAddr("198.18.0.201")
	if err := s.Serve(map[netip.Addr]uint32{ip1: 1, ip2: 7}, time.Now().Add(200*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if got := s.Announced(); len(got) != 2 || got[ip2] != 7 {
		t.Fatalf("announced %v", got)
	}
	if err := s.Serve(map[netip.Addr]uint32{ip2: 7}, time.Now().Add(200*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if got := s.Announced(); len(got) != 1 || got[ip2] != 7 {
		t.Fatalf("after giving %s up: announced %v", ip1, got)
	}
	for i := 0; i < 5; i++ { // renewed well within the lease: stays
		time.Sleep(100 * time.Millisecond)
		s.Extend(time.Now().Add(200 * time.Millisecond))
	}
	if got := s.Announced(); len(got) != 1 {
		t.Fatalf("renewed, yet withdrawn: %v", got)
	}
	time.Sleep(400 * time.Millisecond)
	if got := s.Announced(); len(got) != 0 {
		t.Fatalf("lease ran out 200ms ago, still announced: %v", got)
	}
}

func TestStartNeedsPeersAndASN(t *testing.T) {
	if _, err := Start(context.Background(), Config{NodeIP: netip.MustParseAddr("127.0.0.1")}); err == nil {
		t.Fatal("a speaker without AS number and peers started")
	}
}

// An IPv6 egress IP is announced only by a node with an IPv6 address (its next hop);
// without one the IPv4 IPs are announced all the same and the error says which IPv6
// ones were not.
func TestSpeakerAnnouncesIPv6WithTheNodesIPv6Address(t *testing.T) {
	ip4, ip6 := netip.MustParseAddr("198.18.0.200"), netip.MustParseAddr("2001:db8:18::c8")
	for _, nodeIP6 := range []netip.Addr{{}, netip.MustParseAddr("::1")} {
		s, err := Start(context.Background(), Config{ASN: 64512, NodeIP: netip.MustParseAddr("127.0.0.1"), NodeIP6: nodeIP6,
			Peers: []Peer{{Addr: netip.MustParseAddr("127.0.0.2"), ASN: 64513}}, HoldTime: 3 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		err = s.Serve(map[netip.Addr]uint32{ip4: 1, ip6: 2}, time.Now().Add(time.Minute))
		got := s.Announced()
		s.Close()
		if !nodeIP6.IsValid() {
			if !errors.Is(err, ErrNoIPv6NextHop) || len(got) != 1 || got[ip4] != 1 {
				t.Errorf("without an IPv6 address: Serve = %v, announced %v; want %s announced and ErrNoIPv6NextHop", err, got, ip4)
			}
			continue
		}
		if err != nil || len(got) != 2 || got[ip6] != 2 {
			t.Errorf("with IPv6 address %s: Serve = %v, announced %v; want both", nodeIP6, err, got)
		}
	}
}
