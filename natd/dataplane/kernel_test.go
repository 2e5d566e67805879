package dataplane

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// testNS is a fresh network namespace with one dummy uplink carrying the node IP.
type testNS struct {
	t        testing.TB
	name     string
	h        netns.NsHandle
	stateDir string
}

func newTestNS(t testing.TB, nodeIP string) *testNS {
	t.Helper()
	if os.Geteuid() != 0 {
		requireKernel(t, "kernel tests need root")
	}
	b := make([]byte, 4)
	rand.Read(b)
	name := "natd-kt-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		requireKernel(t, "ip netns add: "+err.Error()+": "+string(out))
	}
	ns := &testNS{t: t, name: name, stateDir: t.TempDir()}
	t.Cleanup(func() {
		if ns.h.IsOpen() {
			ns.h.Close()
		}
		exec.Command("ip", "netns", "del", name).Run()
	})
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	ns.h = h
	ns.run("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0")
	ns.run("ip", "link", "set", "peer0", "up")
	ns.run("ip", "link", "set", "uplink0", "up")
	ns.run("ip", "link", "set", "lo", "up")
	ns.run("ip", "addr", "add", nodeIP+"/24", "dev", "uplink0")
	return ns
}

// requireKernel fails when NATD_E2E=required (CI), skips otherwise.
func requireKernel(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("NATD_E2E") == "required" {
		t.Fatal(why)
	}
	t.Skip(why)
}

func (ns *testNS) run(args ...string) string {
	ns.t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns.name}, args...)...).CombinedOutput()
	if err != nil {
		ns.t.Fatalf("%v: %v\n%s", args, err, out)
	}
	return string(out)
}

func (ns *testNS) dataplane() *Dataplane {
	ns.t.Helper()
	marks, _ := NewMarks(0x00ff0000)
	d, err := New(Config{Marks: marks, RulePriority: 7000, TableBase: 7100, NetNS: &ns.h,
		EgressCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("2001:db8:18::/120")}, StateDir: ns.stateDir,
		Lease: time.Minute, GossipPort: 7946, TunnelPort: 4799})
	if err != nil {
		ns.t.Fatal(err)
	}
	ns.t.Cleanup(d.Close)
	return d
}

var elementsRe = regexp.MustCompile(`elements = \{([^}]*)\}`)
var expiresRe = regexp.MustCompile(` expires [0-9hms]+`)
var spaceRe = regexp.MustCompile(`\s+`)

// normalize folds white space and sorts set elements, which nft prints in the kernel's
// hash order and wraps at its own line width.
func normalize(s string) string {
	s = expiresRe.ReplaceAllString(s, "")
	s = elementsRe.ReplaceAllStringFunc(s, func(m string) string {
		inner := elementsRe.FindStringSubmatch(m)[1]
		var els []string
		for _, e := range strings.Split(inner, ",") {
			els = append(els, strings.TrimSpace(spaceRe.ReplaceAllString(e, " ")))
		}
		sort.Strings(els)
		return "elements = { " + strings.Join(els, ", ") + " }"
	})
	return strings.TrimSpace(spaceRe.ReplaceAllString(s, " "))
}

func sampleState() State {
	return State{
		NodeIP: netip.MustParseAddr("198.18.0.12"),
		ClusterDestinations: []netip.Prefix{
			netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12"),
			netip.MustParsePrefix("198.18.0.11/32"), netip.MustParsePrefix("198.18.0.12/32"),
			netip.MustParsePrefix("fd00:10:244::/56"),
		},
		NodeIPs:       []netip.Addr{netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12")},
		PodCIDRs:      []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")},
		LocalPodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("fd00:10:244:2::/64")},
		Peers: []Peer{{IP: netip.MustParseAddr("198.18.0.11"),
			PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}}},
		Egress: []EgressIP{
			{IP: netip.MustParseAddr("198.18.0.200"), Local: true, Gen: 3, HolderIP: netip.MustParseAddr("198.18.0.12"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("10.244.2.10")}},
			{IP: netip.MustParseAddr("198.18.0.201"), HolderIP: netip.MustParseAddr("198.18.0.11"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.11")}},
			{IP: netip.MustParseAddr("198.18.0.202"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.12")}},
			{IP: netip.MustParseAddr("2001:db8:18::c8"), Local: true, Gen: 4, HolderIP: netip.MustParseAddr("198.18.0.12"),
				Pods: []netip.Addr{netip.MustParseAddr("fd00:10:244:1::10")}},
			{IP: netip.MustParseAddr("2001:db8:18::c9"), HolderIP: netip.MustParseAddr("198.18.0.11"),
				Pods: []netip.Addr{netip.MustParseAddr("fd00:10:244:1::13")}},
		},
		NoEgress: []netip.Addr{netip.MustParseAddr("10.244.1.13"), netip.MustParseAddr("fd00:10:244:1::11")},
		PinnedNamespaces: map[string]NamespaceEgress{
			"team-a": {V4: netip.MustParseAddr("198.18.0.200"), V6: netip.MustParseAddr("2001:db8:18::c8")},
			"team-b": {V4: netip.MustParseAddr("198.18.0.201")}, "team-c": {V4: netip.MustParseAddr("198.18.0.202")},
			"team-d": {V6: netip.MustParseAddr("2001:db8:18::c9")}},
	}
}

// sampleRecords are two pods as the CNI plugin recorded them on this node: one of a
// pinned namespace (dual-stack), one of a namespace nobody pinned.
func sampleRecords() []PodRecord {
	return []PodRecord{
		{ContainerID: "c1", Namespace: "team-a", Name: "a", Added: 2,
			IPs: []netip.Addr{netip.MustParseAddr("10.244.2.10"), netip.MustParseAddr("fd00:10:244:2::10")}},
		{ContainerID: "c2", Namespace: "plain", Name: "p", Added: 1,
			IPs: []netip.Addr{netip.MustParseAddr("10.244.2.20"), netip.MustParseAddr("fd00:10:244:2::20")}},
	}
}

func TestKernelApplyMatchesRenderedRuleset(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	got := ns.run("nft", "-s", "list", "table", "ip", TableName)
	want := BuildRuleset(st, nil, d.cfg.Marks, d.slots, d.cfg.Lease, d.cfg.GossipPort, d.cfg.TunnelPort).Text(false)
	if normalize(got) != normalize(want) {
		t.Fatalf("kernel ruleset differs from rendered one\n--- kernel:\n%s\n--- rendered:\n%s", got, want)
	}
}

// snapshot is natd's kernel state in a namespace, as text a human would compare.
func (ns *testNS) snapshot() string {
	ns.t.Helper()
	var b strings.Builder
	table, err := exec.Command("ip", "netns", "exec", ns.name, "nft", "-s", "list", "table", "ip", TableName).CombinedOutput()
	if err != nil {
		table = []byte("no table")
	}
	b.WriteString(normalize(string(table)) + "\n")
	table6, err := exec.Command("ip", "netns", "exec", ns.name, "nft", "-s", "list", "table", "ip6", TableName).CombinedOutput()
	if err != nil {
		table6 = []byte("no ip6 table")
	}
	b.WriteString(normalize(string(table6)) + "\n")
	arp, err := exec.Command("ip", "netns", "exec", ns.name, "nft", "-s", "list", "table", "arp", TableName).CombinedOutput()
	if err != nil {
		arp = []byte("no arp table")
	}
	b.WriteString(normalize(string(arp)) + "\n")
	// Rules of one priority list in insertion order; a repaired rule comes last.
	rules := strings.Split(strings.TrimSpace(ns.run("ip", "rule", "show", "priority", "6999")+"\n"+
		ns.run("ip", "rule", "show", "priority", "7000")+"\n"+
		ns.run("ip", "rule", "show", "priority", "7001")+"\n"+
		ns.run("ip", "-6", "rule", "show", "priority", "7000")+"\n"+
		ns.run("ip", "-6", "rule", "show", "priority", "7001")), "\n") // the skip, slots, then the route guard
	sort.Strings(rules)
	b.WriteString(strings.Join(rules, "\n") + "\n")
	b.WriteString(ns.run("ip", "route", "show", "table", "all", "proto", "78")) // both families
	b.WriteString(ns.run("ip", "-o", "addr", "show", "dev", "uplink0", "scope", "global"))
	// Tunnel devices (kind, VNI, port, MAC), their neighbours and forwarding entries.
	for _, l := range strings.Split(strings.TrimSpace(ns.run("ip", "-o", "link", "show", "type", "vxlan")), "\n") {
		if name, _, ok := strings.Cut(strings.TrimSpace(strings.SplitN(l+": ", ": ", 3)[1]), "@"); ok || name != "" {
			b.WriteString(tunnelSnapshot(ns, name))
		}
	}
	return b.String()
}

func tunnelSnapshot(ns *testNS, dev string) string {
	if dev == "" {
		return ""
	}
	detail := ns.run("ip", "-d", "-o", "link", "show", "dev", dev)
	var keep []string
	for _, f := range []string{"vxlan id", "dstport", "link/ether", "mtu", "alias"} {
		if i := strings.Index(detail, f); i >= 0 {
			fields := strings.Fields(detail[i:])
			keep = append(keep, strings.Join(fields[:min(len(fields), strings.Count(f, " ")+2)], " "))
		}
	}
	return dev + ": " + strings.Join(keep, " ") + "\n" + ns.run("ip", "neigh", "show", "dev", dev) +
		ns.run("bridge", "fdb", "show", "dev", dev) + ns.run("ip", "-o", "-4", "addr", "show", "dev", dev)
}

func TestKernelReapplyIsIdempotent(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	res, err := d.Apply(st)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Rebuilt || fmt.Sprint(res.Announced) != "[198.18.0.200 2001:db8:18::c8]" {
		t.Fatalf("first apply: %+v; want a rebuild announcing 198.18.0.200 and 2001:db8:18::c8", res)
	}
	first := ns.snapshot()
	for i := 0; i < 3; i++ {
		res, err := d.Apply(st)
		if err != nil {
			t.Fatal(err)
		}
		if res.Rebuilt || len(res.Announced) != 0 || len(res.Released) != 0 {
			t.Fatalf("re-apply %d changed something: %+v", i, res)
		}
	}
	if again := ns.snapshot(); again != first {
		t.Fatalf("re-applying changed the kernel\n--- first:\n%s\n--- after:\n%s", first, again)
	}
	// One rule and one route per egress IP with a remote holder; no duplicates.
	if n := strings.Count(first, "fwmark 0x"); n != 9 {
		t.Errorf("%d ip rules, want 9 (one per egress IP of its family, one for replies in each, the pod guard's for IPv4 and IPv6):\n%s", n, first)
	}
	if n := strings.Count(first, "default via"); n != 2 || !strings.Contains(first, "default via fe80::4e:c612:b dev natd-t") {
		t.Errorf("%d routes, want 2 (to the remote holders of 198.18.0.201 and 2001:db8:18::c9):\n%s", n, first)
	}
	// A fresh Dataplane (natd restarted) on the same kernel converges to the same state.
	d2 := ns.dataplane()
	if _, err := d2.Apply(st); err != nil {
		t.Fatal(err)
	}
	if again := ns.snapshot(); again != first {
		t.Fatalf("a restarted natd changed the kernel\n--- first:\n%s\n--- after:\n%s", first, again)
	}
}

func TestKernelReplacingState(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	// 198.18.0.200 moves away to node .11, .201 comes here, .202 is no longer used,
	// and a pod joins .201 (an element-only change would not cover the rest).
	next := sampleState()
	next.Egress = []EgressIP{
		{IP: netip.MustParseAddr("198.18.0.200"), HolderIP: netip.MustParseAddr("198.18.0.11"),
			Pods: []netip.Addr{netip.MustParseAddr("10.244.1.10")}},
		{IP: netip.MustParseAddr("198.18.0.201"), Local: true, HolderIP: netip.MustParseAddr("198.18.0.12"),
			Pods: []netip.Addr{netip.MustParseAddr("10.244.1.11"), netip.MustParseAddr("10.244.2.10")}},
	}
	res, err := d.Apply(next)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(res.Announced) != "[198.18.0.201]" || fmt.Sprint(res.Released) != "[198.18.0.200 2001:db8:18::c8]" {
		t.Fatalf("apply: %+v; want 198.18.0.201 announced, 198.18.0.200 and 2001:db8:18::c8 released", res)
	}
	got := ns.snapshot()
	want := normalize(BuildRuleset(next, nil, d.cfg.Marks, d.slots, d.cfg.Lease, d.cfg.GossipPort, d.cfg.TunnelPort).Text(false))
	if !strings.HasPrefix(got, want+"\n") {
		t.Fatalf("kernel ruleset differs\n--- kernel:\n%s\n--- want:\n%s", got, want)
	}
	if strings.Count(got, "fwmark 0x") != 5 || !strings.Contains(got, "default via 198.18.0.11") ||
		strings.Count(got, "default via") != 1 {
		t.Errorf("want two ip rules for egress IPs, the reply rule, the pod guard's two, and one route (to .11 for .200):\n%s", got)
	}
	if !strings.Contains(got, "198.18.0.201/32") || strings.Contains(got, "198.18.0.200/32") {
		t.Errorf("want only 198.18.0.201 on the uplink:\n%s", got)
	}

	// Only pods change: element updates, no rebuild.
	next.Egress[1].Pods = append(next.Egress[1].Pods, netip.MustParseAddr("10.244.2.11"))
	res, err = d.Apply(next)
	if err != nil {
		t.Fatal(err)
	}
	if res.Rebuilt {
		t.Error("adding one pod rebuilt the whole table")
	}
	if out := ns.run("nft", "list", "map", "ip", TableName, mapPodEgress); !strings.Contains(out, "10.244.2.11 : goto egress_198.18.0.201") {
		t.Errorf("new pod missing from %s:\n%s", mapPodEgress, out)
	}
}

// Someone deletes or flushes natd's table: the next Apply puts it back whole.
func TestKernelRepairsDeletedOrFlushedTable(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	want := ns.snapshot()
	for _, vandal := range [][]string{
		{"nft", "delete", "table", "ip", TableName},
		{"nft", "flush", "table", "ip", TableName},
		{"nft", "flush", "chain", "ip", TableName, "leak_guard"},
		{"ip", "rule", "del", "priority", "7000"},
	} {
		ns.run(vandal...)
		res, err := d.Apply(st)
		if err != nil {
			t.Fatalf("after %v: %v", vandal, err)
		}
		if got := ns.snapshot(); got != want {
			t.Fatalf("after %v and a sync (%+v) the kernel differs\n--- got:\n%s\n--- want:\n%s", vandal, res, got, want)
		}
	}
}

func TestKernelCleanupRemovesEverything(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	ns.run("sysctl", "-qw", "net.ipv4.conf.uplink0.rp_filter=1")
	before := ns.snapshot()
	d := ns.dataplane()
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	if out := ns.run("ip", "-o", "link", "show", "type", "vxlan"); strings.Count(out, tunnelPrefix) != 6 {
		t.Errorf("want a tunnel device per egress IP and the reply tunnel, have:\n%s", out)
	}
	// Set over netlink (the DaemonSet's /proc/sys is read-only): loose reverse path
	// filtering and no IPv6 address on each of natd's tunnel devices.
	for _, dev := range strings.Fields(ns.run("sh", "-c", "ip -o link show type vxlan | awk -F': ' '{print $2}' | cut -d@ -f1")) {
		if got := strings.TrimSpace(ns.run("sysctl", "-n", "net.ipv4.conf."+dev+".rp_filter")); got != "2" {
			t.Errorf("rp_filter of %s = %s, want 2 (loose)", dev, got)
		}
		if out := ns.run("ip", "-6", "-o", "addr", "show", "dev", dev); out != "" {
			t.Errorf("tunnel device %s has IPv6 addresses: %s", dev, out)
		}
	}
	// Tunnelled packets arrive on natd's own devices, so the uplink's filter stays.
	if got := strings.TrimSpace(ns.run("sysctl", "-n", "net.ipv4.conf.uplink0.rp_filter")); got != "1" {
		t.Errorf("holder's uplink rp_filter = %s, want the node's 1", got)
	}
	// Somebody else's rule, route and table in the same namespace must survive.
	ns.run("ip", "rule", "add", "fwmark", "0x1", "lookup", "100", "priority", "7000")
	ns.run("ip", "route", "add", "default", "via", "198.18.0.1", "table", "100")
	ns.run("nft", "add", "table", "ip", "someone-else")

	// A new Dataplane, as `natd cleanup` runs in a fresh process.
	if err := ns.dataplane().Cleanup(); err != nil {
		t.Fatal(err)
	}
	ns.run("ip", "rule", "del", "priority", "7000", "fwmark", "0x1")
	if out := ns.run("nft", "list", "tables"); !strings.Contains(out, "someone-else") {
		t.Errorf("cleanup removed another table:\n%s", out)
	}
	ns.run("nft", "delete", "table", "ip", "someone-else")
	if out := ns.run("ip", "route", "show", "table", "100"); !strings.Contains(out, "default via 198.18.0.1") {
		t.Errorf("cleanup removed another route: %q", out)
	}
	if after := ns.snapshot(); after != before {
		t.Fatalf("cleanup left state behind\n--- before apply:\n%s\n--- after cleanup:\n%s", before, after)
	}
	if got := strings.TrimSpace(ns.run("sysctl", "-n", "net.ipv4.conf.uplink0.rp_filter")); got != "1" {
		t.Errorf("rp_filter after cleanup = %s, want the original 1", got)
	}
	if err := ns.dataplane().Cleanup(); err != nil {
		t.Fatalf("cleanup of a clean node: %v", err)
	}
}

// A held IP works only while natd renews its lease: when natd stops renewing (it was
// killed), SNAT and ARP answers for the IP end by themselves.
func TestKernelLeasesLapseUnlessRenewed(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	d.cfg.Lease = 300 * time.Millisecond
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	leased := func() string {
		return ns.run("nft", "list", "set", "ip", TableName, setHeldMarks) +
			ns.run("nft", "list", "map", "ip", TableName, mapHeldSNAT) +
			ns.run("nft", "list", "set", "arp", TableName, setLeasedIPs)
	}
	if got := leased(); strings.Count(got, "198.18.0.200") != 3 {
		t.Fatalf("lease missing right after apply:\n%s", got)
	}
	for i := 0; i < 5; i++ { // renewed every 100 ms, it outlives its 300 ms
		time.Sleep(100 * time.Millisecond)
		if err := d.RenewLeases(time.Now().Add(d.cfg.Lease)); err != nil {
			t.Fatal(err)
		}
	}
	if got := leased(); strings.Count(got, "198.18.0.200") != 3 {
		t.Fatalf("renewed lease lapsed:\n%s", got)
	}
	time.Sleep(450 * time.Millisecond)
	if got := leased(); strings.Contains(got, "198.18.0.200") {
		t.Fatalf("lease still there after it was not renewed:\n%s", got)
	}
	// The address stays listed as natd's (for cleanup and restart) with its generation.
	if got := ns.run("nft", "list", "set", "ip", TableName, setHeldAddrs); !strings.Contains(got, `198.18.0.200 counter packets 0 bytes 0 comment "gen=3"`) {
		t.Fatalf("held_addrs lost the IP:\n%s", got)
	}
	// ... but a natd starting now does not claim it: its lease lapsed.
	if claims, err := d.KernelClaims(); err != nil || len(claims) != 0 {
		t.Fatalf("KernelClaims of a lapsed lease = %v, %v", claims, err)
	}
	// Stopping for a restart: the lease is held for the grace time, renewal stops.
	if err := d.RenewLeases(time.Now().Add(d.cfg.Lease)); err != nil {
		t.Fatal(err)
	}
	if err := d.HoldLeases(3 * time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if got := leased(); strings.Count(got, "198.18.0.200") != 3 {
		t.Fatalf("held lease lapsed:\n%s", got)
	}
	// The natd that starts next finds the claim, with its generation.
	claims, err := d.KernelClaims()
	if err != nil || fmt.Sprint(claims) != "[{198.18.0.200 3} {2001:db8:18::c8 4}]" {
		t.Fatalf("KernelClaims = %v, %v; want both families' claims with their generations", claims, err)
	}
}

// A lease ends at the state's LeaseUntil however late the Apply or the renewal
// commits: a slow sync must not stretch the lease past what the evidence allowed.
func TestKernelLeaseEndsAtItsDeadline(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	d.cfg.Lease = 2 * time.Second
	st := sampleState()
	st.LeaseUntil = time.Now().Add(150 * time.Millisecond)
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	leased := func() bool {
		return strings.Contains(ns.run("nft", "list", "set", "ip", TableName, setHeldMarks), "198.18.0.200")
	}
	if !leased() {
		t.Fatal("no lease right after apply")
	}
	time.Sleep(400 * time.Millisecond)
	if leased() {
		t.Fatal("the lease outlived its deadline (it ran --lease from the commit)")
	}
	if err := d.RenewLeases(time.Now().Add(-time.Millisecond)); !errors.Is(err, ErrLeaseDeadlinePassed) {
		t.Fatalf("a renewal past its deadline: %v", err)
	}
	if leased() {
		t.Fatal("a renewal past its deadline served again")
	}
}

// A commit that reaches the kernel late — natd stalled between computing a lease's
// time left and the system call — would let the lease run past its deadline by the
// stall, which the voters' bound does not allow for. boundLeases re-commits at once
// with the time left now, or ends the leases when the deadline has passed.
func TestKernelLateLeaseCommitIsCut(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	d.cfg.Lease = 3 * time.Second
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	expires := func() (time.Duration, bool) {
		out := ns.run("nft", "list", "set", "ip", TableName, setHeldMarks)
		m := regexp.MustCompile(`198\.18\.0\.200 \. 0x[0-9a-f]+ timeout [0-9hms]+ expires ([0-9hms]+)`).FindStringSubmatch(out)
		if m == nil {
			return 0, false
		}
		left, err := time.ParseDuration(m[1])
		if err != nil {
			t.Fatalf("%q: %v", m[1], err)
		}
		return left, true
	}
	// Computed 2.5 s ago for a deadline 0.5 s from now, committed only now: the
	// kernel would serve for 3 s.
	start := time.Now().Add(-2500 * time.Millisecond)
	until := start.Add(d.cfg.Lease)
	d.nftMu.Lock()
	err := d.renew(until.Sub(start))
	stretched, _ := expires()
	if err == nil {
		err = d.boundLeases(until, start)
	}
	d.nftMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	remaining := time.Until(until) // the kernel's count, read after this, can only be lower
	if left, ok := expires(); !ok || left > remaining+5*time.Millisecond {
		t.Fatalf("after a late commit the lease expires in %v (%v); want at most the %v left until its deadline (it was %v)",
			left, ok, remaining.Round(time.Millisecond), stretched)
	}
	// Computed before a deadline that has passed by the time it commits: no lease.
	start = time.Now().Add(-3100 * time.Millisecond)
	until = start.Add(d.cfg.Lease)
	d.nftMu.Lock()
	err = d.renew(d.cfg.Lease)
	if err == nil {
		err = d.boundLeases(until, start)
	}
	d.nftMu.Unlock()
	if !errors.Is(err, ErrLeaseDeadlinePassed) {
		t.Fatalf("a late commit past its deadline: %v; want ErrLeaseDeadlinePassed", err)
	}
	if left, ok := expires(); ok {
		t.Fatalf("a late commit past its deadline left a lease of %v", left)
	}
	if n := d.LateLeaseCommits(); n != 2 {
		t.Errorf("LateLeaseCommits = %d, want 2", n)
	}
	// A commit in time changes nothing.
	if err := d.RenewLeases(time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if left, ok := expires(); !ok || left < 900*time.Millisecond {
		t.Fatalf("a renewal in time: lease %v (%v), want about 1 s", left, ok)
	}
}

// As many egress IPs as a node routes at once (253), each with its tunnel device and
// another node holding it, and 100 peers: one Apply builds it all, a second one finds
// nothing to change, and Verify sees no drift.
func TestKernelManyEgressIPs(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	st.Egress = nil
	for i := 0; i < d.cfg.Marks.MaxIndex(); i++ {
		ip := netip.AddrFrom4([4]byte{198, 19, byte(i / 200), byte(1 + i%200)})
		st.Egress = append(st.Egress, EgressIP{IP: ip, HolderIP: netip.MustParseAddr("198.18.0.11"),
			Pods: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 2, byte(i)})}})
	}
	for i := 0; i < 100; i++ {
		st.Peers = append(st.Peers, Peer{IP: netip.AddrFrom4([4]byte{198, 18, 1, byte(i)}),
			PodCIDRs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 245, byte(i), 0}), 24)}})
	}
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	if res, err := d.Apply(st); err != nil || res.Rebuilt {
		t.Fatalf("second apply: %+v, %v; want nothing to do", res, err)
	}
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("Verify = %v, %v; want no drift", drifted, err)
	}
	if n := strings.Count(ns.run("ip", "-o", "link", "show", "type", "vxlan"), tunnelPrefix); n != len(st.Egress)+1 {
		t.Errorf("%d tunnel devices, want %d", n, len(st.Egress)+1)
	}
}

// A held egress IP answers nothing but pings: a partner's segment or datagram that no
// connection of natd's is waiting for is dropped, where the node's own stack would
// answer with a reset or a port unreachable that kills the partner's connection after
// a move. The node's own address still answers as before.
func TestKernelEgressIPAnswersNoConnection(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	answer := func(network, addr string) error {
		return inNetns(&ns.h, func() error {
			c, err := net.DialTimeout(network, addr, 300*time.Millisecond)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := c.Write([]byte("x")); err != nil {
				return err
			}
			_, err = c.Read(make([]byte, 1))
			return err
		})
	}
	for _, network := range []string{"tcp4", "udp4"} {
		if err := answer(network, "198.18.0.12:9"); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s to the node's own address: %v, want connection refused", network, err)
		}
		var ne net.Error
		if err := answer(network, "198.18.0.200:9"); !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("%s to the held egress IP: %v, want no answer at all (a timeout)", network, err)
		}
	}
}

// arpNeighbour moves the test namespace's peer link into a namespace of its own, a
// neighbour at 198.18.0.1 that takes gratuitous ARP (arp_accept), and returns a
// function that runs a command there.
func (ns *testNS) arpNeighbour() func(args ...string) string {
	t := ns.t
	peer := ns.name + "-n"
	if out, err := exec.Command("ip", "netns", "add", peer).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", peer).Run() })
	ns.run("ip", "link", "set", "peer0", "netns", peer)
	inPeer := func(args ...string) string {
		out, err := exec.Command("ip", append([]string{"netns", "exec", peer}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	inPeer("ip", "addr", "add", "198.18.0.1/24", "dev", "peer0")
	inPeer("ip", "link", "set", "peer0", "up")
	inPeer("sysctl", "-qw", "net.ipv4.conf.peer0.arp_accept=1")
	return inPeer
}

// A planned takeover's gratuitous ARP waits AnnounceAfter (the old holder still serves
// the IP and has its connections' bindings); any other takeover announces at once. A
// neighbour that accepts gratuitous ARP (arp_accept) shows when it heard it.
func TestKernelPlannedTakeoverAnnouncesLate(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	inPeer := ns.arpNeighbour()
	// heardAt polls the neighbour's table for ip until it has an entry.
	heardAt := func(ip string, start time.Time) time.Duration {
		for time.Since(start) < 3*time.Second {
			if out := inPeer("ip", "neigh", "show", ip, "dev", "peer0"); strings.Contains(out, "lladdr") {
				return time.Since(start)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return -1
	}
	marks, _ := NewMarks(0x00ff0000)
	d, err := New(Config{Marks: marks, RulePriority: 7000, TableBase: 7100, NetNS: &ns.h,
		EgressCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("2001:db8:18::/120")}, StateDir: ns.stateDir,
		Lease: time.Minute, GossipPort: 7946, TunnelPort: 4799, Announce: []time.Duration{time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	st := sampleState()
	st.Egress[0].AnnounceAfter = 400 * time.Millisecond
	start := time.Now()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	late := heardAt("198.18.0.200", start)
	// Now an unplanned takeover of another IP: announced at once.
	st.Egress[0].AnnounceAfter = 0
	st.Egress[1] = EgressIP{IP: netip.MustParseAddr("198.18.0.201"), Local: true, Gen: 2, HolderIP: st.NodeIP}
	start = time.Now()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	now := heardAt("198.18.0.201", start)
	t.Logf("planned takeover heard after %s, unplanned after %s", late, now)
	if late < 400*time.Millisecond || late > 900*time.Millisecond {
		t.Errorf("planned takeover announced after %s, want 400 ms", late)
	}
	if now < 0 || now > 200*time.Millisecond {
		t.Errorf("unplanned takeover announced after %s, want at once", now)
	}
}

// A gratuitous ARP repeat falls due only while the lease runs. A natd frozen past its
// lease (SIGSTOP, a paused VM) fires its overdue repeats the moment it resumes, before
// any sync has seen the lease lapse; sent on a packet socket, where the arp table's
// lease does not reach, they would point the router back at a node that no longer
// serves the IP. Without renewals the repeat is not sent; with them (the control) it is.
func TestKernelLapsedLeaseAnnouncesNothing(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	inPeer := ns.arpNeighbour()
	heard := func(ip string) bool {
		return strings.Contains(inPeer("ip", "neigh", "show", ip, "dev", "peer0"), "lladdr")
	}
	marks, _ := NewMarks(0x00ff0000)
	const lease = 300 * time.Millisecond
	d, err := New(Config{Marks: marks, RulePriority: 7000, TableBase: 7100, NetNS: &ns.h,
		EgressCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26"), netip.MustParsePrefix("2001:db8:18::/120")}, StateDir: ns.stateDir,
		Lease: lease, GossipPort: 7946, TunnelPort: 4799, Announce: []time.Duration{700 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	// take announces ip at once and again 700 ms later; the neighbour forgets it at
	// 450 ms, after a lease that was not renewed has run out; renew keeps the lease.
	take := func(ip string, renew bool) (repeated bool) {
		st := sampleState()
		st.Egress[0].IP = netip.MustParseAddr(ip)
		start := time.Now()
		if _, err := d.Apply(st); err != nil {
			t.Fatal(err)
		}
		for time.Since(start) < 50*time.Millisecond && !heard(ip) {
			time.Sleep(5 * time.Millisecond)
		}
		if !heard(ip) {
			t.Fatalf("the takeover of %s was not announced", ip)
		}
		for forgot := false; time.Since(start) < 1100*time.Millisecond; time.Sleep(50 * time.Millisecond) {
			if renew {
				if err := d.RenewLeases(time.Now().Add(lease)); err != nil {
					t.Fatal(err)
				}
			}
			if !forgot && time.Since(start) > 450*time.Millisecond {
				inPeer("ip", "neigh", "flush", "to", ip, "dev", "peer0")
				forgot = true
			}
		}
		return heard(ip)
	}
	if !take("198.18.0.200", true) {
		t.Fatal("control: the repeat of a leased IP was not heard; this test cannot tell")
	}
	if take("198.18.0.201", false) {
		t.Error("a gratuitous ARP for 198.18.0.201 was sent after its lease ran out")
	}
}

// A held IPv6 egress IP is on the uplink deprecated: the node's own connections and the
// CNI's masquerade of unpinned pods never pick it as their source (RFC 6724 would
// prefer it, the newest global address with the longest match), while natd's SNAT and
// neighbour discovery use it. Made preferred by someone, it is drift, and put back.
func TestKernelIPv6EgressIPIsNeverASource(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	ns.run("ip", "-6", "addr", "add", "2001:db8:18::12/64", "dev", "uplink0", "nodad")
	ns.run("ip", "-6", "route", "add", "default", "via", "2001:db8:18::1", "dev", "uplink0")
	d := ns.dataplane()
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	addr := func() string {
		return ns.run("ip", "-6", "-o", "addr", "show", "dev", "uplink0", "to", "2001:db8:18::c8/128")
	}
	if got := addr(); !strings.Contains(got, "2001:db8:18::c8/128") || !strings.Contains(got, "deprecated") {
		t.Fatalf("held IPv6 egress IP on the uplink: %q; want it deprecated", got)
	}
	for _, dst := range []string{"2001:db8:113::10", "2001:db8:18::99"} { // routed, on-link
		if got := ns.run("ip", "-6", "route", "get", dst); !strings.Contains(got, "src 2001:db8:18::12 ") {
			t.Errorf("the node's own source towards %s: %q; want its own address, never the egress IP", dst, got)
		}
	}
	ns.run("ip", "-6", "addr", "change", "2001:db8:18::c8/128", "dev", "uplink0", "preferred_lft", "forever")
	// What the deprecation prevents (and why the check above can fail): preferred, the
	// egress IP is the node's source towards its own link.
	if got := ns.run("ip", "-6", "route", "get", "2001:db8:18::99"); !strings.Contains(got, "src 2001:db8:18::c8 ") {
		t.Errorf("made preferred, the egress IP is not the source on the link: %q; this kernel picks sources otherwise", got)
	}
	if drifted, _, err := d.Verify(); err != nil || !drifted {
		t.Fatalf("Verify with the egress IP made preferred = %v, %v; want drift", drifted, err)
	}
	if _, err := d.Apply(sampleState()); err != nil {
		t.Fatal(err)
	}
	if got := addr(); !strings.Contains(got, "deprecated") {
		t.Fatalf("after the repair: %q; want it deprecated again", got)
	}
}
