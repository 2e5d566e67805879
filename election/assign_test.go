package election

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

var (
	ipA = netip.MustParseAddr("198.18.0.200")
	ipB = netip.MustParseAddr("198.18.0.201")
	ipC = netip.MustParseAddr("198.18.0.202")
)

func TestAssignIsSticky(t *testing.T) {
	in := Input{
		IPs:        []netip.Addr{ipA},
		Candidates: []string{"node2", "node3", "node4"},
		Keepers:    []string{"node2", "node3", "node4"},
		Claims:     map[string][]Claim{"node4": {{IP: ipA, Gen: 3}}},
	}
	if a := Assign(in)[ipA]; a.Holder != "node4" || a.Gen != 3 || !a.Claimed {
		t.Fatalf("claimed IP moved: %+v", a)
	}
	// A node that comes back without a claim does not pull the IP back.
	in.Candidates = append(in.Candidates, "node1")
	in.Keepers = append(in.Keepers, "node1")
	if a := Assign(in)[ipA]; a.Holder != "node4" {
		t.Fatalf("IP moved to a returning node: %+v", a)
	}
}

func TestAssignNewestClaimWins(t *testing.T) {
	in := Input{
		IPs:        []netip.Addr{ipA},
		Candidates: []string{"node2", "node3"},
		Keepers:    []string{"node2", "node3"},
		// node2 restarted with its old claim; node3 took over meanwhile.
		Claims: map[string][]Claim{"node2": {{IP: ipA, Gen: 4}}, "node3": {{IP: ipA, Gen: 5}}},
	}
	if a := Assign(in)[ipA]; a.Holder != "node3" || a.Gen != 5 {
		t.Fatalf("got %+v, want node3 (newer claim)", a)
	}
	// Equal generations (two simultaneous takeovers): every node picks the same one.
	in.Claims["node2"][0].Gen = 5
	first := Assign(in)[ipA]
	in.Candidates = []string{"node3", "node2"}
	if again := Assign(in)[ipA]; again != first {
		t.Fatalf("tie broken differently: %+v vs %+v", first, again)
	}
}

func TestAssignIgnoresNonKeepers(t *testing.T) {
	in := Input{
		IPs:        []netip.Addr{ipA},
		Candidates: []string{"node3"},
		Keepers:    []string{"node3"},
		Claims:     map[string][]Claim{"node2": {{IP: ipA, Gen: 7}}}, // node2 dead or draining
		MaxGen:     map[netip.Addr]uint32{ipA: 7},
	}
	if a := Assign(in)[ipA]; a.Holder != "node3" || a.Gen != 8 || a.Claimed {
		t.Fatalf("got %+v, want node3 taking over with generation 8", a)
	}
}

// ipRange is n consecutive addresses from 198.18.0.1.
func ipRange(n int) []netip.Addr {
	var ips []netip.Addr
	a := netip.MustParseAddr("198.18.0.1")
	for range n {
		ips = append(ips, a)
		a = a.Next()
	}
	return ips
}

func TestAssignSpreadsAndCaps(t *testing.T) {
	ips := ipRange(600)
	nodes := []string{"node2", "node3", "node4"}
	got := Assign(Input{IPs: ips, Candidates: nodes, Keepers: nodes})
	count := map[string]int{}
	for _, as := range got {
		count[as.Holder]++
	}
	for _, n := range nodes {
		if count[n] < 160 || count[n] > 240 { // 200 each on average
			t.Fatalf("uneven: %v", count)
		}
	}
	got = Assign(Input{IPs: ips[:9], Candidates: nodes, Keepers: nodes, MaxPerNode: 2})
	count = map[string]int{}
	for _, as := range got {
		count[as.Holder]++
	}
	if count[""] != 3 || count["node2"] != 2 || count["node3"] != 2 || count["node4"] != 2 {
		t.Fatalf("cap 2 per node over 3 nodes and 9 IPs: %v, want 3 unassigned", count)
	}
}

// Two voters that disagree on the candidates — one already counts node3 down — and
// on the claims they have seen never both give an unclaimed IP to themselves.
func TestAssignDisagreeingVotersNeverPickTwoHolders(t *testing.T) {
	ips := ipRange(200)
	all := []string{"node1", "node2", "node3", "node4"}
	for _, view := range []struct{ self, other []string }{
		{all, []string{"node1", "node2", "node4"}},
		{[]string{"node1", "node2", "node4"}, []string{"node1", "node4"}},
	} {
		// node1's view: no fresh claims; node4's: node1 already claimed half the IPs.
		fresh := map[string][]Claim{}
		for i, ip := range ips {
			if i%2 == 0 {
				fresh["node1"] = append(fresh["node1"], Claim{IP: ip, Gen: 1})
			}
		}
		x := Assign(Input{IPs: ips, Candidates: view.self, Keepers: view.self})
		y := Assign(Input{IPs: ips, Candidates: view.other, Keepers: view.other, Claims: fresh})
		for _, ip := range ips {
			hx, hy := x[ip].Holder, y[ip].Holder
			// A node takes what its own view gives it: a second holder would be a node
			// that one view gives the IP to while the other gives it to another node,
			// both of them in both lists.
			if hx != hy && slices.Contains(view.other, hx) && slices.Contains(view.self, hy) && !y[ip].Claimed {
				t.Fatalf("%s: one view gives it to %s, the other to %s", ip, hx, hy)
			}
		}
	}
}

func TestAssignNoCandidates(t *testing.T) {
	if a := Assign(Input{IPs: []netip.Addr{ipA}})[ipA]; a.Holder != "" {
		t.Fatalf("got %+v with no candidates", a)
	}
}

func TestMetaRoundTrip(t *testing.T) {
	m := Meta{Draining: true, RestartGrace: 20 * time.Second, Boot: 1 << 60, Seq: 7,
		Claims: []Claim{{IP: ipA, Gen: 1}, {IP: ipB, Gen: 1 << 30}, {IP: ipC}}}
	b, err := m.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMeta(b)
	if err != nil || got.Draining != m.Draining || got.RestartGrace != m.RestartGrace || len(got.Claims) != 3 ||
		got.Claims[1] != m.Claims[1] || got.Boot != m.Boot || got.Seq != m.Seq {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	var many Meta
	for i := 0; i <= MaxClaims; i++ {
		many.Claims = append(many.Claims, Claim{IP: netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})})
	}
	if _, err := many.Encode(); err == nil {
		t.Fatalf("encoded more than %d claims", MaxClaims)
	}
	if _, err := (Meta{Claims: []Claim{{IP: ipA}, {IP: ipA, Gen: 2}}}).Encode(); err == nil {
		t.Fatal("encoded two claims on one IP")
	}
	// IPv6 claims fit inline while they are few; more go apart, named by a digest
	// that changes with any claim.
	v6 := Meta{Claims: manyClaims(3, 3)}
	if b, err := v6.Encode(); err != nil {
		t.Fatal(err)
	} else if got, err := DecodeMeta(b); err != nil || !slices.Equal(got.Claims, sortedClaims(v6.Claims)) {
		t.Fatalf("IPv6 round trip: %+v, %v", got, err)
	}
	for _, n := range [][2]int{{55, 0}, {0, 23}, {62, 0}, {63, 0}, {54, 1}, {55, 1}, {0, 24}, {400, 100}} {
		m := Meta{Claims: manyClaims(n[0], n[1]), Boot: 3, Seq: 4}
		b, err := m.Encode()
		if err != nil || len(b) > maxMetaLength {
			t.Fatalf("%v claims: %d bytes, %v", n, len(b), err)
		}
		got, err := DecodeMeta(b)
		apart, count := got.apart, got.count
		fits := (n[1] == 0 && n[0] <= v2MaxClaims) || n[0]*ipv4ClaimSize+n[1]*ipv6ClaimSize <= maxMetaLength-metaHeader
		if err != nil || apart == fits || (apart && (count != n[0]+n[1] || len(got.Claims) != 0)) || (!apart && len(got.Claims) != n[0]+n[1]) {
			t.Fatalf("%v claims: apart %v (%d), %d inline, %v", n, apart, count, len(got.Claims), err)
		}
		if again, err := got.Encode(); err != nil || !slices.Equal(again, b) {
			t.Fatalf("%v claims: re-encoded differently: %v", n, err)
		}
		if apart {
			m.Claims[0].Gen++
			b2, _ := m.Encode()
			if slices.Equal(b2, b) {
				t.Fatalf("%v claims: a changed generation kept the digest", n)
			}
		}
	}
	if !got.Newer(Meta{Boot: 1 << 60, Seq: 6}) || got.Newer(Meta{Boot: 1 << 60, Seq: 8}) || got.Newer(Meta{Boot: 1<<60 + 1}) {
		t.Fatal("Newer orders by boot, then seq")
	}
	// This version's form (an IPv6 claim among them), then broken in every way.
	ok, _ := Meta{Claims: append([]Claim{{IP: ipB}, {IP: ipA}}, manyClaims(0, 1)...)}.Encode()
	if ok[0] != metaVersion {
		t.Fatalf("metadata with an IPv6 claim in version %d", ok[0])
	}
	unsorted := slices.Clone(ok)
	copy(unsorted[metaHeader:], ok[metaHeader+ipv4ClaimSize:])
	copy(unsorted[metaHeader+ipv4ClaimSize:], ok[metaHeader:metaHeader+ipv4ClaimSize])
	apart := slices.Concat(ok[:metaHeader], []byte{0, 0}, make([]byte, 8))
	apart[1] |= flagApart
	mapped := slices.Concat(ok[:metaHeader], []byte{16}, netip.MustParseAddr("::ffff:198.18.0.1").AsSlice(), []byte{0, 0, 0, 1})
	for _, bad := range [][]byte{{1}, {2, 0, 0, 0}, {1, 0, 0, 0, 1, 2, 3}, ok[:len(ok)-1], unsorted, apart, apart[:20], mapped,
		slices.Concat(ok[:metaHeader], []byte{6, 1, 2, 3, 4, 5, 6, 0, 0, 0, 1})} {
		if _, err := DecodeMeta(bad); err == nil {
			t.Errorf("DecodeMeta(%v) accepted garbage", bad)
		}
	}
}

// manyClaims returns v4 IPv4 and v6 IPv6 claims, each with its own generation.
func manyClaims(v4, v6 int) []Claim {
	var out []Claim
	for i := range v4 {
		out = append(out, Claim{IP: netip.AddrFrom4([4]byte{198, 18, byte(4 + i/250), byte(1 + i%250)}), Gen: uint32(i + 1)})
	}
	for i := range v6 {
		out = append(out, Claim{IP: netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i), 14: byte(i >> 8)}), Gen: uint32(i + 7)})
	}
	return out
}

// During a rolling upgrade natds of the previous version (metadata version 2, routes
// version 1) and this one must read each other: a node that cannot read a holder's
// metadata sees no claims and may take its IPs.
func TestMetaAndRoutesOfThePreviousVersion(t *testing.T) {
	// As the previous version wrote it: IPv4 claims of 8 bytes, in no order.
	old := []byte{2, flagDraining, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 3}
	old = append(old, 198, 18, 0, 201, 0, 0, 0, 7, 198, 18, 0, 200, 0, 0, 0, 6)
	m, err := DecodeMeta(old)
	want := []Claim{{IP: ipA, Gen: 6}, {IP: ipB, Gen: 7}}
	if err != nil || !m.Draining || m.RestartGrace != 500*time.Millisecond || m.Boot != 9 || m.Seq != 3 || !slices.Equal(m.Claims, want) {
		t.Fatalf("previous version's metadata: %+v, %v", m, err)
	}
	// This version writes up to 62 IPv4 claims in that form, sorted.
	again, err := m.Encode()
	if err != nil || again[0] != 2 || len(again) != len(old) || !slices.Equal(again[metaHeader:metaHeader+8], old[metaHeader+8:]) {
		t.Fatalf("re-encoded: %v, %v", again, err)
	}
	if _, err := DecodeMeta(append(slices.Clone(old), 198, 18, 0, 200, 0, 0, 0, 1)); err == nil {
		t.Error("two claims on one IP accepted")
	}
	// A routes report of IPv4 routes is the previous version's form too, and its
	// push/pull state (reports only) is read.
	r := Routes{Node: "n1", Version: 5, Claims: want}
	b, err := r.encode()
	if err != nil || b[0] != 1 || len(b) != routesHeader+2+8*len(want) {
		t.Fatalf("routes report: %v, %v", b, err)
	}
	state := appendRoutesBlock([]byte{stateWireVersionV1, kindState}, map[string]Routes{"n1": r})
	if all, records, err := decodeState(state); err != nil || len(all) != 1 || !slices.Equal(all[0].Claims, want) || records != nil {
		t.Fatalf("previous version's state: %v, %v, %v", all, records, err)
	}
	// With an IPv6 route the report needs this version's form.
	r.Claims = append(r.Claims, manyClaims(0, 1)...)
	if b, _ := r.encode(); b[0] != routesWireVersion {
		t.Fatalf("a report with an IPv6 route in version %d", b[0])
	} else if got, err := decodeRoutes(b); err != nil || len(got.Claims) != 3 {
		t.Fatalf("IPv6 report: %v, %v", got, err)
	}
}

func FuzzDecodeMeta(f *testing.F) {
	b, _ := Meta{Claims: []Claim{{IP: ipA, Gen: 2}}}.Encode()
	f.Add(b)
	b, _ = Meta{Claims: manyClaims(100, 1)}.Encode()
	f.Add(b)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if err != nil {
			return
		}
		again, err := m.Encode()
		if err != nil {
			t.Fatalf("decoded %x to %+v but it does not encode: %v", b, m, err)
		}
		m2, err := DecodeMeta(again)
		if err != nil || m2.Draining != m.Draining || m2.RestartGrace != m.RestartGrace || m2.Boot != m.Boot || m2.Seq != m.Seq ||
			m2.apart != m.apart || m2.digest != m.digest || !slices.Equal(m2.Claims, m.Claims) {
			t.Fatalf("decoded %x to %+v, encoded and decoded again to %+v, %v", b, m, m2, err)
		}
	})
}

// Generations wrap harmlessly: the claim after 0xffffffff is 0, and it is the newer.
func TestGenerationsWrap(t *testing.T) {
	ip := netip.MustParseAddr("198.18.0.200")
	in := Input{IPs: []netip.Addr{ip}, Candidates: []string{"a", "b"}, Keepers: []string{"a", "b"},
		Claims: map[string][]Claim{"a": {{IP: ip, Gen: 0xffffffff}}, "b": {{IP: ip, Gen: 0}}}}
	if got := Assign(in)[ip]; got.Holder != "b" || got.Gen != 0 {
		t.Fatalf("after a wrap the older claim won: %+v", got)
	}
	in = Input{IPs: []netip.Addr{ip}, Candidates: []string{"a"}, MaxGen: map[netip.Addr]uint32{ip: 0xffffffff}}
	if got := Assign(in)[ip]; got.Gen != 0 || !NewerGen(0xffffffff, got.Gen) {
		t.Fatalf("new claim after 0xffffffff: %+v", got)
	}
	if LaterGen(0xfffffffe, 1) != 1 || LaterGen(5, 3) != 5 || NewerGen(7, 7) {
		t.Fatal("LaterGen/NewerGen")
	}
}

// An unclaimed IP goes only to a candidate that may hold it (an IPv6 IP to a node with
// IPv6), whatever the rendezvous order; none that may: no holder.
func TestAssignOnlyToCandidatesThatMayHold(t *testing.T) {
	var ips []netip.Addr
	for i := 1; i <= 20; i++ {
		ips = append(ips, netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)}), netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}))
	}
	in := Input{IPs: ips, Candidates: []string{"node2", "node3", "node4"}, Keepers: []string{"node2", "node3", "node4"},
		MayHold: func(m string, ip netip.Addr) bool { return ip.Is4() || m == "node3" }}
	got := Assign(in)
	four := map[string]bool{}
	for _, ip := range ips {
		a := got[ip]
		if ip.Is6() && a.Holder != "node3" {
			t.Errorf("%s given to %q; only node3 may hold IPv6", ip, a.Holder)
		}
		if ip.Is4() {
			four[a.Holder] = true
		}
	}
	if len(four) < 2 {
		t.Errorf("IPv4 IPs went to %v; want them spread as before", four)
	}
	in.MayHold = func(string, netip.Addr) bool { return false }
	if a := Assign(in)[ips[0]]; a.Holder != "" {
		t.Errorf("no candidate may hold it, yet %+v", a)
	}
}
