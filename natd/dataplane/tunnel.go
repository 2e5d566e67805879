package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Pinned traffic of a pod on a node that does not hold its egress IP travels to the
// holder inside a VXLAN tunnel that natd owns: one device per egress IP in use, whose
// VNI is derived from the egress IP (TunnelVNI), so the holder knows which egress IP a
// packet is pinned to from the device it arrives on — without knowing the pod, which
// it may not have seen in the API yet. The outer source is the sending node's own
// address, so underlays that drop foreign sources (cloud source/destination checks,
// port security) carry it, and it needs nothing of the CNI's routes.
//
// A device has no remote of its own. Its table's default route goes via the holder's
// node IP (onlink; an IPv6 egress IP's via TunnelNextHop6 of it); a permanent neighbour entry gives that next hop the holder's
// tunnel MAC, and a forwarding entry sends that MAC to the holder's node IP. Each
// node's tunnel devices share one MAC derived from its node IP (TunnelMAC), so no node
// ever has to learn another's: a holder change re-points one route, one neighbour and
// one forwarding entry per egress IP.

// TunnelOverhead is what VXLAN adds to a packet (outer IPv4, UDP, VXLAN, inner
// Ethernet): the tunnel devices' MTU is the uplink's minus this.
const TunnelOverhead = 50

// tunnelPrefix starts the name of every tunnel device natd makes.
const tunnelPrefix = "natd-t"

// Replies to other nodes' tunnelled connections go back through one more device, the
// reply tunnel, to the pod's node, which receives them on its own reply tunnel. A
// reply then never depends on the CNI's routes or on the reverse path filter of the
// CNI's devices (a partner's address arriving on an overlay device is dropped by a
// strict filter). VNI 0 is the reply tunnel's: an egress IP whose low 24 bits are zero
// is refused.
const (
	ReplyDevice = tunnelPrefix + "r"
	ReplyVNI    = 0
)

// tunnelAlias marks natd's devices, so that cleanup never removes someone else's that
// happens to share the prefix.
const tunnelAlias = "natd egress tunnel"

// tunnelAddr is the address every tunnel device carries. Reverse path filtering, loose
// or strict, drops everything that arrives on a device without an IPv4 address; this
// link-local /32 is never a source or destination of any packet.
var tunnelAddr = netip.MustParseAddr("169.254.78.78")

// TunnelDevice names the tunnel device of egress IP slot idx.
func TunnelDevice(idx int) string { return fmt.Sprintf("%s%d", tunnelPrefix, idx) }

// TunnelVNI is the VXLAN network identifier of egress IP ip on every node: its low 24
// bits, of either family. Egress CIDRs whose addresses would share one are refused by
// the configuration (VNIOverlap).
func TunnelVNI(ip netip.Addr) uint32 {
	b := ip.AsSlice()
	n := len(b)
	return uint32(b[n-3])<<16 | uint32(b[n-2])<<8 | uint32(b[n-1])
}

// VNIOverlap reports two egress CIDRs, of either family, that hold different
// addresses with one VNI. (One IPv4 CIDR never does: it would need to be wider than
// a /8; an IPv6 one wider than a /104 is refused by the configuration.)
func VNIOverlap(cidrs []netip.Prefix) (a, b netip.Prefix, overlap bool) {
	for i, p := range cidrs {
		for _, q := range cidrs[i+1:] {
			if p.Overlaps(q) {
				continue // same family, and inside one another: one address, one VNI
			}
			// Compare the ranges of low 24 bits each covers.
			lo1, hi1 := vniRange(p)
			lo2, hi2 := vniRange(q)
			if lo1 <= hi2 && lo2 <= hi1 {
				return p, q, true
			}
		}
	}
	return netip.Prefix{}, netip.Prefix{}, false
}

func vniRange(p netip.Prefix) (lo, hi uint32) {
	if p.Addr().BitLen()-p.Bits() > 24 {
		return 0, 1<<24 - 1
	}
	return TunnelVNI(p.Masked().Addr()), TunnelVNI(broadcast(p))
}

// TunnelMAC is the MAC address of every tunnel device of the node with IP nodeIP.
func TunnelMAC(nodeIP netip.Addr) net.HardwareAddr {
	b := nodeIP.As4()
	return net.HardwareAddr{0x02, 0x4e, b[0], b[1], b[2], b[3]}
}

// tunnelSpec is what one tunnel device must be.
type tunnelSpec struct {
	name  string
	vni   uint32
	local netip.Addr
	port  uint16
	mtu   int
}

// matches reports whether link is the device spec describes.
func (s tunnelSpec) matches(link netlink.Link) bool {
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		return false
	}
	a := vx.Attrs()
	return a.Alias == tunnelAlias && uint32(vx.VxlanId) == s.vni && vx.Port == int(s.port) &&
		vx.SrcAddr.Equal(s.local.AsSlice()) && !vx.Learning && a.MTU == s.mtu &&
		a.HardwareAddr.String() == TunnelMAC(s.local).String() && a.OperState != netlink.OperDown &&
		a.Flags&net.FlagUp != 0
}

// tunnelState is what the kernel has of natd's tunnels, read in four dumps so that a
// sync or a drift check costs the same few netlink round trips with 250 egress IPs as
// with one.
type tunnelState struct {
	links map[string]netlink.Link // natd's tunnel devices by name
	neigh map[int][]netlink.Neigh // neighbours (both families) by link index
	fdb   map[int][]netlink.Neigh // forwarding entries by link index
	addr  map[int]bool            // links that carry tunnelAddr
}

func (r *router) readTunnels() (*tunnelState, error) {
	ts := &tunnelState{neigh: map[int][]netlink.Neigh{}, fdb: map[int][]netlink.Neigh{}, addr: map[int]bool{}}
	var err error
	if ts.links, err = r.tunnels(); err != nil {
		return nil, err
	}
	neighs, err := r.nl.NeighList(0, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing neighbours: %w", err)
	}
	neighs6, err := r.nl.NeighList(0, unix.AF_INET6)
	if ipv6Absent(err) != nil {
		return nil, fmt.Errorf("listing IPv6 neighbours: %w", err)
	}
	for _, n := range append(neighs, neighs6...) {
		ts.neigh[n.LinkIndex] = append(ts.neigh[n.LinkIndex], n)
	}
	fdb, err := r.nl.NeighList(0, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("listing forwarding entries: %w", err)
	}
	for _, n := range fdb {
		ts.fdb[n.LinkIndex] = append(ts.fdb[n.LinkIndex], n)
	}
	addrs, err := r.nl.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == tunnelAddr {
			ts.addr[a.LinkIndex] = true
		}
	}
	return ts, nil
}

// ensureTunnel makes the device spec describes (re-making one that differs), up, with
// its address and loose reverse path filtering, and returns it.
func (r *router) ensureTunnel(ts *tunnelState, s tunnelSpec) (netlink.Link, error) {
	name := s.name
	link, ok := ts.links[name]
	switch {
	case ok && s.matches(link) && ts.addr[link.Attrs().Index]:
		return link, nil
	case ok && !s.matches(link):
		if err := r.nl.LinkDel(link); err != nil && !isNotFound(err) {
			return nil, fmt.Errorf("removing tunnel device %s to re-make it: %w", name, err)
		}
		ok = false
	}
	if !ok {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: name, MTU: s.mtu, HardwareAddr: TunnelMAC(s.local)},
			VxlanId:   int(s.vni), SrcAddr: s.local.AsSlice(), Port: int(s.port), Learning: false,
		}
		if err := r.nl.LinkAdd(vx); err != nil {
			return nil, fmt.Errorf("adding tunnel device %s: %w", name, err)
		}
		var err error
		if link, err = r.nl.LinkByName(name); err != nil {
			return nil, fmt.Errorf("finding tunnel device %s: %w", name, err)
		}
		if err := r.nl.LinkSetAlias(link, tunnelAlias); err != nil {
			return nil, fmt.Errorf("marking tunnel device %s: %w", name, err)
		}
		if err := r.sysctls(link); err != nil {
			return nil, err
		}
		if err := r.nl.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("setting tunnel device %s up: %w", name, err)
		}
	}
	if err := r.nl.AddrReplace(link, &netlink.Addr{IPNet: &net.IPNet{IP: tunnelAddr.AsSlice(), Mask: net.CIDRMask(32, 32)},
		Scope: unix.RT_SCOPE_LINK}); err != nil {
		return nil, fmt.Errorf("adding address to tunnel device %s: %w", name, err)
	}
	return link, nil
}

// sysctls sets a new tunnel device's reverse path filter to loose — packets arrive on
// it with other nodes' pod addresses, which routes reach through other devices — and
// gives it no IPv6 link-local address (IPv6 packets cross it without one; with one it
// would send router solicitations into the tunnel). Both over netlink, not /proc/sys: in the
// DaemonSet's container /proc/sys is read-only, while CAP_NET_ADMIN suffices here.
func (r *router) sysctls(link netlink.Link) error {
	if err := r.inNetns(func() error { return setIPv4DevConf(link, ipv4DevConfRPFilter, 2) }); err != nil {
		return fmt.Errorf("setting rp_filter of %s to loose: %w", link.Attrs().Name, err)
	}
	err := r.nl.LinkSetIP6AddrGenMode(link, addrGenModeNone)
	if err != nil && !errors.Is(err, unix.EAFNOSUPPORT) && !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("turning IPv6 addresses off on %s: %w", link.Attrs().Name, err)
	}
	return nil
}

const (
	// IPV4_DEVCONF_RP_FILTER in linux/ip.h: the index of rp_filter among a device's
	// IPv4 settings (IFLA_INET_CONF), which the kernel lets RTM_SETLINK change.
	ipv4DevConfRPFilter = 8
	// IN6_ADDR_GEN_MODE_NONE: the kernel makes no link-local address on the device.
	addrGenModeNone = 1
)

// setIPv4DevConf sets one of a link's IPv4 settings (net.ipv4.conf.DEV.*) through
// RTM_SETLINK, in the calling thread's network namespace.
func setIPv4DevConf(link netlink.Link, index uint16, value uint32) error {
	conf := nl.NewRtAttr(unix.IFLA_INET_CONF, nil)
	conf.AddRtAttr(int(index), nl.Uint32Attr(value))
	af := nl.NewRtAttr(unix.AF_INET, nil)
	af.AddChild(conf)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	spec.AddChild(af)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(link.Attrs().Index)
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	req.AddData(msg)
	req.AddData(spec)
	_, err := req.Execute(unix.NETLINK_ROUTE, 0)
	return err
}

// TunnelNextHop6 is the IPv6 next hop that stands for the node with IPv4 address
// nodeIP inside natd's tunnels: a link-local address made of it (fe80::4e:a.b.c.d),
// which a permanent neighbour entry resolves to the node's tunnel MAC. IPv6 routes
// cannot have an IPv4 gateway (the kernel refuses RTA_VIA for IPv6), and the tunnel's
// outer packets are IPv4 between node IPs in both families.
func TunnelNextHop6(nodeIP netip.Addr) netip.Addr {
	b := nodeIP.As4()
	return netip.AddrFrom16([16]byte{0: 0xfe, 1: 0x80, 11: 0x4e, 12: b[0], 13: b[1], 14: b[2], 15: b[3]})
}

// neighboursOf are the neighbour entries that make peer reachable through a tunnel:
// its node IP, and its IPv6 next hop when the tunnel carries IPv6.
func neighboursOf(peer netip.Addr, v6 bool) []netip.Addr {
	if v6 {
		return []netip.Addr{peer, TunnelNextHop6(peer)}
	}
	return []netip.Addr{peer}
}

// pointTunnel makes link reach the nodes in peers: a permanent neighbour entry (node
// IP → its tunnel MAC; with v6 its IPv6 next hop too) and a forwarding entry (that MAC
// → the node IP) each. Entries for other nodes stay: unpointTunnel removes them once
// the routes no longer lead there (see ensure).
func (r *router) pointTunnel(ts *tunnelState, link netlink.Link, peers []netip.Addr, v6 bool) error {
	idx := link.Attrs().Index
	neighs, fdb := ts.neigh[idx], ts.fdb[idx]
	for _, peer := range peers {
		mac := TunnelMAC(peer)
		for _, ip := range neighboursOf(peer, v6) {
			if hasNeigh(neighs, ip, mac) {
				continue
			}
			family := unix.AF_INET
			if ip.Is6() {
				family = unix.AF_INET6
			}
			if err := r.nl.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: family, State: netlink.NUD_PERMANENT,
				IP: ip.AsSlice(), HardwareAddr: mac}); err != nil {
				return fmt.Errorf("adding neighbour %s to %s: %w", ip, link.Attrs().Name, err)
			}
		}
		if !hasFDB(fdb, peer, mac) {
			if err := r.nl.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
				Flags: netlink.NTF_SELF, IP: peer.AsSlice(), HardwareAddr: mac}); err != nil {
				return fmt.Errorf("adding forwarding entry for %s to %s: %w", peer, link.Attrs().Name, err)
			}
		}
	}
	return nil
}

// unpointTunnel removes link's neighbour and forwarding entries for any node not in
// peers (ts: as read before pointTunnel; what it added is wanted anyway).
func (r *router) unpointTunnel(ts *tunnelState, link netlink.Link, peers []netip.Addr, v6 bool) error {
	idx := link.Attrs().Index
	neighs, fdb := ts.neigh[idx], ts.fdb[idx]
	want := map[netip.Addr]bool{}
	wantMAC := map[string]bool{}
	for _, peer := range peers {
		want[peer] = true
		wantMAC[TunnelMAC(peer).String()] = true
		for _, ip := range neighboursOf(peer, v6) {
			want[ip] = true
		}
	}
	for _, n := range neighs {
		if ip, ok := netip.AddrFromSlice(n.IP); ok && !want[ip.Unmap()] && n.State&netlink.NUD_PERMANENT != 0 {
			n := n
			if err := r.nl.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("removing neighbour %s from %s: %w", ip, link.Attrs().Name, err)
			}
		}
	}
	for _, n := range fdb {
		// (AddrFromSlice: a foreign entry may have an IPv6 or no destination.)
		if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok && want[ip] && wantMAC[n.HardwareAddr.String()] {
			continue
		}
		n := n
		n.Flags |= netlink.NTF_SELF
		if err := r.nl.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("removing forwarding entry %s from %s: %w", n.HardwareAddr, link.Attrs().Name, err)
		}
	}
	return nil
}

// pointed reports whether link reaches every node in peers (with v6: by their IPv6
// next hops too) and has its address.
func (ts *tunnelState) pointed(link netlink.Link, peers []netip.Addr, v6 bool) bool {
	idx := link.Attrs().Index
	for _, peer := range peers {
		if !hasFDB(ts.fdb[idx], peer, TunnelMAC(peer)) {
			return false
		}
		for _, ip := range neighboursOf(peer, v6) {
			if !hasNeigh(ts.neigh[idx], ip, TunnelMAC(peer)) {
				return false
			}
		}
	}
	return ts.addr[idx]
}

func hasNeigh(list []netlink.Neigh, ip netip.Addr, mac net.HardwareAddr) bool {
	for _, n := range list {
		if n.IP.Equal(ip.AsSlice()) && n.HardwareAddr.String() == mac.String() && n.State&netlink.NUD_PERMANENT != 0 {
			return true
		}
	}
	return false
}

func hasFDB(list []netlink.Neigh, ip netip.Addr, mac net.HardwareAddr) bool {
	for _, n := range list {
		if n.IP.Equal(ip.AsSlice()) && n.HardwareAddr.String() == mac.String() {
			return true
		}
	}
	return false
}

// tunnels lists natd's tunnel devices by name.
func (r *router) tunnels() (map[string]netlink.Link, error) {
	links, err := r.nl.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	out := map[string]netlink.Link{}
	for _, l := range links {
		if isTunnel(l) {
			out[l.Attrs().Name] = l
		}
	}
	return out, nil
}

// isTunnel reports whether l is one of natd's tunnel devices.
func isTunnel(l netlink.Link) bool {
	_, vx := l.(*netlink.Vxlan)
	return vx && strings.HasPrefix(l.Attrs().Name, tunnelPrefix) && l.Attrs().Alias == tunnelAlias
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}
