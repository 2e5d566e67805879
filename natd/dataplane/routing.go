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

// slotRoute is what one egress IP's route table should hold: a default route to the
// holder when another node holds it; nothing otherwise, so marked packets fall through
// to the main table (held here: SNAT and out the uplink; no holder: dropped by nft).
type slotRoute struct {
	idx int
	via netip.Addr
}

type router struct {
	nl           *netlink.Handle
	marks        Marks
	rulePriority int
	tableBase    int
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

// ensure adds the ip rules and points each table at its holder. It never removes a
// slot; prune does that once nftables no longer marks packets for it.
func (r *router) ensure(uplink netlink.Link, slots []slotRoute) error {
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
	for _, s := range slots {
		if !have[r.table(s.idx)] {
			ru := netlink.NewRule()
			ru.Family = unix.AF_INET
			ru.Priority = r.rulePriority
			ru.Table = r.table(s.idx)
			ru.Mark = r.marks.Value(s.idx)
			mask := r.marks.Mask
			ru.Mask = &mask
			ru.Protocol = RouteProtocol
			if err := r.nl.RuleAdd(ru); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("adding ip rule for table %d: %w", ru.Table, err)
			}
		}
		cur, ok := routes[r.table(s.idx)]
		if !s.via.IsValid() {
			if ok {
				if err := r.nl.RouteDel(&cur); err != nil && !errors.Is(err, unix.ESRCH) {
					return fmt.Errorf("deleting route of table %d: %w", cur.Table, err)
				}
			}
			continue
		}
		if ok && cur.LinkIndex == uplink.Attrs().Index && cur.Gw.Equal(s.via.AsSlice()) {
			continue
		}
		rt := &netlink.Route{
			Table:     r.table(s.idx),
			Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
			Gw:        s.via.AsSlice(),
			LinkIndex: uplink.Attrs().Index,
			Protocol:  RouteProtocol,
		}
		if err := r.nl.RouteReplace(rt); err != nil {
			return fmt.Errorf("pointing table %d at %s: %w", rt.Table, s.via, err)
		}
	}
	return nil
}

// intact reports whether every slot has its ip rule and its table holds exactly the
// route ensure would put there.
func (r *router) intact(uplink netlink.Link, slots []slotRoute) (bool, error) {
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
	for _, s := range slots {
		if !have[r.table(s.idx)] {
			return false, nil
		}
		cur, ok := routes[r.table(s.idx)]
		switch {
		case !s.via.IsValid() && ok:
			return false, nil
		case s.via.IsValid() && (!ok || cur.LinkIndex != uplink.Attrs().Index || !cur.Gw.Equal(s.via.AsSlice())):
			return false, nil
		}
	}
	return true, nil
}

// prune removes the rules and routes of slots no longer in use.
func (r *router) prune(slots []slotRoute) error {
	keep := map[int]bool{}
	for _, s := range slots {
		keep[r.table(s.idx)] = true
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
	for table, rt := range routes {
		if !keep[table] {
			rt := rt
			if err := r.nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("deleting route of table %d: %w", table, err)
			}
		}
	}
	return nil
}

// routes returns natd's routes by table.
func (r *router) routes() (map[int]netlink.Route, error) {
	list, err := r.nl.RouteListFiltered(unix.AF_INET,
		&netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	out := map[int]netlink.Route{}
	for _, rt := range list {
		if rt.Table > r.tableBase && rt.Table <= r.tableBase+255 {
			out[rt.Table] = rt
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
