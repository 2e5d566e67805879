package election

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
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
//	version(1) kind(1) reportVersion(8) nameLen(1) name count(2) claims (see appendClaim)
//
// and of a block of reports in the push/pull state: count(2) count*(len(4) report).
// A report of IPv4 routes only goes in the previous version's form (version 1: claims
// of 8 bytes), which natds of that version read during a rolling upgrade.
const (
	routesWireVersion   = 2
	routesWireVersionV1 = 1
	routesHeader        = 13 // version, kind, report version, name length, count
	kindRoutes          = 'R'
	// maxDatagram keeps a message inside one UDP packet, with room for memberlist's
	// framing and encryption. A larger one (a report of more than ~130 egress IPs)
	// goes over a stream.
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
	v1 := allIPv4(r.Claims)
	version := byte(routesWireVersion)
	if v1 {
		version = routesWireVersionV1
	}
	b := make([]byte, 0, routesHeader+len(r.Node)+ipv4ClaimSize*len(r.Claims))
	b = append(b, version, kindRoutes)
	b = binary.BigEndian.AppendUint64(b, r.Version)
	b = append(b, byte(len(r.Node)))
	b = append(b, r.Node...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Claims)))
	if v1 {
		return appendV2Claims(b, r.Claims), nil
	}
	for _, c := range sortedClaims(r.Claims) {
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
	if len(b) < routesHeader || (b[0] != routesWireVersion && b[0] != routesWireVersionV1) || b[1] != kindRoutes {
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
	read := readClaims
	if b[0] == routesWireVersionV1 {
		read = readV2Claims
	}
	claims, err := read(rest)
	if err != nil {
		return bad(err.Error())
	}
	if len(claims) != count {
		return bad("length does not match count")
	}
	r.Claims = claims
	return r, nil
}

// appendRoutesBlock appends every report in all to b (the push/pull state's first block).
func appendRoutesBlock(b []byte, all map[string]Routes) []byte {
	return appendBlock(b, slices.Collect(maps.Values(all)))
}

// appendBlock appends items to b as a count(2) count*(len(4) item) block; an item
// that does not encode, or past 65,535, is left out.
func appendBlock[T interface{ encode() ([]byte, error) }](b []byte, items []T) []byte {
	at := len(b)
	b = append(b, 0, 0)
	n := 0
	for _, item := range items {
		enc, err := item.encode()
		if err != nil || n == 0xffff {
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(enc)))
		b = append(b, enc...)
		n++
	}
	binary.BigEndian.PutUint16(b[at:], uint16(n))
	return b
}

// readRoutesBlock reads a block of reports from the front of b and returns the rest.
func readRoutesBlock(b []byte) ([]Routes, []byte, error) {
	var out []Routes
	rest, err := readBlock(b, func(item []byte) error {
		r, err := decodeRoutes(item)
		if err == nil {
			out = append(out, r)
		}
		return err
	})
	return out, rest, err
}

// readBlock calls each for every item of a count(2) count*(len(4) item) block at the
// front of b, and returns what follows the block.
func readBlock(b []byte, each func([]byte) error) ([]byte, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("%w: truncated state", ErrBadState)
	}
	count := int(binary.BigEndian.Uint16(b))
	rest := b[2:]
	for range count {
		if len(rest) < 4 {
			return nil, fmt.Errorf("%w: truncated state", ErrBadState)
		}
		n := int(binary.BigEndian.Uint32(rest))
		if len(rest)-4 < n {
			return nil, fmt.Errorf("%w: truncated state", ErrBadState)
		}
		if err := each(rest[4 : 4+n]); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadState, err)
		}
		rest = rest[4+n:]
	}
	return rest, nil
}
