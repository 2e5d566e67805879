// Package dataplane programs a node's kernel for natd: its nftables tables (marks,
// SNAT, fail-closed drops, the leak guard, the IPv6 drop of pinned pods), policy
// routing (ip rules and one route table per egress IP), the egress IPs this node holds
// on its uplink, and the node-local pod records natd's CNI plugin shares with it.
//
// Its input is State, a complete description of what the node must do; Apply converges
// the kernel to it. Everything here is level-triggered: Apply may be called any number
// of times with the same State and changes nothing the second time.
package dataplane

import (
	"net/netip"
	"strings"
	"time"
)

// State is everything one node's kernel must reflect. It is a pure value: build it,
// hand it to Apply.
type State struct {
	// LeaseUntil is when the leases of held IPs must run out, whatever time the Apply
	// takes: the moment the agent last saw the quorum that lets it hold, plus --lease.
	// Zero: --lease from the commit.
	LeaseUntil time.Time
	// NodeIP is this node's own address; the interface that carries it is the uplink
	// where held egress IPs are added and announced.
	NodeIP netip.Addr
	// NodeIP6 is this node's IPv6 address (its IPv6 InternalIP), if it has one: the next
	// hop of its IPv6 egress IPs' BGP announcements.
	NodeIP6 netip.Addr
	// ClusterDestinations are never SNATed: pod and service CIDRs, node IPs, excludes.
	// Either family; IPv6 ones go to the ip6 table.
	ClusterDestinations []netip.Prefix
	// PodCIDRs are the cluster's pod CIDRs (all nodes), either family.
	PodCIDRs []netip.Prefix
	// NodeIPs are the IPv4 addresses of all nodes: the only sources natd's tunnel and
	// gossip ports accept, and next hops into a tunnel.
	NodeIPs []netip.Addr
	// LocalPodCIDRs are this node's pod CIDRs, either family.
	LocalPodCIDRs []netip.Prefix
	// Peers are the other nodes with pod CIDRs: replies to their pods' tunnelled
	// connections go back to them through the reply tunnel.
	Peers []Peer
	// Egress lists every egress IP in use (both families), sorted by IP.
	Egress []EgressIP
	// NoEgress are this node's pinned pods' addresses of a family their namespace has
	// no egress IP in (an IPv6 address of a namespace pinned to an IPv4 egress IP
	// only, or the other way round): their traffic to the outside is dropped, never
	// sent with another source.
	NoEgress []netip.Addr
	// PinnedNamespaces maps every namespace whose annotation is valid to its egress
	// IPs. The CNI plugin pins a new pod by its namespace before natd has seen the pod,
	// from this map as natd last wrote it to the node.
	PinnedNamespaces map[string]NamespaceEgress
	// Handover are NAT bindings the previous holders of egress IPs handed over: an
	// Apply that takes one of those IPs writes its bindings into conntrack first.
	Handover []Binding
}

// NamespaceEgress is a pinned namespace's egress IPs: at most one per family, at least
// one.
type NamespaceEgress struct {
	V4, V6 netip.Addr
}

// For is the egress IP of addr's family, invalid when the namespace has none in it.
func (n NamespaceEgress) For(addr netip.Addr) netip.Addr {
	if addr.Is4() {
		return n.V4
	}
	return n.V6
}

// IPs lists the namespace's egress IPs, IPv4 first.
func (n NamespaceEgress) IPs() []netip.Addr {
	var out []netip.Addr
	for _, ip := range []netip.Addr{n.V4, n.V6} {
		if ip.IsValid() {
			out = append(out, ip)
		}
	}
	return out
}

// String is the annotation's form: "198.18.0.200", "2001:db8::c8" or both, comma
// separated.
func (n NamespaceEgress) String() string {
	var s []string
	for _, ip := range n.IPs() {
		s = append(s, ip.String())
	}
	return strings.Join(s, ",")
}

// Peer is another node: its IPv4 address (the tunnels' outer address) and its pod
// CIDRs of both families.
type Peer struct {
	IP       netip.Addr
	PodCIDRs []netip.Prefix
}

// EgressIP is one egress IP and the pods pinned to it.
type EgressIP struct {
	IP netip.Addr
	// HolderIP is the node IP of the holder; invalid when no node can hold it.
	HolderIP netip.Addr
	// Local is true when this node is the holder.
	Local bool
	// Gen is the generation of this node's claim (Local only); it is kept in the
	// kernel so that a restarted natd knows which claims it had.
	Gen uint32
	// FailOpen lets pinned traffic leave the normal way when there is no holder,
	// instead of dropping it.
	FailOpen bool
	// Pods are this node's pinned pods' addresses of the egress IP's family (any
	// order, each address once across all egress IPs and NoEgress). Other nodes' pods
	// are theirs to classify: their pinned traffic arrives through the egress IP's
	// tunnel device.
	Pods []netip.Addr
	// AnnounceAfter delays the first gratuitous ARP of a planned takeover (Local
	// only): the old holder still serves the IP, and until the other nodes send the
	// IP's traffic here, the partners' replies must keep going to the old holder,
	// which has the connections' bindings.
	AnnounceAfter time.Duration
	// HandingOver is set while this node serves on an IP another node is taking in a
	// planned move (Local only): its connections' TCP tracking is made liberal, so
	// that it un-NATs the partners' replies that acknowledge what the pods sent
	// through the new holder.
	HandingOver bool
}

// HasHolder reports whether some node holds the IP.
func (e EgressIP) HasHolder() bool { return e.Local || e.HolderIP.IsValid() }
