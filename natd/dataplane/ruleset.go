package dataplane

import (
	"fmt"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TableName names natd's nftables tables (families ip, ip6 and arp). natd touches
// nothing else.
const TableName = "natd"

// Names of the sets and maps in natd's table.
const (
	setClusterDsts   = "cluster_dsts"    // interval set: destinations that are never pinned
	setNodeIPs       = "node_ips"        // every node's IP: the only legal next hops for un-SNATed pinned packets
	setPodCIDRs      = "pod_cidrs"       // interval set: the cluster's pod CIDRs
	setLocalPodCIDRs = "local_pod_cidrs" // interval set: this node's pod CIDRs
	setHeldAddrs     = "held_addrs"      // egress IPs on this node's uplink, with their claim generation
	setHeldMarks     = "held_marks"      // egress IP . its mark, for held IPs whose lease is current
	chainFromTunnels = "from_tunnels"    // packets out of the egress IPs' tunnels, by device
	chainGuardedPods = "guarded_pods"    // packets of pinned pods' own devices: classified, or dropped
	setHeldDsts      = "held_dsts"       // egress IPs on this node's uplink, as destinations (held_addrs counts SNAT)
	setLeasedIPs     = "leased_ips"      // (arp table) held egress IPs whose lease is current
	MapCNIPods       = "cni_pods"        // this node's pods as the CNI plugin saw them -> jump to their egress chain, or return (unpinned)
	mapPodEgress     = "pod_egress"      // pinned pod IP (from the API) -> jump to its egress IP's chain
	mapHeldSNAT      = "held_snat"       // mark of a leased egress IP -> that egress IP (expires with the lease)

	// The ip6 table's sets have the same names with a 6 (family.set).
	MapCNIPods6     = MapCNIPods + "6"
	ChainPinnedIPv6 = "pinned_ipv6" // IPv6 traffic of pinned pods to the outside whose namespace has no IPv6 egress IP: dropped
	ChainPinnedIPv4 = "pinned_ipv4" // the same for IPv4, in the ip table
)

// Base-chain priorities. natd classifies and marks just after dstnat (-100, where
// kube-proxy's and iptables' DNAT sit): a Service's translated destination decides
// whether the packet leaves the cluster, so a ClusterIP whose endpoint is outside is
// pinned like the outside address itself. Routing comes after every prerouting hook,
// so the mark still steers policy routing. natd SNATs just before srcnat (100, where
// iptables' and most CNIs' MASQUERADE sits): the first NAT chain that binds a
// connection wins, so an earlier binding keeps the CNI from rewriting a pinned packet.
// The guard runs after all NAT, when the packet carries its final source address.
const (
	prioMark  = -90  // dstnat + 10
	prioSNAT  = 90   // srcnat - 10
	prioGuard = 110  // srcnat + 10
	prioClamp = -150 // mangle
)

// Marks are the bits of the packet mark natd owns; the rest is left to others
// (kube-proxy uses 0x4000/0x8000).
type Marks struct {
	Mask  uint32
	shift uint
}

// NewMarks validates a mark mask: one contiguous run of at least 8 bits, so that 255
// egress IPs fit.
func NewMarks(mask uint32) (Marks, error) {
	if mask == 0 {
		return Marks{}, fmt.Errorf("fwmark mask must not be zero")
	}
	shift := uint(bits.TrailingZeros32(mask))
	run := mask >> shift
	if run&(run+1) != 0 {
		return Marks{}, fmt.Errorf("fwmark mask %#08x is not one contiguous run of bits", mask)
	}
	if bits.OnesCount32(mask) < 8 {
		return Marks{}, fmt.Errorf("fwmark mask %#08x has fewer than 8 bits", mask)
	}
	return Marks{Mask: mask, shift: shift}, nil
}

// Value is the mark of egress IP slot idx (1..MaxIndex).
func (m Marks) Value(idx int) uint32 { return uint32(idx) << m.shift }

// PinnedFlow is the bit of the connection mark (the lowest of the mask) that natd sets
// on every connection it pinned: a later packet of such a connection that has lost its
// classification (someone flushed natd's maps) is dropped, never sent un-NATed.
func (m Marks) PinnedFlow() uint32 { return 1 << m.shift }

// MaxIndex is the number of egress IPs a node can route at once.
func (m Marks) MaxIndex() int {
	n := int(m.Mask >> m.shift)
	if n > originIndex-1 {
		n = originIndex - 1 // keep route table numbers in a small, documented range
	}
	return n
}

// The mark values no slot uses.
const (
	passIndex   = 255
	replyIndex  = 254
	originIndex = 253
)

// Pass is the mark of pinned packets that natd lets the main table route: fail-open
// traffic. It keeps tunnelled fail-open packets clear of the route guard, which
// blackholes tunnelled packets that carry no natd mark (natd's tables are gone).
func (m Marks) Pass() uint32 { return m.Value(passIndex) }

// Reply is the mark of replies to connections that came out of a tunnel: policy
// routing sends them back to the pod's node through the reply tunnel.
func (m Marks) Reply() uint32 { return m.Value(replyIndex) }

// Origin is the mark a pinned pod's own device gives every packet the pod sends (the
// pod guard, podguard.go). natd's tables replace it when they classify the packet, and
// drop a packet they cannot classify; a packet that still carries it at routing has
// met no natd table, and the route guard keeps it in.
func (m Marks) Origin() uint32 { return m.Value(originIndex) }

// TunnelledFlow is the conntrack-mark bit of connections that came out of a tunnel
// (the bit above PinnedFlow).
func (m Marks) TunnelledFlow() uint32 { return 2 << m.shift }

// Ruleset is the complete content of one of natd's tables: built by BuildRuleset as a
// pure function of the state, rendered as nft text for tests and humans, and turned into
// one netlink batch by the applier.
type Ruleset struct {
	Family nftables.TableFamily
	Sets   []*Set
	Chains []*Chain
}

func (rs *Ruleset) familyName() string {
	switch rs.Family {
	case nftables.TableFamilyARP:
		return "arp"
	case nftables.TableFamilyIPv6:
		return "ip6"
	}
	return "ip"
}

// Set is a named set or map with its elements.
type Set struct {
	Name     string
	Decl     string // the "type ..." and "flags ..." lines as nft prints them
	KeyType  nftables.SetDatatype
	DataType nftables.SetDatatype
	IsMap    bool
	Interval bool
	// Concat: the key is an address . mark (Element.Key, Element.Key2).
	Concat bool
	// Timeout, when set, is given to every element: the element disappears from the
	// kernel unless natd re-adds it in time (a lease).
	Timeout time.Duration
	// Counter gives every element its own packet and byte counter.
	Counter  bool
	KeyOrder binaryutil.ByteOrder
	Elements []Element
}

// keyLen is the length of one key part in the kernel.
func (s *Set) keyLen() int {
	if strings.HasPrefix(s.KeyType.Name, nftables.TypeIP6Addr.Name) { // a concatenation's name starts with its first part's
		return 16
	}
	return 4
}

// Element is one element: a small value, so that at 50k pods building and comparing
// the sets each sync allocates nothing per element.
type Element struct {
	Key    [16]byte // address (IPv4: the first 4 bytes, network order) or mark (host order)
	KeyEnd [16]byte // interval sets: first address after the range (zero: to the end)
	Key2   [4]byte  // concatenated sets: the mark that follows the address
	Val    [16]byte // maps to an address (IPv4: the first 4 bytes)
	// Verdict maps: the chain to go to (shared by all elements of a group), or, with
	// Return, no chain: the packet leaves natd's chain unclassified (an unpinned pod).
	Chain  string
	Return bool
	// Comment is kept in the kernel with the element (held_addrs: the claim generation).
	Comment string
}

func addrKey(a netip.Addr) (k [16]byte) {
	if a.Is4() {
		b := a.As4()
		copy(k[:], b[:])
	} else {
		k = a.As16()
	}
	return k
}

func markKey(v uint32) (k [16]byte) {
	copy(k[:], native32(v))
	return k
}

// ElementText is how nft prints e as an element of s.
func (s *Set) ElementText(e Element) string {
	var key string
	switch {
	case s.Interval:
		key = addrRange{keyAddr(s, e.Key), keyAddr(s, e.KeyEnd)}.String()
	case s.KeyType.Name == nftables.TypeMark.Name:
		key = fmt.Sprintf("0x%08x", binaryutil.NativeEndian.Uint32(e.Key[:4]))
	case s.Concat:
		key = fmt.Sprintf("%s . 0x%08x", keyAddr(s, e.Key), binaryutil.NativeEndian.Uint32(e.Key2[:]))
	default:
		key = keyAddr(s, e.Key).String()
	}
	if s.Timeout > 0 {
		key += " timeout " + nftDuration(s.Timeout)
	}
	if s.Counter {
		key += " counter" // as `nft -s` prints it: stateless, without the counts
	}
	if e.Comment != "" {
		key += fmt.Sprintf(" comment %q", e.Comment)
	}
	switch {
	case !s.IsMap:
		return key
	case e.Return:
		return key + " : return"
	case e.Chain != "":
		return key + " : goto " + e.Chain
	default:
		return key + " : " + valAddr(s, e.Val).String()
	}
}

// keyAddr reads an address key of s; an all-zero key of an interval end is invalid (to
// the end of the address space).
func keyAddr(s *Set, k [16]byte) netip.Addr {
	if s.keyLen() == 16 {
		return netip.AddrFrom16(k)
	}
	return netip.AddrFrom4([4]byte(k[:4]))
}

// valAddr reads an address a map of s maps to.
func valAddr(s *Set, v [16]byte) netip.Addr {
	if s.DataType.Name == nftables.TypeIP6Addr.Name {
		return netip.AddrFrom16(v)
	}
	return netip.AddrFrom4([4]byte(v[:4]))
}

// valLen is the length of the data s maps to (addresses only; verdicts are encoded
// apart).
func (s *Set) valLen() int {
	if s.DataType.Name == nftables.TypeIP6Addr.Name {
		return 16
	}
	return 4
}

// nftDuration prints a duration the way nft does: 400ms, 2s, 1m30s.
func nftDuration(d time.Duration) string {
	var b strings.Builder
	for _, u := range []struct {
		d    time.Duration
		name string
	}{{time.Hour, "h"}, {time.Minute, "m"}, {time.Second, "s"}, {time.Millisecond, "ms"}} {
		if n := d / u.d; n > 0 {
			fmt.Fprintf(&b, "%d%s", n, u.name)
			d -= n * u.d
		}
	}
	return b.String()
}

// Chain is a chain and its rules. Base chains have a hook.
type Chain struct {
	Name     string
	Type     nftables.ChainType
	Hook     *nftables.ChainHook
	Priority int
	Header   string // the "type ... hook ... priority ...; policy accept;" line; empty for regular chains
	Rules    []*Rule
}

// Rule is one rule as both nft text and kernel expressions, built together by the
// helpers below so that they cannot disagree.
type Rule struct {
	parts []string
	Exprs []expr.Any
	// Drops, when set, names why the rule drops pinned packets; its counter is
	// exported as a metric with that reason.
	Drops string
}

// Text is the rule as `nft list` prints it.
func (r *Rule) Text() string { return strings.Join(r.parts, " ") }

func (r *Rule) add(text string, exprs ...expr.Any) *Rule {
	r.parts = append(r.parts, text)
	r.Exprs = append(r.Exprs, exprs...)
	return r
}

func newRule() *Rule { return &Rule{} }

func native32(v uint32) []byte { return binaryutil.NativeEndian.PutUint32(v) }

// arpAddrIn matches an ARP packet's sender (saddr) or target (daddr) IPv4 address
// against a set; offsets are those of Ethernet/IPv4 ARP.
func (r *Rule) arpAddrIn(field string, set string, invert bool) *Rule {
	offset := uint32(14)
	if field == "daddr" {
		offset = 24
	}
	return r.payloadIn("arp "+field+" ip", offset, 4, set, invert)
}

// ipAddrIn matches an IPv4 packet's source (saddr) or destination (daddr) against a set.
func (r *Rule) ipAddrIn(field string, set string, invert bool) *Rule {
	return r.addrIn(familyIPv4, field, set, invert)
}

// addrIn matches a packet's source (saddr) or destination (daddr) of family f against
// a set.
func (r *Rule) addrIn(f family, field string, set string, invert bool) *Rule {
	offset := f.saddrOff
	if field == "daddr" {
		offset = f.daddrOff
	}
	return r.payloadIn(f.name+" "+field, offset, f.addrLen, set, invert)
}

func (r *Rule) payloadIn(text string, offset, length uint32, set string, invert bool) *Rule {
	op := ""
	if invert {
		op = "!= "
	}
	return r.add(fmt.Sprintf("%s %s@%s", text, op, set),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: length},
		&expr.Lookup{SourceRegister: 1, SetName: set, Invert: invert})
}

// saddrMarkIn matches the pair (source address, natd's bits of the mark) against a
// concatenated set: the packet left with the egress IP its own pinning names.
func (r *Rule) saddrMarkIn(f family, mask uint32, set string) *Rule {
	// A concatenation fills consecutive 32-bit registers: the address from register 1
	// (32-bit register 8) on, the mark in the one after it (9 for IPv4, 12 for IPv6).
	markReg := 8 + f.addrLen/4
	return r.add(fmt.Sprintf("%s saddr . meta mark & 0x%08x @%s", f.name, mask, set),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddrOff, Len: f.addrLen},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: markReg},
		&expr.Bitwise{SourceRegister: markReg, DestRegister: markReg, Len: 4, Mask: native32(mask), Xor: native32(0)},
		&expr.Lookup{SourceRegister: 1, SetName: set})
}

func (r *Rule) saddrVmap(f family, mapName string) *Rule {
	return r.add(f.name+" saddr vmap @"+mapName,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddrOff, Len: f.addrLen},
		&expr.Lookup{SourceRegister: 1, SetName: mapName, IsDestRegSet: true, DestRegister: 0})
}

// l4Dport matches the transport protocol (unix.IPPROTO_TCP or _UDP) and destination port.
func (r *Rule) l4Dport(proto byte, name string, port uint16) *Rule {
	return r.add(fmt.Sprintf("%s dport %d", name, port),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)})
}

// oifnamePrefix matches output devices whose name starts with prefix.
func (r *Rule) oifnamePrefix(prefix string) *Rule {
	return r.add(fmt.Sprintf("oifname %q", prefix+"*"),
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)})
}

// tcpSyn matches TCP packets with the SYN flag.
func (r *Rule) tcpSyn() *Rule {
	return r.add("tcp flags syn",
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x02}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0}})
}

// clampMSS sets a SYN's MSS option to what the route's MTU allows.
func (r *Rule) clampMSS() *Rule {
	return r.add("tcp option maxseg size set rt mtu",
		&expr.Rt{Register: 1, Key: expr.RtTCPMSS},
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 2, Size: 2},
		&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: 2, Offset: 2, Len: 2, SourceRegister: 1})
}

// l4ProtoIsNot matches packets that are not ICMP (IPv4) or ICMPv6 (IPv6).
func (r *Rule) l4ProtoIsNot(f family) *Rule {
	if f.v4 {
		return r.add("ip protocol != icmp",
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 9, Len: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_ICMP}})
	}
	return r.add("meta l4proto != ipv6-icmp",
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}})
}

// iifnamePrefix matches input devices whose name starts with prefix.
func (r *Rule) iifnamePrefix(prefix string) *Rule {
	return r.add(fmt.Sprintf("iifname %q", prefix+"*"),
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(prefix)})
}

// iifname matches the device a packet came in on.
func (r *Rule) iifname(name string) *Rule {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return r.add(fmt.Sprintf("iifname %q", name),
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b})
}

func (r *Rule) gotoChain(chain string) *Rule {
	return r.add("goto "+chain, &expr.Verdict{Kind: expr.VerdictGoto, Chain: chain})
}

// tunnelOuter matches the encapsulated packets of natd's tunnels: UDP to the tunnel
// port from a node's address (a pod's packet never has one).
func (r *Rule) tunnelOuter(port uint16) *Rule {
	return r.ipAddrIn("saddr", setNodeIPs, false).l4Dport(unix.IPPROTO_UDP, "udp", port)
}

// fibSaddrIifMissing matches packets whose source has no route back through the
// interface they came in on (strict reverse path filtering, for one rule).
func (r *Rule) fibSaddrIifMissing() *Rule {
	// Interface index 0: no such route.
	return r.add("fib saddr . iif oif 0",
		&expr.Fib{Register: 1, ResultOIF: true, FlagSADDR: true, FlagIIF: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(0)})
}

func (r *Rule) nexthopIn(set string) *Rule {
	return r.add("rt ip nexthop @"+set,
		&expr.Rt{Register: 1, Key: expr.RtNexthop4},
		&expr.Lookup{SourceRegister: 1, SetName: set})
}

func (r *Rule) loadMaskedMark(mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(mask), Xor: native32(0)},
	}
}

func (r *Rule) markMaskedIsZero(mask uint32) *Rule { return r.markMaskedIs(mask, 0) }

func (r *Rule) markMaskedIs(mask, value uint32) *Rule {
	ex := append(r.loadMaskedMark(mask), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(value)})
	return r.add(fmt.Sprintf("meta mark & 0x%08x == 0x%08x", mask, value), ex...)
}

// setMarkBits sets natd's bits of the mark to value and keeps everyone else's.
func (r *Rule) setMarkBits(mask, value uint32) *Rule {
	text := fmt.Sprintf("meta mark set meta mark & 0x%08x | 0x%08x", ^mask|value, value)
	switch { // as nft prints it
	case ^mask|value == ^uint32(0):
		text = fmt.Sprintf("meta mark set meta mark | 0x%08x", value)
	case value == 0:
		text = fmt.Sprintf("meta mark set meta mark & 0x%08x", ^mask)
	}
	return r.add(text,
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(^mask), Xor: native32(value)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1})
}

// notEgress returns what is never a pod's egress: replies of connections opened towards
// a pod (a NodePort, an ingress controller in a pinned namespace) and cluster
// destinations. With clearMark (a pinned pod's own packets) they go on without the pod
// guard's mark; other packets carry none, and pay no mark write.
func notEgress(f family, marks Marks, clearMark bool) []*Rule {
	reply, cluster := newRule().ctReply(), newRule().addrIn(f, "daddr", f.set(setClusterDsts), false)
	if clearMark {
		reply, cluster = reply.setMarkBits(marks.Mask, 0), cluster.setMarkBits(marks.Mask, 0)
	}
	return []*Rule{reply.verdict(expr.VerdictReturn), cluster.verdict(expr.VerdictReturn)}
}

// classifyPods sends a packet of one of this node's pods to its egress IP's chain (or
// returns, for an unpinned pod): first as the CNI plugin registered the pod, before its
// first packet — pinned, or explicitly not, whatever natd's view of the API says about
// an older pod that had the same IP — then from natd's view of the API.
func classifyPods(f family) []*Rule {
	return []*Rule{newRule().saddrVmap(f, f.set(MapCNIPods)), newRule().saddrVmap(f, f.set(mapPodEgress))}
}

func (r *Rule) snatToMarkMap(f family, mask uint32, mapName string) *Rule {
	ex := append(r.loadMaskedMark(mask),
		&expr.Lookup{SourceRegister: 1, SetName: mapName, IsDestRegSet: true, DestRegister: 1},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: f.nfproto, RegAddrMin: 1})
	return r.add(fmt.Sprintf("snat to meta mark & 0x%08x map @%s", mask, mapName), ex...)
}

// snatToSelf binds the connection to its own source address. It changes nothing on
// the wire, but a connection that already has a NAT binding is not NATed again by
// later NAT chains, which keeps the CNI's MASQUERADE off pinned packets on their way
// to the holder.
func (r *Rule) snatToSelf(f family) *Rule {
	return r.add("snat to "+f.name+" saddr",
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddrOff, Len: f.addrLen},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: f.nfproto, RegAddrMin: 1})
}

// setCtBit sets one bit of the connection's mark and keeps the others.
func (r *Rule) setCtBit(bit uint32) *Rule {
	return r.add(fmt.Sprintf("ct mark set ct mark | 0x%08x", bit),
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(^bit), Xor: native32(bit)},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true})
}

// ctOriginalWithBit matches packets of the original direction whose connection has bit
// set in its mark.
func (r *Rule) ctOriginalWithBit(bit uint32) *Rule { return r.ctDirectionWithBit(0, "original", bit) }

// ctReplyWithBit matches packets of the reply direction whose connection has bit set
// in its mark.
func (r *Rule) ctReplyWithBit(bit uint32) *Rule { return r.ctDirectionWithBit(1, "reply", bit) }

func (r *Rule) ctDirectionWithBit(dir byte, name string, bit uint32) *Rule {
	return r.add(fmt.Sprintf("ct direction %s ct mark & 0x%08x == 0x%08x", name, bit, bit),
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{dir}},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(bit), Xor: native32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: native32(bit)})
}

// ctStateNew matches packets that start a connection (no conntrack entry had them).
func (r *Rule) ctStateNew() *Rule {
	return r.add("ct state new",
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: native32(expr.CtStateBitNEW), Xor: native32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: native32(0)})
}

// ctReply matches packets of the reply direction of their connection.
func (r *Rule) ctReply() *Rule {
	return r.add("ct direction reply",
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1}})
}

func (r *Rule) counter() *Rule { return r.add("counter", &expr.Counter{}) }

// Reasons pinned packets are dropped, as the drop rules' counters are exported.
const (
	DropFailClosed      = "fail_closed"      // no node can give the traffic its egress IP
	DropUnpinnedTransit = "unpinned_transit" // another node's pod this node does not know as pinned yet
	DropLeakGuard       = "leak_guard"       // would have left with another source address
	DropNoIPv6Egress    = "no_ipv6_egress"   // IPv6 traffic of a pinned pod whose namespace has no IPv6 egress IP
	DropNoIPv4Egress    = "no_ipv4_egress"   // IPv4 traffic of a pinned pod whose namespace has no IPv4 egress IP
	DropStrayReply      = "stray_reply"      // a reply tunnel packet of a connection natd had deleted
	DropUnclassified    = "unclassified"     // from a pinned pod's device, with an address no map names
)

// DropReasons lists every reason, in the order metrics export them.
var DropReasons = []string{DropFailClosed, DropLeakGuard, DropNoIPv4Egress, DropNoIPv6Egress, DropStrayReply, DropUnclassified, DropUnpinnedTransit}

// countDrops is counter() for a rule that drops pinned packets for reason.
func (r *Rule) countDrops(reason string) *Rule {
	r.Drops = reason
	return r.counter()
}

func (r *Rule) verdict(kind expr.VerdictKind) *Rule {
	name := map[expr.VerdictKind]string{expr.VerdictAccept: "accept", expr.VerdictDrop: "drop", expr.VerdictReturn: "return"}[kind]
	return r.add(name, &expr.Verdict{Kind: kind})
}

// EgressChainName is the regular chain that handles packets pinned to ip.
// nft's own parser does not take a ':' in a chain name (the kernel would), and a
// ruleset that `nft list ruleset` cannot read back breaks everyone's save and restore:
// an IPv6 address is written with '-'.
func EgressChainName(ip netip.Addr) string {
	return "egress_" + strings.ReplaceAll(ip.String(), ":", "-")
}

// unpinnedTransit drops another node's pod sending outside through this node, but not
// through natd's tunnel: a natd from before the tunnel forwarding pinned traffic during
// an upgrade. This node cannot tell whether the pod is pinned; let through, the CNI
// would masquerade it with this node's IP. Only a node that knows its own pod CIDRs
// (Node.spec.podCIDRs) can tell another node's pod from one of its own that natd has
// not classified (it predates natd-cni): without them the rule would drop every such
// pod of every namespace, so there is none. (IPv4 only: natd versions before the
// tunnel had no IPv6 egress.)
func unpinnedTransit(state State, marks Marks) []*Rule {
	if !slices.ContainsFunc(state.LocalPodCIDRs, func(p netip.Prefix) bool { return p.Addr().Is4() }) {
		return nil
	}
	return []*Rule{newRule().ipAddrIn("saddr", setPodCIDRs, false).ipAddrIn("saddr", setLocalPodCIDRs, true).
		markMaskedIsZero(marks.Mask).countDrops(DropUnpinnedTransit).verdict(expr.VerdictDrop)}
}

// family is what differs between natd's ip and ip6 tables: the egress IPs of one
// family are served by the table of that family, with the same chains.
type family struct {
	table    nftables.TableFamily
	v4       bool
	name     string // as nft prints a header field: "ip", "ip6"
	addrType nftables.SetDatatype
	addrName string // "ipv4_addr", "ipv6_addr"
	suffix   string // of the table's set names ("cni_pods6")
	saddrOff uint32
	daddrOff uint32
	addrLen  uint32
	nfproto  uint32
	// noEgress is the chain for pinned pods' addresses of this family when their
	// namespace has no egress IP in it; dropReason counts its drops.
	noEgress   string
	dropReason string
}

var (
	familyIPv4 = family{table: nftables.TableFamilyIPv4, v4: true, name: "ip", addrType: nftables.TypeIPAddr, addrName: "ipv4_addr",
		saddrOff: 12, daddrOff: 16, addrLen: 4, nfproto: unix.NFPROTO_IPV4, noEgress: ChainPinnedIPv4, dropReason: DropNoIPv4Egress}
	familyIPv6 = family{table: nftables.TableFamilyIPv6, name: "ip6", addrType: nftables.TypeIP6Addr, addrName: "ipv6_addr",
		suffix: "6", saddrOff: 8, daddrOff: 24, addrLen: 16, nfproto: unix.NFPROTO_IPV6, noEgress: ChainPinnedIPv6, dropReason: DropNoIPv6Egress}
)

// of reports whether a is an address of this family.
func (f family) of(a netip.Addr) bool { return a.Is4() == f.v4 }

// set is the name of a set of this family's table.
func (f family) set(name string) string { return name + f.suffix }

// chainOf is the chain a pinned pod's address of this family goes to: its egress IP's,
// or the drop chain when its namespace has no egress IP in this family.
func (f family) chainOf(eip netip.Addr) string {
	if !eip.IsValid() {
		return f.noEgress
	}
	return EgressChainName(eip)
}

// BuildRuleset renders natd's whole ip table for state and the node's pod records.
// index gives each egress IP its slot (mark value and route table); it must hold every
// IP in state.Egress. lease is how long SNAT to a held egress IP lasts unless natd
// renews it (0: forever). gossipPort, when set, is guarded against non-node sources;
// tunnelPort is the UDP port of natd's tunnels between nodes.
func BuildRuleset(state State, records []PodRecord, marks Marks, index map[netip.Addr]int, lease time.Duration, gossipPort, tunnelPort uint16) *Ruleset {
	input, forward := nodePortGuards(gossipPort, tunnelPort)
	rs := buildTable(familyIPv4, state, records, marks, index, lease, tunnelPort, input.Rules)
	rs.Chains = append(rs.Chains, forward)
	return rs
}

// BuildRuleset6 renders natd's ip6 table: the same chains as the ip table, for IPv6
// egress IPs. A pinned pod's IPv6 traffic to the outside whose namespace has no IPv6
// egress IP is dropped and counted, never sent with the pod's or the node's own
// address; its IPv6 traffic to cluster destinations and on its link is not. The
// holder's neighbour discovery for its IPv6 egress IPs obeys their leases, as ARP does
// for IPv4 (BuildARPRuleset).
func BuildRuleset6(state State, records []PodRecord, marks Marks, index map[netip.Addr]int, lease time.Duration) *Ruleset {
	return buildTable(familyIPv6, state, records, marks, index, lease, 0, nil)
}

// buildTable renders the table of family f; portGuards are the ip table's guards of
// natd's ports, which end its input chain ("node_ports").
func buildTable(f family, state State, records []PodRecord, marks Marks, index map[netip.Addr]int, lease time.Duration, tunnelPort uint16,
	portGuards []*Rule) *Ruleset {
	rs := &Ruleset{Family: f.table}
	var held []EgressIP
	podEgress := verdictMap(f.set(mapPodEgress), f.addrType, f.addrName)
	heldSNAT := &Set{Name: f.set(mapHeldSNAT), Decl: "type mark : " + f.addrName, KeyType: nftables.TypeMark,
		DataType: f.addrType, IsMap: true, KeyOrder: binaryutil.NativeEndian, Timeout: lease}
	heldMarks := &Set{Name: f.set(setHeldMarks), Decl: "type " + f.addrName + " . mark", KeyType: nftables.MustConcatSetType(f.addrType, nftables.TypeMark),
		Concat: true, Timeout: lease}
	if lease > 0 {
		heldSNAT.Decl += "\nflags timeout"
		heldMarks.Decl += "\nflags timeout"
	}
	n := len(state.NoEgress)
	for _, e := range state.Egress {
		n += len(e.Pods)
	}
	podEgress.Elements = make([]Element, 0, n)
	var egressChains []*Chain
	var fromTunnels []*Rule
	var heldDsts []netip.Addr
	for _, e := range state.Egress {
		if !f.of(e.IP) {
			continue
		}
		slot := index[e.IP]
		mark := marks.Value(slot)
		ch := &Chain{Name: EgressChainName(e.IP)}
		if slot != 0 {
			// Another node's pinned packet for this egress IP: the tunnel device it
			// came out of names the IP (one VNI per egress IP), whatever the pod.
			fromTunnels = append(fromTunnels, newRule().iifname(TunnelDevice(slot)).setCtBit(marks.TunnelledFlow()).gotoChain(ch.Name))
		}
		switch {
		case slot == 0:
			// No slot left on this node (more egress IPs in use than marks): without a
			// mark the packet would leave through the CNI's masquerade.
			ch.Rules = append(ch.Rules, newRule().countDrops(DropFailClosed).verdict(expr.VerdictDrop))
		case e.HasHolder():
			ch.Rules = append(ch.Rules, newRule().setMarkBits(marks.Mask, mark))
		case !e.FailOpen:
			// Fail closed: no node can give this traffic its egress IP, so it must not
			// leave at all.
			ch.Rules = append(ch.Rules, newRule().countDrops(DropFailClosed).verdict(expr.VerdictDrop))
		default:
			// Fail open: out the normal way, past the route guard.
			ch.Rules = append(ch.Rules, newRule().setMarkBits(marks.Mask, marks.Pass()))
		}
		egressChains = append(egressChains, ch)
		for _, p := range e.Pods {
			podEgress.Elements = append(podEgress.Elements, Element{Key: addrKey(p), Chain: ch.Name})
		}
		if e.Local && slot != 0 { // only these are on the uplink
			held = append(held, e)
			heldDsts = append(heldDsts, e.IP)
			heldSNAT.Elements = append(heldSNAT.Elements, Element{Key: markKey(mark), Val: addrKey(e.IP)})
			heldMarks.Elements = append(heldMarks.Elements, Element{Key: addrKey(e.IP), Key2: [4]byte(native32(mark))})
		}
	}
	for _, e := range state.Egress {
		// A packet of this family out of the tunnel of an egress IP of the other
		// family: no node sends one (each routes a family's packets into its own
		// family's tunnels only), and it has no egress IP to leave with.
		if slot := index[e.IP]; !f.of(e.IP) && slot != 0 {
			fromTunnels = append(fromTunnels, newRule().iifname(TunnelDevice(slot)).countDrops(DropLeakGuard).verdict(expr.VerdictDrop))
		}
	}
	for _, p := range state.NoEgress {
		if f.of(p) {
			podEgress.Elements = append(podEgress.Elements, Element{Key: addrKey(p), Chain: f.noEgress})
		}
	}
	// The pinned pods of namespaces without an egress IP of this family.
	egressChains = append(egressChains, &Chain{Name: f.noEgress, Rules: []*Rule{newRule().countDrops(f.dropReason).verdict(expr.VerdictDrop)}})
	cniPods := verdictMap(f.set(MapCNIPods), f.addrType, f.addrName)
	cniPods.Elements = cniPodElements(records, state.PinnedNamespaces, f)

	clusterDsts := state.ClusterDestinations
	if !f.v4 {
		clusterDsts = append(slices.Clone(clusterDsts), linkScope6...)
	}
	rs.Sets = []*Set{intervalSet(f.set(setClusterDsts), clusterDsts, f)}
	if f.v4 {
		rs.Sets = append(rs.Sets, addrSet(setNodeIPs, state.NodeIPs, f))
	}
	rs.Sets = append(rs.Sets, intervalSet(f.set(setPodCIDRs), state.PodCIDRs, f))
	if f.v4 {
		rs.Sets = append(rs.Sets, intervalSet(setLocalPodCIDRs, state.LocalPodCIDRs, f))
	}
	rs.Sets = append(rs.Sets,
		heldAddrsSet(held, true, f),
		heldMarks,
		addrSet(f.set(setHeldDsts), heldDsts, f),
	)
	if !f.v4 {
		rs.Sets = append(rs.Sets, leasedSet(held, lease, f))
	}
	rs.Sets = append(rs.Sets, cniPods, podEgress, heldSNAT)

	// Packets out of the egress IPs' tunnels are told apart by device, one rule per
	// device, in a chain of their own: every other packet (an unpinned pod's, a
	// reply) passes one prefix test here instead of one test per egress IP in use
	// (with 200 IPs in use that halved an unpinned pod's throughput). The reply
	// tunnel shares the prefix but carries only replies and stray replies, which the
	// rules above have dealt with.
	tunnelIn := &Chain{Name: chainFromTunnels, Rules: fromTunnels}
	var toTunnelIn []*Rule
	if len(fromTunnels) > 0 {
		toTunnelIn = []*Rule{newRule().iifnamePrefix(tunnelPrefix).gotoChain(chainFromTunnels)}
	}
	var transit []*Rule
	if f.v4 {
		transit = unpinnedTransit(state, marks)
	}
	// A packet that carries the origin mark comes from a pinned pod's own device (the
	// pod guard, podguard.go): it goes to its own chain, where natd's maps classify
	// it or it is dropped. Clearing the mark up front instead would let a pod whose
	// address no map names (a lookup that misses, elements a hand or a half-finished
	// tool removed) leave with the node's or its own address; kept until the pod is
	// classified, the mark makes such a packet the guard's, as if the tables were
	// gone. Every other packet pays one mark comparison here.
	guarded := &Chain{Name: chainGuardedPods, Rules: slices.Concat(notEgress(f, marks, true), classifyPods(f), []*Rule{
		newRule().countDrops(DropUnclassified).verdict(expr.VerdictDrop),
	})}
	prerouting := &Chain{
		Name: "prerouting", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookPrerouting,
		Priority: prioMark, Header: "type filter hook prerouting priority dstnat + 10; policy accept;",
		Rules: slices.Concat([]*Rule{
			newRule().markMaskedIs(marks.Mask, marks.Origin()).gotoChain(chainGuardedPods),
			// The reply tunnel carries replies of connections this node opened. One that
			// starts a connection is a reply in flight when natd deleted the connection
			// (a takeover or a re-pinning flushes the pod's entries): let in, it would
			// make a connection whose original direction is partner to pod, and the
			// pod's next packets, as its replies, would skip every rule below and leave
			// with the pod's own address.
			newRule().iifname(ReplyDevice).ctStateNew().countDrops(DropStrayReply).verdict(expr.VerdictDrop),
			// Replies to another node's pod whose connection came out of a tunnel go
			// back through the reply tunnel, whatever the CNI's routes and reverse path
			// filters would do with a partner's address.
			newRule().ctReplyWithBit(marks.TunnelledFlow()).setMarkBits(marks.Mask, marks.Reply()).verdict(expr.VerdictReturn),
		}, notEgress(f, marks, false), toTunnelIn, classifyPods(f), transit),
	}
	var ownTunnel []*Rule
	if f.v4 {
		// A tunnel packet this node sends: the encapsulation keeps the inner packet's
		// mark, but it is the node's own traffic.
		ownTunnel = []*Rule{newRule().tunnelOuter(tunnelPort).verdict(expr.VerdictReturn)}
	}
	snat := &Chain{
		Name: "pinned_snat", Type: nftables.ChainTypeNAT, Hook: nftables.ChainHookPostrouting,
		Priority: prioSNAT, Header: "type nat hook postrouting priority srcnat - 10; policy accept;",
		Rules: slices.Concat(ownTunnel, []*Rule{
			newRule().markMaskedIsZero(marks.Mask).verdict(expr.VerdictReturn),
			newRule().markMaskedIs(marks.Mask, marks.Pass()).verdict(expr.VerdictReturn),
			// NAT chains see a connection's first packet only: remember it is pinned.
			newRule().setCtBit(marks.PinnedFlow()),
			newRule().snatToMarkMap(f, marks.Mask, f.set(mapHeldSNAT)),
			newRule().snatToSelf(f),
		}),
	}
	// Into the tunnel to the holder, still with the pod's own address. An IPv4 packet
	// is told by its next hop, a node; an IPv6 packet's next hop in the tunnel is the
	// holder's IPv4 address, which nftables cannot name, so by the device.
	intoTunnel := newRule().addrIn(f, "saddr", f.set(setPodCIDRs), false).oifnamePrefix(tunnelPrefix)
	if f.v4 {
		intoTunnel = newRule().ipAddrIn("saddr", setPodCIDRs, false).nexthopIn(setNodeIPs)
	}
	guard := &Chain{
		Name: "leak_guard", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookPostrouting,
		Priority: prioGuard, Header: "type filter hook postrouting priority srcnat + 10; policy accept;",
		Rules: slices.Concat(acceptOwnTunnel(f, tunnelPort), []*Rule{
			newRule().markMaskedIs(marks.Mask, marks.Pass()).verdict(expr.VerdictReturn),
			newRule().markMaskedIs(marks.Mask, marks.Reply()).verdict(expr.VerdictReturn),
			// A pinned connection whose packet lost its classification (natd's maps were
			// flushed): its NAT binding would send it with the pod's own address.
			newRule().ctOriginalWithBit(marks.PinnedFlow()).markMaskedIsZero(marks.Mask).
				countDrops(DropLeakGuard).verdict(expr.VerdictDrop),
			newRule().markMaskedIsZero(marks.Mask).verdict(expr.VerdictReturn),
			// SNATed here to the egress IP this packet's own pinning names (its mark),
			// held with a current lease. A connection NATed under an older pinning (the
			// namespace moved to another egress IP) does not match. The second lookup
			// counts the packet against its egress IP: held_addrs keeps a counter per
			// element.
			newRule().saddrMarkIn(f, marks.Mask, f.set(setHeldMarks)).addrIn(f, "saddr", f.set(setHeldAddrs), false).verdict(expr.VerdictAccept),
			intoTunnel.verdict(expr.VerdictAccept),
			// Anything else would reach the partner with another source address.
			newRule().countDrops(DropLeakGuard).verdict(expr.VerdictDrop),
		}),
	}
	// A connection through a tunnel carries 50 bytes of encapsulation each way: its
	// SYNs announce the tunnel's MSS, so that neither end sends what the tunnel cannot
	// carry (a partner behind a firewall that drops ICMP would never learn the path
	// MTU of the reply tunnel).
	clamp := &Chain{
		Name: "tunnel_mss", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookForward,
		Priority: prioClamp, Header: "type filter hook forward priority mangle; policy accept;",
		Rules: []*Rule{newRule().oifnamePrefix(tunnelPrefix).tcpSyn().clampMSS()},
	}
	rs.Chains = append(egressChains, tunnelIn, guarded, prerouting, snat, guard, clamp)
	if !f.v4 {
		rs.Chains = append(rs.Chains, lapsedSourcesOut())
	}
	// An egress IP is a source only: its replies are un-NATed to a pod before routing
	// and never come in here. Anything else for it would be answered by this node's
	// own stack, with a reset or a port unreachable from the egress IP, which kills
	// the connection at the partner: the partner's segments that reach a new holder
	// before the pod's next packet has re-created the connection there, or an old
	// holder whose conntrack finds them out of window (it no longer sees the pod's
	// side) and so does not un-NAT them. Nor should anything on the node be reachable
	// at an egress IP. Pings (and IPv6's neighbour discovery) still get their answer.
	input := &Chain{
		Name: "node_ports", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookInput,
		Priority: 0, Header: "type filter hook input priority filter; policy accept;",
		Rules: []*Rule{newRule().addrIn(f, "daddr", f.set(setHeldDsts), false).l4ProtoIsNot(f).counter().verdict(expr.VerdictDrop)},
	}
	input.Rules = append(input.Rules, portGuards...)
	rs.Chains = append(rs.Chains, input)
	return rs
}

// nodePortGuards keep natd's ports (gossip, tunnel) to nodes. Gossip and tunnel
// packets only ever flow between node IPs, and every pod can reach a node's ports. A
// flood of datagrams or connections from a pod then never reaches memberlist's socket,
// so it can neither crowd out the voters' heartbeats (a holder that cannot hear them
// gives its IPs up) nor cost natd memory; and no pod can hand a holder a packet to
// send out with an egress IP by wrapping it in natd's tunnel. A pod that forges a
// node's address is stopped twice: its own node does not forward anything to a
// node's tunnel port, and the receiving node wants a tunnel packet to arrive on the
// interface its route back to the sender uses.
func nodePortGuards(gossipPort, tunnelPort uint16) (input, forward *Chain) {
	input = &Chain{
		Name: "node_ports", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookInput,
		Priority: 0, Header: "type filter hook input priority filter; policy accept;",
	}
	if gossipPort != 0 {
		input.Rules = append(input.Rules,
			newRule().l4Dport(unix.IPPROTO_TCP, "tcp", gossipPort).ipAddrIn("saddr", setNodeIPs, true).counter().verdict(expr.VerdictDrop),
			newRule().l4Dport(unix.IPPROTO_UDP, "udp", gossipPort).ipAddrIn("saddr", setNodeIPs, true).counter().verdict(expr.VerdictDrop))
	}
	input.Rules = append(input.Rules,
		newRule().l4Dport(unix.IPPROTO_UDP, "udp", tunnelPort).ipAddrIn("saddr", setNodeIPs, true).counter().verdict(expr.VerdictDrop),
		newRule().l4Dport(unix.IPPROTO_UDP, "udp", tunnelPort).fibSaddrIifMissing().counter().verdict(expr.VerdictDrop))
	forward = &Chain{
		Name: "node_ports_forward", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookForward,
		Priority: 0, Header: "type filter hook forward priority filter; policy accept;",
		Rules: []*Rule{
			newRule().l4Dport(unix.IPPROTO_UDP, "udp", tunnelPort).ipAddrIn("daddr", setNodeIPs, false).counter().verdict(expr.VerdictDrop),
		},
	}
	return input, forward
}

// linkScope6 are IPv6 destinations that never leave the link, so never reach the
// outside: link-local unicast and link-scope multicast. A pod's neighbour discovery
// uses them with its own address as the source (its solicitation for its gateway goes
// to a solicited-node multicast address): dropping that would cut a pinned pod off
// IPv6 inside the cluster as well, and count its solicitations instead of its traffic.
var linkScope6 = []netip.Prefix{netip.MustParsePrefix("fe80::/10"), netip.MustParsePrefix("ff02::/16")}

// acceptOwnTunnel lets the encapsulated packets of natd's tunnels (IPv4, from the
// node's address) pass the ip table's leak guard.
func acceptOwnTunnel(f family, tunnelPort uint16) []*Rule {
	if !f.v4 {
		return nil
	}
	return []*Rule{newRule().tunnelOuter(tunnelPort).verdict(expr.VerdictAccept)}
}

// lapsedSourcesOut keeps the node from sending anything from a held IPv6 egress IP
// whose lease lapsed (natd was killed, another node took the IP over), above all its
// neighbour advertisements: the kernel answers a solicitation for an address on the
// uplink from that address, and would draw the IP's traffic back. It is what the arp
// table does for IPv4. (nft 1.0 cannot read back a match on the target inside a
// neighbour discovery message against a set of addresses, so the source it is.)
func lapsedSourcesOut() *Chain {
	f := familyIPv6
	return &Chain{Name: "lapsed_out", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookOutput,
		Priority: 0, Header: "type filter hook output priority filter; policy accept;",
		Rules: []*Rule{newRule().addrIn(f, "saddr", f.set(setHeldDsts), false).
			addrIn(f, "saddr", f.set(setLeasedIPs), true).counter().verdict(expr.VerdictDrop)}}
}

// cniPodElements turns pod records into elements of family f's cni_pods map: an address
// of a pod of a pinned namespace jumps to its egress IP's chain of that family (or the
// family's drop chain), any other pod returns.
func cniPodElements(records []PodRecord, pinned map[string]NamespaceEgress, f family) []Element {
	var out []Element
	for _, r := range records {
		eips, isPinned := pinned[r.Namespace]
		for _, ip := range r.IPs {
			if !f.of(ip) {
				continue
			}
			e := Element{Key: addrKey(ip), Return: true}
			if isPinned {
				e.Chain, e.Return = f.chainOf(eips.For(ip)), false
			}
			out = append(out, e)
		}
	}
	return out
}

func verdictMap(name string, key nftables.SetDatatype, keyName string) *Set {
	return &Set{Name: name, Decl: "type " + keyName + " : verdict", KeyType: key, DataType: nftables.TypeVerdict, IsMap: true}
}

func addrSet(name string, addrs []netip.Addr, f family) *Set {
	s := &Set{Name: name, Decl: "type " + f.addrName, KeyType: f.addrType}
	s.Elements = make([]Element, 0, len(addrs))
	for _, a := range addrs {
		s.Elements = append(s.Elements, Element{Key: addrKey(a)})
	}
	return s
}

// intervalSet holds the prefixes of family f (the others are left out).
func intervalSet(name string, prefixes []netip.Prefix, f family) *Set {
	s := &Set{Name: name, Decl: "type " + f.addrName + "\nflags interval", KeyType: f.addrType, Interval: true}
	for _, r := range mergeRanges(prefixes, !f.v4) {
		e := Element{Key: addrKey(r.start)}
		if r.end.IsValid() {
			e.KeyEnd = addrKey(r.end)
		}
		s.Elements = append(s.Elements, e)
	}
	return s
}

// heldAddrsSet lists the egress IPs on the uplink with their claim generation: after a
// restart or a crash, natd reads its claims back from here. With counter, each element
// counts the packets that leave with its address (the SNAT metrics); the counter starts
// at zero when the element is added, that is when the node takes the IP.
func heldAddrsSet(held []EgressIP, counter bool, f family) *Set {
	s := &Set{Name: f.set(setHeldAddrs), Decl: "type " + f.addrName, KeyType: f.addrType, Counter: counter}
	if counter {
		s.Decl += "\ncounter"
	}
	for _, e := range held {
		s.Elements = append(s.Elements, Element{Key: addrKey(e.IP), Comment: genComment(e.Gen)})
	}
	return s
}

// leasedSet lists the held egress IPs whose lease is current.
func leasedSet(held []EgressIP, lease time.Duration, f family) *Set {
	s := &Set{Name: f.set(setLeasedIPs), Decl: "type " + f.addrName, KeyType: f.addrType, Timeout: lease}
	if lease > 0 {
		s.Decl += "\nflags timeout"
	}
	for _, e := range held {
		s.Elements = append(s.Elements, Element{Key: addrKey(e.IP)})
	}
	return s
}

func genComment(gen uint32) string { return fmt.Sprintf("gen=%d", gen) }

// The arp family numbers its hooks on its own (NF_ARP_IN, NF_ARP_OUT in
// linux/netfilter_arp.h); the inet numbers google/nftables names mean other hooks
// there, and the kernel rejects them with EOPNOTSUPP.
const (
	arpHookIn  nftables.ChainHook = 0
	arpHookOut nftables.ChainHook = 1
)

// BuildARPRuleset renders natd's arp table: a node stops answering ARP for an egress IP
// (and stops using it as an ARP sender) as soon as its lease lapses, even while the
// address is still on the uplink — when natd is killed, say, and another node takes the
// IP over.
func BuildARPRuleset(state State, lease time.Duration) *Ruleset {
	var held []EgressIP
	for _, e := range state.Egress {
		if e.Local && e.IP.Is4() {
			held = append(held, e)
		}
	}
	return &Ruleset{
		Family: nftables.TableFamilyARP,
		Sets:   []*Set{heldAddrsSet(held, false, familyIPv4), leasedSet(held, lease, familyIPv4)},
		Chains: []*Chain{
			{Name: "input", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookRef(arpHookIn), Priority: 0,
				Header: "type filter hook input priority filter; policy accept;",
				Rules: []*Rule{newRule().arpAddrIn("daddr", setHeldAddrs, false).
					arpAddrIn("daddr", setLeasedIPs, true).counter().verdict(expr.VerdictDrop)}},
			{Name: "output", Type: nftables.ChainTypeFilter, Hook: nftables.ChainHookRef(arpHookOut), Priority: 0,
				Header: "type filter hook output priority filter; policy accept;",
				Rules: []*Rule{newRule().arpAddrIn("saddr", setHeldAddrs, false).
					arpAddrIn("saddr", setLeasedIPs, true).counter().verdict(expr.VerdictDrop)}},
		},
	}
}

// Text renders the ruleset the way `nft list table ip natd` prints it. With terse, set
// elements are left out (as `nft -t`).
func (rs *Ruleset) Text(terse bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table %s %s {\n", rs.familyName(), TableName)
	for _, s := range rs.Sets {
		kind := "set"
		if s.IsMap {
			kind = "map"
		}
		fmt.Fprintf(&b, "\t%s %s {\n", kind, s.Name)
		for _, l := range strings.Split(s.Decl, "\n") {
			fmt.Fprintf(&b, "\t\t%s\n", l)
		}
		if !terse && len(s.Elements) > 0 {
			var els []string
			for _, e := range s.Elements {
				els = append(els, s.ElementText(e))
			}
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(els, ", "))
		}
		b.WriteString("\t}\n")
	}
	for _, c := range rs.Chains {
		fmt.Fprintf(&b, "\n\tchain %s {\n", c.Name)
		if c.Header != "" {
			fmt.Fprintf(&b, "\t\t%s\n", c.Header)
		}
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s\n", r.Text())
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// addrRange is the half-open range [start, end); an invalid end means "to the end of
// the address space".
type addrRange struct{ start, end netip.Addr }

func (r addrRange) String() string {
	last := lastAddr(r.start.BitLen())
	if r.end.IsValid() {
		last = r.end.Prev()
	}
	if last == r.start {
		return r.start.String()
	}
	for bits := 0; bits < r.start.BitLen(); bits++ {
		p := netip.PrefixFrom(r.start, bits)
		if p.Masked().Addr() == r.start && broadcast(p) == last {
			return p.String()
		}
	}
	return r.start.String() + "-" + last.String()
}

// lastAddr is the highest address of a family (32 or 128 bits).
func lastAddr(bitLen int) netip.Addr {
	if bitLen == 32 {
		return netip.AddrFrom4([4]byte{255, 255, 255, 255})
	}
	var b [16]byte
	for i := range b {
		b[i] = 0xff
	}
	return netip.AddrFrom16(b)
}

// broadcast is the last address of p.
func broadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// mergeRanges turns possibly overlapping prefixes of one family into sorted, disjoint,
// non-adjacent ranges: the kernel rejects overlapping intervals in one set.
func mergeRanges(prefixes []netip.Prefix, v6 bool) []addrRange {
	type span struct{ first, last netip.Addr }
	var spans []span
	for _, p := range prefixes {
		if p.Addr().Is4() == v6 {
			continue
		}
		p = p.Masked()
		spans = append(spans, span{p.Addr(), broadcast(p)})
	}
	slices.SortFunc(spans, func(a, b span) int { return a.first.Compare(b.first) })
	var merged []span
	for _, sp := range spans {
		if n := len(merged); n > 0 {
			prev := &merged[n-1]
			next := prev.last.Next() // invalid after the last address: everything merges
			if !next.IsValid() || sp.first.Compare(next) <= 0 {
				if sp.last.Compare(prev.last) > 0 {
					prev.last = sp.last
				}
				continue
			}
		}
		merged = append(merged, sp)
	}
	out := make([]addrRange, 0, len(merged))
	for _, m := range merged {
		out = append(out, addrRange{start: m.first, end: m.last.Next()})
	}
	return out
}
