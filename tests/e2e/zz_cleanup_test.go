package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"natd.dev/natd/tests/lab"
)

// `natd cleanup` on the holder leaves nothing of natd in its kernel: no table, no ip
// rules, no routes, no egress IP, and the uplink's rp_filter as the node had it. A
// restarted natd then programs the node again. (zz_: runs after the other tests.)
func TestCleanupRemovesEverything(t *testing.T) {
	const ip = "198.18.0.211"
	p := newPod(t, "pin-cleanup", "app", "node1")
	annotate(t, "pin-cleanup", ip)
	unpinOnCleanup(t, "pin-cleanup")
	waitSeen(t, p, tcp, ip)
	holder := waitHolder(t, ip)
	cur, err := lab.LoadTopology(labDir)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := cur.Node(holder)
	if err := lab.StopNatd(cur, n); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { restartNatd(t, holder) })
	// A natd that is down leaves the kernel programmed: traffic keeps its egress IP.
	assertSeen(t, p, ip)

	if out, err := lab.NsRun(n.Netns, cur.API.NatdBinary, "cleanup", "--egress-cidr", lab.EgressCIDR,
		"--state-dir", filepath.Join(labDir, "state-"+holder)); err != nil {
		t.Fatalf("natd cleanup: %v\n%s", err, out)
	}
	assertNodeClean(t, cur, n)
	// Running it again on a clean node is fine.
	if out, err := lab.NsRun(n.Netns, cur.API.NatdBinary, "cleanup", "--egress-cidr", lab.EgressCIDR,
		"--state-dir", filepath.Join(labDir, "state-"+holder)); err != nil {
		t.Fatalf("second natd cleanup: %v\n%s", err, out)
	}
}

// assertNodeClean checks that nothing of natd is left in a node's kernel.
func assertNodeClean(t *testing.T, cur *lab.Topology, n *lab.Node) {
	t.Helper()
	for _, family := range []string{"ip", "ip6", "arp"} {
		if out, err := lab.NsRun(n.Netns, "nft", "list", "table", family, "natd"); err == nil {
			t.Errorf("natd's %s table is still there:\n%s", family, out)
		}
	}
	for _, c := range [][]string{
		{"ip", "rule", "show", "priority", "7000"},
		{"ip", "rule", "show", "priority", "7001"}, // the route guard
		{"ip", "route", "show", "table", "all", "proto", "78"},
		{"ip", "-o", "link", "show", "type", "vxlan"}, // natd's tunnels (the lab's CNI has none)
		{"ip", "-o", "addr", "show", "to", lab.EgressCIDR},
	} {
		out, err := lab.NsRun(n.Netns, c...)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "" {
			t.Errorf("%s still shows natd's state:\n%s", strings.Join(c, " "), out)
		}
	}
	if out, _ := lab.NsRun(n.Netns, "sysctl", "-n", "net.ipv4.conf.eth0.rp_filter"); strings.TrimSpace(out) != "1" {
		t.Errorf("rp_filter of eth0 is %q after cleanup, want the node's original 1", strings.TrimSpace(out))
	}
}

// Uninstalling is one step — deleting natd's DaemonSet — and leaves nothing on the
// nodes without anything run on them by hand: natd, stopped by the kubelet, sees its
// DaemonSet gone and cleans its node up instead of keeping its IPs for a restart. The
// IP moves to an egress node that stays.
func TestUninstallLeavesNothing(t *testing.T) {
	const ip = "198.18.0.213"
	kubectl(t, "apply", "--server-side", "--field-manager", "natd-e2e", "-k", manifestsDir())
	p := newPod(t, "pin-uninstall", "app", "node1")
	annotate(t, "pin-uninstall", ip)
	unpinOnCleanup(t, "pin-uninstall")
	waitSeen(t, p, tcp, ip)
	holder := waitHolder(t, ip)
	cur := restartNatd(t, holder, "--daemonset", "natd-system/natd")
	n, _ := cur.Node(holder)
	t.Cleanup(func() { restartNatd(t, holder) })
	waitSeen(t, p, tcp, ip)
	kubectl(t, "-n", "natd-system", "delete", "daemonset", "natd")
	if err := lab.StopNatd(cur, n); err != nil { // the kubelet's SIGTERM
		t.Fatal(err)
	}
	if lab.Alive(n.NatdPid) {
		t.Fatal("natd did not exit on SIGTERM")
	}
	assertNodeClean(t, cur, n)
	if out, _ := lab.NsRun(n.Netns, "ls", "-A", filepath.Join(labDir, "state-"+holder)); strings.TrimSpace(out) != "" {
		t.Errorf("natd's state dir still holds: %s", out)
	}
	waitSeen(t, p, tcp, ip) // the other egress node took the IP over
	if h := waitHolder(t, ip); h == holder {
		t.Errorf("%s still holds %s after its natd was uninstalled", holder, ip)
	}
}
