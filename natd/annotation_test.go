package natd

import (
	"net/netip"
	"testing"
)

func TestParseEgressIP(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("192.0.2.7/32"),
		netip.MustParsePrefix("10.0.0.0/32")}
	nodes := map[netip.Addr]string{netip.MustParseAddr("198.18.0.193"): "node9"}
	for _, tc := range []struct {
		in, want, reason string
	}{
		{in: "198.18.0.200", want: "198.18.0.200"},
		{in: " 198.18.0.200 ", want: "198.18.0.200"},
		{in: "::ffff:198.18.0.200", want: "198.18.0.200"},
		{in: "192.0.2.7", want: "192.0.2.7"}, // a /32 egress CIDR has no network/broadcast address
		{in: "", reason: ReasonInvalidIP},
		{in: "not-an-ip", reason: ReasonInvalidIP},
		{in: "198.18.0.300", reason: ReasonInvalidIP},
		{in: "198.18.0.200/32", reason: ReasonInvalidIP},
		{in: "198.18.0.200,198.18.0.201", reason: ReasonNotSupported},
		{in: "2001:db8::1", reason: ReasonNotSupported},
		{in: "203.0.113.5", reason: ReasonOutsideEgressCIDR},
		{in: "198.18.0.192", reason: ReasonReservedAddress},
		{in: "198.18.0.255", reason: ReasonReservedAddress},
		{in: "198.18.0.193", reason: ReasonNodeIP},
		{in: "10.0.0.0", reason: ReasonReservedAddress}, // its tunnel VNI (0) is the reply tunnel's
	} {
		got, err := ParseEgressIP(tc.in, cidrs, nodes)
		if tc.reason != "" {
			if err == nil || err.Reason != tc.reason {
				t.Errorf("ParseEgressIP(%q) = %v, %v; want reason %s", tc.in, got, err, tc.reason)
			}
			if err != nil && err.Message == "" {
				t.Errorf("ParseEgressIP(%q): empty message", tc.in)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseEgressIP(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func FuzzParseEgressIP(f *testing.F) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26")}
	for _, s := range []string{"198.18.0.200", "", "a,b", "::1", "198.18.0.255"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ip, err := ParseEgressIP(s, cidrs, nil)
		if err == nil && !cidrs[0].Contains(ip) {
			t.Fatalf("accepted %s outside the egress CIDR", ip)
		}
	})
}
