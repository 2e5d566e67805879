package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

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
}

type router struct {
	nl           *netlink.Handle
	marks        Marks
	rulePriority int
	tableBase    int
	tunnelPort   uint16
	inNetns      func(func() error) error
}

func (r *router) table(idx int) int { return r.tableBase + idx }

func (r *router) ours(rule netlink.Rule) bool {
	return rule.Priority == r.rulePriority && rule.Table > r.tableBase && rule.Table <= r.tableBase+255
}

// rightMark reports whether one of natd's rules matches the mark and mask of its table's
// slot.
func (r *router) rightMark(ru netlink.Rule) bool {
	return ru.Mark == r.marks.Value(ru.Table-r.tableBase) && ru.Mask != nil && *ru.Mask == r.marks.Mask
}

// channel is one tunnel with its ip rule (mark value idx) and route table (base+idx):
// an egress IP's slot, or the reply tunnel (replyIndex). ensure, intact and prune treat
// them alike.
type channel struct {
	idx    int
	tunnel tunnelSpec
	peers  []netip.Addr                              // the nodes the tunnel must reach
	routes func(tunnel netlink.Link) []netlink.Route // what its table must hold
}

// channels lists the slots' channels and, when there is a slot, the reply tunnel's.
func (r *router) channels(uplink netlink.Link, nodeIP netip.Addr, slots []slotRoute, peers []Peer) []channel {
	spec := func(name string, vni uint32) tunnelSpec {
		return tunnelSpec{name: name, vni: vni, local: nodeIP, port: r.tunnelPort, mtu: uplink.Attrs().MTU - TunnelOverhead}
	}
	out := make([]channel, 0, len(slots)+1)
	for _, s := range slots {
		c := channel{idx: s.idx, tunnel: spec(TunnelDevice(s.idx), s.vni),
			routes: func(tunnel netlink.Link) []netlink.Route { return r.wantRoutes(s, tunnel) }}
		if s.via.IsValid() {
			c.peers = []netip.Addr{s.via}
		}
		out = append(out, c)
	}
	if len(slots) > 0 {
		c := channel{idx: replyIndex, tunnel: spec(ReplyDevice, ReplyVNI),
			routes: func(tunnel netlink.Link) []netlink.Route { return r.wantReplyRoutes(peers, tunnel) }}
		for _, p := range peers {
			c.peers = append(c.peers, p.IP)
		}
		out = append(out, c)
	}
	return out
}

// wantRoutes is what table idx must hold to send marked packets to via through the
// tunnel: the default route into the tunnel, and a throw route for the holder itself,
// because the encapsulated packet keeps the mark and must reach the holder through the
// main table, not loop into the tunnel.
func (r *router) wantRoutes(s slotRoute, tunnel netlink.Link) []netlink.Route {
	if !s.via.IsValid() {
		return nil
	}
	return []netlink.Route{
		{Table: r.table(s.idx), Dst: defaultDst(), Type: unix.RTN_UNICAST, Gw: s.via.AsSlice(), LinkIndex: tunnel.Attrs().Index,
			Flags: int(netlink.FLAG_ONLINK), Protocol: RouteProtocol},
		{Table: r.table(s.idx), Dst: &net.IPNet{IP: s.via.AsSlice(), Mask: net.CIDRMask(32, 32)}, Type: unix.RTN_THROW,
			Protocol: RouteProtocol},
	}
}

func defaultDst() *net.IPNet { return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)} }

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
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return fmt.Errorf("listing ip rules: %w", err)
	}
	have := map[int]bool{}
	for _, ru := range rules {
		if !r.ours(ru) {
			continue
		}
		if r.rightMark(ru) {
			have[ru.Table] = true
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
		if !have[r.table(c.idx)] {
			ru := netlink.NewRule()
			ru.Family = unix.AF_INET
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
		if err := r.pointTunnel(ts, tunnel, c.peers); err != nil {
			return err
		}
		if err := r.replaceRoutes(routes[r.table(c.idx)], c.routes(tunnel)); err != nil {
			return fmt.Errorf("filling table %d: %w", r.table(c.idx), err)
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
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return false, fmt.Errorf("listing ip rules: %w", err)
	}
	have := map[int]bool{}
	for _, ru := range rules {
		if r.ours(ru) && r.rightMark(ru) {
			have[ru.Table] = true
		}
	}
	routes, err := r.routes()
	if err != nil {
		return false, err
	}
	ts, err := r.readTunnels()
	if err != nil {
		return false, err
	}
	for _, c := range r.channels(uplink, nodeIP, slots, peers) {
		tunnel, ok := ts.links[c.tunnel.name]
		if !have[r.table(c.idx)] || !ok || !c.tunnel.matches(tunnel) || !ts.pointed(tunnel, c.peers) ||
			!sameRoutes(routes[r.table(c.idx)], c.routes(tunnel)) {
			return false, nil
		}
	}
	return true, nil
}

// prune removes the rules, routes and tunnel devices of slots no longer in use, and the
// reply tunnel when no slot is.
func (r *router) prune(slots []slotRoute) error {
	keep := map[int]bool{}
	keepDev := map[string]bool{}
	for _, s := range slots {
		keep[r.table(s.idx)] = true
		keepDev[TunnelDevice(s.idx)] = true
	}
	if len(slots) > 0 {
		keep[r.replyTable()] = true
		keepDev[ReplyDevice] = true
	}
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return fmt.Errorf("listing ip rules: %w", err)
	}
	for _, ru := range rules {
		if r.ours(ru) && !keep[ru.Table] {
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

// wantReplyRoutes is the reply table: each peer's pod CIDRs through the reply tunnel.
func (r *router) wantReplyRoutes(peers []Peer, tunnel netlink.Link) []netlink.Route {
	var out []netlink.Route
	for _, p := range peers {
		for _, c := range p.PodCIDRs {
			out = append(out, netlink.Route{Table: r.replyTable(), Type: unix.RTN_UNICAST, Protocol: RouteProtocol,
				Dst: &net.IPNet{IP: c.Addr().AsSlice(), Mask: net.CIDRMask(c.Bits(), 32)}, Gw: p.IP.AsSlice(),
				LinkIndex: tunnel.Attrs().Index, Flags: int(netlink.FLAG_ONLINK)})
		}
	}
	return out
}

// routes returns natd's routes by table.
func (r *router) routes() (map[int][]netlink.Route, error) {
	list, err := r.nl.RouteListFiltered(unix.AF_INET,
		&netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	out := map[int][]netlink.Route{}
	for _, rt := range list {
		if rt.Table > r.tableBase && rt.Table <= r.tableBase+255 {
			out[rt.Table] = append(out[rt.Table], rt)
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

// egressAddrs lists the /32 addresses on link that natd owns: those inside an egress
// CIDR, or that natd's table said it held.
func egressAddrs(nl *netlink.Handle, link netlink.Link, owned func(netip.Addr) bool) ([]netip.Addr, error) {
	addrs, err := nl.AddrList(link, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", link.Attrs().Name, err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ones, _ := a.Mask.Size()
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if ok && ones == 32 && owned(ip) {
			out = append(out, ip)
		}
	}
	return out, nil
}

func hostAddr(ip netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}}
}
