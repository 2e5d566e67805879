package natd

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"

	corev1 "k8s.io/api/core/v1"

	"natd.dev/natd/natd/dataplane"
)

// HolderChooser decides which candidate node holds each egress IP. The election
// package implements it; every node must get the same answer from the same inputs.
type HolderChooser interface {
	Holders(ips []netip.Addr, candidates []string) map[netip.Addr]string
}

// Cluster is what the planner reads from the API: the listers' current content. Pods
// are read through indexes, so that the cost of a sync grows with the pinned pods and
// this node's pods, not with every pod of the cluster.
type Cluster struct {
	Namespaces []*corev1.Namespace
	Nodes      []*corev1.Node
	// PodsIn lists the pods of a namespace.
	PodsIn func(namespace string) []*podRecord
	// LocalPods are the pods bound to this node.
	LocalPods []*podRecord
}

// Plan is the outcome of one planning pass: the node's kernel state and what the
// agent should tell users.
type Plan struct {
	State dataplane.State
	// Holders maps each egress IP in use to its holder ("" when none).
	Holders map[netip.Addr]string
	// Namespaces maps each egress IP in use to the namespaces pinned to it.
	Namespaces map[netip.Addr][]string
	// Rejected maps namespaces with an invalid annotation to the reason.
	Rejected map[string]*AnnotationError
	// ReadyNodes are the names of all Ready nodes (for choosing who reports).
	ReadyNodes []string
}

// Planner computes Plans. It is a pure function of its inputs.
type Planner struct {
	Config  *Config
	Holders HolderChooser
}

// Plan computes what this node must do. It fails only when this node's own Node object
// or IP is unknown: without them nothing sensible can be programmed.
func (p *Planner) Plan(c Cluster) (*Plan, error) {
	cfg := p.Config
	plan := &Plan{
		Holders:    map[netip.Addr]string{},
		Namespaces: map[netip.Addr][]string{},
		Rejected:   map[string]*AnnotationError{},
	}

	nodeIPs := map[netip.Addr]string{}
	nodeIPOf := map[string]netip.Addr{}
	var candidates []string
	var self *corev1.Node
	for _, n := range c.Nodes {
		ip := internalIP(n)
		for _, a := range n.Status.Addresses {
			if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
				continue
			}
			if addr, err := netip.ParseAddr(a.Address); err == nil && addr.Is4() {
				nodeIPs[addr] = n.Name
			}
		}
		if ip.IsValid() {
			nodeIPOf[n.Name] = ip
		}
		if n.Name == cfg.NodeName {
			self = n
		}
		if isReady(n) && n.DeletionTimestamp == nil {
			plan.ReadyNodes = append(plan.ReadyNodes, n.Name)
			if n.Labels[LabelEgressNode] == "true" && ip.IsValid() {
				candidates = append(candidates, n.Name)
			}
		}
	}
	if self == nil {
		return nil, fmt.Errorf("node %s is not in the API (yet)", cfg.NodeName)
	}
	st := &plan.State
	st.NodeIP = cfg.NodeIP
	if !st.NodeIP.IsValid() {
		st.NodeIP = nodeIPOf[cfg.NodeName]
	}
	if !st.NodeIP.IsValid() {
		return nil, fmt.Errorf("node %s has no IPv4 InternalIP; set --node-ip", cfg.NodeName)
	}
	nodeIPs[st.NodeIP] = cfg.NodeName

	for ip := range nodeIPs {
		st.NodeIPs = append(st.NodeIPs, ip)
		st.ClusterDestinations = append(st.ClusterDestinations, netip.PrefixFrom(ip, 32))
	}
	slices.SortFunc(st.NodeIPs, netip.Addr.Compare)
	st.PodCIDRs = cfg.ClusterCIDRs
	for _, list := range [][]netip.Prefix{cfg.ClusterCIDRs, cfg.ServiceCIDRs, cfg.ExcludeCIDRs} {
		st.ClusterDestinations = append(st.ClusterDestinations, list...)
	}
	slices.SortFunc(st.ClusterDestinations, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	for _, s := range self.Spec.PodCIDRs {
		if pr, err := netip.ParsePrefix(s); err == nil && pr.Addr().Is4() {
			st.LocalPodCIDRs = append(st.LocalPodCIDRs, pr.Masked())
		}
	}
	if len(st.LocalPodCIDRs) == 0 && self.Spec.PodCIDR != "" {
		if pr, err := netip.ParsePrefix(self.Spec.PodCIDR); err == nil && pr.Addr().Is4() {
			st.LocalPodCIDRs = append(st.LocalPodCIDRs, pr.Masked())
		}
	}

	pods := map[netip.Addr][]netip.Addr{}
	for _, ns := range c.Namespaces {
		v, ok := ns.Annotations[AnnotationEgressIP]
		if !ok {
			continue
		}
		ip, aerr := ParseEgressIP(v, cfg.EgressCIDRs, nodeIPs)
		if aerr != nil {
			plan.Rejected[ns.Name] = aerr
			continue
		}
		plan.Namespaces[ip] = append(plan.Namespaces[ip], ns.Name)
		list := pods[ip]
		for _, pod := range c.PodsIn(ns.Name) {
			if !pod.inert {
				list = pod.appendIPs(list)
			}
		}
		pods[ip] = list
	}
	for _, pod := range c.LocalPods {
		if !pod.inert && pod.nodeName == cfg.NodeName {
			st.KnownLocalPods = pod.appendIPs(st.KnownLocalPods)
		}
	}
	slices.SortFunc(st.KnownLocalPods, netip.Addr.Compare)
	st.KnownLocalPods = slices.Compact(st.KnownLocalPods)

	var ips []netip.Addr
	for ip := range plan.Namespaces {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	holders := p.Holders.Holders(ips, candidates)
	for _, ip := range ips {
		sort.Strings(plan.Namespaces[ip])
		// Pods stay in lister order: sorting 50k addresses would cost more than the
		// dataplane's diff, which does not need an order.
		e := dataplane.EgressIP{IP: ip, FailOpen: cfg.FailOpen, Pods: pods[ip]}
		holder := holders[ip]
		plan.Holders[ip] = holder
		if holder != "" {
			e.HolderIP = nodeIPOf[holder]
			e.Local = holder == cfg.NodeName
		}
		st.Egress = append(st.Egress, e)
	}
	sort.Strings(plan.ReadyNodes)
	return plan, nil
}

func internalIP(n *corev1.Node) netip.Addr {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			if ip, err := netip.ParseAddr(a.Address); err == nil && ip.Is4() {
				return ip
			}
		}
	}
	return netip.Addr{}
}

func isReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

