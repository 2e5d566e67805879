package lab

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-iptables/iptables"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"

	"natd.dev/natd/manifests"
)

// Addresses of the lab (CONTRACT.md).
const (
	NodeCIDR    = "198.18.0.0/24"
	EgressCIDR  = "198.18.0.192/26"
	ClusterCIDR = "10.244.0.0/16"
	ServiceCIDR = "10.96.0.0/12"
	PartnerIP   = "203.0.113.10"
	PartnerPort = 8080

	routerNodeIP    = "198.18.0.1"
	routerPartnerIP = "203.0.113.1"
	apiNodeIP       = "198.18.0.2"
	apiHostIP       = "198.18.1.2"
	hostLinkIP      = "198.18.1.1"
	hostLink        = "natd-api0"

	nsRouter  = "natd-router"
	nsPartner = "natd-partner"
	nsAPI     = "natd-api"

	// IPv6 of the dual network mode (CONTRACT.md), and of the routed one: the node
	// network (dual), IPv6 egress IPs, pods (a /64 per node), Services, partner.
	NodeCIDR6    = "2001:db8:18::/64"
	EgressCIDR6  = "2001:db8:18::c0/122"
	ClusterCIDR6 = "fd00:10:244::/56"
	ServiceCIDR6 = "fd00:10:96::/112"
	PartnerIP6   = "2001:db8:113::10"

	routerNodeIP6    = "2001:db8:18::1"
	routerPartnerIP6 = "2001:db8:113::1"

	// The manifests' ServiceAccount, which the lab's agents run as.
	ServiceAccountNamespace = "natd-system"
	ServiceAccountName      = "natd"
)

// NodeIP is node i's address (i from 1).
func NodeIP(i int) string { return fmt.Sprintf("198.18.0.%d", 10+i) }

// NodeIP6 is node i's IPv6 address in the dual network mode: the digits of NodeIP's
// last byte (node1: 2001:db8:18::11), never inside EgressCIDR6 (::c0-::ff).
func NodeIP6(i int) string { return fmt.Sprintf("2001:db8:18::%d", 10+i) }

// PodCIDR6 is node i's IPv6 pod range in the dual network mode: the i-th /64 of
// ClusterCIDR6.
func PodCIDR6(i int) string { return fmt.Sprintf("fd00:10:244:%x::/64", i) }

// Network modes of the lab (CONTRACT.md). Only flat and dual are built so far.
const (
	NetworkFlat    = "flat"
	NetworkDual    = "dual"
	NetworkOverlay = "overlay"
	NetworkRouted  = "routed"
)

// Options of `natd-lab up`.
type Options struct {
	Dir      string
	Nodes    int
	Natd     string // natd binary
	Self     string // natd-lab binary (runs the partner)
	KubeBins string // directory with etcd, kube-apiserver, kubectl, kube-proxy
	NatdArgs []string
	// ProxyMode is kube-proxy's mode on every node: nftables (the default) or iptables.
	ProxyMode string
	// Network is the network mode: flat (the default) or dual (dual-stack nodes, pods
	// and partner).
	Network string
	// Kubelet: the real-node mode. NatdImage is natd's image archive (make image),
	// PauseImage the lab's pause image archive.
	Kubelet    bool
	NatdImage  string
	PauseImage string
	Out        io.Writer
}

// Up builds the lab. On failure it leaves what it made recorded in the ledger for Down.
func Up(ctx context.Context, o Options) (*Topology, error) {
	if o.Nodes < 1 || o.Nodes > 200 {
		return nil, fmt.Errorf("--nodes must be between 1 and 200")
	}
	switch o.ProxyMode {
	case "":
		o.ProxyMode = ProxyModeNFTables
	case ProxyModeNFTables, ProxyModeIPTables:
	default:
		return nil, fmt.Errorf("--proxy-mode must be %s or %s", ProxyModeNFTables, ProxyModeIPTables)
	}
	switch o.Network {
	case "":
		o.Network = NetworkFlat
	case NetworkFlat, NetworkDual, NetworkOverlay:
	case NetworkRouted:
		if err := checkRoutedTools(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("--network must be %s, %s, %s or %s", NetworkFlat, NetworkDual, NetworkOverlay, NetworkRouted)
	}
	if o.Kubelet {
		if o.Network != NetworkFlat {
			return nil, fmt.Errorf("--kubelet runs on the flat network only (so far)")
		}
		if err := checkRealNodeTools(o); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(filepath.Join(o.Dir, "lab-ledger.json")); err == nil {
		return nil, fmt.Errorf("a lab already exists in %s; run natd-lab down first", o.Dir)
	}
	for _, b := range []string{o.Natd, o.Self, filepath.Join(o.KubeBins, "etcd"), filepath.Join(o.KubeBins, "kube-apiserver"),
		filepath.Join(o.KubeBins, "kube-proxy")} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("missing %s (make build kube-bins builds it): %w", b, err)
		}
	}
	if out, err := Run("ip", "-o", "addr", "show", "to", "198.18.1.0/30"); err != nil || strings.TrimSpace(out) != "" {
		return nil, fmt.Errorf("the host already has an address in 198.18.1.0/30, which the lab needs for its API link: %s", out)
	}
	created := false
	if _, err := os.Stat(o.Dir); errors.Is(err, os.ErrNotExist) {
		created = true
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return nil, err
	}
	l, _ := loadLedger(dir)
	l.CreatedDir = created
	if err := l.save(); err != nil {
		return nil, err
	}
	u := &upper{o: o, dir: dir, l: l}
	return u.up(ctx)
}

type upper struct {
	o   Options
	dir string
	l   *ledger
	pki *pki
}

func (u *upper) say(format string, args ...any) {
	if u.o.Out != nil {
		fmt.Fprintf(u.o.Out, "  • "+format+"\n", args...)
	}
}

func (u *upper) up(ctx context.Context) (*Topology, error) {
	t := &Topology{NatdArgs: u.o.NatdArgs,
		Kubeconfig: filepath.Join(u.dir, "kubeconfig"), NodeCIDR: NodeCIDR, EgressCIDR: EgressCIDR,
		ClusterCIDR: ClusterCIDR, ServiceCIDR: ServiceCIDR,
		Partner: Partner{Netns: nsPartner, IP: PartnerIP, Port: PartnerPort},
		Router:  Router{Netns: nsRouter},
		API: API{Netns: nsAPI, Server: "https://" + apiHostIP + ":6443", NatdBinary: u.o.Natd,
			KubectlBinary: filepath.Join(u.o.KubeBins, "kubectl"), APIServerLog: filepath.Join(u.dir, "kube-apiserver.log"),
			KubeProxyBinary: filepath.Join(u.o.KubeBins, "kube-proxy")},
		ProxyMode: u.o.ProxyMode,
		Network:   u.o.Network,
		Kubelet:   u.o.Kubelet,
	}
	if t.IPv6() {
		t.NodeCIDR6, t.EgressCIDR6, t.ClusterCIDR6, t.ServiceCIDR6 = NodeCIDR6, EgressCIDR6, ClusterCIDR6, ServiceCIDR6
		t.Partner.IP6 = PartnerIP6
		if t.Network == NetworkRouted {
			t.NodeCIDR6 = routedNodes6
		}
	}
	if t.Network == NetworkRouted {
		t.NodeCIDR = routedSubnet(1)
	}
	for i := 1; i <= u.o.Nodes; i++ {
		name := fmt.Sprintf("node%d", i)
		ip := NodeIP(i)
		if t.Network == NetworkRouted {
			ip = RoutedNodeIP(i)
		}
		n := Node{Name: name, Netns: "natd-" + name, IP: ip,
			PodCIDR: fmt.Sprintf("10.244.%d.0/24", i),
			// node1 is a plain worker; every other node may hold egress IPs.
			Egress:       i != 1 || u.o.Nodes == 1,
			NatdLog:      filepath.Join(u.dir, "natd-"+name+".log"),
			KubeProxyLog: filepath.Join(u.dir, "kube-proxy-"+name+".log")}
		if t.IPv6() {
			n.IP6, n.PodCIDR6 = NodeIP6(i), PodCIDR6(i)
			if t.Network == NetworkRouted {
				n.IP6 = RoutedNodeIP6(i)
			}
		}
		t.Nodes = append(t.Nodes, n)
	}
	u.say("%s network: router, partner, API server namespace", t.Network)
	if err := u.network(t); err != nil {
		return nil, err
	}
	u.say("CNI: %s", strings.Join(t.CNI.Plugins, " → "))
	u.say("certificates and kubeconfigs")
	if err := u.credentials(t); err != nil {
		return nil, err
	}
	if t.Kubelet {
		if err := u.realNodeCredentials(t); err != nil {
			return nil, err
		}
	}
	u.say("etcd and kube-apiserver")
	if err := u.controlPlane(ctx, t); err != nil {
		return nil, err
	}
	if t.Kubelet {
		u.say("kube-controller-manager and kube-scheduler")
		if err := u.controllers(t); err != nil {
			return nil, err
		}
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return nil, err
	}
	u.say("manifests (CRD, RBAC, ServiceAccount), agent tokens and Node objects")
	if err := applyManifests(ctx, t); err != nil {
		return nil, err
	}
	if err := u.agentKubeconfigs(ctx, client, t); err != nil {
		return nil, err
	}
	if err := u.objects(ctx, client, t); err != nil {
		return nil, err
	}
	u.say("kube-proxy (%s mode) on every node", t.ProxyMode)
	if err := u.kubeProxyCredentials(ctx, client); err != nil {
		return nil, err
	}
	proxyStart := time.Now()
	if err := u.startKubeProxies(t); err != nil {
		return nil, err
	}
	partnerArgs := []string{"partner", "--listen", fmt.Sprintf("0.0.0.0:%d", PartnerPort)}
	if t.IPv6() {
		u.say("partner server on %s:%d and [%s]:%d", PartnerIP, PartnerPort, PartnerIP6, PartnerPort)
		partnerArgs = append(partnerArgs, "--listen", fmt.Sprintf("[::]:%d", PartnerPort))
	} else {
		u.say("partner server on %s:%d", PartnerIP, PartnerPort)
	}
	pid, err := u.start(nsPartner, u.o.Self, filepath.Join(u.dir, "partner.log"), partnerArgs...)
	if err != nil {
		return nil, err
	}
	t.Partner.Pid = pid
	if t.Kubelet {
		u.say("containerd and kubelet on every node, then natd's DaemonSet")
		if err := u.realNodes(ctx, client, t); err != nil {
			_ = t.Save(u.dir)
			return nil, err
		}
	}
	for i := range t.Nodes {
		if t.Kubelet {
			break
		}
		n := &t.Nodes[i]
		u.say("natd on %s", n.Name)
		if n.NatdPid, err = StartNatd(u.dir, t, n, nil); err != nil {
			return nil, err
		}
		if err := u.l.addPid(n.NatdPid, t.API.NatdBinary); err != nil {
			return nil, err
		}
	}
	if err := t.Save(u.dir); err != nil {
		return nil, err
	}
	for i := range t.Nodes {
		if err := WaitNatdReady(ctx, &t.Nodes[i], 60*time.Second); err != nil {
			return nil, err
		}
	}
	waitStart := time.Now()
	for i := range t.Nodes {
		if err := WaitKubeProxyHealthy(ctx, &t.Nodes[i], 60*time.Second); err != nil {
			return nil, err
		}
	}
	u.say("kube-proxy healthy on %d nodes %.1fs after its start (up waited %.1fs more for it)",
		len(t.Nodes), time.Since(proxyStart).Seconds(), time.Since(waitStart).Seconds())
	return t, nil
}

func (u *upper) netns(name string) error {
	if err := u.l.addNetns(name); err != nil {
		return err
	}
	if _, err := Run("ip", "netns", "add", name); err != nil {
		return err
	}
	if u.o.Network == NetworkDual {
		// No duplicate address detection: an IPv6 address works the moment it is added
		// (every address the lab adds is unique), link-local ones included.
		if err := u.cmds(name, "sysctl -qw net.ipv6.conf.all.accept_dad=0", "sysctl -qw net.ipv6.conf.default.accept_dad=0"); err != nil {
			return err
		}
	}
	_, err := NsRun(name, "ip", "link", "set", "lo", "up")
	return err
}

func (u *upper) cmds(ns string, cmds ...string) error {
	for _, c := range cmds {
		if _, err := NsRun(ns, strings.Fields(c)...); err != nil {
			return err
		}
	}
	return nil
}

func (u *upper) network(t *Topology) error {
	for _, ns := range []string{nsRouter, nsPartner, nsAPI} {
		if err := u.netns(ns); err != nil {
			return err
		}
	}
	// The router bridges the node network and routes to the partner network. It never
	// NATs: a source address that arrives at the partner is the one a node sent.
	if err := u.cmds(nsRouter,
		"ip link add br0 type bridge", "ip link set br0 up",
		"ip addr add "+routerNodeIP+"/24 dev br0",
		"ip link add eth-partner type veth peer name eth0 netns "+nsPartner,
		"ip addr add "+routerPartnerIP+"/24 dev eth-partner", "ip link set eth-partner up",
		"sysctl -qw net.ipv4.ip_forward=1",
	); err != nil {
		return err
	}
	if err := u.cmds(nsPartner,
		"ip addr add "+PartnerIP+"/24 dev eth0", "ip link set eth0 up",
		"ip route add default via "+routerPartnerIP,
	); err != nil {
		return err
	}
	if t.IPv6() {
		// The same for IPv6: the router forwards between the node network (routed:
		// the nodes' subnets, addressed per port) and the partner's, and never NATs.
		cmds := []string{"ip -6 addr add " + routerPartnerIP6 + "/64 dev eth-partner nodad",
			"sysctl -qw net.ipv6.conf.all.forwarding=1",
			// A port set down and up again (an uplink cut) keeps its IPv6 address, as
			// it keeps its IPv4 one; Linux would flush it.
			"sysctl -qw net.ipv6.conf.all.keep_addr_on_down=1", "sysctl -qw net.ipv6.conf.default.keep_addr_on_down=1"}
		if t.Network != NetworkRouted {
			cmds = append(cmds, "ip -6 addr add "+routerNodeIP6+"/64 dev br0 nodad")
		}
		if err := u.cmds(nsRouter, cmds...); err != nil {
			return err
		}
		if err := u.cmds(nsPartner,
			"ip -6 addr add "+PartnerIP6+"/64 dev eth0 nodad",
			"ip -6 route add default via "+routerPartnerIP6,
		); err != nil {
			return err
		}
	}
	if t.Network == NetworkOverlay {
		if err := u.sourceCheck(t); err != nil {
			return err
		}
	}
	// The API server sits on the node network (for the agents) and has one link to the
	// host (for kubectl and the tests): the only thing the lab adds to the host.
	if err := u.cmds(nsRouter,
		"ip link add api-eth0 type veth peer name eth0 netns "+nsAPI,
		"ip link set api-eth0 master br0", "ip link set api-eth0 up"); err != nil {
		return err
	}
	u.l.HostLinks = append(u.l.HostLinks, hostLink)
	if err := u.l.save(); err != nil {
		return err
	}
	if _, err := Run("ip", "link", "add", hostLink, "type", "veth", "peer", "name", "eth1", "netns", nsAPI); err != nil {
		return err
	}
	if _, err := Run("ip", "addr", "add", hostLinkIP+"/30", "dev", hostLink); err != nil {
		return err
	}
	if _, err := Run("ip", "link", "set", hostLink, "up"); err != nil {
		return err
	}
	if err := u.cmds(nsAPI,
		"ip addr add "+apiNodeIP+"/24 dev eth0", "ip link set eth0 up",
		"ip addr add "+apiHostIP+"/30 dev eth1", "ip link set eth1 up"); err != nil {
		return err
	}
	if t.Network == NetworkRouted {
		// The nodes' subnets are behind the router.
		if err := u.cmds(nsAPI, "ip route add "+routedNodes+" via "+routerNodeIP); err != nil {
			return err
		}
	}
	for i := range t.Nodes {
		if err := u.node(t, i); err != nil {
			return err
		}
	}
	if t.Network == NetworkRouted {
		if err := u.startBIRD(t); err != nil {
			return err
		}
	}
	if t.Kubelet {
		for i := range t.Nodes {
			if err := u.realNodeCNI(t, &t.Nodes[i]); err != nil {
				return err
			}
		}
		t.CNI = CNI{BinDirs: []string{"/opt/cni/bin"}, Plugins: []string{"bridge"}}
		return nil
	}
	return u.setupCNI(t)
}

// node builds one node: uplink to the router's bridge, a cni0 bridge for its pods (the
// CNI chain's bridge plugin attaches pods to it), host-gateway routes to the other
// nodes' pods, and the CNI's masquerade rule.
func (u *upper) node(t *Topology, i int) error {
	n := t.Nodes[i]
	if err := u.netns(n.Netns); err != nil {
		return err
	}
	port := fmt.Sprintf("n%d", i+1)
	gateway, gateway6 := routerNodeIP, routerNodeIP6
	if t.Network == NetworkRouted {
		// A subnet of its own: the router routes between the nodes, and to each
		// node's pods (as a fabric that learned them, or a CNI announcing them).
		gateway, gateway6 = routedGateway(i+1), routedGateway6(i+1)
		if err := u.cmds(nsRouter,
			"ip link add "+port+" type veth peer name eth0 netns "+n.Netns,
			"ip addr add "+gateway+"/24 dev "+port, "ip link set "+port+" up",
			"ip route add "+n.PodCIDR+" via "+n.IP,
			"ip -6 addr add "+gateway6+"/64 dev "+port+" nodad",
			"ip -6 route add "+n.PodCIDR6+" via "+n.IP6); err != nil {
			return err
		}
	} else if err := u.cmds(nsRouter,
		"ip link add "+port+" type veth peer name eth0 netns "+n.Netns,
		"ip link set "+port+" master br0", "ip link set "+port+" up"); err != nil {
		return err
	}
	gw := strings.TrimSuffix(n.PodCIDR, "0/24") + "1"
	cmds := []string{
		"ip addr add " + n.IP + "/24 dev eth0", "ip link set eth0 up",
		"ip route add default via " + gateway,
		// A bridge without a MAC of its own takes the lowest MAC of its ports, so it
		// would change as pods come and go and strand the pods' ARP entries for their
		// gateway; CNIs' bridges fix theirs the same way.
		fmt.Sprintf("ip link add cni0 address 02:00:00:00:%02x:01 type bridge", i+1),
		"ip addr add " + gw + "/24 dev cni0", "ip link set cni0 up",
		"sysctl -qw net.ipv4.ip_forward=1",
		// As many distributions ship it: strict reverse path filtering on the uplink.
		"sysctl -qw net.ipv4.conf.all.rp_filter=1", "sysctl -qw net.ipv4.conf.eth0.rp_filter=1",
	}
	if t.Network == NetworkOverlay {
		cmds = append(cmds, overlayCmds(t, i)...)
	} else if t.Network != NetworkRouted { // routed: other nodes' pods through the router
		for j, other := range t.Nodes {
			if j != i {
				cmds = append(cmds, "ip route add "+other.PodCIDR+" via "+other.IP)
			}
		}
	}
	if t.IPv6() {
		cmds = append(cmds,
			"ip -6 addr add "+n.IP6+"/64 dev eth0 nodad",
			"ip -6 route add default via "+gateway6,
			"ip -6 addr add "+podGateway6(n.PodCIDR6)+"/64 dev cni0 nodad",
			"sysctl -qw net.ipv6.conf.all.forwarding=1")
		for j, other := range t.Nodes {
			if j != i && t.Network != NetworkRouted {
				cmds = append(cmds, "ip -6 route add "+other.PodCIDR6+" via "+other.IP6)
			}
		}
	}
	if err := u.cmds(n.Netns, cmds...); err != nil {
		return err
	}
	// The CNI's masquerade, as ip-masq-agent or flannel install it: pod traffic to
	// anything outside the cluster and node networks leaves with the node's IP; in the
	// dual mode the same for IPv6 with the node's IPv6 address.
	// An overlay CNI masquerades pod traffic to node addresses too (flannel does): the
	// underlay would drop a pod's address.
	nodeCIDR := NodeCIDR
	switch t.Network {
	case NetworkOverlay:
		nodeCIDR = ""
	case NetworkRouted:
		nodeCIDR = routedNodes
	}
	return InNetns(n.Netns, func() error {
		if err := masquerade(iptables.ProtocolIPv4, ClusterCIDR, nodeCIDR); err != nil {
			return err
		}
		if t.IPv6() {
			return masquerade(iptables.ProtocolIPv6, ClusterCIDR6, t.NodeCIDR6)
		}
		return nil
	})
}

// The overlay mode's CNI, as flannel's VXLAN backend builds it: a VXLAN device per node
// (VNI 1, UDP 8472) whose address is the first of its pod CIDR; each other node's pod
// CIDR routes through it via that node's first pod address, with a permanent neighbour
// entry (the node's VTEP MAC) and a forwarding entry (that MAC → the node's IP).
const overlayDevice = "flannel.1"

func vtepMAC(i int) string { return fmt.Sprintf("02:aa:00:00:00:%02x", i+1) }

func overlayCmds(t *Topology, i int) []string {
	n := t.Nodes[i]
	first := func(cidr string) string { return netip.MustParsePrefix(cidr).Addr().String() }
	cmds := []string{
		"ip link add " + overlayDevice + " type vxlan id 1 dstport 8472 local " + n.IP + " dev eth0 nolearning",
		"ip link set " + overlayDevice + " address " + vtepMAC(i) + " mtu 1450 up",
		"ip addr add " + first(n.PodCIDR) + "/32 dev " + overlayDevice,
	}
	for j, other := range t.Nodes {
		if j == i {
			continue
		}
		cmds = append(cmds,
			"ip route add "+other.PodCIDR+" via "+first(other.PodCIDR)+" dev "+overlayDevice+" onlink",
			"ip neigh replace "+first(other.PodCIDR)+" lladdr "+vtepMAC(j)+" dev "+overlayDevice+" nud permanent",
			"bridge fdb append "+vtepMAC(j)+" dev "+overlayDevice+" dst "+other.IP+" self permanent")
	}
	return cmds
}

// sourceCheck makes the router's bridge drop every IPv4 frame from a node whose source
// is neither that node's IP nor in the egress CIDR, as a cloud's source/destination
// check or port security does: pod addresses never cross the node network.
func (u *upper) sourceCheck(t *Topology) error {
	var rules []string
	for i, n := range t.Nodes {
		rules = append(rules, fmt.Sprintf("nft add rule bridge lab source_check iifname n%d ether type ip ip saddr != { %s, %s } counter drop",
			i+1, n.IP, EgressCIDR))
	}
	return u.cmds(nsRouter, append([]string{
		"nft add table bridge lab",
		"nft add chain bridge lab source_check { type filter hook prerouting priority 0 ; }",
	}, rules...)...)
}

// masquerade installs the lab CNI's LAB-CNI-MASQ chain for one family: traffic of
// pods (clusterCIDR) to anything but pods and nodes (nodeCIDR, unless empty) is
// masqueraded.
func masquerade(family iptables.Protocol, clusterCIDR, nodeCIDR string) error {
	ipt, err := iptables.NewWithProtocol(family)
	if err != nil {
		return err
	}
	if err := ipt.NewChain("nat", "LAB-CNI-MASQ"); err != nil {
		return err
	}
	rules := [][]string{{"-d", clusterCIDR, "-j", "RETURN"}}
	if nodeCIDR != "" {
		rules = append(rules, []string{"-d", nodeCIDR, "-j", "RETURN"})
	}
	for _, r := range append(rules, []string{"-j", "MASQUERADE"}) {
		if err := ipt.Append("nat", "LAB-CNI-MASQ", r...); err != nil {
			return err
		}
	}
	return ipt.Append("nat", "POSTROUTING", "-s", clusterCIDR, "-j", "LAB-CNI-MASQ")
}

// podGateway6 is the first address of an IPv6 pod range: the pods' gateway on cni0.
func podGateway6(podCIDR6 string) string {
	return netip.MustParsePrefix(podCIDR6).Addr().Next().String()
}

func (u *upper) credentials(t *Topology) error {
	p, err := newPKI(filepath.Join(u.dir, "pki"))
	if err != nil {
		return err
	}
	u.pki = p
	if err := p.serviceAccountKey(); err != nil {
		return err
	}
	if _, _, err := p.issue("apiserver", "kube-apiserver", nil,
		[]net.IP{net.ParseIP(apiNodeIP), net.ParseIP(apiHostIP), net.ParseIP("10.96.0.1"), net.ParseIP("127.0.0.1")},
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"}); err != nil {
		return err
	}
	// The gossip key the agents share (a Secret in a real deployment).
	gk := make([]byte, 32)
	if _, err := rand.Read(gk); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(u.dir, "gossip.key"), []byte(base64.StdEncoding.EncodeToString(gk)+"\n"), 0o600); err != nil {
		return err
	}
	cert, key, err := p.issue("admin", "natd-lab-admin", []string{"system:masters"}, nil, nil)
	if err != nil {
		return err
	}
	return writeKubeconfig(t.Kubeconfig, "https://"+apiHostIP+":6443", p.caPEM,
		&clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key})
}

func writeKubeconfig(path, server string, ca []byte, user *clientcmdapi.AuthInfo) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["natd-lab"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["user"] = user
	cfg.Contexts["natd-lab"] = &clientcmdapi.Context{Cluster: "natd-lab", AuthInfo: "user"}
	cfg.CurrentContext = "natd-lab"
	return clientcmd.WriteToFile(*cfg, path)
}

// start runs a long-lived process inside a network namespace, detached from natd-lab,
// logging to logPath, and records its PID in the ledger.
func (u *upper) start(ns, bin, logPath string, args ...string) (int, error) {
	pid, err := startIn(ns, bin, logPath, args...)
	if err != nil {
		return 0, err
	}
	return pid, u.l.addPid(pid, bin)
}

func startIn(ns, bin, logPath string, args ...string) (int, error) {
	return startProcess(logPath, append([]string{"ip", "netns", "exec", ns, bin}, args...)...)
}

// startProcess runs argv detached from natd-lab, logging to logPath.
func startProcess(logPath string, argv ...string) (int, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("starting %s: %w", strings.Join(argv, " "), err)
	}
	pid := cmd.Process.Pid
	// Reap it when it exits while natd-lab still runs; after that, init does.
	go cmd.Wait()
	return pid, nil
}

func (u *upper) controlPlane(ctx context.Context, t *Topology) error {
	bins := u.o.KubeBins
	pid, err := u.start(nsAPI, filepath.Join(bins, "etcd"), filepath.Join(u.dir, "etcd.log"),
		"--data-dir", filepath.Join(u.dir, "etcd"), "--name", "natd-lab",
		"--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "natd-lab=http://127.0.0.1:2380", "--unsafe-no-fsync")
	if err != nil {
		return err
	}
	t.API.EtcdPid = pid
	pki := filepath.Join(u.dir, "pki")
	args := []string{"--etcd-servers", "http://127.0.0.1:2379",
		"--bind-address", "0.0.0.0", "--secure-port", "6443", "--advertise-address", apiNodeIP,
		"--tls-cert-file", filepath.Join(pki, "apiserver.crt"), "--tls-private-key-file", filepath.Join(pki, "apiserver.key"),
		"--client-ca-file", filepath.Join(pki, "ca.crt"),
		"--service-account-key-file", filepath.Join(pki, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(pki, "sa.key"),
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-cluster-ip-range", ServiceCIDR,
		"--authorization-mode", "Node,RBAC",
	}
	if !t.Kubelet {
		// No controller-manager runs to create default ServiceAccounts.
		args = append(args, "--disable-admission-plugins", "ServiceAccount")
	}
	pid, err = u.start(nsAPI, filepath.Join(bins, "kube-apiserver"), t.API.APIServerLog, args...)
	if err != nil {
		return err
	}
	t.API.APIServerPid = pid
	return WaitAPIReady(ctx, t.Kubeconfig, 90*time.Second)
}

// Client returns a client for the lab's API server.
func Client(kubeconfig string) (*kubernetes.Clientset, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	rc.QPS, rc.Burst = 200, 400
	return kubernetes.NewForConfig(rc)
}

// WaitAPIReady waits until the API server answers /readyz.
func WaitAPIReady(ctx context.Context, kubeconfig string, timeout time.Duration) error {
	client, err := Client(kubeconfig)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		_, last = client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(rctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
		}
	}
	return fmt.Errorf("API server not ready after %s: %w", timeout, last)
}

func (u *upper) objects(ctx context.Context, client kubernetes.Interface, t *Topology) error {
	for _, n := range t.Nodes {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{"kubernetes.io/hostname": n.Name}},
			Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR, PodCIDRs: []string{n.PodCIDR}},
		}
		addrs := []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.IP}}
		if n.IP6 != "" {
			// Dual-stack, IPv4 first, as the node IPAM controller and the kubelet do.
			node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, n.PodCIDR6)
			addrs = append(addrs, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: n.IP6})
		}
		if n.Egress {
			node.Labels["egress.natd.dev/node"] = "true"
		}
		created, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		if t.Kubelet {
			continue // the kubelet registers onto it and reports its status
		}
		now := metav1.Now()
		created.Status = corev1.NodeStatus{
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue,
				Reason: "KubeletReady", Message: "natd lab node", LastHeartbeatTime: now, LastTransitionTime: now}},
			Addresses: append(addrs, corev1.NodeAddress{Type: corev1.NodeHostName, Address: n.Name}),
		}
		if _, err := client.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	return nil
}

// applyManifests installs what the manifests say natd needs besides the DaemonSet (its
// namespace, the EgressIP CRD, the ClusterRole, the ServiceAccount and its binding) with
// kubectl (server-side apply), and waits until the API server serves the CRD.
func applyManifests(ctx context.Context, t *Topology) error {
	dir, err := os.MkdirTemp("", "natd-manifests-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	kubectl := []string{"--kubeconfig", t.Kubeconfig, "apply", "--server-side", "--field-manager", "natd-lab"}
	for i, doc := range [][]byte{manifests.Namespace, manifests.EgressIPCRD, manifests.ClusterRole, manifests.ServiceAccount} {
		f := filepath.Join(dir, fmt.Sprintf("%d.yaml", i))
		if err := os.WriteFile(f, doc, 0o600); err != nil {
			return err
		}
		kubectl = append(kubectl, "-f", f)
	}
	if out, err := Run(t.API.KubectlBinary, kubectl...); err != nil {
		return fmt.Errorf("applying manifests: %w\n%s", err, out)
	}
	_, err = Run(t.API.KubectlBinary, "--kubeconfig", t.Kubeconfig, "wait", "--for", "condition=Established", "--timeout", "60s",
		"crd/egressips.egress.natd.dev")
	return err
}

// agentKubeconfigs gives every agent the manifests' ServiceAccount, as the DaemonSet
// would: a token from the TokenRequest API, so the lab proves that the ClusterRole
// grants everything natd calls.
func (u *upper) agentKubeconfigs(ctx context.Context, client kubernetes.Interface, t *Topology) error {
	for _, n := range t.Nodes {
		tr, err := client.CoreV1().ServiceAccounts(ServiceAccountNamespace).CreateToken(ctx, ServiceAccountName,
			&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To(int64(30 * 24 * 3600))}},
			metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("requesting a token for natd's ServiceAccount: %w", err)
		}
		if err := writeKubeconfig(filepath.Join(u.dir, n.Name+".kubeconfig"), "https://"+apiNodeIP+":6443", u.pki.caPEM,
			&clientcmdapi.AuthInfo{Token: tr.Status.Token}); err != nil {
			return err
		}
	}
	return nil
}

// StartNatd starts natd for node n inside its namespace and returns its PID.
func StartNatd(dir string, t *Topology, n *Node, extra []string) (int, error) {
	args := []string{
		"--node-name", n.Name, "--kubeconfig", filepath.Join(dir, n.Name+".kubeconfig"),
		"--egress-cidr", EgressCIDR, "--cluster-cidr", ClusterCIDR, "--service-cidr", ServiceCIDR,
		"--state-dir", NatdStateDir(dir, n.Name), "--resync-period", "10s", "-v", "2",
		"--gossip-key-file", filepath.Join(dir, "gossip.key"),
	}
	if t.IPv6() {
		// A dual-stack cluster's IPv6 pod and service CIDRs (destinations pinned pods
		// reach with their own address) and its IPv6 egress IPs.
		args = append(args, "--cluster-cidr", t.ClusterCIDR6, "--service-cidr", t.ServiceCIDR6, "--egress-cidr", t.EgressCIDR6)
	}
	if t.Network == NetworkRouted {
		args = append(args, routedNatdArgs(t, n)...)
	}
	// NODE_IP as the DaemonSet sets it (status.hostIP): /metrics listens on the node IP
	// and loopback only.
	env := []string{"NODE_IP=" + n.IP, t.API.NatdBinary}
	args = append(append(args, t.NatdArgs...), extra...)
	return startIn(n.Netns, "env", n.NatdLog, append(env, args...)...)
}

// WaitNatdReady waits until the node's natd answers /readyz (its first sync is done).
func WaitNatdReady(ctx context.Context, n *Node, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if ready(ctx, n) {
			return nil
		}
		if n.NatdPid > 0 && !Alive(n.NatdPid) { // the real-node mode's kubelet restarts it
			return fmt.Errorf("natd on %s exited; see %s", n.Name, n.NatdLog)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("natd on %s not ready after %s; see %s", n.Name, timeout, n.NatdLog)
}

func ready(ctx context.Context, n *Node) bool {
	code, err := httpGetIn(ctx, n.Netns, "127.0.0.1:9793", "/readyz")
	return err == nil && code == 200
}

// Alive reports whether pid is a running (not zombie) process.
func Alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] != 'Z'
}
