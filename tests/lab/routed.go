package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The routed network mode (natd-lab up --network routed): each node in a subnet of its
// own behind the router, which routes between them and to their pods, and learns
// egress IPs from the nodes over BGP with BIRD (Debian's bird2): no gratuitous ARP of a
// node reaches a neighbour table that matters.
const (
	// routedNodes covers every node subnet (node i: 198.18.(10+i).0/24); routedNodes6
	// their IPv6 /64s (node i: 2001:db8:18:(16+i)::/64, i up to 15).
	routedNodes  = "198.18.0.0/16"
	routedNodes6 = "2001:db8:18:10::/60"
	// The nodes' AS (natd's --bgp-asn) and the router's.
	NodesASN  = 64512
	RouterASN = 64513
	birdBin   = "/usr/sbin/bird"
)

// RoutedNodeIP is node i's address in the routed mode (i from 1).
func RoutedNodeIP(i int) string { return fmt.Sprintf("198.18.%d.10", 10+i) }

// RoutedNodeIP6 is node i's IPv6 address in the routed mode.
func RoutedNodeIP6(i int) string { return fmt.Sprintf("2001:db8:18:%x::10", 16+i) }

// routedGateway is the router's address in node i's subnet; routedGateway6 its IPv6
// one.
func routedGateway(i int) string  { return fmt.Sprintf("198.18.%d.1", 10+i) }
func routedGateway6(i int) string { return fmt.Sprintf("2001:db8:18:%x::1", 16+i) }

func routedSubnet(i int) string { return fmt.Sprintf("198.18.%d.0/24", 10+i) }

func checkRoutedTools() error {
	if _, err := exec.LookPath(birdBin); err != nil {
		return fmt.Errorf("--network routed needs BIRD (%s; scripts/install-deps.sh installs bird2)", birdBin)
	}
	return nil
}

// routedNatdArgs make node n's natd announce its egress IPs to the router over BGP.
func routedNatdArgs(t *Topology, n *Node) []string {
	for i := range t.Nodes {
		if t.Nodes[i].Name == n.Name {
			return []string{"--bgp-asn", fmt.Sprint(NodesASN), "--bgp-peer", fmt.Sprintf("%s:%d", routedGateway(i+1), RouterASN)}
		}
	}
	return nil
}

// birdConfig peers the router with every node. It accepts from a node nothing but /32s
// of the egress CIDR and /128s of the IPv6 one (a node cannot draw any other traffic;
// IPv6 routes come over the same IPv4 sessions, multiprotocol) and puts the best route
// of each into the router's kernel tables. Among routes of one egress IP the lowest MED
// wins: natd announces a newer claim with a lower one. A node whose session closes
// (natd restarting) keeps its routes for its graceful-restart time; one that goes
// silent (powered off) loses them after the 3 s hold time.
func birdConfig(t *Topology) string {
	var b strings.Builder
	fmt.Fprintf(&b, `log stderr all;
router id %s;
protocol device { scan time 10; }
protocol kernel {
	ipv4 { import none; export all; };
	learn off;
}
protocol kernel kernel6 {
	ipv6 { import none; export all; };
	learn off;
}
template bgp node {
	local as %d;
	ipv4 {
		import filter { if net ~ [ %s{32,32} ] then accept; reject; };
		export none;
	};
	ipv6 {
		import filter { if net ~ [ %s{128,128} ] then accept; reject; };
		export none;
	};
	hold time 3;
	keepalive time 1;
	connect retry time 1;
	graceful restart on;
	passive on;
}
`, routerNodeIP, RouterASN, EgressCIDR, EgressCIDR6)
	for i, n := range t.Nodes {
		fmt.Fprintf(&b, "protocol bgp %s from node { local %s; neighbor %s as %d; }\n", n.Name, routedGateway(i+1), n.IP, NodesASN)
	}
	return b.String()
}

// startBIRD runs BIRD in the router's namespace.
func (u *upper) startBIRD(t *Topology) error {
	conf := filepath.Join(u.dir, "bird.conf")
	if err := os.WriteFile(conf, []byte(birdConfig(t)), 0o644); err != nil {
		return err
	}
	if out, err := Run(birdBin, "-p", "-c", conf); err != nil {
		return fmt.Errorf("BIRD refuses its configuration: %w\n%s", err, out)
	}
	t.Router.BirdSocket = filepath.Join(u.dir, "bird.ctl")
	_, err := u.start(nsRouter, birdBin, filepath.Join(u.dir, "bird.log"), "-f", "-c", conf,
		"-s", t.Router.BirdSocket, "-P", filepath.Join(u.dir, "bird.pid"))
	return err
}

// BGPAnnouncers are the nodes whose BGP route for ip the router's BIRD has (best
// first), whether it uses them or keeps them stale.
func BGPAnnouncers(t *Topology, ip string) ([]string, error) {
	out, err := Run(birdBin+"c", "-s", t.Router.BirdSocket, "show", "route", "for", hostPrefix(ip), "all")
	if err != nil && !strings.Contains(out, "ready") { // birdc fails "Network not found"
		return nil, fmt.Errorf("birdc: %w\n%s", err, out)
	}
	var nodes []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		for i := range f {
			if strings.HasPrefix(f[i], "[node") {
				nodes = append(nodes, strings.TrimPrefix(f[i], "["))
				break
			}
		}
	}
	return nodes, nil
}

// RouterNextHop is the node the router sends ip's traffic to: in the routed mode the
// next hop of its BGP route, otherwise the node whose MAC its neighbour entry has
// ("" when none).
func RouterNextHop(t *Topology, ip string) (string, error) {
	if t.Network == NetworkRouted {
		family := "-4"
		if strings.Contains(ip, ":") {
			family = "-6" // ip infers no family from the prefix here
		}
		out, err := NsRun(t.Router.Netns, "ip", family, "route", "show", hostPrefix(ip))
		if err != nil {
			return "", err
		}
		f := strings.Fields(out)
		for i := range f {
			if f[i] == "via" && i+1 < len(f) {
				for _, n := range t.Nodes {
					if n.IP == f[i+1] || n.IP6 == f[i+1] {
						return n.Name, nil
					}
				}
			}
		}
		return "", nil
	}
	mac, err := RouterNeighbour(t, ip)
	if err != nil || mac == "" {
		return "", err
	}
	for _, n := range t.Nodes {
		if m, _ := UplinkMAC(t, n.Name); m == mac {
			return n.Name, nil
		}
	}
	return "", nil
}

// hostPrefix is ip as a host route: /32 or /128.
func hostPrefix(ip string) string {
	if strings.Contains(ip, ":") {
		return ip + "/128"
	}
	return ip + "/32"
}
