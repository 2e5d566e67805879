package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// The CNI chain lab pods are wired with, as a container runtime runs it: Debian's
// containernetworking-plugins (bridge with host-local IPAM) on each node's cni0, and
// natd's own chained plugin last when the lab has one.
const (
	SystemCNIBinDir = "/usr/lib/cni"
	cniNetworkName  = "natd-lab"
	cniVersion      = "1.0.0" // the newest the Debian plugins (1.1.1) speak
	natdCNIPlugin   = "natd-cni"
	podIfName       = "eth0"
	// The first pod address of a node's pod CIDR (.1 is the gateway on cni0).
	firstPodHost = 10
)

// NatdStateDir is node's natd --state-dir in the lab.
func NatdStateDir(dir, node string) string { return filepath.Join(dir, "state-"+node) }

// setupCNI writes each node's network configuration list and the lab's CNI bin
// directory: natd-cni from beside the natd binary, if there is one, is chained after
// the bridge plugin.
func (u *upper) setupCNI(t *Topology) error {
	for _, p := range []string{"bridge", "host-local"} {
		if _, err := os.Stat(filepath.Join(SystemCNIBinDir, p)); err != nil {
			return fmt.Errorf("missing the CNI plugin %s (scripts/install-deps.sh installs containernetworking-plugins): %w", p, err)
		}
	}
	root := filepath.Join(u.dir, "cni")
	if err := u.l.addPath(root); err != nil {
		return err
	}
	bin := filepath.Join(root, "bin")
	for _, d := range []string{bin, filepath.Join(root, "net.d"), filepath.Join(root, "cache")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	t.CNI = CNI{BinDirs: []string{bin, SystemCNIBinDir}, CacheDir: filepath.Join(root, "cache"), Plugins: []string{"bridge"}}
	if src := filepath.Join(filepath.Dir(u.o.Natd), natdCNIPlugin); isExecutable(src) {
		if err := os.Symlink(src, filepath.Join(bin, natdCNIPlugin)); err != nil {
			return err
		}
		t.CNI.Plugins = append(t.CNI.Plugins, natdCNIPlugin)
	}
	for i := range t.Nodes {
		n := &t.Nodes[i]
		conf, err := nodeConfList(u.dir, n, t.CNI.Plugins)
		if err != nil {
			return err
		}
		n.CNIConfList = filepath.Join(root, "net.d", "10-natd-lab-"+n.Name+".conflist")
		if err := os.WriteFile(n.CNIConfList, conf, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// nodeConfList is node n's conflist: the bridge plugin on the lab's cni0 (the node
// made it with a fixed MAC and the gateway address, which the plugin keeps), host-local
// over the node's pod CIDR with a data directory of the node's own (dual mode: a second
// range, the node's IPv6 pod CIDR, and a default route of each family), and the chained
// plugins after it.
func nodeConfList(dir string, n *Node, plugins []string) ([]byte, error) {
	prefix, err := netip.ParsePrefix(n.PodCIDR)
	if err != nil {
		return nil, err
	}
	gw := prefix.Addr().Next()
	first := prefix.Addr()
	for i := 0; i < firstPodHost; i++ {
		first = first.Next()
	}
	type obj = map[string]any
	ranges := [][]obj{{{"subnet": n.PodCIDR, "rangeStart": first.String(), "gateway": gw.String()}}}
	routes := []obj{{"dst": "0.0.0.0/0", "gw": gw.String()}}
	if n.PodCIDR6 != "" {
		prefix6, err := netip.ParsePrefix(n.PodCIDR6)
		if err != nil {
			return nil, err
		}
		gw6 := prefix6.Addr().Next()
		first6 := prefix6.Addr()
		for i := 0; i < firstPodHost; i++ {
			first6 = first6.Next()
		}
		ranges = append(ranges, []obj{{"subnet": n.PodCIDR6, "rangeStart": first6.String(), "gateway": gw6.String()}})
		routes = append(routes, obj{"dst": "::/0", "gw": gw6.String()})
	}
	chain := []obj{{
		"type":      "bridge",
		"bridge":    "cni0",
		"isGateway": true,
		// The node has its own masquerade rule (LAB-CNI-MASQ), as with ip-masq-agent.
		"ipMasq": false,
		// A pod may reach itself through a Service's ClusterIP.
		"hairpinMode": true,
		"ipam": obj{
			"type":    "host-local",
			"ranges":  ranges,
			"routes":  routes,
			"dataDir": filepath.Join(dir, "cni", "ipam", n.Name),
		},
	}}
	for _, p := range plugins {
		if p == natdCNIPlugin {
			chain = append(chain, obj{"type": natdCNIPlugin, "stateDir": NatdStateDir(dir, n.Name)})
		}
	}
	return json.MarshalIndent(obj{"cniVersion": cniVersion, "name": cniNetworkName, "plugins": chain}, "", "  ")
}

// newContainerID is a sandbox ID as container runtimes make them.
func newContainerID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// podRuntimeConf is what a runtime passes the chain for pod p's sandbox: CNI_ARGS as
// containerd sets them, and IP=… when a test asks for an address (host-local honours
// it when it lies in the node's range and is free).
func podRuntimeConf(p *Pod, uid, requestedIP string) *libcni.RuntimeConf {
	args := [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", p.Namespace},
		{"K8S_POD_NAME", p.Name},
		{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
	}
	if uid != "" {
		args = append(args, [2]string{"K8S_POD_UID", uid})
	}
	if requestedIP != "" {
		args = append(args, [2]string{"IP", requestedIP})
	}
	return &libcni.RuntimeConf{ContainerID: p.ContainerID, NetNS: filepath.Join("/run/netns", p.Netns), IfName: podIfName, Args: args}
}

func cniConfig(t *Topology, n *Node) (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	if n.CNIConfList == "" || len(t.CNI.BinDirs) == 0 {
		return nil, nil, fmt.Errorf("node %s has no CNI configuration (a lab from an older natd-lab?)", n.Name)
	}
	list, err := libcni.ConfListFromFile(n.CNIConfList)
	if err != nil {
		return nil, nil, err
	}
	return libcni.NewCNIConfigWithCacheDir(t.CNI.BinDirs, t.CNI.CacheDir, nil), list, nil
}

// cniAdd runs node n's chain (ADD) from inside the node's network namespace, as the
// node's runtime would, and returns the pod's IPv4 address and (with an IPv6 range in
// the chain) its IPv6 address from the result.
func cniAdd(ctx context.Context, t *Topology, n *Node, rt *libcni.RuntimeConf) (ip4, ip6 netip.Addr, err error) {
	cn, list, err := cniConfig(t, n)
	if err != nil {
		return ip4, ip6, err
	}
	var res types.Result
	// Plugins are exec'd from this locked thread, so they start in the node's namespace.
	if err := InNetns(n.Netns, func() error {
		var err error
		res, err = cn.AddNetworkList(ctx, list, rt)
		return err
	}); err != nil {
		return ip4, ip6, fmt.Errorf("CNI ADD on %s: %w", n.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return ip4, ip6, err
	}
	for _, ipc := range r.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		switch a = a.Unmap(); {
		case !ok:
		case a.Is4() && !ip4.IsValid():
			ip4 = a
		case a.Is6() && !ip6.IsValid():
			ip6 = a
		}
	}
	if !ip4.IsValid() {
		return ip4, ip6, fmt.Errorf("CNI ADD on %s returned no IPv4 address: %v", n.Name, r.IPs)
	}
	if n.PodCIDR6 != "" && !ip6.IsValid() {
		return ip4, ip6, fmt.Errorf("CNI ADD on %s returned no IPv6 address: %v", n.Name, r.IPs)
	}
	return ip4, ip6, nil
}

// cniDel runs node n's chain (DEL) for the sandbox rt describes.
func cniDel(ctx context.Context, t *Topology, n *Node, rt *libcni.RuntimeConf) error {
	cn, list, err := cniConfig(t, n)
	if err != nil {
		return err
	}
	if err := InNetns(n.Netns, func() error { return cn.DelNetworkList(ctx, list, rt) }); err != nil {
		return fmt.Errorf("CNI DEL on %s: %w", n.Name, err)
	}
	return nil
}

// validPodIP checks a requested pod address: IPv4, inside node n's pod CIDR (host-local
// then says whether it is in its range and free).
func validPodIP(n *Node, ip string) error {
	a, err := netip.ParseAddr(ip)
	if err != nil || !a.Is4() {
		return fmt.Errorf("requested pod IP %q is not an IPv4 address", ip)
	}
	if prefix, err := netip.ParsePrefix(n.PodCIDR); err != nil || !prefix.Contains(a) {
		return fmt.Errorf("requested pod IP %s is not in %s's pod CIDR %s", ip, n.Name, n.PodCIDR)
	}
	return nil
}
