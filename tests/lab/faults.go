package lab

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strconv"
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
	return routerTable(t, family, "natd-lab-partition", fmt.Sprintf(`
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "%s" oifname { %s } drop
		iifname { %s } oifname "%s" drop
	}`, port, set, set, port))
}

// routerTable adds an nftables table of the lab's own to the router's namespace (the
// fault) and returns the function that deletes it again (the heal).
func routerTable(t *Topology, family, name, chains string) (heal func() error, err error) {
	if _, err := NsRun(t.Router.Netns, "nft", fmt.Sprintf("table %s %s {%s\n}", family, name, chains)); err != nil {
		return nil, err
	}
	return func() error {
		_, err := NsRun(t.Router.Netns, "nft", "delete", "table", family, name)
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

// FreezeNatd stops a node's natd (SIGSTOP) without ending it, as a node whose
// processes are frozen (a hung cgroup, a VM paused by its hypervisor, CPU starvation):
// its kernel goes on forwarding, natd neither renews nor answers. heal resumes it.
func FreezeNatd(t *Topology, node string) (heal func() error, err error) {
	p, err := natdProcess(t, node)
	if err != nil {
		return nil, err
	}
	if err := syscall.Kill(p.Pid, syscall.SIGSTOP); err != nil {
		return nil, err
	}
	return func() error { return syscall.Kill(p.Pid, syscall.SIGCONT) }, nil
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
	return routerTable(t, "bridge", "natd-lab-arp", fmt.Sprintf(`
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "%s" ether type arp drop
	}`, port))
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

// LoseOnNodeLinks makes every node's link lose percent % of its frames, at random and
// in each direction, as a lossy network would: the router's bridge (routed mode: the
// router) drops them as they come from a node's port and as they go to one. A frame
// between two nodes crosses two links, so it is lost twice as often.
func LoseOnNodeLinks(t *Topology, percent int) (heal func() error, err error) {
	if percent <= 0 || percent >= 100 {
		return nil, fmt.Errorf("loss of %d %%: want 1 to 99", percent)
	}
	var ports []string
	for _, n := range t.Nodes {
		p, _ := routerPort(t, n.Name)
		ports = append(ports, p)
	}
	set := strings.Join(ports, ", ")
	family := "bridge"
	if t.Network == NetworkRouted {
		family = "inet"
	}
	lose := fmt.Sprintf("numgen random mod 100 < %d drop", percent)
	return routerTable(t, family, "natd-lab-loss", fmt.Sprintf(`
	chain forward {
		type filter hook forward priority filter - 1; policy accept;
		iifname { %[1]s } %[2]s
		oifname { %[1]s } %[2]s
	}
	chain input {
		type filter hook input priority filter - 1; policy accept;
		iifname { %[1]s } %[2]s
	}
	chain output {
		type filter hook output priority filter - 1; policy accept;
		oifname { %[1]s } %[2]s
	}`, set, lose))
}

// StressNodes saturates the nodes' CPUs: a stress-ng process on every node with as
// many CPU workers as the machine has cores (the lab's nodes share them). stop ends
// each process group it started, and only those.
func StressNodes(t *Topology) (stop func() error, err error) {
	if _, err := exec.LookPath("stress-ng"); err != nil {
		return nil, fmt.Errorf("stress-ng is not installed: %w", err)
	}
	var started []*exec.Cmd
	stop = func() error {
		var errs []error
		for _, c := range started {
			// stress-ng's parent ends its workers on SIGTERM; the group catches any left.
			errs = append(errs, syscall.Kill(-c.Process.Pid, syscall.SIGTERM))
			c.Wait()
		}
		return errors.Join(errs...)
	}
	for _, n := range t.Nodes {
		c := exec.Command("ip", "netns", "exec", n.Netns, "stress-ng", "--quiet", "--cpu", strconv.Itoa(runtime.NumCPU()))
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := c.Start(); err != nil {
			return nil, errors.Join(fmt.Errorf("starting stress-ng on %s: %w", n.Name, err), stop())
		}
		started = append(started, c)
	}
	return stop, nil
}
