package dataplane

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestBindingOf(t *testing.T) {
	held := map[netip.Addr]bool{netip.MustParseAddr("198.18.0.200"): true}
	entry := func(proto uint8, sport, natPort uint16, natted string, state uint8) *netlink.ConntrackFlow {
		f := &netlink.ConntrackFlow{FamilyType: unix.AF_INET}
		f.Forward = netlink.IPTuple{SrcIP: net.ParseIP("10.244.1.10"), DstIP: net.ParseIP("203.0.113.10"), Protocol: proto, SrcPort: sport, DstPort: 443}
		f.Reverse = netlink.IPTuple{SrcIP: net.ParseIP("203.0.113.10"), DstIP: net.ParseIP(natted), Protocol: proto, SrcPort: 443, DstPort: natPort}
		if proto == unix.IPPROTO_TCP {
			f.ProtoInfo = &netlink.ProtoInfoTCP{State: state}
		}
		return f
	}
	want := Binding{Proto: unix.IPPROTO_TCP, Pod: netip.MustParseAddrPort("10.244.1.10:40000"),
		Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.MustParseAddrPort("198.18.0.200:51234")}
	if b, ok := bindingOf(entry(unix.IPPROTO_TCP, 40000, 51234, "198.18.0.200", tcpEstablished), held); !ok || b != want {
		t.Errorf("a port-changing binding of a held IP: %v %v, want %v", b, ok, want)
	}
	if _, ok := bindingOf(entry(unix.IPPROTO_UDP, 40000, 51234, "198.18.0.200", 0), held); !ok {
		t.Error("a UDP binding was not handed over")
	}
	for name, f := range map[string]*netlink.ConntrackFlow{
		"port kept (the successor keeps it too)": entry(unix.IPPROTO_TCP, 40000, 40000, "198.18.0.200", tcpEstablished),
		"another egress IP":                      entry(unix.IPPROTO_TCP, 40000, 51234, "198.18.0.201", tcpEstablished),
		"not NATed":                              entry(unix.IPPROTO_TCP, 40000, 40000, "10.244.1.10", tcpEstablished),
		"closing":                                entry(unix.IPPROTO_TCP, 40000, 51234, "198.18.0.200", 7),
		"ICMP":                                   entry(unix.IPPROTO_ICMP, 40000, 51234, "198.18.0.200", 0),
	} {
		if b, ok := bindingOf(f, held); ok {
			t.Errorf("%s: handed over as %v", name, b)
		}
	}
}

func TestBindingsWireFormat(t *testing.T) {
	v4 := netip.MustParseAddr("198.18.0.200")
	v6 := netip.MustParseAddr("2001:db8:18::c8")
	bs := []Binding{
		{Proto: unix.IPPROTO_TCP, Pod: netip.MustParseAddrPort("10.244.1.10:40000"), Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.AddrPortFrom(v4, 51234)},
		{Proto: unix.IPPROTO_UDP, Pod: netip.MustParseAddrPort("10.244.2.10:40000"), Partner: netip.MustParseAddrPort("203.0.113.10:53"), Egress: netip.AddrPortFrom(v4, 1)},
		{Proto: unix.IPPROTO_TCP, Pod: netip.MustParseAddrPort("[fd00:10:244:1::10]:40000"), Partner: netip.MustParseAddrPort("[2001:db8:99::10]:443"), Egress: netip.AddrPortFrom(v6, 61000)},
		{Proto: unix.IPPROTO_TCP, Pod: netip.MustParseAddrPort("10.244.1.10:1"), Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.MustParseAddrPort("198.18.0.201:2")},
	}
	for _, ip := range []netip.Addr{v4, v6} {
		msg := EncodeBindings(ip, bs)
		got, back, err := DecodeBindings(msg)
		if err != nil {
			t.Fatal(err)
		}
		want := slices.DeleteFunc(slices.Clone(bs), func(b Binding) bool { return b.Egress.Addr() != ip })
		if got != ip || !slices.Equal(back, want) {
			t.Errorf("round trip of %s: %s %v, want %v", ip, got, back, want)
		}
		// Every truncation and a flipped version are refused, never half-read.
		for n := range len(msg) {
			if _, _, err := DecodeBindings(msg[:n]); !errors.Is(err, errBadHandover) {
				t.Fatalf("%d of %d bytes: %v", n, len(msg), err)
			}
		}
		bad := slices.Clone(msg)
		bad[0] = 9
		if _, _, err := DecodeBindings(bad); !errors.Is(err, errBadHandover) {
			t.Errorf("version 9: %v", err)
		}
	}
	// A count that claims more than the message holds, and a protocol natd never sends.
	msg := EncodeBindings(v4, bs[:1])
	msg[2+4+3] = 2
	if _, _, err := DecodeBindings(msg); !errors.Is(err, errBadHandover) {
		t.Errorf("count 2 with one binding: %v", err)
	}
	msg = EncodeBindings(v4, bs[:1])
	msg[2+4+4] = unix.IPPROTO_ICMP
	if _, _, err := DecodeBindings(msg); !errors.Is(err, errBadHandover) {
		t.Errorf("ICMP: %v", err)
	}
}

func FuzzDecodeBindings(f *testing.F) {
	f.Add(EncodeBindings(netip.MustParseAddr("198.18.0.200"), []Binding{{Proto: unix.IPPROTO_TCP,
		Pod: netip.MustParseAddrPort("10.244.1.10:40000"), Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.MustParseAddrPort("198.18.0.200:51234")}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		ip, bs, err := DecodeBindings(b)
		if err != nil {
			return
		}
		if again := EncodeBindings(ip, bs); string(again) != string(b) {
			t.Errorf("decoded %x, encodes back as %x", b, again)
		}
	})
}
