package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The route guard keeps natd's pinned packets from leaving unclassified when natd's
// nftables tables are gone — deleted by hand, a firewall reload, `nft flush ruleset` —
// until natd rebuilds them, and for as long as natd is not running to do so. Without
// the tables nothing marks a pinned packet, and the main table would send it out
// through the CNI's MASQUERADE with the node address. Policy routing does not depend on
// nftables: rules send such packets to the guard table, where every cluster destination
// is thrown back to the rules that follow and everything else is a blackhole.
//
//   - On a holder, a rule per tunnel device sends its packets that carry no natd mark
//     there: with the tables in place every such packet carries a mark (its egress
//     IP's, or the pass mark of fail-open traffic), so the rule changes nothing.
//   - On a pinned pod's own node, one rule sends packets that still carry the origin
//     mark there: the pod guard's filter on the pod's device sets it, natd's tables
//     clear it (podguard.go). A rule keyed by the pod's address could not do this:
//     reverse path filtering looks up the route back to a reply's source as a flow
//     from the pod's address arriving on the pod's device — exactly the packet such a
//     rule would blackhole — and would drop every reply to the pod.
//
// IPv6 has the same guard, with its own table and rules (wantGuard6).

// guardRule is one of the route guard's rules: packets without a natd mark that came
// out of a tunnel device, or packets with the origin mark.
type guardRule struct {
	iif    string
	origin bool
}

func (g guardRule) key() string {
	if g.origin {
		return "origin"
	}
	return "iif " + g.iif
}

func (r *router) guardTable() int    { return r.tableBase }
func (r *router) guardPriority() int { return r.rulePriority + 1 }

// Every packet the node routes walks the ip rules in order, and natd has two per
// egress IP in use: the slot rules (a mark) and the guard rules (a tunnel device). A
// packet without a natd mark — an unpinned pod's, a reply, the node's own — matches
// no slot rule, so one rule before them sends it straight to the guard's: with 201
// egress IPs in use this raised an unpinned pod's UDP rate from 70 to 90 kpps
// (BenchmarkPinnedPath; 119 with one IP). The skip rule exists while the guard does
// (its target).
func (r *router) skipPriority() int { return r.rulePriority - 1 }

func (r *router) oursSkip(ru netlink.Rule) bool {
	return ru.Priority == r.skipPriority() && ru.Goto == r.guardPriority()
}

func (r *router) newSkipRule() *netlink.Rule {
	ru := r.unmarkedRule(r.skipPriority())
	ru.Goto = r.guardPriority()
	return ru
}

// unmarkedRule is an ip rule of natd's, at priority, for packets without a natd mark.
func (r *router) unmarkedRule(priority int) *netlink.Rule {
	ru := netlink.NewRule()
	ru.Family = unix.AF_INET
	ru.Priority = priority
	mask := r.marks.Mask
	ru.Mark, ru.Mask = 0, &mask
	ru.Protocol = RouteProtocol
	return ru
}

// isSkipRule reports whether a rule at the skip rule's priority that jumps to the
// guard's is in natd's form (others like it are foreign).
func (r *router) isSkipRule(ru netlink.Rule) bool {
	return ru.Mark == 0 && ru.Mask != nil && *ru.Mask == r.marks.Mask && ru.IifName == "" && ru.Src == nil
}

func (r *router) oursGuard(ru netlink.Rule) bool {
	return ru.Priority == r.guardPriority() && ru.Table == r.guardTable()
}

// guardKey is the key of a kernel rule of the guard, or "" when it is not one as
// natd makes them (unmarked packets from a device, or the origin mark from anywhere).
func (r *router) guardKey(ru netlink.Rule) string {
	if ru.Mask == nil || *ru.Mask != r.marks.Mask || ru.Src != nil || ru.Dst != nil {
		return ""
	}
	switch {
	case ru.Mark == 0 && ru.IifName != "":
		return guardRule{iif: ru.IifName}.key()
	case ru.Mark == r.marks.Origin() && ru.IifName == "":
		return guardRule{origin: true}.key()
	}
	return ""
}

// newGuardRule is the kernel rule for g, in family.
func (r *router) newGuardRule(g guardRule, family int) *netlink.Rule {
	ru := r.unmarkedRule(r.guardPriority())
	ru.Family = family
	ru.Table = r.guardTable()
	if g.origin {
		ru.Mark = r.marks.Origin()
	} else {
		ru.IifName = g.iif
	}
	return ru
}

// guardPlan is the guard as it should be: its rules, one per tunnel device, and its
// table, which exists only while there are rules. Apply and Verify each compute it once.
type guardPlan struct {
	rules  []guardRule
	routes []netlink.Route
}

// wantGuard plans the guard for these tunnel slots and cluster destinations. The
// origin rule is always there: a pinned pod may start at any moment (natd-cni puts the
// pod guard on its device at once).
func (r *router) wantGuard(slots []slotRoute, clusterDsts []netip.Prefix) guardPlan {
	g := guardPlan{rules: []guardRule{{origin: true}}}
	for _, s := range slots {
		g.rules = append(g.rules, guardRule{iif: TunnelDevice(s.idx)})
	}
	g.routes = r.wantGuardRoutes(clusterDsts)
	return g
}

// wantGuardRoutes is the guard table: cluster destinations thrown back, the rest a
// blackhole.
func (r *router) wantGuardRoutes(clusterDsts []netip.Prefix) []netlink.Route {
	out := []netlink.Route{{Table: r.guardTable(), Dst: defaultDst(), Type: unix.RTN_BLACKHOLE, Protocol: RouteProtocol}}
	for _, rg := range mergeRanges(clusterDsts, false) {
		for _, p := range rangePrefixes(rg) {
			out = append(out, netlink.Route{Table: r.guardTable(), Type: unix.RTN_THROW, Protocol: RouteProtocol,
				Dst: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 32)}})
		}
	}
	return out
}

// rangePrefixes splits a range of IPv4 addresses into prefixes.
func rangePrefixes(rg addrRange) []netip.Prefix {
	var out []netip.Prefix
	a := rg.start
	for a.IsValid() && (!rg.end.IsValid() || a.Less(rg.end)) {
		bits := 0
		for ; bits < 32; bits++ {
			p := netip.PrefixFrom(a, bits)
			if p.Masked().Addr() != a {
				continue
			}
			if last := broadcast(p); rg.end.IsValid() && !last.Less(rg.end) {
				continue
			}
			break
		}
		p := netip.PrefixFrom(a, bits)
		out = append(out, p)
		a = broadcast(p).Next()
	}
	return out
}

// ensureGuard adds the guard table's routes and the guard rules it lacks; it removes
// nothing (pruneGuard does, after the nftables step).
func (r *router) ensureGuard(want guardPlan) error {
	if len(want.rules) == 0 {
		return nil
	}
	routes, err := r.guardRoutes()
	if err != nil {
		return err
	}
	wantRoutes := want.routes
	for i := range wantRoutes {
		if slices.ContainsFunc(routes, func(rt netlink.Route) bool { return routeKey(rt) == routeKey(wantRoutes[i]) }) {
			continue
		}
		if err := r.nl.RouteReplace(&wantRoutes[i]); err != nil {
			return fmt.Errorf("adding guard route %s: %w", wantRoutes[i].Dst, err)
		}
	}
	have, skip, err := r.guardRules()
	if err != nil {
		return err
	}
	for _, g := range want.rules {
		if have[g.key()] {
			continue
		}
		if err := r.nl.RuleAdd(r.newGuardRule(g, unix.AF_INET)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding guard rule %s: %w", g.key(), err)
		}
	}
	if skip.right == 1 && skip.foreign == 0 {
		return nil
	}
	// A delete names the priority and the target only, so it cannot pick natd's rule
	// out of others like it: all of them go, and natd's comes back.
	if err := r.deleteSkipRules(); err != nil {
		return err
	}
	if err := r.nl.RuleAdd(r.newSkipRule()); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("adding the rule that skips the slot rules: %w", err)
	}
	return nil
}

// deleteSkipRules deletes every rule at the skip rule's priority that jumps to the
// guard's.
func (r *router) deleteSkipRules() error {
	for range 1000 {
		ru := netlink.NewRule()
		ru.Family = unix.AF_INET
		ru.Priority = r.skipPriority()
		ru.Goto = r.guardPriority()
		if err := r.nl.RuleDel(ru); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return fmt.Errorf("deleting the rule that skips the slot rules: %w", err)
		}
	}
	return errors.New("deleting the rules that skip the slot rules: still there after 1000 deletions")
}

// pruneGuard removes guard rules and routes that are not wanted (all of them with an
// empty plan).
func (r *router) pruneGuard(want guardPlan) error {
	keep := map[string]bool{}
	for _, g := range want.rules {
		keep[g.key()] = true
	}
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return fmt.Errorf("listing ip rules: %w", err)
	}
	if len(want.rules) == 0 {
		if err := r.deleteSkipRules(); err != nil {
			return err
		}
	}
	for _, ru := range rules {
		if !r.oursGuard(ru) {
			continue
		}
		if k := r.guardKey(ru); k != "" && keep[k] {
			keep[k] = false // a duplicate goes
			continue
		}
		ru := ru
		if err := r.nl.RuleDel(&ru); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting guard rule: %w", err)
		}
	}
	routes, err := r.guardRoutes()
	if err != nil {
		return err
	}
	wantRoutes := map[string]bool{}
	for _, rt := range want.routes {
		wantRoutes[routeKey(rt)] = true
	}
	return r.deleteRoutes(routes, wantRoutes)
}

// guardIntact reports whether the guard's rules and table are exactly as wanted.
func (r *router) guardIntact(want guardPlan) (bool, error) {
	have, skip, err := r.guardRules()
	if err != nil {
		return false, err
	}
	if len(have) != len(want.rules) {
		return false, nil
	}
	if skip.foreign > 0 || skip.right > 1 || (skip.right == 1) != (len(want.rules) > 0) {
		return false, nil
	}
	for _, g := range want.rules {
		if !have[g.key()] {
			return false, nil
		}
	}
	routes, err := r.guardRoutes()
	if err != nil {
		return false, err
	}
	return sameRoutes(routes, want.routes), nil
}

// skipCount counts the rules at the skip rule's priority that jump to the guard's:
// natd's form, and any other.
type skipCount struct{ right, foreign int }

// guardRules lists the keys of the guard rules in the kernel, and counts the skip
// rules; a rule of the guard's priority and table that natd would not make counts
// under an impossible key.
func (r *router) guardRules() (map[string]bool, skipCount, error) {
	var skip skipCount
	rules, err := r.nl.RuleList(unix.AF_INET)
	if err != nil {
		return nil, skip, fmt.Errorf("listing ip rules: %w", err)
	}
	have := map[string]bool{}
	for i, ru := range rules {
		if r.oursSkip(ru) {
			if r.isSkipRule(ru) {
				skip.right++
			} else {
				skip.foreign++
			}
			continue
		}
		if !r.oursGuard(ru) {
			continue
		}
		k := r.guardKey(ru)
		if k == "" || have[k] {
			k = fmt.Sprintf("\x00foreign %d", i)
		}
		have[k] = true
	}
	return have, skip, nil
}

func (r *router) guardRoutes() ([]netlink.Route, error) {
	list, err := r.nl.RouteListFiltered(unix.AF_INET,
		&netlink.Route{Table: r.guardTable(), Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("listing guard routes: %w", err)
	}
	return list, nil
}

// The IPv6 guard has its own table — the cluster's IPv6 destinations and the link's
// scope thrown back, the rest a blackhole — and the same rules as the IPv4 guard: the
// origin rule, and one per tunnel device of an IPv6 egress IP. (A pinned pod's IPv6 to
// the outside is dropped or SNATed by natd's ip6 table; without the table, here.) It
// has no skip rule: IPv6 has a slot rule per IPv6 egress IP only.

// wantGuard6 plans the IPv6 guard.
func (r *router) wantGuard6(slots []slotRoute, clusterDsts []netip.Prefix) guardPlan {
	g := guardPlan{rules: []guardRule{{origin: true}}}
	for _, s := range slots {
		if s.v6 {
			g.rules = append(g.rules, guardRule{iif: TunnelDevice(s.idx)})
		}
	}
	g.routes = []netlink.Route{{Family: unix.AF_INET6, Table: r.guardTable(), Type: unix.RTN_BLACKHOLE,
		Protocol: RouteProtocol, Dst: defaultDst6()}}
	seen := map[netip.Prefix]bool{}
	for _, p := range append(slices.Clone(clusterDsts), linkScope6...) {
		p = p.Masked()
		if !p.Addr().Is6() || p.Addr().Is4In6() || seen[p] {
			continue
		}
		seen[p] = true
		g.routes = append(g.routes, netlink.Route{Family: unix.AF_INET6, Table: r.guardTable(), Type: unix.RTN_THROW,
			Protocol: RouteProtocol, Dst: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), 128)}})
	}
	return g
}

func (r *router) guard6Routes() ([]netlink.Route, error) {
	list, err := r.nl.RouteListFiltered(unix.AF_INET6,
		&netlink.Route{Table: r.guardTable(), Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("listing IPv6 guard routes: %w", err)
	}
	return list, nil
}

// guard6Rules sorts the IPv6 rules at the guard's priority and table: natd's by key
// (the first of each), and any other (foreign, or a duplicate).
func (r *router) guard6Rules() (ours map[string]netlink.Rule, others []netlink.Rule, err error) {
	rules, err := r.nl.RuleList(unix.AF_INET6)
	if err != nil {
		return nil, nil, fmt.Errorf("listing IPv6 rules: %w", err)
	}
	ours = map[string]netlink.Rule{}
	for _, ru := range rules {
		if !r.oursGuard(ru) {
			continue
		}
		k := r.guardKey(ru)
		if _, dup := ours[k]; k == "" || dup {
			others = append(others, ru)
			continue
		}
		ours[k] = ru
	}
	return ours, others, nil
}

// ensureGuard6 adds what the IPv6 guard lacks, and deletes foreign rules at its
// priority and table; like ensureGuard it removes none of natd's own: pruneGuard6 does,
// once nftables no longer uses the slots they guard.
func (r *router) ensureGuard6(want guardPlan) error {
	have, err := r.guard6Routes()
	if err != nil {
		return err
	}
	for i := range want.routes {
		if slices.ContainsFunc(have, func(rt netlink.Route) bool { return routeKey(rt) == routeKey(want.routes[i]) }) {
			continue
		}
		if err := r.nl.RouteReplace(&want.routes[i]); err != nil {
			return fmt.Errorf("adding IPv6 guard route %s: %w", want.routes[i].Dst, err)
		}
	}
	ours, others, err := r.guard6Rules()
	if err != nil {
		return err
	}
	for _, g := range want.rules {
		if _, ok := ours[g.key()]; ok {
			continue
		}
		if err := r.nl.RuleAdd(r.newGuardRule(g, unix.AF_INET6)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding IPv6 guard rule %s: %w", g.key(), err)
		}
	}
	return r.deleteGuard6Rules(others)
}

// pruneGuard6 removes the IPv6 guard's rules and routes that are not planned.
func (r *router) pruneGuard6(want guardPlan) error {
	have, err := r.guard6Routes()
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, rt := range want.routes {
		keep[routeKey(rt)] = true
	}
	if err := r.deleteRoutes(have, keep); err != nil {
		return err
	}
	ours, _, err := r.guard6Rules()
	if err != nil {
		return err
	}
	wanted := map[string]bool{}
	for _, g := range want.rules {
		wanted[g.key()] = true
	}
	var unwanted []netlink.Rule
	for k, ru := range ours {
		if !wanted[k] {
			unwanted = append(unwanted, ru)
		}
	}
	return r.deleteGuard6Rules(unwanted)
}

// removeGuard6 takes the IPv6 guard away (cleanup).
func (r *router) removeGuard6() error {
	ours, others, err := r.guard6Rules()
	if err != nil {
		return err
	}
	for _, ru := range ours {
		others = append(others, ru)
	}
	if err := r.deleteGuard6Rules(others); err != nil {
		return err
	}
	have, err := r.guard6Routes()
	if err != nil {
		return err
	}
	return r.deleteRoutes(have, nil)
}

func (r *router) deleteGuard6Rules(rules []netlink.Rule) error {
	for _, ru := range rules {
		if err := r.nl.RuleDel(&ru); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("deleting IPv6 guard rule: %w", err)
		}
	}
	return nil
}

// guard6Intact reports whether the IPv6 guard is exactly as planned.
func (r *router) guard6Intact(want guardPlan) (bool, error) {
	ours, others, err := r.guard6Rules()
	if err != nil {
		return false, err
	}
	if len(ours) != len(want.rules) || len(others) > 0 {
		return false, nil
	}
	for _, g := range want.rules {
		if _, ok := ours[g.key()]; !ok {
			return false, nil
		}
	}
	have, err := r.guard6Routes()
	if err != nil {
		return false, err
	}
	return sameRoutes(have, want.routes), nil
}
