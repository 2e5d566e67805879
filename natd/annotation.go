package natd

import (
	"fmt"
	"natd.dev/natd/natd/dataplane"
	"net/netip"
	"strings"
)

// Reasons a namespace's egress annotation is rejected; they appear in Events.
const (
	ReasonInvalidIP         = "InvalidEgressIP"
	ReasonNotSupported      = "UnsupportedEgressIP"
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

// ParseEgressIP validates the value of the egress annotation: one IPv4 address inside
// an egress CIDR, not the network or broadcast address of that CIDR, and not a node's IP.
func ParseEgressIP(value string, egressCIDRs []netip.Prefix, nodeIPs map[netip.Addr]string) (netip.Addr, *AnnotationError) {
	v := strings.TrimSpace(value)
	if strings.Contains(v, ",") {
		return netip.Addr{}, reject(ReasonNotSupported,
			"%s=%q: a list of egress IPs is not supported yet; give one IPv4 address", AnnotationEgressIP, value)
	}
	ip, err := netip.ParseAddr(v)
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, reject(ReasonInvalidIP, "%s=%q is not an IP address", AnnotationEgressIP, value)
	}
	if ip.Is4In6() {
		ip = ip.Unmap()
	}
	if !ip.Is4() {
		return netip.Addr{}, reject(ReasonNotSupported, "%s=%q: only IPv4 egress IPs are supported for now", AnnotationEgressIP, value)
	}
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
	if in.Bits() < 31 { // /31 and /32 have no network or broadcast address (RFC 3021)
		if ip == in.Addr() {
			return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s is the network address of %s", ip, in)
		}
		if ip == lastAddr(in) {
			return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s is the broadcast address of %s", ip, in)
		}
	}
	if dataplane.TunnelVNI(ip) == dataplane.ReplyVNI {
		// Its tunnel's VNI is the one replies travel on.
		return netip.Addr{}, rejectIP(ip, ReasonReservedAddress, "egress IP %s ends in .0.0: natd reserves that tunnel ID", ip)
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
