package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// A connection survives a move of its egress IP when the new holder translates it as
// the old one did. The new holder knows nothing of it: conntrack picks the connection
// up from its next packet and SNATs it to the egress IP, keeping the pod's source
// port when that is free. That reproduces every binding the old holder made by
// keeping the port, but not the ones where it had to choose another: two pods on two
// nodes that use one source port to one partner port. The first of the two to send
// after the move gets the port (whichever it had), the other a fresh one, and the
// partner resets both. So a holder hands those bindings over: it reads the ones whose
// port it changed from conntrack, the agent gossips them to the nodes that may take
// the IP next, and a node that takes the IP writes them into its conntrack before
// the IP's traffic reaches it. Kept ports need no handover: the new holder keeps them
// too, and the handed-over bindings occupy the ports they hold.

// Binding is one connection's NAT binding on the holder of an egress IP: the pod's
// connection to the partner leaves as Egress.
type Binding struct {
	Proto   uint8 // unix.IPPROTO_TCP or unix.IPPROTO_UDP
	Pod     netip.AddrPort
	Partner netip.AddrPort
	Egress  netip.AddrPort
}

// handoverTimeout is the conntrack timeout of a handed-over binding until its
// connection's next packet (which gives it the kernel's own timeout for its state): a
// binding whose connection ended meanwhile does not keep its port for long.
const handoverTimeout = 600 // seconds

// bindingOf reports the binding of a conntrack entry that the handover carries: one
// SNATed to an egress IP in held, with another port than the pod's, of a connection
// that is established (TCP) or any UDP one.
func bindingOf(f *netlink.ConntrackFlow, held map[netip.Addr]bool) (Binding, bool) {
	if f.Forward.Protocol != unix.IPPROTO_TCP && f.Forward.Protocol != unix.IPPROTO_UDP {
		return Binding{}, false
	}
	egress, _ := netip.AddrFromSlice(f.Reverse.DstIP)
	pod, _ := netip.AddrFromSlice(f.Forward.SrcIP)
	partner, _ := netip.AddrFromSlice(f.Forward.DstIP)
	egress, pod, partner = egress.Unmap(), pod.Unmap(), partner.Unmap()
	if !held[egress] || pod == egress || f.Forward.SrcPort == f.Reverse.DstPort {
		return Binding{}, false
	}
	if tcp, ok := f.ProtoInfo.(*netlink.ProtoInfoTCP); ok && tcp.State != tcpEstablished {
		return Binding{}, false
	}
	return Binding{Proto: f.Forward.Protocol, Pod: netip.AddrPortFrom(pod, f.Forward.SrcPort),
		Partner: netip.AddrPortFrom(partner, f.Forward.DstPort), Egress: netip.AddrPortFrom(egress, f.Reverse.DstPort)}, true
}

// tcpEstablished is conntrack's TCP state ESTABLISHED (enum tcp_conntrack).
const tcpEstablished = 3

// Bindings reads the bindings of the egress IPs in held that a successor must be
// handed (see Binding), sorted. From the same read it makes every TCP connection of a
// held IP liberal, once (loosenHeld).
func (d *Dataplane) Bindings(held []netip.Addr) ([]Binding, error) {
	set := map[netip.Addr]bool{}
	for _, ip := range held {
		set[ip] = true
	}
	var out []Binding
	var tcp []*netlink.ConntrackFlow
	for _, fam := range familiesOf(held) {
		flows, err := d.nl.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			return nil, fmt.Errorf("reading conntrack: %w", err)
		}
		for _, f := range flows {
			if b, ok := bindingOf(f, set); ok {
				out = append(out, b)
			}
			if heldTCP(f, set) {
				tcp = append(tcp, f)
			}
		}
	}
	d.loosenHeld(tcp)
	slices.SortFunc(out, compareBindings)
	return out, nil
}

// heldTCP reports whether f is a TCP connection SNATed to an IP in held.
func heldTCP(f *netlink.ConntrackFlow, held map[netip.Addr]bool) bool {
	natted, _ := netip.AddrFromSlice(f.Reverse.DstIP)
	pod, _ := netip.AddrFromSlice(f.Forward.SrcIP)
	return f.Forward.Protocol == unix.IPPROTO_TCP && held[natted.Unmap()] && pod.Unmap() != natted.Unmap()
}

// flowKey names a connection by its original direction.
type flowKey struct{ src, dst netip.AddrPort }

func keyOf(f *netlink.ConntrackFlow) flowKey {
	src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
	dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
	return flowKey{netip.AddrPortFrom(src.Unmap(), f.Forward.SrcPort), netip.AddrPortFrom(dst.Unmap(), f.Forward.DstPort)}
}

// loosenHeld makes liberal the connections of flows (a held IP's TCP connections) not
// made liberal by an earlier call. Made liberal only when a move begins
// (loosenHandingOver), they were not always in time: the new holder, acting on the
// same API change, could take the IP and the pods' nodes send through it before this
// node had begun its handover, and the partners' answers that still reached it were
// out of its window — dropped, and every connection of the IP waited for a
// retransmission (one planned move of 10 to 20). A liberal connection is still
// tracked, and the pod's stack checks every segment; kube-proxy offers the same for
// all connections (--conntrack-tcp-be-liberal). A failure is logged: the connection
// then waits for the handover's loosening, as before. It has its own ctnetlink
// connection and lock: loosening thousands of new connections must not hold up an
// Apply (a takeover) behind it.
func (d *Dataplane) loosenHeld(flows []*netlink.ConntrackFlow) {
	d.looseMu.Lock()
	defer d.looseMu.Unlock()
	next := make(map[flowKey]bool, len(flows))
	n := 0
	for _, f := range flows {
		k := keyOf(f)
		if d.liberal[k] {
			next[k] = true
			continue
		}
		msg, err := liberalMessage(f)
		if err == nil {
			err = d.ctExecuteOn(&d.looseConn, msg)
		}
		if err != nil && !errors.Is(err, unix.ENOENT) { // ENOENT: it ended meanwhile
			klog.V(2).InfoS("Held connections not all made liberal", "liberal", n, "err", err)
			break
		}
		next[k] = true
		n++
	}
	d.liberal = next
	if n > 0 {
		klog.V(4).InfoS("Made held connections liberal", "connections", n)
	}
}

func compareBindings(a, b Binding) int {
	if c := a.Egress.Compare(b.Egress); c != 0 {
		return c
	}
	if c := a.Pod.Compare(b.Pod); c != 0 {
		return c
	}
	if c := a.Partner.Compare(b.Partner); c != 0 {
		return c
	}
	return int(a.Proto) - int(b.Proto)
}

// installBindings writes handed-over bindings of the egress IPs this node takes into
// its conntrack. One that is there already (the connection of a pod on this node,
// which it passed on un-NATed until now: the stale-flow sweep deletes that entry, and
// the second call, after the sweep, writes this node's pods' bindings: localOnly) or
// whose port another entry holds is skipped. A failure fails no Apply: the connection breaks, nothing leaks
// (the leak guard checks every packet), and the node must take the IP all the same.
//
// Bindings come from other nodes: only a pod's connection is written (a source in the
// cluster's pod CIDRs), and one of a pod on this node only if the pod is pinned to
// that egress IP here — a binding can never give the egress IP to a connection that
// would not have had it anyway.
func (d *Dataplane) installBindings(state State, taken map[netip.Addr]bool, localOnly bool) {
	in := func(cidrs []netip.Prefix, a netip.Addr) bool {
		return slices.ContainsFunc(cidrs, func(p netip.Prefix) bool { return p.Contains(a) })
	}
	written, exist, refused := 0, 0, 0
	var failed error
	for _, b := range state.Handover {
		ip, pod := b.Egress.Addr(), b.Pod.Addr()
		if !taken[ip] || (localOnly && !in(state.LocalPodCIDRs, pod)) {
			continue
		}
		mark := d.cfg.Marks.PinnedFlow()
		switch {
		case !in(state.PodCIDRs, pod):
			refused++
			continue
		case in(state.LocalPodCIDRs, pod):
			if i := egressIndex(state.Egress, ip); i < 0 || !slices.Contains(state.Egress[i].Pods, pod) {
				refused++
				continue
			}
		default:
			mark |= d.cfg.Marks.TunnelledFlow() // its replies go back through the reply tunnel
		}
		switch err := d.createBinding(b, mark); {
		case err == nil:
			written++
		case errors.Is(err, unix.EEXIST):
			exist++
		default:
			failed = err
		}
	}
	if failed != nil {
		klog.InfoS("Handed-over NAT bindings not all written", "written", written, "err", failed)
	}
	if refused > 0 {
		klog.InfoS("Handed-over NAT bindings refused: not a pod pinned to the egress IP", "refused", refused)
	}
	if written > 0 {
		klog.V(2).InfoS("Wrote handed-over NAT bindings", "written", written, "present", exist)
	}
}

// ctnetlink attribute types (linux/netfilter/nfnetlink_conntrack.h).
const (
	ctaTupleOrig       = 1
	ctaTupleReply      = 2
	ctaStatus          = 3
	ctaProtoinfo       = 4
	ctaNATSrc          = 6
	ctaTimeout         = 7
	ctaMark            = 8
	ctaTupleIP         = 1
	ctaTupleProto      = 2
	ctaIPv4Src         = 1
	ctaIPv4Dst         = 2
	ctaIPv6Src         = 3
	ctaIPv6Dst         = 4
	ctaProtoNum        = 1
	ctaProtoSrcPort    = 2
	ctaProtoDstPort    = 3
	ctaProtoinfoTCP    = 1
	ctaProtoinfoTCPSt  = 1
	ctaNATv4MinIP      = 1
	ctaNATProto        = 3
	ctaNATv6MinIP      = 4
	ctaProtoNATPortMin = 1
	ctaProtoNATPortMax = 2
	ipsSeenReply       = 1 << 1
	ipsAssured         = 1 << 2
	ipsConfirmed       = 1 << 3
	ipctnlMsgCtNew     = 0 // IPCTNL_MSG_CT_NEW
)

// createBinding writes one conntrack entry: the pod's connection as it arrives here,
// SNATed to b.Egress. The reply tuple is the un-NATed one and the NAT comes as a
// range of one address and one port: the kernel marks the entry SNATed only when the
// NAT setup changes the reply tuple (a reply tuple given already NATed would be kept
// and never applied to a packet).
func (d *Dataplane) createBinding(b Binding, mark uint32) error {
	msg, err := bindingMessage(b, mark)
	if err != nil {
		return err
	}
	if err := d.ctExecute(msg); err != nil {
		return fmt.Errorf("writing conntrack entry %s→%s as %s: %w", b.Pod, b.Partner, b.Egress, err)
	}
	return nil
}

// ctTuple encodes a conntrack tuple (src → dst, proto) into ae under attr.
func ctTuple(ae *mdnetlink.AttributeEncoder, attr uint16, proto uint8, src, dst netip.AddrPort) {
	srcAttr, dstAttr := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if src.Addr().Is6() {
		srcAttr, dstAttr = ctaIPv6Src, ctaIPv6Dst
	}
	ae.Nested(attr, func(ae *mdnetlink.AttributeEncoder) error {
		ae.Nested(ctaTupleIP, func(ae *mdnetlink.AttributeEncoder) error {
			ae.Bytes(srcAttr, src.Addr().AsSlice())
			ae.Bytes(dstAttr, dst.Addr().AsSlice())
			return nil
		})
		ae.Nested(ctaTupleProto, func(ae *mdnetlink.AttributeEncoder) error {
			ae.Uint8(ctaProtoNum, proto)
			ae.Uint16(ctaProtoSrcPort, src.Port())
			ae.Uint16(ctaProtoDstPort, dst.Port())
			return nil
		})
		return nil
	})
}

// ctRequest is a ctnetlink request of type msg for the family of v6, its attributes
// encoded by attrs.
func ctRequest(msg uint16, flags mdnetlink.HeaderFlags, v6 bool, attrs func(*mdnetlink.AttributeEncoder)) (mdnetlink.Message, error) {
	fam := byte(unix.AF_INET)
	if v6 {
		fam = unix.AF_INET6
	}
	ae := mdnetlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	attrs(ae)
	data, err := ae.Encode()
	if err != nil {
		return mdnetlink.Message{}, fmt.Errorf("encoding a conntrack request: %w", err)
	}
	return mdnetlink.Message{
		Header: mdnetlink.Header{Type: mdnetlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | msg), Flags: mdnetlink.Request | flags},
		Data:   append([]byte{fam, unix.NFNETLINK_V0, 0, 0}, data...), // struct nfgenmsg
	}, nil
}

// bindingMessage is the ctnetlink request that creates b's entry.
func bindingMessage(b Binding, mark uint32) (mdnetlink.Message, error) {
	v6 := b.Egress.Addr().Is6()
	if b.Pod.Addr().Is6() != v6 || b.Partner.Addr().Is6() != v6 {
		return mdnetlink.Message{}, fmt.Errorf("binding %s→%s as %s mixes address families", b.Pod, b.Partner, b.Egress)
	}
	natAttr := uint16(ctaNATv4MinIP)
	if v6 {
		natAttr = ctaNATv6MinIP
	}
	return ctRequest(ipctnlMsgCtNew, mdnetlink.Acknowledge|mdnetlink.Create|mdnetlink.Excl, v6, func(ae *mdnetlink.AttributeEncoder) {
		ctTuple(ae, ctaTupleOrig, b.Proto, b.Pod, b.Partner)
		ctTuple(ae, ctaTupleReply, b.Proto, b.Partner, b.Pod)
		ae.Nested(ctaNATSrc, func(ae *mdnetlink.AttributeEncoder) error {
			ae.Bytes(natAttr, b.Egress.Addr().AsSlice())
			ae.Nested(ctaNATProto, func(ae *mdnetlink.AttributeEncoder) error {
				ae.Uint16(ctaProtoNATPortMin, b.Egress.Port())
				ae.Uint16(ctaProtoNATPortMax, b.Egress.Port())
				return nil
			})
			return nil
		})
		// Seen both ways and assured: the connection's packets are ESTABLISHED here, as
		// they were on the old holder (CONFIRMED: the kernel refuses a status without it).
		ae.Uint32(ctaStatus, ipsSeenReply|ipsAssured|ipsConfirmed)
		ae.Uint32(ctaTimeout, handoverTimeout)
		ae.Uint32(ctaMark, mark)
		if b.Proto == unix.IPPROTO_TCP {
			ctTCPInfo(ae, func(ae *mdnetlink.AttributeEncoder) { ae.Uint8(ctaProtoinfoTCPSt, tcpEstablished) })
		}
	})
}

// ctTCPInfo encodes conntrack's TCP protocol info, its attributes encoded by attrs.
func ctTCPInfo(ae *mdnetlink.AttributeEncoder, attrs func(*mdnetlink.AttributeEncoder)) {
	ae.Nested(ctaProtoinfo, func(ae *mdnetlink.AttributeEncoder) error {
		ae.Nested(ctaProtoinfoTCP, func(ae *mdnetlink.AttributeEncoder) error {
			attrs(ae)
			return nil
		})
		return nil
	})
}

// Wire form of the bindings of one egress IP (the payload of a handover message):
//
//	version(1) addrLen(1) egressIP count(4) count*(proto(1) pod port(2) partner port(2) egressPort(2))
//
// with addresses of the egress IP's length.
const handoverWireVersion = 1

// maxHandover bounds the bindings of one egress IP in one message (and what a message
// read from the network may claim): 64 Ki bindings of IPv6 are 2.4 MB.
const maxHandover = 1 << 16

// EncodeBindings is the handover message of ip's bindings (those of other IPs in bs
// are left out).
func EncodeBindings(ip netip.Addr, bs []Binding) []byte {
	alen := ip.BitLen() / 8
	mine := slices.DeleteFunc(slices.Clone(bs), func(b Binding) bool {
		return b.Egress.Addr() != ip || b.Pod.Addr().BitLen() != ip.BitLen() || b.Partner.Addr().BitLen() != ip.BitLen()
	})
	mine = mine[:min(len(mine), maxHandover)]
	out := make([]byte, 0, 6+alen+len(mine)*(7+2*alen))
	out = append(out, handoverWireVersion, byte(alen))
	out = append(out, ip.AsSlice()...)
	out = binary.BigEndian.AppendUint32(out, uint32(len(mine)))
	for _, b := range mine {
		out = append(out, b.Proto)
		out = append(out, b.Pod.Addr().AsSlice()...)
		out = binary.BigEndian.AppendUint16(out, b.Pod.Port())
		out = append(out, b.Partner.Addr().AsSlice()...)
		out = binary.BigEndian.AppendUint16(out, b.Partner.Port())
		out = binary.BigEndian.AppendUint16(out, b.Egress.Port())
	}
	return out
}

// errBadHandover is a handover message that cannot be read.
var errBadHandover = errors.New("unreadable handover message")

// DecodeBindings reads a handover message: the egress IP and its bindings.
func DecodeBindings(b []byte) (netip.Addr, []Binding, error) {
	if len(b) < 2 || b[0] != handoverWireVersion || (b[1] != 4 && b[1] != 16) {
		return netip.Addr{}, nil, fmt.Errorf("%w: header", errBadHandover)
	}
	alen := int(b[1])
	if len(b) < 6+alen {
		return netip.Addr{}, nil, fmt.Errorf("%w: %d bytes", errBadHandover, len(b))
	}
	ip, _ := netip.AddrFromSlice(b[2 : 2+alen])
	n := binary.BigEndian.Uint32(b[2+alen:])
	rest := b[6+alen:]
	size := 7 + 2*alen
	if n > maxHandover || len(rest) != int(n)*size {
		return netip.Addr{}, nil, fmt.Errorf("%w: %d bindings in %d bytes", errBadHandover, n, len(rest))
	}
	out := make([]Binding, 0, n)
	for i := 0; i < int(n); i++ {
		r := rest[i*size : (i+1)*size]
		proto := r[0]
		if proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_UDP {
			return netip.Addr{}, nil, fmt.Errorf("%w: protocol %d", errBadHandover, proto)
		}
		pod, _ := netip.AddrFromSlice(r[1 : 1+alen])
		partner, _ := netip.AddrFromSlice(r[3+alen : 3+2*alen])
		out = append(out, Binding{Proto: proto,
			Pod:     netip.AddrPortFrom(pod, binary.BigEndian.Uint16(r[1+alen:])),
			Partner: netip.AddrPortFrom(partner, binary.BigEndian.Uint16(r[3+2*alen:])),
			Egress:  netip.AddrPortFrom(ip, binary.BigEndian.Uint16(r[5+2*alen:]))})
	}
	return ip, out, nil
}

// While a planned move overlaps (make-before-break), a pod's segments already leave
// through the new holder, but the partners' replies still reach the old one until the
// router follows the new holder's announcement. The old holder's conntrack has not
// seen the data they acknowledge: it finds them out of window, marks them invalid and
// does not un-NAT them, and the connection stalls until the pod retransmits (0.26 s
// p50, 0.5 s p99 in make bench-failover). So when an IP starts being handed over, its
// connections here are made liberal (the kernel's per-connection form of
// nf_conntrack_tcp_be_liberal, a netns-wide sysctl natd must not touch): the window
// is not checked, the replies are un-NATed and go on to the pod. Only those
// connections, only on the node letting them go.

// loosenHandingOver makes the TCP connections of IPs that state starts handing over
// liberal (once per handover). A failure fails no Apply: the connection stalls as it
// would have.
func (d *Dataplane) loosenHandingOver(state State) {
	want := map[netip.Addr]bool{}
	var start []netip.Addr
	for _, e := range state.Egress {
		if e.Local && e.HandingOver {
			want[e.IP] = true
			if !d.loosened[e.IP] {
				start = append(start, e.IP)
			}
		}
	}
	d.loosened = want
	if len(start) == 0 {
		return
	}
	n, err := d.loosenConntrack(start)
	if err != nil {
		klog.InfoS("Handed-over connections not all made liberal", "ips", start, "liberal", n, "err", err)
		return
	}
	klog.V(2).InfoS("Made handed-over connections liberal", "ips", start, "connections", n)
}

// ipCtTCPFlagBeLiberal is IP_CT_TCP_FLAG_BE_LIBERAL: the window is not checked.
const ipCtTCPFlagBeLiberal = 0x08

const (
	ctaProtoinfoTCPFlagsOrig  = 4
	ctaProtoinfoTCPFlagsReply = 5
)

// loosenConntrack makes liberal every TCP connection SNATed to one of ips.
func (d *Dataplane) loosenConntrack(ips []netip.Addr) (int, error) {
	set := map[netip.Addr]bool{}
	for _, ip := range ips {
		set[ip] = true
	}
	n := 0
	for _, fam := range familiesOf(ips) {
		flows, err := d.nl.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			return n, fmt.Errorf("reading conntrack: %w", err)
		}
		for _, f := range flows {
			if !heldTCP(f, set) {
				continue
			}
			msg, err := liberalMessage(f)
			if err != nil {
				return n, err
			}
			if err := d.ctExecute(msg); err != nil && !errors.Is(err, unix.ENOENT) {
				return n, err // ENOENT: the connection ended meanwhile
			}
			n++
		}
	}
	return n, nil
}

// liberalMessage is the ctnetlink request that makes f's TCP tracking liberal both ways.
func liberalMessage(f *netlink.ConntrackFlow) (mdnetlink.Message, error) {
	src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
	dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
	src, dst = src.Unmap(), dst.Unmap()
	return ctRequest(ipctnlMsgCtNew, mdnetlink.Acknowledge, src.Is6(), func(ae *mdnetlink.AttributeEncoder) {
		ctTuple(ae, ctaTupleOrig, unix.IPPROTO_TCP, netip.AddrPortFrom(src, f.Forward.SrcPort), netip.AddrPortFrom(dst, f.Forward.DstPort))
		ctTCPInfo(ae, func(ae *mdnetlink.AttributeEncoder) {
			flags := []byte{ipCtTCPFlagBeLiberal, ipCtTCPFlagBeLiberal} // struct nf_ct_tcp_flags: flags, mask
			ae.Bytes(ctaProtoinfoTCPFlagsOrig, flags)
			ae.Bytes(ctaProtoinfoTCPFlagsReply, flags)
		})
	})
}

// familiesOf are the conntrack families of ips.
func familiesOf(ips []netip.Addr) []netlink.InetFamily {
	var out []netlink.InetFamily
	for _, ip := range ips {
		fam := netlink.InetFamily(unix.AF_INET)
		if ip.Is6() {
			fam = unix.AF_INET6
		}
		if !slices.Contains(out, fam) {
			out = append(out, fam)
		}
	}
	return out
}

// ctExecute sends one ctnetlink request and waits for its acknowledgement (Apply's
// connection: the caller holds mu).
func (d *Dataplane) ctExecute(msg mdnetlink.Message) error { return d.ctExecuteOn(&d.ctConn, msg) }

// ctExecuteOn is ctExecute on the connection *c, opened on first use.
func (d *Dataplane) ctExecuteOn(c **mdnetlink.Conn, msg mdnetlink.Message) error {
	if *c == nil {
		conn, err := d.dial(unix.NETLINK_NETFILTER)
		if err != nil {
			return err
		}
		*c = conn
	}
	_, err := (*c).Execute(msg)
	return err
}
