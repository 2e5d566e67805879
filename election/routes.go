package election

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// Routes is what one node has programmed: for each egress IP, the claim (holder's
// generation) its kernel sends that IP's traffic to. Every node's Routes reach every
// other node through gossip, so the holder of an IP can tell how many nodes are ready
// for it without any node writing to the API.
type Routes struct {
	Node string
	// Version orders one node's reports: its clock (unix ns) when it made the report,
	// kept increasing, so a report from before a restart loses to a newer one.
	Version uint64
	Claims  []Claim // sorted by IP
}

// Has reports whether the node routes ip's traffic to the holder's claim gen.
func (r Routes) Has(ip netip.Addr, gen uint32) bool {
	i, ok := slices.BinarySearchFunc(r.Claims, ip, func(c Claim, ip netip.Addr) int { return c.IP.Compare(ip) })
	return ok && r.Claims[i].Gen == gen
}

func sortedClaims(claims []Claim) []Claim {
	out := slices.Clone(claims)
	slices.SortFunc(out, func(a, b Claim) int { return a.IP.Compare(b.IP) })
	return out
}

// Wire form of a Routes report (a gossip message):
//
//	version(1) kind(1) reportVersion(8) nameLen(1) name count(2) count*(ip(4) gen(4))
//
// and of the push/pull state: version(1) kind(1) count(2) count*(len(4) report).
const (
	routesWireVersion = 1
	routesHeader      = 13 // version, kind, report version, name length, count
	kindRoutes        = 'R'
	kindRoutesState   = 'S'
	// maxDatagram keeps a report inside one UDP packet, with room for memberlist's
	// framing and encryption. A larger report (more than ~140 egress IPs) goes over a
	// stream.
	maxDatagram = 1200
	maxNameLen  = 255
)

func (r Routes) encode() ([]byte, error) {
	if len(r.Node) == 0 || len(r.Node) > maxNameLen {
		return nil, fmt.Errorf("node name %q: length %d out of 1..%d", r.Node, len(r.Node), maxNameLen)
	}
	if len(r.Claims) > 0xffff {
		return nil, fmt.Errorf("%d routes do not fit in one report", len(r.Claims))
	}
	b := make([]byte, 0, routesHeader+len(r.Node)+claimSize*len(r.Claims))
	b = append(b, routesWireVersion, kindRoutes)
	b = binary.BigEndian.AppendUint64(b, r.Version)
	b = append(b, byte(len(r.Node)))
	b = append(b, r.Node...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Claims)))
	for _, c := range r.Claims {
		b = appendClaim(b, c)
	}
	return b, nil
}

// ErrBadRoutes is returned for a routes message natd cannot read; it comes from the
// network and is dropped.
var ErrBadRoutes = errors.New("unreadable routes report")

func decodeRoutes(b []byte) (Routes, error) {
	bad := func(why string) (Routes, error) {
		return Routes{}, fmt.Errorf("%w: %s (%d bytes)", ErrBadRoutes, why, len(b))
	}
	if len(b) < routesHeader || b[0] != routesWireVersion || b[1] != kindRoutes {
		return bad("unknown header")
	}
	r := Routes{Version: binary.BigEndian.Uint64(b[2:10])}
	n := int(b[10])
	rest := b[11:]
	if n == 0 || len(rest) < n+2 {
		return bad("truncated name")
	}
	r.Node, rest = string(rest[:n]), rest[n:]
	count := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != count*claimSize {
		return bad("length does not match count")
	}
	r.Claims = make([]Claim, 0, count)
	for ; len(rest) > 0; rest = rest[claimSize:] {
		c := readClaim(rest)
		if len(r.Claims) > 0 && r.Claims[len(r.Claims)-1].IP.Compare(c.IP) >= 0 {
			return bad("routes not sorted")
		}
		r.Claims = append(r.Claims, c)
	}
	return r, nil
}

func encodeRoutesState(all map[string]Routes) []byte {
	b := []byte{routesWireVersion, kindRoutesState, 0, 0}
	n := 0
	for _, r := range all {
		enc, err := r.encode()
		if err != nil || n == 0xffff {
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(enc)))
		b = append(b, enc...)
		n++
	}
	binary.BigEndian.PutUint16(b[2:], uint16(n))
	return b
}

func decodeRoutesState(b []byte) ([]Routes, error) {
	if len(b) == 0 {
		return nil, nil // a peer without routes to tell
	}
	if len(b) < 4 || b[0] != routesWireVersion || b[1] != kindRoutesState {
		return nil, fmt.Errorf("%w: unknown state header (%d bytes)", ErrBadRoutes, len(b))
	}
	count := int(binary.BigEndian.Uint16(b[2:]))
	rest := b[4:]
	// The count comes from the network: do not let it size the allocation.
	out := make([]Routes, 0, min(count, len(rest)/(4+routesHeader)))
	for i := 0; i < count; i++ {
		if len(rest) < 4 {
			return nil, fmt.Errorf("%w: truncated state", ErrBadRoutes)
		}
		n := int(binary.BigEndian.Uint32(rest))
		if len(rest) < 4+n {
			return nil, fmt.Errorf("%w: truncated state", ErrBadRoutes)
		}
		r, err := decodeRoutes(rest[4 : 4+n])
		if err != nil {
			return nil, err
		}
		out = append(out, r)
		rest = rest[4+n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: trailing bytes in state", ErrBadRoutes)
	}
	return out, nil
}
