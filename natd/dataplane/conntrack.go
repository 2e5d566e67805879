package dataplane

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// A connection's NAT binding is decided by its first packet and kept by conntrack.
// When an egress IP moves, bindings made under the old assignment would keep steering
// the connection's later packets wrongly: a node that forwarded a pinned flow to the
// old holder (an identity binding) and now holds the IP itself would go on sending that
// flow un-SNATed (the leak guard drops it, forever, as long as the flow lives); an old
// holder would go on SNATing flows that must now go to the new holder. So when this
// node takes or gives up an IP, the affected entries are deleted, and the flows' next
// packets are NATed anew under the current rules.

// staleFlows matches the conntrack entries to delete after a change of holders or of
// pods' pinning.
type staleFlows struct {
	// pinnedTo maps pinned pod IPs of IPs this node just took to that egress IP:
	// their entries not SNATed to it are stale.
	pinnedTo map[netip.Addr]netip.Addr
	// released are egress IPs this node gave up: entries SNATed to them are stale.
	released map[netip.Addr]bool
	// taken are egress IPs this node just took: an entry whose original direction
	// goes to one of them is stale. An egress IP is a source only; such an entry is a
	// partner's segment this node forwarded while it did not hold the IP (the router
	// still sent the IP here: a holder taking it back after a short quorum break).
	// Loose TCP tracking makes it an established connection for days, and it holds
	// the very tuple the pod's connection needs: conntrack would SNAT the pod's next
	// packet to another port and the partner reset it (1 of 4 long-lived connections
	// in a one-minute soak).
	taken map[netip.Addr]bool
	// repinned are pod IPs whose classification changed (pinned, unpinned, or pinned
	// to another egress IP): every entry they opened was NATed under the old one.
	repinned map[netip.Addr]bool
	// relayedBit, when set, is the pinned-connection bit of the conntrack mark: after
	// a takeover, other nodes' pinned flows this node passed on un-NATed (through the
	// tunnel, while it thought another node held their IP) are stale too.
	relayedBit uint32
	local      []netip.Prefix // this node's pod CIDRs (both families)
}

func (s *staleFlows) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
	src = src.Unmap()
	if s.repinned[src] {
		return true
	}
	dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
	if s.taken[dst.Unmap()] {
		return true
	}
	natted, _ := netip.AddrFromSlice(f.Reverse.DstIP) // the source replies go back to
	natted = natted.Unmap()
	if s.released[natted] {
		return true
	}
	if eip, ok := s.pinnedTo[src]; ok && natted != eip {
		return true
	}
	if s.relayedBit != 0 && f.Mark&s.relayedBit != 0 && natted == src && !slices.ContainsFunc(s.local, func(p netip.Prefix) bool { return p.Contains(src) }) {
		return true
	}
	return false
}

// flushStaleFlows deletes conntrack entries made stale by IPs this node took (taken)
// or gave up (released), and those of pods whose classification changed (repinned).
func (d *Dataplane) flushStaleFlows(state State, taken, released []netip.Addr, repinned map[netip.Addr]bool) error {
	if len(taken) == 0 && len(released) == 0 && len(repinned) == 0 {
		return nil
	}
	s := &staleFlows{pinnedTo: map[netip.Addr]netip.Addr{}, released: map[netip.Addr]bool{}, taken: map[netip.Addr]bool{},
		repinned: repinned, local: state.LocalPodCIDRs}
	if len(taken) > 0 {
		s.relayedBit = d.cfg.Marks.PinnedFlow()
	}
	for _, ip := range released {
		s.released[ip] = true
	}
	for _, ip := range taken {
		s.taken[ip] = true
		if i := egressIndex(state.Egress, ip); i >= 0 {
			for _, p := range state.Egress[i].Pods {
				s.pinnedTo[p] = ip
			}
		}
	}
	families := []netlink.InetFamily{unix.AF_INET}
	any6 := slices.ContainsFunc(taken, netip.Addr.Is6) || slices.ContainsFunc(released, netip.Addr.Is6)
	for ip := range repinned {
		any6 = any6 || ip.Is6()
	}
	if any6 {
		families = append(families, unix.AF_INET6)
	}
	for _, fam := range families {
		n, err := d.nl.ConntrackDeleteFilters(netlink.ConntrackTable, fam, s)
		if err != nil {
			return fmt.Errorf("deleting stale conntrack entries: %w", err)
		}
		if n > 0 {
			klog.V(2).InfoS("Deleted stale conntrack entries", "entries", n, "taken", taken, "released", released, "repinned", len(repinned))
		}
	}
	return nil
}
