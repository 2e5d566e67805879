package dataplane

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The CNI plugin's records become the cni_pods maps of both families, and the kernel
// holds exactly what the builders render.
func TestKernelPodRecordsAndIPv6Table(t *testing.T) {
	ns, d, st := appliedSample(t)
	for _, rs := range []*Ruleset{BuildRuleset(st, sampleRecords(), d.cfg.Marks, d.slots, d.cfg.Lease, d.cfg.GossipPort, d.cfg.TunnelPort), BuildRuleset6(st, sampleRecords(), d.cfg.Marks, d.slots, d.cfg.Lease)} {
		got := ns.run("nft", "-s", "list", "table", rs.familyName(), TableName)
		if normalize(got) != normalize(rs.Text(false)) {
			t.Fatalf("kernel %s table differs from the rendered one\n--- kernel:\n%s\n--- rendered:\n%s", rs.familyName(), got, rs.Text(false))
		}
	}
	// natd tells the plugin which namespaces are pinned.
	pinned, ok, err := d.store.ReadPinning()
	if err != nil || !ok || fmt.Sprint(pinned.Namespaces["team-a"]) != "[198.18.0.200 2001:db8:18::c8]" ||
		pinned.FwmarkMask != d.cfg.Marks.Mask {
		t.Fatalf("pinning.json = %v, %v, %v", pinned, ok, err)
	}
}

// Whatever someone does to natd's kernel state, Verify notices it and the next Apply
// puts back exactly what was there: elements deleted, added or changed, a flushed map,
// a flushed ruleset, an old saved ruleset restored, ip rules, routes and addresses.
func TestKernelVerifyAndRepairDrift(t *testing.T) {
	ns, d, st := appliedSample(t)
	want := ns.snapshot()
	time.Sleep(minReadBack) // so that Verify really reads the tables back
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("Verify right after Apply = %v, %v; want no drift", drifted, err)
	}
	// An old ruleset saved by a firewall tool: the same tables, other elements.
	old := sampleState()
	old.Egress[0].Pods = []netip.Addr{netip.MustParseAddr("10.244.1.99")}
	saved := filepath.Join(t.TempDir(), "saved.nft")
	{
		d2 := ns.dataplane()
		if _, err := d2.Apply(old); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(saved, []byte(ns.run("nft", "list", "ruleset")), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Apply(st); err != nil {
			t.Fatal(err)
		}
	}
	remoteTable := fmt.Sprint(7100 + d.slots[netip.MustParseAddr("198.18.0.201")]) // routes to the holder .11
	for _, vandal := range [][]string{
		{"nft", "delete", "element", "ip", TableName, mapPodEgress, "{ 10.244.1.10 }"},
		{"nft", "flush", "map", "ip", TableName, mapPodEgress},
		{"nft", "flush", "map", "ip", TableName, MapCNIPods},
		{"nft", "add", "element", "ip", TableName, mapPodEgress, "{ 10.244.1.77 : jump egress_198.18.0.201 }"},
		{"nft", "delete", "element", "ip", TableName, MapCNIPods, "{ 10.244.2.20 }"},
		{"sh", "-c", "nft delete element ip natd cni_pods { 10.244.2.20 } && nft add element ip natd cni_pods { 10.244.2.20 : goto egress_198.18.0.200 }"},
		{"nft", "delete", "element", "ip6", TableName, MapCNIPods6, "{ fd00:10:244:2::10 }"},
		{"nft", "delete", "element", "ip", TableName, setNodeIPs, "{ 198.18.0.11 }"},
		{"nft", "delete", "element", "ip", TableName, setClusterDsts, "{ 10.96.0.0/12 }"},
		{"nft", "flush", "ruleset"},
		{"sh", "-c", "nft flush ruleset && nft -f " + saved},
		{"nft", "delete", "table", "ip6", TableName},
		{"ip", "rule", "del", "priority", "7000"},
		{"ip", "rule", "del", "priority", "6999"},                 // the rule that skips the slot rules
		{"ip", "rule", "add", "priority", "6999", "goto", "7001"}, // a second one, not natd's form
		{"sh", "-c", "ip rule del priority 7000 table " + remoteTable + " && ip rule add priority 7000 fwmark 0x00990000/0x00ff0000 table " + remoteTable + " proto 78"},
		{"ip", "route", "replace", "default", "via", "198.18.0.99", "dev", "uplink0", "table", remoteTable, "proto", "78"},
		{"sh", "-c", "ip rule del priority 7001 fwmark 0x00fd0000/0x00ff0000"}, // the pod guard's rule
		{"ip", "-6", "rule", "del", "priority", "7001"},
		{"ip", "-6", "route", "del", "blackhole", "default", "table", "7100"},
		{"ip", "route", "del", "throw", "10.96.0.0/12", "table", "7100"},
		{"ip", "addr", "del", "198.18.0.200/32", "dev", "uplink0"},
	} {
		ns.run(vandal...)
		time.Sleep(minReadBack) // Verify reads the tables back at most this often
		drifted, _, err := d.Verify()
		if err != nil || !drifted {
			t.Fatalf("after %v: Verify = %v, %v; want drift", vandal, drifted, err)
		}
		if _, err := d.Apply(st); err != nil {
			t.Fatalf("after %v: %v", vandal, err)
		}
		if got := ns.snapshot(); got != want {
			t.Fatalf("after %v and a sync the kernel differs\n--- got:\n%s\n--- want:\n%s", vandal, got, want)
		}
		time.Sleep(minReadBack)
		if drifted, _, err := d.Verify(); err != nil || drifted {
			t.Fatalf("after repairing %v: Verify = %v, %v; want no drift", vandal, drifted, err)
		}
	}
	// Someone else's commit that leaves natd's tables alone is no drift.
	ns.run("nft", "add", "table", "ip", "someone-else")
	time.Sleep(minReadBack) // so that Verify really reads the tables back
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("another table's change: Verify = %v, %v; want no drift", drifted, err)
	}
}

// A pod whose classification changes (its namespace moves to another egress IP, or is
// no longer pinned) must not keep connections NATed under the old one: they are
// deleted from conntrack, and so are those of a pod that reuses another's IP.
func TestKernelRepinnedPodsLoseTheirConnections(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	putRecords(t, d, PodRecord{ContainerID: "c1", Namespace: "team-a", IPs: []netip.Addr{netip.MustParseAddr("10.244.2.10")}})
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	nl, err := netlink.NewHandleAt(ns.h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	flow := func(src string, sport uint16) *netlink.ConntrackFlow {
		f := &netlink.ConntrackFlow{FamilyType: unix.AF_INET, TimeOut: 100}
		f.Forward = netlink.IPTuple{SrcIP: net.ParseIP(src).To4(), DstIP: net.ParseIP("203.0.113.10").To4(),
			Protocol: unix.IPPROTO_UDP, SrcPort: sport, DstPort: 8080}
		f.Reverse = netlink.IPTuple{SrcIP: net.ParseIP("203.0.113.10").To4(), DstIP: net.ParseIP("198.18.0.200").To4(),
			Protocol: unix.IPPROTO_UDP, SrcPort: 8080, DstPort: sport}
		return f
	}
	for _, f := range []*netlink.ConntrackFlow{flow("10.244.1.10", 4000), flow("10.244.1.11", 4001), flow("10.244.2.10", 4002)} {
		if err := nl.ConntrackCreate(netlink.ConntrackTable, unix.AF_INET, f); err != nil {
			t.Fatalf("creating conntrack entry: %v", err)
		}
	}
	sources := func() string {
		flows, err := nl.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, f := range flows {
			out = append(out, f.Forward.SrcIP.String())
		}
		return strings.Join(out, " ")
	}
	// 10.244.1.10 moves from .200 to .201 (its namespace was re-pinned); this node's
	// pod 10.244.2.10 is no longer pinned at all (its namespace team-a was unpinned);
	// 10.244.1.11 stays.
	next := sampleState()
	next.Egress[0].Pods = nil
	next.Egress[1].Pods = append(next.Egress[1].Pods, netip.MustParseAddr("10.244.1.10"))
	delete(next.PinnedNamespaces, "team-a")
	res, err := d.Apply(next)
	if err != nil {
		t.Fatal(err)
	}
	if res.Repinned != 2 {
		t.Errorf("Repinned = %d, want 2", res.Repinned)
	}
	if got := sources(); got != "10.244.1.11" {
		t.Fatalf("conntrack sources after re-pinning: %q, want only 10.244.1.11", got)
	}
}

// An Apply that fails after it took an IP leaves the address, the announcement, the
// conntrack deletion and the report owed: the next Apply still reports the IP as taken.
func TestKernelFailedApplyKeepsWhatItOwes(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	st.Egress[0].Local = false // nothing held yet
	st.Egress[0].HolderIP = netip.MustParseAddr("198.18.0.11")
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	// The last step (telling the CNI plugin the pinning) fails: /run is read-only,
	// say. The kernel already has the IP and its SNAT.
	blocker := filepath.Join(ns.stateDir, pinningName)
	if err := os.Remove(blocker); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(blocker, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(blocker, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	take := sampleState()
	if _, err := d.Apply(take); err == nil {
		t.Fatal("Apply succeeded although pinning.json could not be written")
	}
	// The tables (SNAT, and held_dsts guarding the address) went in; the address
	// goes on the uplink only after them, so not in this Apply.
	if out := ns.run("nft", "list", "set", "ip", "natd", "held_dsts"); !strings.Contains(out, "198.18.0.200") {
		t.Fatalf("the failed Apply did not get as far as the tables:\n%s", out)
	}
	if out := ns.run("ip", "-o", "addr", "show", "dev", "uplink0"); strings.Contains(out, "198.18.0.200/32") {
		t.Fatalf("the egress IP went on the uplink although the Apply failed after the tables:\n%s", out)
	}
	if err := os.RemoveAll(blocker); err != nil {
		t.Fatal(err)
	}
	res, err := d.Apply(take)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Announced) != 1 || res.Announced[0].String() != "198.18.0.200" {
		t.Fatalf("retry reported %+v; want 198.18.0.200 taken (announced, flows flushed, counted)", res)
	}
	if res, err := d.Apply(take); err != nil || len(res.Announced) != 0 {
		t.Fatalf("a further Apply = %+v, %v; want nothing taken again", res, err)
	}
}

// Every nftables commit in the node's namespace but natd's own lease renewals is
// reported within milliseconds; lease renewals leave Verify's cheap path intact.
func TestKernelWatchChanges(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	defer close(stop)
	changed := make(chan struct{}, 16)
	if err := d.WatchChanges(stop, func() { changed <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	reported := func(what string) {
		t.Helper()
		select {
		case <-changed:
		case <-time.After(2 * time.Second):
			t.Fatalf("no change reported for %s", what)
		}
	}
	notReported := func(what string) {
		t.Helper()
		select {
		case <-changed:
			t.Errorf("a change reported for %s", what)
		case <-time.After(300 * time.Millisecond):
		}
	}
	ns.run("nft", "add", "table", "ip", "someone-else")
	reported("another table's commit")
	time.Sleep(minReadBack) // so that Verify really reads the tables back
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("Verify = %v, %v", drifted, err)
	}
	if err := d.RenewLeases(time.Now().Add(d.cfg.Lease)); err != nil {
		t.Fatal(err)
	}
	if !d.nft.genKnown {
		t.Error("a lease renewal made natd forget the tables are untouched: every renewal would cost a read-back")
	}
	drain := func() {
		for {
			select {
			case <-changed:
			case <-time.After(300 * time.Millisecond):
				return
			}
		}
	}
	drain()
	// natd's own renewals (every --lease/4 on a holder) are no reason to check;
	// another's commit right after them still is.
	gen0, _ := d.nftGen()
	for range 20 {
		if err := d.RenewLeases(time.Now().Add(d.cfg.Lease)); err != nil {
			t.Fatal(err)
		}
	}
	if gen1, _ := d.nftGen(); gen1 < gen0+20 {
		t.Fatalf("20 renewals took the generation from %d to %d: they did not all commit", gen0, gen1)
	}
	notReported("natd's own lease renewals")
	ns.run("nft", "add", "table", "ip", "someone-else-again")
	reported("another's commit after natd's renewals")
	drain()
	// A route of the main table coming and going (a CNI's) is no reason to check; an
	// ip rule of natd's deleted is, at once, and the check finds it.
	ns.run("ip", "route", "add", "10.99.0.0/24", "dev", "uplink0")
	ns.run("ip", "route", "del", "10.99.0.0/24", "dev", "uplink0")
	notReported("a main-table route")
	ns.run("ip", "rule", "del", "priority", "7001")
	reported("a deleted ip rule")
	if drifted, _, err := d.Verify(); err != nil || !drifted {
		t.Errorf("Verify after an ip rule was deleted = %v, %v; want drift", drifted, err)
	}
}

// putRecords stores pod records as the CNI plugin would have.
func putRecords(t *testing.T, d *Dataplane, recs ...PodRecord) {
	t.Helper()
	for _, r := range recs {
		if err := d.store.Put(r); err != nil {
			t.Fatal(err)
		}
	}
}

// appliedSample is a node namespace where natd applied sampleState with the CNI
// plugin's sampleRecords.
func appliedSample(t *testing.T) (*testNS, *Dataplane, State) {
	t.Helper()
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	putRecords(t, d, sampleRecords()...)
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	return ns, d, st
}
