package natd

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/dataplane"
)

// A dual-stack cluster's agent gets IPv6 cluster and service CIDRs beside the IPv4
// ones; they become cluster destinations of the ip6 table. Egress CIDRs stay IPv4, and
// an IPv4 cluster CIDR is required.
func TestConfigIPv6CIDRs(t *testing.T) {
	base := []string{"--node-name", "node1", "--gossip-key-file", "/k", "--egress-cidr", "198.18.0.192/26"}
	for _, c := range []struct {
		args []string
		err  string
	}{
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56",
			"--service-cidr", "10.96.0.0/12,fd00:10:96::/112", "--exclude-cidr", "2001:db8:99::/48"}, ""},
		{[]string{"--cluster-cidr", "fd00:10:244::/56"}, "at least one IPv4 --cluster-cidr"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56", "--egress-cidr", "2001:db8:18::c0/122"}, ""},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--egress-cidr", "2001:db8:18::c0/122"}, "IPv6 --cluster-cidr"},
		// A /104 holds every VNI, 198.18.0.192/26's too.
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56", "--egress-cidr", "2001:db8:18::/104"}, "same last three bytes"},
		// Wider than a /104: two of its addresses would share a tunnel.
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--egress-cidr", "2001:db8:18::/64"}, "a /104 or longer"},
		// 198.18.0.200 and 2001:db8:18::12:c8 end in the same three bytes.
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56", "--egress-cidr", "2001:db8:18::12:0/112"}, "same last three bytes"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56", "--egress-cidr", "2001:db8:18::c0/122", "--egress-cidr", "2001:db8:19::c0/122"}, "same last three bytes"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--egress-cidr", "199.18.0.192/26"}, "same last three bytes"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--egress-cidr", "::ffff:198.19.0.0/120"}, "IPv4 or an IPv6 prefix"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--nice", "-21"}, "--nice (-21) must be between -20 and 19"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--nice", "0"}, ""},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--handover-interval", "-1s"}, "--handover-interval (-1s) must not be negative"},
		{[]string{"--cluster-cidr", "10.244.0.0/16", "--handover-interval", "0"}, ""},
	} {
		var cfg Config
		fs := flag.NewFlagSet("natd", flag.ContinueOnError)
		cfg.RegisterFlags(fs)
		if err := fs.Parse(append(append([]string{}, base...), c.args...)); err != nil {
			t.Fatal(err)
		}
		err := cfg.Validate()
		if got := fmt.Sprint(err); (c.err == "" && err != nil) || (c.err != "" && !strings.Contains(got, c.err)) {
			t.Errorf("%v: Validate() = %v, want %q", c.args, err, c.err)
		}
	}
}

// IPv6 CIDRs and the nodes' IPv6 InternalIPs are cluster destinations; the pod CIDRs
// of both families are pod CIDRs (the ip6 table's leak guard lets them into a tunnel).
func TestPlanDualStackClusterDestinations(t *testing.T) {
	cfg := testConfig("node1")
	cfg.ClusterCIDRs = append(cfg.ClusterCIDRs, netip.MustParsePrefix("fd00:10:244::/56"))
	cfg.ServiceCIDRs = append(cfg.ServiceCIDRs, netip.MustParsePrefix("fd00:10:96::/112"))
	c := cluster()
	for _, n := range c.Nodes {
		six := "2001:db8:18::" + strings.TrimPrefix(n.Status.Addresses[0].Address, "198.18.0.")
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: six})
	}
	p := &Planner{Config: cfg}
	plan, err := p.Plan(c, elect("node1", "node1", "node2"))
	if err != nil {
		t.Fatal(err)
	}
	want := "10.96.0.0/12 10.244.0.0/16 192.0.2.0/24 198.18.0.11/32 198.18.0.12/32 198.18.0.13/32 " +
		"2001:db8:18::11/128 2001:db8:18::12/128 2001:db8:18::13/128 fd00:10:96::/112 fd00:10:244::/56"
	if got := prefixes(plan.State.ClusterDestinations); got != want {
		t.Errorf("ClusterDestinations = %s\nwant %s", got, want)
	}
	if got := prefixes(plan.State.PodCIDRs); got != "10.244.0.0/16 fd00:10:244::/56" {
		t.Errorf("PodCIDRs = %s; want both families'", got)
	}
}

// BGP needs both a peer and the nodes' AS number; a malformed peer is refused at parse.
func TestConfigBGP(t *testing.T) {
	base := []string{"--node-name", "node1", "--gossip-key-file", "/k", "--egress-cidr", "198.18.0.192/26", "--cluster-cidr", "10.244.0.0/16"}
	for _, c := range []struct {
		args     []string
		parseErr bool
		err      string
	}{
		{[]string{"--bgp-asn", "64512", "--bgp-peer", "198.18.11.1:64513", "--bgp-peer", "198.18.11.2:64513"}, false, ""},
		{[]string{"--bgp-peer", "198.18.11.1:64513"}, false, "needs --bgp-asn"},
		{[]string{"--bgp-asn", "64512"}, false, "without --bgp-peer"},
		{[]string{"--bgp-peer", "198.18.11.1"}, true, ""},
		{[]string{"--bgp-peer", "2001:db8::1:64513"}, true, ""},
		{[]string{"--bgp-asn", "0"}, true, ""},
	} {
		var cfg Config
		fs := flag.NewFlagSet("natd", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		cfg.RegisterFlags(fs)
		err := fs.Parse(append(append([]string{}, base...), c.args...))
		if c.parseErr {
			if err == nil {
				t.Errorf("%v: parsed", c.args)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		err = cfg.Validate()
		if got := fmt.Sprint(err); (c.err == "" && err != nil) || (c.err != "" && !strings.Contains(got, c.err)) {
			t.Errorf("%v: Validate() = %v, want %q", c.args, err, c.err)
		}
	}
}

// --max-egress-ips is bounded by what a node can route (the mark slots of the default
// mask), not by what gossip can carry.
func TestMaxEgressIPsIsWhatANodeCanRoute(t *testing.T) {
	marks, err := dataplane.NewMarks(0x00ff0000)
	if err != nil {
		t.Fatal(err)
	}
	if marks.MaxIndex() != maxEgressIPs || maxEgressIPs > election.MaxClaims {
		t.Fatalf("--max-egress-ips bound %d; the default mask routes %d, gossip announces %d", maxEgressIPs, marks.MaxIndex(), election.MaxClaims)
	}
	for _, n := range []int{maxEgressIPs, maxEgressIPs + 1} {
		var cfg Config
		fs := flag.NewFlagSet("natd", flag.ContinueOnError)
		cfg.RegisterFlags(fs)
		if err := fs.Parse([]string{"--node-name", "node1", "--gossip-key-file", "/k", "--egress-cidr", "198.18.0.0/22",
			"--cluster-cidr", "10.244.0.0/16", "--max-egress-ips", fmt.Sprint(n)}); err != nil {
			t.Fatal(err)
		}
		if err := cfg.Validate(); (err == nil) != (n == maxEgressIPs) {
			t.Fatalf("--max-egress-ips %d: %v", n, err)
		}
	}
}
