package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	t.Cleanup(func() {
		restarted, err := lab.RestartNatd(labDir, holder, nil)
		if err != nil {
			t.Fatal(err)
		}
		rn, _ := restarted.Node(holder)
		if err := lab.WaitNatdReady(context.Background(), rn, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	})
	// A natd that is down leaves the kernel programmed: traffic keeps its egress IP.
	assertSeen(t, p, ip)

	if out, err := lab.NsRun(n.Netns, cur.API.NatdBinary, "cleanup", "--egress-cidr", lab.EgressCIDR,
		"--state-dir", filepath.Join(labDir, "state-"+holder)); err != nil {
		t.Fatalf("natd cleanup: %v\n%s", err, out)
	}
	for _, family := range []string{"ip", "arp"} {
		if out, err := lab.NsRun(n.Netns, "nft", "list", "table", family, "natd"); err == nil {
			t.Errorf("natd's %s table is still there:\n%s", family, out)
		}
	}
	for _, c := range [][]string{
		{"ip", "rule", "show", "priority", "7000"},
		{"ip", "route", "show", "table", "all", "proto", "78"},
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
	// Running it again on a clean node is fine.
	if out, err := lab.NsRun(n.Netns, cur.API.NatdBinary, "cleanup", "--egress-cidr", lab.EgressCIDR,
		"--state-dir", filepath.Join(labDir, "state-"+holder)); err != nil {
		t.Fatalf("second natd cleanup: %v\n%s", err, out)
	}
}
