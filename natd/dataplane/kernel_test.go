package dataplane

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// testNS is a fresh network namespace with one dummy uplink carrying the node IP.
type testNS struct {
	t    *testing.T
	name string
	h    netns.NsHandle
}

func newTestNS(t *testing.T, nodeIP string) *testNS {
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
	ns := &testNS{t: t, name: name}
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
func requireKernel(t *testing.T, why string) {
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
		EgressCIDRs: []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26")}, StateDir: ns.t.TempDir()})
	if err != nil {
		ns.t.Fatal(err)
	}
	ns.t.Cleanup(d.Close)
	return d
}

var elementsRe = regexp.MustCompile(`elements = \{([^}]*)\}`)
var spaceRe = regexp.MustCompile(`\s+`)

// normalize folds white space and sorts set elements, which nft prints in the kernel's
// hash order and wraps at its own line width.
func normalize(s string) string {
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
		},
		NodeIPs:        []netip.Addr{netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("198.18.0.12")},
		LocalPodCIDRs:  []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")},
		KnownLocalPods: []netip.Addr{netip.MustParseAddr("10.244.2.10")},
		Egress: []EgressIP{
			{IP: netip.MustParseAddr("198.18.0.200"), Local: true, HolderIP: netip.MustParseAddr("198.18.0.12"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.10"), netip.MustParseAddr("10.244.2.10")}},
			{IP: netip.MustParseAddr("198.18.0.201"), HolderIP: netip.MustParseAddr("198.18.0.11"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.11")}},
			{IP: netip.MustParseAddr("198.18.0.202"),
				Pods: []netip.Addr{netip.MustParseAddr("10.244.1.12")}},
		},
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
	want := BuildRuleset(st, d.cfg.Marks, d.slots).Text(false)
	if normalize(got) != normalize(want) {
		t.Fatalf("kernel ruleset differs from rendered one\n--- kernel:\n%s\n--- rendered:\n%s", got, want)
	}
}

func TestKernelDummy(t *testing.T) {
	_ = net.IPv4zero
	_ = netlink.Addr{}
}
