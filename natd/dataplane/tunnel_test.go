package dataplane

import (
	"net/netip"
	"testing"
)

func TestTunnelVNIAndMAC(t *testing.T) {
	if got := TunnelVNI(netip.MustParseAddr("198.18.0.200")); got != 0x1200c8 {
		t.Errorf("VNI of 198.18.0.200 = %#x, want 0x1200c8 (its low 24 bits)", got)
	}
	if got := TunnelVNI(netip.MustParseAddr("2001:db8:18::12:c8")); got != 0x1200c8 {
		t.Errorf("VNI of 2001:db8:18::12:c8 = %#x, want 0x1200c8 (its low 24 bits)", got)
	}
	if got := TunnelNextHop6(netip.MustParseAddr("198.18.0.12")).String(); got != "fe80::4e:c612:c" {
		t.Errorf("IPv6 next hop of 198.18.0.12 = %s", got)
	}
	if got := TunnelMAC(netip.MustParseAddr("198.18.0.12")).String(); got != "02:4e:c6:12:00:0c" {
		t.Errorf("tunnel MAC of 198.18.0.12 = %s", got)
	}
}

// Two egress CIDRs whose addresses would share a VNI are refused; any others pass.
func TestVNIOverlap(t *testing.T) {
	p := netip.MustParsePrefix
	for _, c := range []struct {
		cidrs   []netip.Prefix
		overlap bool
	}{
		{[]netip.Prefix{p("198.18.0.192/26")}, false},
		{[]netip.Prefix{p("198.18.0.192/26"), p("203.0.113.0/28")}, false},
		{[]netip.Prefix{p("198.18.0.192/26"), p("198.18.0.128/26")}, false},  // same first octet: distinct low bits
		{[]netip.Prefix{p("198.18.0.192/26"), p("10.18.0.200/32")}, true},    // 10.18.0.200 and 198.18.0.200
		{[]netip.Prefix{p("10.0.0.0/8"), p("11.5.0.0/16")}, true},            // a /8 covers every VNI
		{[]netip.Prefix{p("198.18.0.192/26"), p("2001:db8::/64")}, true},     // a /64 covers every VNI
		{[]netip.Prefix{p("198.18.0.192/26"), p("2001:db8::c0/122")}, false}, // ::c0-::ff: 0x0000c0.., not 0x1200c0..
		{[]netip.Prefix{p("198.18.0.192/26"), p("2001:db8::12:c0/122")}, true},
		{[]netip.Prefix{p("2001:db8:18::/120"), p("2001:db8:19::/120")}, true}, // only the prefix differs
		{[]netip.Prefix{p("198.18.0.0/24"), p("198.18.0.192/26")}, false},      // overlapping CIDRs: the same addresses
	} {
		if _, _, got := VNIOverlap(c.cidrs); got != c.overlap {
			t.Errorf("VNIOverlap(%v) = %v, want %v", c.cidrs, got, c.overlap)
		}
	}
}
