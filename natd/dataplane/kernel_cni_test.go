package dataplane

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The CNI plugin's ADD and DEL, in a node's network namespace: a new pod is classified
// in the kernel at once (pinned or explicitly not), a pod that reuses an IP overrides
// the old classification, natd's next sync keeps what the plugin did, and DEL undoes it.
func TestKernelCNIRegisterAndUnregister(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	reg := func(rec PodRecord) bool {
		t.Helper()
		var pinned bool
		err := d.inNetns(func() (err error) {
			pinned, err = RegisterPod(d.store, rec)
			return err
		})
		if err != nil {
			t.Fatalf("RegisterPod(%v): %v", rec, err)
		}
		return pinned
	}
	cniPods := func() string {
		return ns.run("nft", "list", "map", "ip", TableName, MapCNIPods) + ns.run("nft", "list", "map", "ip6", TableName, MapCNIPods6)
	}
	pinnedPod := PodRecord{ContainerID: "c30", Namespace: "team-a", Name: "new",
		IPs: []netip.Addr{netip.MustParseAddr("10.244.2.30"), netip.MustParseAddr("fd00:10:244:2::30")}, Added: 1}
	if !reg(pinnedPod) {
		t.Error("a pod of team-a was not reported pinned")
	}
	got := cniPods()
	if !strings.Contains(got, "10.244.2.30 : goto egress_198.18.0.200") || !strings.Contains(got, "fd00:10:244:2::30 : goto egress_2001-db8-18--c8") {
		t.Fatalf("pinned pod not classified:\n%s", got)
	}
	// A namespace with an IPv4 egress IP only: the pod's IPv6 address goes to the drop
	// chain; one with an IPv6 egress IP only: its IPv4 address does.
	if !reg(PodRecord{ContainerID: "c31", Namespace: "team-b", Name: "b", Added: 1,
		IPs: []netip.Addr{netip.MustParseAddr("10.244.2.31"), netip.MustParseAddr("fd00:10:244:2::31")}}) ||
		!reg(PodRecord{ContainerID: "c32", Namespace: "team-d", Name: "d", Added: 1,
			IPs: []netip.Addr{netip.MustParseAddr("10.244.2.32"), netip.MustParseAddr("fd00:10:244:2::32")}}) {
		t.Error("pods of team-b and team-d were not reported pinned")
	}
	got = cniPods()
	for _, want := range []string{"10.244.2.31 : goto egress_198.18.0.201", "fd00:10:244:2::31 : goto pinned_ipv6",
		"10.244.2.32 : goto pinned_ipv4", "fd00:10:244:2::32 : goto egress_2001-db8-18--c9"} {
		if !strings.Contains(got, want) {
			t.Fatalf("want %q in:\n%s", want, got)
		}
	}
	// natd's next sync reads the record and keeps the elements; nothing has drifted.
	time.Sleep(minReadBack) // so that Verify really reads the tables back
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("Verify after the plugin's ADD = %v, %v; want no drift", drifted, err)
	}
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	if got := cniPods(); !strings.Contains(got, "10.244.2.30 : goto egress_198.18.0.200") {
		t.Fatalf("natd's sync dropped the plugin's element:\n%s", got)
	}
	// The pod goes (DEL) and an unpinned pod gets its IP (ADD): never the old pinning.
	if err := d.inNetns(func() error { return UnregisterPod(d.store, "c30") }); err != nil {
		t.Fatal(err)
	}
	if got := cniPods(); strings.Contains(got, "10.244.2.30") {
		t.Fatalf("DEL left the pod's elements:\n%s", got)
	}
	reuse := PodRecord{ContainerID: "c31", Namespace: "plain", Name: "reuser", IPs: []netip.Addr{netip.MustParseAddr("10.244.2.30")}, Added: 2}
	if reg(reuse) {
		t.Error("a pod of an unpinned namespace was reported pinned")
	}
	if got := cniPods(); !strings.Contains(got, "10.244.2.30 : return") {
		t.Fatalf("reused IP not marked unpinned:\n%s", got)
	}
	// A stale record whose DEL never came loses the IP to the newer one.
	stale := PodRecord{ContainerID: "c29", Namespace: "team-a", Name: "gone", IPs: []netip.Addr{netip.MustParseAddr("10.244.2.30")}, Added: 1}
	if err := d.store.Put(stale); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	if got := cniPods(); !strings.Contains(got, "10.244.2.30 : return") {
		t.Fatalf("a stale record took the IP back:\n%s", got)
	}
	time.Sleep(minReadBack) // so that Verify really reads the tables back
	if drifted, _, err := d.Verify(); err != nil || drifted {
		t.Fatalf("Verify = %v, %v; want no drift", drifted, err)
	}
	// Tables gone while natd is down: a pinned pod's ADD fails (the pod does not start
	// unpinned), an unpinned pod's reports an error its caller ignores.
	ns.run("nft", "flush", "ruleset")
	err := d.inNetns(func() error {
		pinned, err := RegisterPod(d.store, PodRecord{ContainerID: "c40", Namespace: "team-a", IPs: []netip.Addr{netip.MustParseAddr("10.244.2.40")}})
		if !pinned {
			return errors.New("not reported pinned")
		}
		return err
	})
	if !errors.Is(err, ErrNoTables) {
		t.Fatalf("ADD of a pinned pod without tables: %v; want ErrNoTables", err)
	}
}

// Where natd never ran (or was uninstalled), the plugin does nothing at all.
func TestKernelCNIWithoutNatd(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	dir := filepath.Join(t.TempDir(), "natd")
	store := PodStore{Dir: dir}
	d := ns.dataplane()
	err := d.inNetns(func() error {
		pinned, err := RegisterPod(store, PodRecord{ContainerID: "c1", Namespace: "team-a", IPs: []netip.Addr{netip.MustParseAddr("10.244.2.10")}})
		if pinned || err != nil {
			t.Errorf("RegisterPod without natd = %v, %v", pinned, err)
		}
		return UnregisterPod(store, "c1")
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the plugin created %s on a node without natd", dir)
	}
	if out := ns.run("nft", "list", "tables"); strings.TrimSpace(out) != "" {
		t.Errorf("the plugin created tables: %s", out)
	}
}
