package natd

import (
	"fmt"
	"net/netip"
	"strings"

	"natd.dev/natd/natd/dataplane"
)

// Reasons a namespace's egress annotation is rejected; they appear in Events.
const (
	ReasonInvalidIP         = "InvalidEgressIP"
	ReasonOutsideEgressCIDR = "OutsideEgressCIDR"
	ReasonNodeIP            = "EgressIPIsNodeIP"
	ReasonReservedAddress   = "ReservedEgressIP"
)

// AnnotationError says why an annotation was rejected.
type AnnotationError struct {
	Reason  string
	Message string
	// IP is the address the annotation names, when it is one (outside the egress
	// CIDRs, say): its EgressIP object carries the rejection as a condition.
	IP netip.Addr
}

func (e *AnnotationError) Error() string { return e.Message }

func reject(reason, format string, args ...any) *AnnotationError {
	return &AnnotationError{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

func rejectIP(ip netip.Addr, reason, format string, args ...any) *AnnotationError {
	e := reject(reason, format, args...)
	e.IP = ip
	return e
}

// ParseEgressIPs validates the value of the egress annotation: one IPv4 address, one
// IPv6 address, or one of each separated by a comma. Each must be inside an egress
// CIDR, not its network (or IPv4 broadcast) address, and not a node's address
// (nodeIPs: every node's addresses, both families). One bad address rejects the whole
// annotation: half of a namespace's pinning is no pinning a partner can rely on.
func ParseEgressIPs(value string, egressCIDRs []netip.Prefix, nodeIPs map[netip.Addr]string) (dataplane.NamespaceEgress, *AnnotationError) {
	var out dataplane.NamespaceEgress
	parts := strings.Split(value, ",")
	if len(parts) > 2 {
		return out, reject(ReasonInvalidIP, "%s=%q: give one IPv4 address, one IPv6 address, or one of each, separated by a comma", AnnotationEgressIP, value)
	}
	for _, part := range parts {
		ip, err := parseEgressIP(part, value, egressCIDRs, nodeIPs)
		if err != nil {
			return dataplane.NamespaceEgress{}, err
		}
		slot := &out.V4
		if ip.Is6() {
			slot = &out.V6
		}
		if slot.IsValid() {
			return dataplane.NamespaceEgress{}, reject(ReasonInvalidIP, "%s=%q names two addresses of one family; give at most one IPv4 and one IPv6 address", AnnotationEgressIP, value)
		}
		*slot = ip
	}
	return out, nil
}

// parseEgressIP validates one address of the annotation (value: the whole of it, for
// messages).
func parseEgressIP(part, value string, egressCIDRs []netip.Prefix, nodeIPs map[netip.Addr]string) (netip.Addr, *AnnotationError) {
	ip, err := netip.ParseAddr(strings.TrimSpace(part))
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, reject(ReasonInvalidIP, "%s=%q: %q is not an IP address", AnnotationEgressIP, value, strings.TrimSpace(part))
	}
	ip = ip.Unmap()
	if node, ok := nodeIPs[ip]; ok {
		return netip.Addr{}, rejectIP(ip, ReasonNodeIP, "egress IP %s is the IP of node %s", ip, node)
	}
	var in netip.Prefix
	for _, p := range egressCIDRs {
		if p.Contains(ip) {
			in = p
			break
		}
	}
	if !in.IsValid() {
		return netip.Addr{}, rejectIP(ip, ReasonOutsideEgressCIDR, "egress IP %s is outside every egress CIDR (%s)", ip, joinPrefixes(egressCIDRs))
	}
	// IPv4 /31 and /32 have no network or broadcast address (RFC 3021); IPv6 has no
	// broadcast, and a /127 or /128 no subnet-router anycast address (RFC 6164).
	if in.Addr().BitLen()-in.Bits() > 1 {
		if ip == in.Masked().Addr() {
			return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s is the network address of %s", ip, in)
		}
		if ip.Is4() && ip == lastAddr(in) {
			return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s is the broadcast address of %s", ip, in)
		}
	}
	if dataplane.TunnelVNI(ip) == dataplane.ReplyVNI {
		// Its tunnel's VNI is the one replies travel on.
		return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s ends in three zero bytes: natd reserves that tunnel ID", ip)
	}
	return ip, nil
}

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

func joinPrefixes(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, ", ")
}
