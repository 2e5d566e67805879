// Package dataplane programs a node's kernel for natd: one nftables table (marks, SNAT,
// fail-closed drops, the leak guard), policy routing (ip rules and one route table per
// egress IP) and the egress IPs this node holds on its uplink.
//
// Its input is State, a complete description of what the node must do; Apply converges
// the kernel to it. Everything here is level-triggered: Apply may be called any number
// of times with the same State and changes nothing the second time.
package dataplane

import (
	"net/netip"
)

// State is everything one node's kernel must reflect. It is a pure value: build it,
// hand it to Apply.
type State struct {
	// NodeIP is this node's own address; the interface that carries it is the uplink
	// where held egress IPs are added and announced.
	NodeIP netip.Addr
	// ClusterDestinations are never SNATed: pod and service CIDRs, node IPs, excludes.
	ClusterDestinations []netip.Prefix
	// PodCIDRs are the cluster's pod CIDRs (all nodes).
	PodCIDRs []netip.Prefix
	// NodeIPs are the addresses of all nodes (next hops towards a remote holder).
	NodeIPs []netip.Addr
	// LocalPodCIDRs are this node's pod CIDRs. Traffic from an address in them that
	// natd does not know as a pod yet (KnownLocalPods) is held back from the outside
	// until natd knows whether its namespace is pinned.
	LocalPodCIDRs []netip.Prefix
	// KnownLocalPods are the IPs of the pods on this node natd has seen.
	KnownLocalPods []netip.Addr
	// Egress lists every egress IP in use, sorted by IP.
	Egress []EgressIP
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
	// Pods are the pinned pods' IPs (all nodes, any order): the holder SNATs traffic
	// that other nodes forward to it, so it must know every one of them.
	Pods []netip.Addr
}

// HasHolder reports whether some node holds the IP.
func (e EgressIP) HasHolder() bool { return e.Local || e.HolderIP.IsValid() }
