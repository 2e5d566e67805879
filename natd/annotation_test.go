package natd

import (
	"net/netip"
	"testing"
)

func TestParseEgressIPs(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("192.0.2.7/32"),
		netip.MustParsePrefix("10.0.0.0/32"), netip.MustParsePrefix("2001:db8:18::/120"),
		netip.MustParsePrefix("2001:db8:19::/127"), netip.MustParsePrefix("2001:db8:21::fffe/127"), netip.MustParsePrefix("2001:db8:20::/128")}
	nodes := map[netip.Addr]string{netip.MustParseAddr("198.18.0.193"): "node9", netip.MustParseAddr("2001:db8:18::9"): "node9"}
	for _, tc := range []struct {
		in, want, reason string
	}{
		{in: "198.18.0.200", want: "198.18.0.200"},
		{in: " 198.18.0.200 ", want: "198.18.0.200"},
		{in: "::ffff:198.18.0.200", want: "198.18.0.200"},
		{in: "192.0.2.7", want: "192.0.2.7"}, // a /32 egress CIDR has no network/broadcast address
		{in: "2001:db8:18::c8", want: "2001:db8:18::c8"},
		{in: "2001:DB8:18:0::C8", want: "2001:db8:18::c8"},
		{in: "198.18.0.200,2001:db8:18::c8", want: "198.18.0.200,2001:db8:18::c8"},
		{in: "2001:db8:18::c8, 198.18.0.200", want: "198.18.0.200,2001:db8:18::c8"}, // either order
		{in: "2001:db8:21::fffe", want: "2001:db8:21::fffe"},                        // a /127 has no anycast address (RFC 6164)
		{in: "", reason: ReasonInvalidIP},
		{in: "not-an-ip", reason: ReasonInvalidIP},
		{in: "198.18.0.300", reason: ReasonInvalidIP},
		{in: "198.18.0.200/32", reason: ReasonInvalidIP},
		{in: "fe80::1%eth0", reason: ReasonInvalidIP},
		{in: "198.18.0.200,", reason: ReasonInvalidIP},
		{in: ",2001:db8:18::c8", reason: ReasonInvalidIP},
		{in: "198.18.0.200,198.18.0.201", reason: ReasonInvalidIP},       // two of one family
		{in: "2001:db8:18::c8,2001:db8:18::c9", reason: ReasonInvalidIP}, // two of one family
		{in: "198.18.0.200,2001:db8:18::c8,2001:db8:18::c9", reason: ReasonInvalidIP},
		{in: "203.0.113.5", reason: ReasonOutsideEgressCIDR},
		{in: "2001:db8:99::1", reason: ReasonOutsideEgressCIDR},
		{in: "198.18.0.200,2001:db8:99::1", reason: ReasonOutsideEgressCIDR}, // one bad address rejects both
		{in: "198.18.0.192", reason: ReasonReservedAddress},
		{in: "198.18.0.255", reason: ReasonReservedAddress},
		{in: "2001:db8:18::", reason: ReasonReservedAddress}, // subnet-router anycast
		{in: "2001:db8:20::", reason: ReasonReservedAddress}, // its VNI (0) is the reply tunnel's
		{in: "198.18.0.193", reason: ReasonNodeIP},
		{in: "2001:db8:18::9", reason: ReasonNodeIP},
		{in: "10.0.0.0", reason: ReasonReservedAddress}, // its tunnel VNI (0) is the reply tunnel's
	} {
		got, err := ParseEgressIPs(tc.in, cidrs, nodes)
		if tc.reason != "" {
			if err == nil || err.Reason != tc.reason {
				t.Errorf("ParseEgressIPs(%q) = %v, %v; want reason %s", tc.in, got, err, tc.reason)
			}
			if err != nil && err.Message == "" {
				t.Errorf("ParseEgressIPs(%q): empty message", tc.in)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseEgressIPs(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func FuzzParseEgressIPs(f *testing.F) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("2001:db8:18::/120")}
	for _, s := range []string{"198.18.0.200", "", "a,b", "::1", "198.18.0.255", "198.18.0.200,2001:db8:18::c8"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		eips, err := ParseEgressIPs(s, cidrs, nil)
		if err != nil {
			return
		}
		if !eips.V4.IsValid() && !eips.V6.IsValid() {
			t.Fatalf("accepted %q without an address", s)
		}
		for _, ip := range eips.IPs() {
			if !cidrs[0].Contains(ip) && !cidrs[1].Contains(ip) {
				t.Fatalf("accepted %s outside the egress CIDRs", ip)
			}
		}
		if (eips.V4.IsValid() && !eips.V4.Is4()) || (eips.V6.IsValid() && !eips.V6.Is6()) {
			t.Fatalf("families mixed up: %+v", eips)
		}
	})
}
