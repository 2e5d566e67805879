package dataplane

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol tags natd's ip rules and routes (rtm_protocol), so that a restarted
// natd and `natd cleanup` find exactly what natd made and nothing else.
const RouteProtocol = 0x4e // 'N'; unassigned in iproute2's rt_protos

// slotRoute is what one egress IP's slot should hold in the kernel: its tunnel device
// (always, so that other nodes' pinned packets arrive wherever this node stands) and,
// when another node holds the IP, a table whose default route sends marked packets
// into the tunnel to that holder. Otherwise the table is empty, so marked packets fall
// through to the main table (held here: SNAT and out the uplink; no holder: dropped by
// nft).
type slotRoute struct {
	idx int
	vni uint32
	via netip.Addr
	v6  bool // an IPv6 egress IP: its rule and routes are IPv6 ones
}

type router struct {
	nl           *netlink.Handle
	marks        Marks
	rulePriority int
	tableBase    int
	tunnelPort   uint16
	inNetns      func(func() error) error
	// noIPv6: the kernel has no IPv6 (ipv6.disable=1). Its pods have no IPv6
	// addresses, so IPv6 slots get no rules, routes or neighbours here (the kernel
	// would refuse them, failing every Apply), and the node holds no IPv6 egress IP
	// (the planner gives those only to nodes with an IPv6 InternalIP).
	noIPv6 bool
}

func (r *router) table(idx int) int { return r.tableBase + idx }

// ruleKey names one of natd's slot rules: its family and table.
type ruleKey struct{ family, table int }

func (r *router) ours(rule netlink.Rule) bool {
	return rule.Priority == r.rulePriority && rule.Table > r.tableBase && rule.Table <= r.tableBase+255
}

// rightMark reports whether one of natd's rules matches the mark and mask of its table's
// slot.
func (r *router) rightMark(ru netlink.Rule) bool {
	return ru.Mark == r.marks.Value(ru.Table-r.tableBase) && ru.Mask != nil && *ru.Mask == r.marks.Mask
}

// channel is one tunnel with its ip rules (mark value idx) and route table (base+idx):
// an egress IP's slot, or the reply tunnel (replyIndex). ensure, intact and prune treat
// them alike.
type channel struct {
	idx      int
	tunnel   tunnelSpec
	families []int                                     // of its ip rules
	peers    []netip.Addr                              // the nodes the tunnel must reach
	routes   func(tunnel netlink.Link) []netlink.Route // what its table must hold
}

// carries6 reports whether the channel carries IPv6 packets.
func (c channel) carries6() bool { return slices.Contains(c.families, unix.AF_INET6) }

// channels lists the slots' channels and, when there is a slot, the reply tunnel's. An
// IPv4 slot has an IPv4 rule, an IPv6 slot an IPv6 one (its tunnel's outer packets are
// IPv4 and take the main table); the reply tunnel has both while an IPv6 egress IP is
// in use.
func (r *router) channels(uplink netlink.Link, nodeIP netip.Addr, slots []slotRoute, peers []Peer) []channel {
	spec := func(name string, vni uint32) tunnelSpec {
		return tunnelSpec{name: name, vni: vni, local: nodeIP, port: r.tunnelPort, mtu: uplink.Attrs().MTU - TunnelOverhead}
	}
	out := make([]channel, 0, len(slots)+1)
	any6 := false
	for _, s := range slots {
		c := channel{idx: s.idx, tunnel: spec(TunnelDevice(s.idx), s.vni), families: []int{unix.AF_INET},
			routes: func(tunnel netlink.Link) []netlink.Route { return r.wantRoutes(s, tunnel) }}
		if s.v6 {
			c.families, any6 = []int{unix.AF_INET6}, true
			if r.noIPv6 {
				c.families = nil
			}
		}
		if s.via.IsValid() {
			c.peers = []netip.Addr{s.via}
		}
		out = append(out, c)
	}
	if len(slots) > 0 {
		c := channel{idx: replyIndex, tunnel: spec(ReplyDevice, ReplyVNI), families: []int{unix.AF_INET},
			routes: func(tunnel netlink.Link) []netlink.Route { return r.wantReplyRoutes(peers, tunnel, any6 && !r.noIPv6) }}
		if any6 && !r.noIPv6 {
			c.families = append(c.families, unix.AF_INET6)
		}
		for _, p := range peers {
			c.peers = append(c.peers, p.IP)
		}
		out = append(out, c)
	}
	return out
}

// wantRoutes is what table idx must hold to send marked packets to via through the
// tunnel: the default route into the tunnel, and for IPv4 a throw route for the holder
// itself, because the encapsulated packet keeps the mark and must reach the holder
// through the main table, not loop into the tunnel. The throw route comes first:
// replaceRoutes adds in this order, and a default route to a new holder without its
// throw route sent the encapsulated packets back into the tunnel, which dropped them
// (TestKernelRepointingTheTunnelLosesNothing).
func (r *router) wantRoutes(s slotRoute, tunnel netlink.Link) []netlink.Route {
	if !s.via.IsValid() || (s.v6 && r.noIPv6) {
		return nil
	}
	if s.v6 {
		return []netlink.Route{{Family: unix.AF_INET6, Table: r.table(s.idx), Dst: defaultDst6(), Type: unix.RTN_UNICAST,
			Gw: TunnelNextHop6(s.via).AsSlice(), LinkIndex: tunnel.Attrs().Index, Protocol: RouteProtocol}}
	}
	return []netlink.Route{
		{Table: r.table(s.idx), Dst: &net.IPNet{IP: s.via.AsSlice(), Mask: net.CIDRMask(32, 32)}, Type: unix.RTN_THROW,
			Protocol: RouteProtocol},
		{Table: r.table(s.idx), Dst: defaultDst(), Type: unix.RTN_UNICAST, Gw: s.via.AsSlice(), LinkIndex: tunnel.Attrs().Index,
			Flags: int(netlink.FLAG_ONLINK), Protocol: RouteProtocol},
	}
}

func defaultDst() *net.IPNet  { return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)} }
func defaultDst6() *net.IPNet { return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)} }

// routeKey identifies a route by what natd sets on it. A default route may come back
// from the kernel without a destination; an IPv6 blackhole or throw route comes back
// with the loopback device, which natd never sets: a route without a next hop is
// keyed without a device.
func routeKey(rt netlink.Route) string {
	dst := "0.0.0.0/0"
	if rt.Family == unix.AF_INET6 {
		dst = "::/0"
	}
	if rt.Dst != nil {
		dst = rt.Dst.String()
	}
	link := rt.LinkIndex
	if rt.Type == unix.RTN_BLACKHOLE || rt.Type == unix.RTN_THROW {
		link = 0
	}
	onlink := rt.Flags&int(netlink.FLAG_ONLINK) != 0
	return fmt.Sprintf("%d %s %d %s %d %v", rt.Table, dst, rt.Type, rt.Gw, link, onlink)
}

func sameRoutes(have, want []netlink.Route) bool {
	if len(have) != len(want) {
		return false
	}
	keys := map[string]bool{}
	for _, rt := range have {
		keys[routeKey(rt)] = true
	}
	for _, rt := range want {
		if !keys[routeKey(rt)] {
			return false
		}
	}
	return true
}

// ensure adds the ip rules, makes each channel's tunnel device, points it at its nodes
// and fills its table. It never removes a slot; prune does that once nftables no longer
// marks packets for it.
func (r *router) ensure(uplink netlink.Link, nodeIP netip.Addr, slots []slotRoute, peers []Peer) error {
	rules, err := r.slotRules()
	if err != nil {
		return err
	}
	have := map[ruleKey]bool{}
	for _, ru := range rules {
		if r.rightMark(ru) {
			have[ruleKey{ru.Family, ru.Table}] = true
			continue
		}
		// natd's rule for the table with another mark (tampered with, or left by a
		// run with another --fwmark-mask): it would never match.
		ru := ru
		if err := r.nl.RuleDel(&ru); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting stale ip rule for table %d: %w", ru.Table, err)
		}
	}
	routes, err := r.routes()
	if err != nil {
		return err
	}
	ts, err := r.readTunnels()
	if err != nil {
		return err
	}
	for _, c := range r.channels(uplink, nodeIP, slots, peers) {
		for _, family := range c.families {
			if have[ruleKey{family, r.table(c.idx)}] {
				continue
			}
			ru := netlink.NewRule()
			ru.Family = family
			ru.Priority = r.rulePriority
			ru.Table = r.table(c.idx)
			ru.Mark = r.marks.Value(c.idx)
			mask := r.marks.Mask
			ru.Mask = &mask
			ru.Protocol = RouteProtocol
			if err := r.nl.RuleAdd(ru); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("adding ip rule for table %d: %w", ru.Table, err)
			}
		}
		tunnel, err := r.ensureTunnel(ts, c.tunnel)
		if err != nil {
			return err
		}
		// The new holder's entries first, then the route to it, and only then the old
		// holder's entries go: a packet routed via the old holder a moment before the
		// route changed still needs its neighbour and forwarding entry. Removed first,
		// such a packet waited in an unresolvable neighbour's queue and was lost
		// (TestKernelRepointingTheTunnelLosesNothing: 45-74 of ~8,500 datagrams in 40
		// moves with the throw route already first; a TCP segment lost so waits for
		// its retransmission, 200 ms or more).
		if err := r.pointTunnel(ts, tunnel, c.peers, c.carries6()); err != nil {
			return err
		}
		if err := r.replaceRoutes(routes[r.table(c.idx)], c.routes(tunnel)); err != nil {
			return fmt.Errorf("filling table %d: %w", r.table(c.idx), err)
		}
		if err := r.unpointTunnel(ts, tunnel, c.peers, c.carries6()); err != nil {
			return err
		}
	}
	return nil
}

// replaceRoutes turns one table's routes cur into want: the new routes first (replace
// re-points a route in place), then whatever is left of the old ones.
func (r *router) replaceRoutes(cur, want []netlink.Route) error {
	if sameRoutes(cur, want) {
		return nil
	}
	keep := map[string]bool{}
	for i := range want {
		if err := r.nl.RouteReplace(&want[i]); err != nil {
			return fmt.Errorf("adding route %s: %w", want[i].Dst, err)
		}
		keep[routeKey(want[i])] = true
	}
	return r.deleteRoutes(cur, keep)
}

// deleteRoutes deletes the routes of list whose key is not in keep.
func (r *router) deleteRoutes(list []netlink.Route, keep map[string]bool) error {
	for _, rt := range list {
		if keep[routeKey(rt)] {
			continue
		}
		rt := rt
		if err := r.nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("deleting route %s of table %d: %w", rt.Dst, rt.Table, err)
		}
	}
	return nil
}

// intact reports whether every channel has its ip rule, its tunnel device as ensure
// makes it, pointed at its nodes, and its table holds exactly the routes ensure would
// put there.
func (r *router) intact(uplink netlink.Link, nodeIP netip.Addr, slots []slotRoute, peers []Peer) (bool, error) {
	rules, err := r.slotRules()
	if err != nil {
		return false, err
	}
	have := map[ruleKey]bool{}
	for _, ru := range rules {
		if r.rightMark(ru) {
			have[ruleKey{ru.Family, ru.Table}] = true
		}
	}
	n := 0
	routes, err := r.routes()
	if err != nil {
		return false, err
	}
	ts, err := r.readTunnels()
	if err != nil {
		return false, err
	}
	for _, c := range r.channels(uplink, nodeIP, slots, peers) {
		for _, family := range c.families {
			if !have[ruleKey{family, r.table(c.idx)}] {
				return false, nil
			}
			n++
		}
		tunnel, ok := ts.links[c.tunnel.name]
		if !ok || !c.tunnel.matches(tunnel) || !ts.pointed(tunnel, c.peers, c.carries6()) ||
			!sameRoutes(routes[r.table(c.idx)], c.routes(tunnel)) {
			return false, nil
		}
	}
	return n == len(have), nil // no rule of a family its slot no longer has
}

// slotRules lists natd's slot rules of both families (a node without IPv6 has IPv4
// ones only).
func (r *router) slotRules() ([]netlink.Rule, error) {
	var out []netlink.Rule
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := r.nl.RuleList(family)
		if family == unix.AF_INET6 {
			err = ipv6Absent(err)
		}
		if err != nil {
			return nil, fmt.Errorf("listing ip rules: %w", err)
		}
		for _, ru := range rules {
			if r.ours(ru) {
				ru.Family = family
				out = append(out, ru)
			}
		}
	}
	return out, nil
}

// prune removes the rules, routes and tunnel devices of slots no longer in use, and the
// reply tunnel when no slot is.
func (r *router) prune(slots []slotRoute) error {
	keep := map[int]bool{}
	keepRule := map[ruleKey]bool{}
	keepDev := map[string]bool{}
	any6 := false
	for _, s := range slots {
		keep[r.table(s.idx)] = true
		family := unix.AF_INET
		if s.v6 {
			family, any6 = unix.AF_INET6, true
		}
		keepRule[ruleKey{family, r.table(s.idx)}] = true
		keepDev[TunnelDevice(s.idx)] = true
	}
	if len(slots) > 0 {
		keep[r.replyTable()] = true
		keepRule[ruleKey{unix.AF_INET, r.replyTable()}] = true
		keepRule[ruleKey{unix.AF_INET6, r.replyTable()}] = any6 && !r.noIPv6
		keepDev[ReplyDevice] = true
	}
	rules, err := r.slotRules()
	if err != nil {
		return err
	}
	for _, ru := range rules {
		if !keepRule[ruleKey{ru.Family, ru.Table}] {
			ru := ru
			if err := r.nl.RuleDel(&ru); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("deleting ip rule for table %d: %w", ru.Table, err)
			}
		}
	}
	routes, err := r.routes()
	if err != nil {
		return err
	}
	for table, list := range routes {
		if !keep[table] {
			if err := r.deleteRoutes(list, nil); err != nil {
				return err
			}
		}
	}
	// (A slot given to an IP of the other family keeps no routes of the old one:
	// ensure replaced the table's routes, of both families, whole.)
	tunnels, err := r.tunnels()
	if err != nil {
		return err
	}
	for name, l := range tunnels {
		if keepDev[name] {
			continue
		}
		if err := r.nl.LinkDel(l); err != nil && !isNotFound(err) {
			return fmt.Errorf("removing tunnel device %s: %w", name, err)
		}
	}
	return nil
}

func (r *router) replyTable() int { return r.tableBase + replyIndex }

// wantReplyRoutes is the reply table: each peer's pod CIDRs through the reply tunnel
// (its IPv6 ones with v6: while an IPv6 egress IP is in use).
func (r *router) wantReplyRoutes(peers []Peer, tunnel netlink.Link, v6 bool) []netlink.Route {
	var out []netlink.Route
	for _, p := range peers {
		for _, c := range p.PodCIDRs {
			rt := netlink.Route{Table: r.replyTable(), Type: unix.RTN_UNICAST, Protocol: RouteProtocol,
				Dst: &net.IPNet{IP: c.Addr().AsSlice(), Mask: net.CIDRMask(c.Bits(), c.Addr().BitLen())}, Gw: p.IP.AsSlice(),
				LinkIndex: tunnel.Attrs().Index, Flags: int(netlink.FLAG_ONLINK)}
			switch {
			case c.Addr().Is4():
			case v6:
				rt.Family, rt.Gw, rt.Flags = unix.AF_INET6, TunnelNextHop6(p.IP).AsSlice(), 0
			default:
				continue
			}
			out = append(out, rt)
		}
	}
	return out
}

// routes returns natd's routes (both families) by table.
func (r *router) routes() (map[int][]netlink.Route, error) {
	out := map[int][]netlink.Route{}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		list, err := r.nl.RouteListFiltered(family,
			&netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: RouteProtocol},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if family == unix.AF_INET6 {
			err = ipv6Absent(err)
		}
		if err != nil {
			return nil, fmt.Errorf("listing routes: %w", err)
		}
		for _, rt := range list {
			if rt.Table > r.tableBase && rt.Table <= r.tableBase+255 {
				rt.Family = family
				out[rt.Table] = append(out[rt.Table], rt)
			}
		}
	}
	return out, nil
}

// uplinkOf finds the interface that carries ip.
func uplinkOf(nl *netlink.Handle, ip netip.Addr) (netlink.Link, error) {
	addrs, err := nl.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		if got, ok := netip.AddrFromSlice(a.IP.To4()); ok && got == ip {
			link, err := nl.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("finding link %d: %w", a.LinkIndex, err)
			}
			return link, nil
		}
	}
	return nil, fmt.Errorf("no interface has the node IP %s", ip)
}

// egressAddrs lists the host addresses (/32, /128) on link that natd owns: those inside
// an egress CIDR, or that natd's table said it held.
// The second list names the IPv6 ones that are not deprecated (hostAddr says why they
// must be).
func egressAddrs(nl *netlink.Handle, link netlink.Link, owned func(netip.Addr) bool) (all, preferred6 []netip.Addr, err error) {
	addrs, err := nl.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return nil, nil, fmt.Errorf("listing addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		ones, bits := a.Mask.Size()
		ip, ok := netip.AddrFromSlice(a.IP)
		if ip = ip.Unmap(); ok && ones == bits && ones == ip.BitLen() && owned(ip) {
			all = append(all, ip)
			if ip.Is6() && a.Flags&unix.IFA_F_DEPRECATED == 0 {
				preferred6 = append(preferred6, ip)
			}
		}
	}
	return all, preferred6, nil
}

// hostAddr is ip as a host address on the uplink. An IPv6 one skips duplicate address
// detection, which would keep it unusable (tentative) for a second or more after a
// takeover: the election already made sure no other node serves it. And it is
// deprecated (preferred lifetime 0, valid forever): IPv6 source address selection
// (RFC 6724) would otherwise prefer the newest global address, or the longest match,
// for the node's own connections and the CNI's masquerade of unpinned pods — which
// would then leave with the egress IP. A deprecated address still receives, answers
// neighbour solicitations and serves as natd's SNAT source; it is just never chosen.
func hostAddr(ip netip.Addr) *netlink.Addr {
	a := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}}
	if ip.Is6() {
		a.Flags = unix.IFA_F_NODAD
		a.PreferedLft, a.ValidLft = 0, math.MaxUint32
	}
	return a
}
