package dataplane

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The pod guard keeps a pinned pod's packets in when natd's nftables tables are gone
// from the pod's own node — `nft delete table ip natd`, `nft flush ruleset`, a
// firewall reload — until natd rebuilds them, or for as long as natd is not running to
// do so. Without the tables nothing marks the pod's packets for its egress IP, and the
// main table would send them out through the CNI's MASQUERADE with the node address
// (or un-NATed, with the pod's own, when the flush took the masquerade rule too).
//
// The guard must not depend on nftables, and it must tell a pinned pod's packet from
// everything else without the tables. Policy routing alone cannot: a rule keyed by the
// pod's address also matches the reverse path check of every packet *to* the pod
// (the kernel looks the route back to a reply's source up as a flow from the pod's
// address, arriving on the pod's device), so it would drop replies to the pod. So the
// pod's own device marks what the pod sends: a tc filter on the host side of a pinned
// pod's veth (ingress: the pod's transmissions) sets natd's bits of the packet mark to
// the origin value. With natd's tables in place their first rule clears it again, and
// nothing changes. Without them the mark survives to routing, where one ip rule
// (`fwmark origin/mask`, the route guard's) sends the packet to the guard table: cluster
// destinations are thrown back, the rest is a blackhole. A reply to the pod never
// passes the pod's device inbound, so its reverse path check carries no origin mark.
//
// The filter sits on the pod's device, not on an address: a pod that later gets the
// same IP has another device, and the filter goes with the pod. The tc filter is a
// five-instruction BPF program (tc's skbedit action would do, but is not in every
// kernel, and cls_bpf is).

// podGuardPriority is the tc filter priority natd's filter has on a pod's device, and
// podGuardName its name: together they tell natd's filter from anyone else's.
const (
	podGuardPriority = 0x4e41
	podGuardName     = "natd_origin"
)

// originProgram sets natd's bits of skb->mark to marks.Origin() and lets the packet
// go on (TC_ACT_OK).
func originProgramSpec(marks Marks) *ebpf.ProgramSpec {
	const markOffset = 8 // offsetof(struct __sk_buff, mark)
	return &ebpf.ProgramSpec{
		Name:    podGuardName,
		Type:    ebpf.SchedCLS,
		License: "Apache-2.0",
		Instructions: asm.Instructions{
			asm.LoadMem(asm.R2, asm.R1, markOffset, asm.Word),
			asm.And.Imm32(asm.R2, int32(^marks.Mask)),
			asm.Or.Imm32(asm.R2, int32(marks.Origin())),
			asm.StoreMem(asm.R1, markOffset, asm.R2, asm.Word),
			asm.Mov.Imm(asm.R0, 0),
			asm.Return(),
		},
	}
}

// ErrPodGuardUnsupported means this kernel cannot run natd's pod guard (no cls_bpf, no
// BPF, or no permission to load it): pinned pods still work, but deleting natd's
// tables lets their packets out until natd repairs them.
var ErrPodGuardUnsupported = errors.New("the pod guard cannot be loaded")

// podGuard attaches and detaches the origin filter. Its program is loaded once.
type podGuard struct {
	nl    *netlink.Handle
	marks Marks

	once    sync.Once
	prog    *ebpf.Program
	tag     string
	loadErr error
	// refused are devices whose guard the kernel refused at the last attempt (another
	// qdisc in the way, say): the Apply that tried reports them, and intact does not
	// count them as drift, so that one such pod does not make every check a repair.
	refused map[podDevice]bool
}

func (g *podGuard) program() (*ebpf.Program, string, error) {
	g.once.Do(func() {
		prog, err := ebpf.NewProgram(originProgramSpec(g.marks))
		if err != nil {
			g.loadErr = fmt.Errorf("%w: %w", ErrPodGuardUnsupported, err)
			return
		}
		info, err := prog.Info()
		if err != nil {
			prog.Close() //nolint:errcheck // unusable anyway
			g.loadErr = fmt.Errorf("%w: reading the program's tag: %w", ErrPodGuardUnsupported, err)
			return
		}
		g.prog, g.tag = prog, info.Tag
	})
	return g.prog, g.tag, g.loadErr
}

// close releases the program (attached filters keep their own reference).
func (g *podGuard) close() {
	if g.prog != nil {
		g.prog.Close() //nolint:errcheck // nothing to do about it
	}
}

// podDevice is the host side of a pod's veth, as the CNI plugin recorded it.
type podDevice struct {
	name  string
	index int
}

// link finds the device, or nil when it is gone (the pod is) or the index now names
// another device.
func (g *podGuard) link(dev podDevice) (netlink.Link, error) {
	l, err := g.nl.LinkByIndex(dev.index)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return nil, nil
		}
		return nil, fmt.Errorf("looking up pod device %s: %w", dev.name, err)
	}
	if l.Attrs().Name != dev.name {
		return nil, nil
	}
	return l, nil
}

// guarded reports whether link has natd's filter with this natd's program (a filter
// of an older program, one with other marks, is not).
func (g *podGuard) guarded(link netlink.Link) (ours, current bool, err error) {
	_, tag, err := g.program()
	if err != nil {
		return false, false, err
	}
	filters, err := g.nl.FilterList(link, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
			return false, false, nil // no clsact qdisc, or the device just went
		}
		return false, false, fmt.Errorf("listing filters of %s: %w", link.Attrs().Name, err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && isOurs(bf) {
			ours = true
			current = current || bf.Tag == tag
		}
	}
	return ours, current, nil
}

func isOurs(f *netlink.BpfFilter) bool {
	return f.Priority == podGuardPriority && f.Name == podGuardName
}

// guard attaches natd's filter to link (replacing an older one).
func (g *podGuard) guard(link netlink.Link) error {
	prog, _, err := g.program()
	if err != nil {
		return err
	}
	if err := g.ensureClsact(link); err != nil {
		return err
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: link.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: netlink.MakeHandle(0, 1), Priority: podGuardPriority, Protocol: unix.ETH_P_ALL},
		Fd: prog.FD(), Name: podGuardName, DirectAction: true,
	}
	if err := g.nl.FilterReplace(f); err != nil {
		return fmt.Errorf("attaching the pod guard to %s: %w", link.Attrs().Name, err)
	}
	return nil
}

func (g *podGuard) ensureClsact(link netlink.Link) error {
	qdiscs, err := g.nl.QdiscList(link)
	if err != nil {
		return fmt.Errorf("listing qdiscs of %s: %w", link.Attrs().Name, err)
	}
	for _, q := range qdiscs {
		// An ingress qdisc (the CNI bandwidth plugin's) takes ingress filters as well,
		// and excludes a clsact.
		if q.Type() == "clsact" || q.Type() == "ingress" {
			return nil
		}
	}
	q := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: link.Attrs().Index,
		Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}
	if err := g.nl.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("adding a clsact qdisc to %s: %w", link.Attrs().Name, err)
	}
	return nil
}

// unguard removes natd's filters from link, and the clsact qdisc when nobody else has
// a filter on it (natd put it there).
func (g *podGuard) unguard(link netlink.Link) error {
	filters, err := g.nl.FilterList(link, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) {
			return nil
		}
		return fmt.Errorf("listing filters of %s: %w", link.Attrs().Name, err)
	}
	others, removed := 0, 0
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || !isOurs(bf) {
			others++
			continue
		}
		if err := g.nl.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing the pod guard from %s: %w", link.Attrs().Name, err)
		}
		removed++
	}
	if removed == 0 {
		return nil
	}
	egress, err := g.nl.FilterList(link, netlink.HANDLE_MIN_EGRESS)
	if err != nil || others > 0 || len(egress) > 0 {
		return nil //nolint:nilerr // someone else's qdisc, or theirs too: it stays
	}
	// Only a clsact qdisc is natd's to remove: the kernel deletes whatever qdisc sits
	// at the ingress parent, an ingress qdisc (the bandwidth plugin's) as well.
	qdiscs, err := g.nl.QdiscList(link)
	if err != nil {
		return fmt.Errorf("listing qdiscs of %s: %w", link.Attrs().Name, err)
	}
	for _, q := range qdiscs {
		if q.Type() != "clsact" {
			continue
		}
		if err := g.nl.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("removing the clsact qdisc of %s: %w", link.Attrs().Name, err)
		}
	}
	return nil
}

// recordedDevices is, per recorded pod device, whether it must carry the guard: the
// pods of pinned namespaces.
func recordedDevices(records []PodRecord, pinned map[string]NamespaceEgress) map[podDevice]bool {
	want := map[podDevice]bool{}
	for _, r := range records {
		if r.HostIfIndex <= 0 || r.HostIf == "" {
			continue // not a veth pod, or recorded before natd knew devices
		}
		_, p := pinned[r.Namespace]
		want[podDevice{name: r.HostIf, index: r.HostIfIndex}] = p
	}
	return want
}

// unrecorded are this node's pinned pod addresses (natd's view of the API) that no
// pod record claims: pods older than natd-cni on this node.
func unrecorded(state State, records []PodRecord) []netip.Addr {
	recorded := map[netip.Addr]bool{}
	for _, r := range records {
		for _, ip := range r.IPs {
			recorded[ip] = true
		}
	}
	var out []netip.Addr
	add := func(ips []netip.Addr) {
		for _, ip := range ips {
			if !recorded[ip] {
				out = append(out, ip)
			}
		}
	}
	for _, e := range state.Egress {
		add(e.Pods)
	}
	// A pod of a namespace pinned in the other family only (an IPv4-only pod of a
	// namespace with an IPv6 egress IP) is pinned too: its traffic is dropped.
	add(state.NoEgress)
	return out
}

// discover finds the host devices of pods known only by address: the device the
// node's route to the address uses when it is a veth (routed CNIs), or, when it is a
// bridge (bridge CNIs), the bridge port behind which the bridge has learnt the pod's
// MAC address. A pod the node has no neighbour entry for yet is found once it has
// sent something.
func (g *podGuard) discover(addrs []netip.Addr) (map[podDevice]bool, error) {
	found := map[podDevice]bool{}
	var fdb []netlink.Neigh
	fdbRead := false
	for _, ip := range addrs {
		routes, err := g.nl.RouteGet(ip.AsSlice())
		if err != nil || len(routes) == 0 {
			continue
		}
		l, err := g.nl.LinkByIndex(routes[0].LinkIndex)
		if err != nil {
			continue
		}
		switch l.Type() {
		case "veth":
			found[podDevice{name: l.Attrs().Name, index: l.Attrs().Index}] = true
			continue
		case "bridge":
		default:
			continue
		}
		neighs, err := g.nl.NeighList(l.Attrs().Index, unix.AF_INET)
		if err != nil {
			return found, fmt.Errorf("listing neighbours on %s: %w", l.Attrs().Name, err)
		}
		var mac net.HardwareAddr
		for _, n := range neighs {
			if n.IP.Equal(ip.AsSlice()) && len(n.HardwareAddr) > 0 {
				mac = n.HardwareAddr
			}
		}
		if mac == nil {
			continue
		}
		if !fdbRead {
			if fdb, err = g.nl.NeighListExecute(netlink.Ndmsg{Family: unix.AF_BRIDGE}); err != nil {
				return found, fmt.Errorf("listing bridge forwarding entries: %w", err)
			}
			fdbRead = true
		}
		for _, e := range fdb {
			if e.MasterIndex != l.Attrs().Index || !bytes.Equal(e.HardwareAddr, mac) {
				continue
			}
			port, err := g.nl.LinkByIndex(e.LinkIndex)
			if err == nil && port.Type() == "veth" {
				found[podDevice{name: port.Attrs().Name, index: port.Attrs().Index}] = true
			}
		}
	}
	return found, nil
}

// attach puts the guard on every device want marks (release takes it off the
// others). A device that is gone is skipped: its pod is.
func (g *podGuard) attach(want map[podDevice]bool) error {
	if _, _, err := g.program(); err != nil {
		return err
	}
	var errs []error
	refused := map[podDevice]bool{}
	for dev, pinned := range want {
		if !pinned {
			continue
		}
		link, err := g.link(dev)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if link == nil {
			continue
		}
		_, current, err := g.guarded(link)
		if err == nil && !current {
			err = g.guard(link)
		}
		if err != nil {
			errs = append(errs, err)
			refused[dev] = true
		}
	}
	g.refused = refused
	return errors.Join(errs...)
}

// release takes natd's filter off every device of the node that has it and is not in
// want (a pod whose namespace was unpinned, also while natd was not running).
func (g *podGuard) release(want map[podDevice]bool) error {
	links, err := g.nl.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	var errs []error
	for _, l := range links {
		if l.Type() != "veth" || want[podDevice{name: l.Attrs().Name, index: l.Attrs().Index}] {
			continue
		}
		if ours, _, err := g.guarded(l); err != nil || !ours {
			if err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := g.unguard(l); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// intact reports whether every device that must carry the guard does, and no other
// recorded device carries it.
func (g *podGuard) intact(want map[podDevice]bool) (bool, error) {
	for dev, pinned := range want {
		if g.refused[dev] {
			continue
		}
		link, err := g.link(dev)
		if err != nil || link == nil {
			if err != nil {
				return false, err
			}
			continue
		}
		ours, current, err := g.guarded(link)
		if err != nil {
			return false, err
		}
		if pinned != current || (!pinned && ours) {
			return false, nil
		}
	}
	return true, nil
}

// removeAll takes natd's filter off every device of the node (cleanup).
func (g *podGuard) removeAll() error {
	links, err := g.nl.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	var errs []error
	for _, l := range links {
		if err := g.unguard(l); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
