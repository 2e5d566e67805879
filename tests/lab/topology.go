package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// DefaultDir is where the lab lives unless --dir says otherwise.
const DefaultDir = "/tmp/natd-lab"

// Topology is DIR/topology.json, the lab's one machine-readable description
// (CONTRACT.md fixes its fields).
type Topology struct {
	Kubeconfig  string  `json:"kubeconfig"`
	NodeCIDR    string  `json:"nodeCIDR"`
	EgressCIDR  string  `json:"egressCIDR"`
	ClusterCIDR string  `json:"clusterCIDR"`
	ServiceCIDR string  `json:"serviceCIDR"`
	Nodes       []Node  `json:"nodes"`
	Pods        []Pod   `json:"pods"`
	Partner     Partner `json:"partner"`
	Router      Router  `json:"router"`
	// API is where the API server listens, for tools that want more than kubeconfig.
	API API `json:"api"`
	// NatdArgs are the extra flags every natd of this lab runs with (restarts too).
	NatdArgs []string `json:"natdArgs,omitempty"`
	// ProxyMode is kube-proxy's mode on every node: nftables or iptables.
	ProxyMode string `json:"proxyMode"`
	// CNI is how pods are wired: each node's conflist, run with libcni.
	CNI CNI `json:"cni"`
	// Network is the network mode: flat or dual ("" in a lab of an older natd-lab: flat).
	Network string `json:"network"`
	// Kubelet: the real-node mode (natd-lab up --kubelet). Every node runs containerd and
	// a kubelet, natd runs as the DaemonSet, pods are the kubelet's.
	Kubelet bool `json:"kubelet,omitempty"`
	// The IPv6 networks of the dual and routed modes (empty otherwise): nodes (routed:
	// the aggregate of the nodes' subnets), IPv6 egress IPs (natd's
	// --egress-cidr), pods (a /64 per node) and Services (kube-apiserver's service range
	// stays IPv4: Services are single-stack; natd is told this CIDR).
	NodeCIDR6    string `json:"nodeCIDR6,omitempty"`
	EgressCIDR6  string `json:"egressCIDR6,omitempty"`
	ClusterCIDR6 string `json:"clusterCIDR6,omitempty"`
	ServiceCIDR6 string `json:"serviceCIDR6,omitempty"`
}

// Dual reports whether the lab is the dual network mode: dual-stack on one flat
// segment.
func (t *Topology) Dual() bool { return t.Network == NetworkDual }

// IPv6 reports whether the lab's nodes, pods and partner have IPv6 addresses too: the
// dual mode, and the routed mode (every node's subnet has an IPv6 /64, and the router
// learns IPv6 egress IPs over the same BGP sessions).
func (t *Topology) IPv6() bool { return t.Network == NetworkDual || t.Network == NetworkRouted }

// CNI is the plugin chain lab pods are created with, as a container runtime runs it.
type CNI struct {
	// BinDirs is CNI_PATH: the lab's own plugins (natd-cni, when the lab has it), then
	// the system's (bridge, host-local).
	BinDirs []string `json:"binDirs"`
	// CacheDir is libcni's cache of results, which DEL reads.
	CacheDir string `json:"cacheDir"`
	// Plugins are the types in each node's chain, in order.
	Plugins []string `json:"plugins"`
}

type Node struct {
	Name    string `json:"name"`
	Netns   string `json:"netns"`
	IP      string `json:"ip"`
	PodCIDR string `json:"podCIDR"`
	Egress  bool   `json:"egress"`
	// IP6 and PodCIDR6: the node's IPv6 address and IPv6 pod range (dual mode).
	IP6      string `json:"ip6,omitempty"`
	PodCIDR6 string `json:"podCIDR6,omitempty"`
	NatdPid  int    `json:"natdPid"`
	NatdLog  string `json:"natdLog"`
	// KubeProxyPid and KubeProxyLog: the node's kube-proxy.
	KubeProxyPid int    `json:"kubeProxyPid"`
	KubeProxyLog string `json:"kubeProxyLog"`
	// CNIConfList is the node's CNI network configuration list.
	CNIConfList string `json:"cniConfList"`
	// The real-node mode's containerd and kubelet (NatdPid stays 0 there: NatdPid()
	// finds the container's process).
	ContainerdPid    int    `json:"containerdPid,omitempty"`
	ContainerdSocket string `json:"containerdSocket,omitempty"`
	ContainerdLog    string `json:"containerdLog,omitempty"`
	KubeletPid       int    `json:"kubeletPid,omitempty"`
	KubeletLog       string `json:"kubeletLog,omitempty"`
}

type Pod struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Node      string `json:"node"`
	Netns     string `json:"netns"`
	IP        string `json:"ip"`
	// IP6 is the pod's IPv6 address (dual mode).
	IP6 string `json:"ip6,omitempty"`
	// ContainerID is the sandbox ID the CNI chain was called with (DEL needs it).
	ContainerID string `json:"containerID"`
}

type Partner struct {
	Netns string `json:"netns"`
	IP    string `json:"ip"`
	// IP6 is the partner's IPv6 address (dual mode); it serves the same port there.
	IP6  string `json:"ip6,omitempty"`
	Port int    `json:"port"`
	Pid  int    `json:"pid"`
}

type Router struct {
	Netns string `json:"netns"`
	// BirdSocket is the control socket of the router's BIRD (routed mode).
	BirdSocket string `json:"birdSocket,omitempty"`
}

type API struct {
	Netns           string `json:"netns"`
	Server          string `json:"server"`
	EtcdPid         int    `json:"etcdPid"`
	APIServerPid    int    `json:"apiserverPid"`
	APIServerLog    string `json:"apiserverLog"`
	NatdBinary      string `json:"natdBinary"`
	KubectlBinary   string `json:"kubectlBinary"`
	KubeProxyBinary string `json:"kubeProxyBinary"`
	// The real-node mode's controllers.
	ControllerManagerPid int `json:"controllerManagerPid,omitempty"`
	SchedulerPid         int `json:"schedulerPid,omitempty"`
}

// LoadTopology reads DIR/topology.json.
func LoadTopology(dir string) (*Topology, error) {
	b, err := os.ReadFile(filepath.Join(dir, "topology.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no lab in %s (run natd-lab up): %w", dir, err)
		}
		return nil, err
	}
	var t Topology
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("reading %s/topology.json: %w", dir, err)
	}
	return &t, nil
}

// Save writes DIR/topology.json atomically.
func (t *Topology) Save(dir string) error {
	return writeJSON(filepath.Join(dir, "topology.json"), t)
}

func (t *Topology) Node(name string) (*Node, error) {
	for i := range t.Nodes {
		if t.Nodes[i].Name == name {
			return &t.Nodes[i], nil
		}
	}
	return nil, fmt.Errorf("no node %q in the lab", name)
}

func (t *Topology) Pod(namespace, name string) (*Pod, error) {
	for i := range t.Pods {
		if t.Pods[i].Namespace == namespace && t.Pods[i].Name == name {
			return &t.Pods[i], nil
		}
	}
	return nil, fmt.Errorf("no pod %s/%s in the lab", namespace, name)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// ledger records, before each step of `up`, what the step is about to create, so that
// `down` can remove everything even after a crash half-way through.
type ledger struct {
	path       string
	CreatedDir bool     `json:"createdDir"`
	Netns      []string `json:"netns"`
	HostLinks  []string `json:"hostLinks"`
	Pids       []proc   `json:"pids"`
	// Paths are files and directories in the lab directory that down removes.
	Paths []string `json:"paths"`
	// The real-node mode's changes outside the lab directory: host directories up
	// created as mount points, cgroups, the global sysctls the kubelet changes (their
	// values before), and the containerd sockets whose containers down stops.
	HostDirs []string          `json:"hostDirs,omitempty"`
	Cgroups  []string          `json:"cgroups,omitempty"`
	Sysctls  map[string]string `json:"sysctls,omitempty"`
	Runtimes []string          `json:"runtimes,omitempty"`
}

type proc struct {
	Pid    int    `json:"pid"`
	Binary string `json:"binary"`
}

func loadLedger(dir string) (*ledger, error) {
	l := &ledger{path: filepath.Join(dir, "lab-ledger.json")}
	b, err := os.ReadFile(l.path)
	if errors.Is(err, os.ErrNotExist) {
		return l, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, l); err != nil {
		return nil, fmt.Errorf("reading %s: %w", l.path, err)
	}
	return l, nil
}

func (l *ledger) save() error { return writeJSON(l.path, l) }

func (l *ledger) addNetns(name string) error {
	for _, n := range l.Netns {
		if n == name {
			return nil
		}
	}
	l.Netns = append(l.Netns, name)
	return l.save()
}

func (l *ledger) removeNetns(name string) error {
	out := l.Netns[:0]
	for _, n := range l.Netns {
		if n != name {
			out = append(out, n)
		}
	}
	l.Netns = out
	return l.save()
}

func (l *ledger) addPath(path string) error {
	l.Paths = appendUnique(l.Paths, path)
	return l.save()
}

func (l *ledger) addPid(pid int, binary string) error {
	l.Pids = append(l.Pids, proc{Pid: pid, Binary: binary})
	return l.save()
}
