package lab

import (
	"fmt"
	"net"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Faults the failover tests inject. Each returns a function that heals it.

// CutUplink unplugs a node from the network (its port on the router's bridge goes
// down): to everyone else the node is gone, as after a power loss.
func CutUplink(t *Topology, node string) (heal func() error, err error) {
	port, err := routerPort(t, node)
	if err != nil {
		return nil, err
	}
	if _, err := NsRun(t.Router.Netns, "ip", "link", "set", port, "down"); err != nil {
		return nil, err
	}
	return func() error {
		if _, err := NsRun(t.Router.Netns, "ip", "link", "set", port, "up"); err != nil {
			return err
		}
		if t.Network == NetworkRouted {
			// The kernel dropped the route to the node's pods with the link.
			n, err := t.Node(node)
			if err != nil {
				return err
			}
			if _, err = NsRun(t.Router.Netns, "ip", "route", "replace", n.PodCIDR, "via", n.IP); err != nil || n.IP6 == "" {
				return err
			}
			_, err = NsRun(t.Router.Netns, "ip", "-6", "route", "replace", n.PodCIDR6, "via", n.IP6)
			return err
		}
		return nil
	}, nil
}

// Partition cuts a node off from the other nodes while it still reaches the router
// (and through it the partner): the bridge (routed mode: the router) drops what goes
// between its port and theirs.
func Partition(t *Topology, node string) (heal func() error, err error) {
	port, err := routerPort(t, node)
	if err != nil {
		return nil, err
	}
	var others []string
	for _, n := range t.Nodes {
		if n.Name != node {
			p, _ := routerPort(t, n.Name)
			others = append(others, p)
		}
	}
	set := strings.Join(others, ", ")
	family := "bridge"
	if t.Network == NetworkRouted {
		family = "inet" // the router routes between the nodes' subnets
	}
	script := fmt.Sprintf(`table %s natd-lab-partition {
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "%s" oifname { %s } drop
		iifname { %s } oifname "%s" drop
	}
}`, family, port, set, set, port)
	if _, err := NsRun(t.Router.Netns, "nft", script); err != nil {
		return nil, err
	}
	return func() error {
		_, err := NsRun(t.Router.Netns, "nft", "delete", "table", family, "natd-lab-partition")
		return err
	}, nil
}

// StopAPIServer freezes the API server (SIGSTOP): every client call hangs and times
// out, as when it is down.
func StopAPIServer(t *Topology) (heal func() error, err error) {
	pid := t.API.APIServerPid
	if !Alive(pid) {
		return nil, fmt.Errorf("kube-apiserver (pid %d) is not running", pid)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		return nil, err
	}
	return func() error { return syscall.Kill(pid, syscall.SIGCONT) }, nil
}

// KillNatd ends a node's natd with SIGKILL: no goodbye, the kernel state stays.
func KillNatd(t *Topology, node string) error {
	p, err := natdProcess(t, node)
	if err != nil {
		return err
	}
	return syscall.Kill(p.Pid, syscall.SIGKILL)
}

// DrainNatd asks a node's natd to hand its egress IPs over and exit (SIGUSR1).
func DrainNatd(t *Topology, node string) error {
	p, err := natdProcess(t, node)
	if err != nil {
		return err
	}
	return syscall.Kill(p.Pid, syscall.SIGUSR1)
}

// RouterNeighbour is the MAC address the router has for ip ("" when it has none).
func RouterNeighbour(t *Topology, ip string) (string, error) {
	out, err := NsRun(t.Router.Netns, "ip", "neigh", "show", ip)
	if err != nil {
		return "", err
	}
	f := strings.Fields(out)
	for i := range f {
		if f[i] == "lladdr" && i+1 < len(f) {
			return f[i+1], nil
		}
	}
	return "", nil
}

// UplinkMAC is the MAC address of a node's uplink.
func UplinkMAC(t *Topology, node string) (string, error) {
	n, err := t.Node(node)
	if err != nil {
		return "", err
	}
	out, err := NsRun(n.Netns, "cat", "/sys/class/net/eth0/address")
	return strings.TrimSpace(out), err
}

func routerPort(t *Topology, node string) (string, error) {
	for i, n := range t.Nodes {
		if n.Name == node {
			return fmt.Sprintf("n%d", i+1), nil
		}
	}
	return "", fmt.Errorf("no node %q", node)
}

// BlockARPFrom makes the router deaf to a node's ARP (its gratuitous ARPs above all):
// the router keeps sending an egress IP's traffic to its previous holder, as when a
// gratuitous ARP is lost.
func BlockARPFrom(t *Topology, node string) (heal func() error, err error) {
	port, err := routerPort(t, node)
	if err != nil {
		return nil, err
	}
	script := fmt.Sprintf(`table bridge natd-lab-arp {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "%s" ether type arp drop
	}
}`, port)
	if _, err := NsRun(t.Router.Netns, "nft", script); err != nil {
		return nil, err
	}
	return func() error {
		_, err := NsRun(t.Router.Netns, "nft", "delete", "table", "bridge", "natd-lab-arp")
		return err
	}, nil
}

// DeleteConnections deletes, on node, every conntrack entry a pod at src opened (what
// `conntrack -D -s src` does): as natd does after a takeover or a re-pinning, an
// operator's conntrack flush, or a full table evicting entries.
func DeleteConnections(t *Topology, node, src string) (deleted uint, err error) {
	n, err := t.Node(node)
	if err != nil {
		return 0, err
	}
	f := &netlink.ConntrackFilter{}
	if err := f.AddIP(netlink.ConntrackOrigSrcIP, net.ParseIP(src)); err != nil {
		return 0, err
	}
	err = InNetns(n.Netns, func() error {
		deleted, err = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, f)
		return err
	})
	return deleted, err
}
