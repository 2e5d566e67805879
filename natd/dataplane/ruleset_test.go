package dataplane

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestBuildRulesetText(t *testing.T) {
	marks, err := NewMarks(0x00ff0000)
	if err != nil {
		t.Fatal(err)
	}
	st := sampleState()
	index := map[netip.Addr]int{
		netip.MustParseAddr("198.18.0.200"):    1,
		netip.MustParseAddr("198.18.0.201"):    2,
		netip.MustParseAddr("198.18.0.202"):    3,
		netip.MustParseAddr("2001:db8:18::c8"): 4,
		netip.MustParseAddr("2001:db8:18::c9"): 5,
	}
	got := BuildRuleset(st, sampleRecords(), marks, index, 400*time.Millisecond, 7946, 4799).Text(false)
	want := `table ip natd {
	set cluster_dsts {
		type ipv4_addr
		flags interval
		elements = { 10.96.0.0/12, 10.244.0.0/16, 198.18.0.11-198.18.0.12 }
	}
	set node_ips {
		type ipv4_addr
		elements = { 198.18.0.11, 198.18.0.12 }
	}
	set pod_cidrs {
		type ipv4_addr
		flags interval
		elements = { 10.244.0.0/16 }
	}
	set local_pod_cidrs {
		type ipv4_addr
		flags interval
		elements = { 10.244.2.0/24 }
	}
	set held_addrs {
		type ipv4_addr
		counter
		elements = { 198.18.0.200 counter comment "gen=3" }
	}
	set held_marks {
		type ipv4_addr . mark
		flags timeout
		elements = { 198.18.0.200 . 0x00010000 timeout 400ms }
	}
	set held_dsts {
		type ipv4_addr
		elements = { 198.18.0.200 }
	}
	map cni_pods {
		type ipv4_addr : verdict
		elements = { 10.244.2.10 : goto egress_198.18.0.200, 10.244.2.20 : return }
	}
	map pod_egress {
		type ipv4_addr : verdict
		elements = { 10.244.1.10 : goto egress_198.18.0.200, 10.244.2.10 : goto egress_198.18.0.200, 10.244.1.11 : goto egress_198.18.0.201, 10.244.1.12 : goto egress_198.18.0.202, 10.244.1.13 : goto pinned_ipv4 }
	}
	map held_snat {
		type mark : ipv4_addr
		flags timeout
		elements = { 0x00010000 timeout 400ms : 198.18.0.200 }
	}

	chain egress_198.18.0.200 {
		meta mark set meta mark & 0xff01ffff | 0x00010000
	}

	chain egress_198.18.0.201 {
		meta mark set meta mark & 0xff02ffff | 0x00020000
	}

	chain egress_198.18.0.202 {
		counter drop
	}

	chain pinned_ipv4 {
		counter drop
	}

	chain from_tunnels {
		iifname "natd-t1" ct mark set ct mark | 0x00020000 goto egress_198.18.0.200
		iifname "natd-t2" ct mark set ct mark | 0x00020000 goto egress_198.18.0.201
		iifname "natd-t3" ct mark set ct mark | 0x00020000 goto egress_198.18.0.202
		iifname "natd-t4" counter drop
		iifname "natd-t5" counter drop
	}

	chain guarded_pods {
		ct direction reply meta mark set meta mark & 0xff00ffff return
		ip daddr @cluster_dsts meta mark set meta mark & 0xff00ffff return
		ip saddr vmap @cni_pods
		ip saddr vmap @pod_egress
		counter drop
	}

	chain prerouting {
		type filter hook prerouting priority dstnat + 10; policy accept;
		meta mark & 0x00ff0000 == 0x00fd0000 goto guarded_pods
		iifname "natd-tr" ct state new counter drop
		ct direction reply ct mark & 0x00020000 == 0x00020000 meta mark set meta mark & 0xfffeffff | 0x00fe0000 return
		ct direction reply return
		ip daddr @cluster_dsts return
		iifname "natd-t*" goto from_tunnels
		ip saddr vmap @cni_pods
		ip saddr vmap @pod_egress
		ip saddr @pod_cidrs ip saddr != @local_pod_cidrs meta mark & 0x00ff0000 == 0x00000000 counter drop
	}

	chain pinned_snat {
		type nat hook postrouting priority srcnat - 10; policy accept;
		ip saddr @node_ips udp dport 4799 return
		meta mark & 0x00ff0000 == 0x00000000 return
		meta mark & 0x00ff0000 == 0x00ff0000 return
		ct mark set ct mark | 0x00010000
		snat to meta mark & 0x00ff0000 map @held_snat
		snat to ip saddr
	}

	chain leak_guard {
		type filter hook postrouting priority srcnat + 10; policy accept;
		ip saddr @node_ips udp dport 4799 accept
		meta mark & 0x00ff0000 == 0x00ff0000 return
		meta mark & 0x00ff0000 == 0x00fe0000 return
		ct direction original ct mark & 0x00010000 == 0x00010000 meta mark & 0x00ff0000 == 0x00000000 counter drop
		meta mark & 0x00ff0000 == 0x00000000 return
		ip saddr . meta mark & 0x00ff0000 @held_marks ip saddr @held_addrs accept
		ip saddr @pod_cidrs rt ip nexthop @node_ips accept
		counter drop
	}

	chain tunnel_mss {
		type filter hook forward priority mangle; policy accept;
		oifname "natd-t*" tcp flags syn tcp option maxseg size set rt mtu
	}

	chain node_ports {
		type filter hook input priority filter; policy accept;
		ip daddr @held_dsts ip protocol != icmp counter drop
		tcp dport 7946 ip saddr != @node_ips counter drop
		udp dport 7946 ip saddr != @node_ips counter drop
		udp dport 4799 ip saddr != @node_ips counter drop
		udp dport 4799 fib saddr . iif oif 0 counter drop
	}

	chain node_ports_forward {
		type filter hook forward priority filter; policy accept;
		udp dport 4799 ip daddr @node_ips counter drop
	}
}
`
	if got != want {
		t.Fatalf("rendered ruleset differs\n--- got:\n%s\n--- want:\n%s", got, want)
	}
}

func TestBuildRuleset6Text(t *testing.T) {
	st := sampleState()
	st.ClusterDestinations = append(st.ClusterDestinations, netip.MustParsePrefix("fd00:10:244::/48"),
		netip.MustParsePrefix("fd00:10:96::/112"), netip.MustParsePrefix("fd00:10:244:1::/64"))
	index := map[netip.Addr]int{
		netip.MustParseAddr("198.18.0.200"):    1,
		netip.MustParseAddr("2001:db8:18::c8"): 4,
		netip.MustParseAddr("2001:db8:18::c9"): 5,
	}
	got := BuildRuleset6(st, sampleRecords(), testMarks, index, 400*time.Millisecond).Text(false)
	want := `table ip6 natd {
	set cluster_dsts6 {
		type ipv6_addr
		flags interval
		elements = { fd00:10:96::/112, fd00:10:244::/48, fe80::/10, ff02::/16 }
	}
	set pod_cidrs6 {
		type ipv6_addr
		flags interval
		elements = { fd00:10:244::/56 }
	}
	set held_addrs6 {
		type ipv6_addr
		counter
		elements = { 2001:db8:18::c8 counter comment "gen=4" }
	}
	set held_marks6 {
		type ipv6_addr . mark
		flags timeout
		elements = { 2001:db8:18::c8 . 0x00040000 timeout 400ms }
	}
	set held_dsts6 {
		type ipv6_addr
		elements = { 2001:db8:18::c8 }
	}
	set leased_ips6 {
		type ipv6_addr
		flags timeout
		elements = { 2001:db8:18::c8 timeout 400ms }
	}
	map cni_pods6 {
		type ipv6_addr : verdict
		elements = { fd00:10:244:2::10 : goto egress_2001-db8-18--c8, fd00:10:244:2::20 : return }
	}
	map pod_egress6 {
		type ipv6_addr : verdict
		elements = { fd00:10:244:1::10 : goto egress_2001-db8-18--c8, fd00:10:244:1::13 : goto egress_2001-db8-18--c9, fd00:10:244:1::11 : goto pinned_ipv6 }
	}
	map held_snat6 {
		type mark : ipv6_addr
		flags timeout
		elements = { 0x00040000 timeout 400ms : 2001:db8:18::c8 }
	}

	chain egress_2001-db8-18--c8 {
		meta mark set meta mark & 0xff04ffff | 0x00040000
	}

	chain egress_2001-db8-18--c9 {
		meta mark set meta mark & 0xff05ffff | 0x00050000
	}

	chain pinned_ipv6 {
		counter drop
	}

	chain from_tunnels {
		iifname "natd-t4" ct mark set ct mark | 0x00020000 goto egress_2001-db8-18--c8
		iifname "natd-t5" ct mark set ct mark | 0x00020000 goto egress_2001-db8-18--c9
		iifname "natd-t1" counter drop
	}

	chain guarded_pods {
		ct direction reply meta mark set meta mark & 0xff00ffff return
		ip6 daddr @cluster_dsts6 meta mark set meta mark & 0xff00ffff return
		ip6 saddr vmap @cni_pods6
		ip6 saddr vmap @pod_egress6
		counter drop
	}

	chain prerouting {
		type filter hook prerouting priority dstnat + 10; policy accept;
		meta mark & 0x00ff0000 == 0x00fd0000 goto guarded_pods
		iifname "natd-tr" ct state new counter drop
		ct direction reply ct mark & 0x00020000 == 0x00020000 meta mark set meta mark & 0xfffeffff | 0x00fe0000 return
		ct direction reply return
		ip6 daddr @cluster_dsts6 return
		iifname "natd-t*" goto from_tunnels
		ip6 saddr vmap @cni_pods6
		ip6 saddr vmap @pod_egress6
	}

	chain pinned_snat {
		type nat hook postrouting priority srcnat - 10; policy accept;
		meta mark & 0x00ff0000 == 0x00000000 return
		meta mark & 0x00ff0000 == 0x00ff0000 return
		ct mark set ct mark | 0x00010000
		snat to meta mark & 0x00ff0000 map @held_snat6
		snat to ip6 saddr
	}

	chain leak_guard {
		type filter hook postrouting priority srcnat + 10; policy accept;
		meta mark & 0x00ff0000 == 0x00ff0000 return
		meta mark & 0x00ff0000 == 0x00fe0000 return
		ct direction original ct mark & 0x00010000 == 0x00010000 meta mark & 0x00ff0000 == 0x00000000 counter drop
		meta mark & 0x00ff0000 == 0x00000000 return
		ip6 saddr . meta mark & 0x00ff0000 @held_marks6 ip6 saddr @held_addrs6 accept
		ip6 saddr @pod_cidrs6 oifname "natd-t*" accept
		counter drop
	}

	chain tunnel_mss {
		type filter hook forward priority mangle; policy accept;
		oifname "natd-t*" tcp flags syn tcp option maxseg size set rt mtu
	}

	chain lapsed_out {
		type filter hook output priority filter; policy accept;
		ip6 saddr @held_dsts6 ip6 saddr != @leased_ips6 counter drop
	}

	chain node_ports {
		type filter hook input priority filter; policy accept;
		ip6 daddr @held_dsts6 meta l4proto != ipv6-icmp counter drop
	}
}
`
	if got != want {
		t.Fatalf("rendered ip6 ruleset differs\n--- got:\n%s\n--- want:\n%s", got, want)
	}
}

func TestBuildARPRulesetText(t *testing.T) {
	got := BuildARPRuleset(sampleState(), time.Second).Text(true)
	want := `table arp natd {
	set held_addrs {
		type ipv4_addr
	}
	set leased_ips {
		type ipv4_addr
		flags timeout
	}

	chain input {
		type filter hook input priority filter; policy accept;
		arp daddr ip @held_addrs arp daddr ip != @leased_ips counter drop
	}

	chain output {
		type filter hook output priority filter; policy accept;
		arp saddr ip @held_addrs arp saddr ip != @leased_ips counter drop
	}
}
`
	if got != want {
		t.Fatalf("rendered arp ruleset differs\n--- got:\n%s\n--- want:\n%s", got, want)
	}
}

func TestFailOpenEgressChainPassesTheGuard(t *testing.T) {
	marks, _ := NewMarks(0x00ff0000)
	st := State{Egress: []EgressIP{{IP: netip.MustParseAddr("198.18.0.200"), FailOpen: true,
		Pods: []netip.Addr{netip.MustParseAddr("10.244.1.10")}}}}
	rs := BuildRuleset(st, nil, marks, map[netip.Addr]int{netip.MustParseAddr("198.18.0.200"): 1}, 0, 0, 4799)
	if c := rs.Chains[0]; c.Name != "egress_198.18.0.200" || len(c.Rules) != 1 || c.Rules[0].Text() != "meta mark set meta mark | 0x00ff0000" {
		t.Fatalf("fail-open chain without holder: %+v; want only the pass mark (the packet goes the normal way, past the route guard)", c)
	}
}

func TestMergeRanges(t *testing.T) {
	var in []netip.Prefix
	for _, s := range []string{"10.0.0.0/8", "10.1.0.0/16", "192.168.0.1/32", "192.168.0.2/31", "192.168.0.0/32", "0.0.0.0/0"} {
		in = append(in, netip.MustParsePrefix(s))
	}
	got := mergeRanges(in[:5], false)
	var txt []string
	for _, r := range got {
		txt = append(txt, r.String())
	}
	if want := "10.0.0.0/8 192.168.0.0/30"; join(txt) != want {
		t.Errorf("mergeRanges = %q, want %q", join(txt), want)
	}
	if all := mergeRanges(in, false); len(all) != 1 || all[0].String() != "0.0.0.0/0" {
		t.Errorf("mergeRanges with 0.0.0.0/0 = %v", all)
	}
	v6 := []netip.Prefix{netip.MustParsePrefix("fd00::/8"), netip.MustParsePrefix("fd00:1::/32"),
		netip.MustParsePrefix("2001:db8::1/128"), netip.MustParsePrefix("2001:db8::2/128"), netip.MustParsePrefix("10.0.0.0/8")}
	txt = nil
	for _, r := range mergeRanges(v6, true) {
		txt = append(txt, r.String())
	}
	if want := "2001:db8::1-2001:db8::2 fd00::/8"; join(txt) != want {
		t.Errorf("mergeRanges(v6) = %q, want %q", join(txt), want)
	}
}

func join(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out
}

func TestNewMarks(t *testing.T) {
	for _, bad := range []uint32{0, 0x00f0f000, 0x0000000f} {
		if _, err := NewMarks(bad); err == nil {
			t.Errorf("NewMarks(%#x) accepted", bad)
		}
	}
	m, err := NewMarks(0xff000000)
	if err != nil || m.Value(1) != 0x01000000 || m.MaxIndex() != 252 || m.Pass() != 0xff000000 || m.Reply() != 0xfe000000 || m.Origin() != 0xfd000000 {
		t.Errorf("NewMarks(0xff000000) = %+v, %v", m, err)
	}
}

func TestDiffElements(t *testing.T) {
	el := func(k byte, chain string) Element { return Element{Key: [16]byte{10, 0, 0, k}, Chain: chain} }
	del, add := diffElements(
		[]Element{el(1, "x"), el(2, "x"), el(3, "x")},
		[]Element{el(1, "x"), el(2, "y"), el(4, "x")})
	if len(del) != 2 || del[0] != el(2, "x") || del[1] != el(3, "x") {
		t.Errorf("del = %v", del)
	}
	if len(add) != 2 || add[0] != el(2, "y") || add[1] != el(4, "x") {
		t.Errorf("add = %v", add)
	}
	if del, add := diffElements([]Element{el(1, "x")}, []Element{el(1, "x")}); del != nil || add != nil {
		t.Errorf("identical lists: del %v add %v", del, add)
	}
	// A key listed twice (two pods with one IP) must neither panic nor ask the kernel
	// for the same element twice.
	del, add = diffElements(
		[]Element{el(1, "x"), el(1, "y"), el(2, "x")},
		[]Element{el(1, "y"), el(1, "x"), el(3, "x"), el(3, "y")})
	if len(del) != 2 || del[0] != el(1, "x") || del[1] != el(2, "x") {
		t.Errorf("with duplicates: del = %v", del)
	}
	if len(add) != 2 || add[0] != el(1, "y") || add[1] != el(3, "x") {
		t.Errorf("with duplicates: add = %v", add)
	}
}

// An egress IP without a slot (more egress IPs in use than marks) has no mark to give
// its packets: without one they would leave through the CNI's masquerade, so its chain
// drops them, and it has no tunnel rule and no SNAT even where it is held.
func TestEgressIPWithoutSlotFailsClosed(t *testing.T) {
	marks, _ := NewMarks(0x00ff0000)
	st := State{Egress: []EgressIP{{IP: netip.MustParseAddr("198.18.0.200"), Local: true, HolderIP: netip.MustParseAddr("198.18.0.12"),
		Pods: []netip.Addr{netip.MustParseAddr("10.244.1.10")}}}}
	text := BuildRuleset(st, nil, marks, map[netip.Addr]int{}, 0, 0, 4799).Text(false)
	for _, want := range []string{"chain egress_198.18.0.200 {\n\t\tcounter drop\n\t}", "10.244.1.10 : goto egress_198.18.0.200"} {
		if !strings.Contains(text, want) {
			t.Errorf("ruleset lacks %q:\n%s", want, text)
		}
	}
	for _, unwanted := range []string{`iifname "natd-t0`, `iifname "natd-t1`, "198.18.0.200 . 0x", ": 198.18.0.200"} {
		if strings.Contains(text, unwanted) {
			t.Errorf("ruleset has %q for a slotless IP:\n%s", unwanted, text)
		}
	}
}

// A node without Node.spec.podCIDRs (a CNI with its own IPAM) cannot tell another
// node's pod from one of its own that natd has not classified: it must not drop pod
// sources as unpinned transit, or every such pod of every namespace would lose the
// outside.
func TestNoPodCIDRNoTransitDrop(t *testing.T) {
	marks, err := NewMarks(0x00ff0000)
	if err != nil {
		t.Fatal(err)
	}
	st := sampleState()
	with := BuildRuleset(st, sampleRecords(), marks, nil, time.Second, 7946, 4799).Text(false)
	const transitDrop = "ip saddr @pod_cidrs ip saddr != @local_pod_cidrs"
	if !strings.Contains(with, transitDrop) {
		t.Fatalf("a node with pod CIDRs has no unpinned-transit drop:\n%s", with)
	}
	st.LocalPodCIDRs = nil
	without := BuildRuleset(st, sampleRecords(), marks, nil, time.Second, 7946, 4799).Text(false)
	if strings.Contains(without, transitDrop) {
		t.Fatalf("a node without pod CIDRs drops unpinned transit:\n%s", without)
	}
}

// testMarks is natd's default mark mask.
var testMarks = func() Marks {
	m, err := NewMarks(0x00ff0000)
	if err != nil {
		panic(err)
	}
	return m
}()

// The pods the pod guard must find by address (natd-cni never recorded them) include
// those pinned in the other family only: their traffic is dropped, so they are pinned.
func TestUnrecordedIncludesPodsWithoutAnEgressIPOfTheirFamily(t *testing.T) {
	st := sampleState()
	got := unrecorded(st, []PodRecord{{IPs: []netip.Addr{netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("fd00:10:244:1::11")}}})
	for _, want := range []string{"10.244.1.11", "10.244.1.13", "fd00:10:244:1::13"} {
		if !slices.Contains(got, netip.MustParseAddr(want)) {
			t.Errorf("unrecorded = %v; want %s in it", got, want)
		}
	}
	for _, recorded := range []string{"10.244.1.10", "fd00:10:244:1::11"} {
		if slices.Contains(got, netip.MustParseAddr(recorded)) {
			t.Errorf("unrecorded = %v; %s is recorded", got, recorded)
		}
	}
}
