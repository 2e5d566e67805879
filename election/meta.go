package election

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Meta is what every member gossips about itself (memberlist node metadata, at most
// 512 bytes): the egress IPs it holds and whether it is leaving.
type Meta struct {
	// Draining: the member is handing its IPs over and takes no new ones.
	Draining bool
	// RestartGrace: the member is stopping for a restart; its claims stand for this long
	// after it goes down, and its kernel keeps serving them meanwhile.
	RestartGrace time.Duration
	Claims       []Claim
	// Boot and Seq order one member's metadata across its restarts: Boot is when its
	// natd started (unix ns, never below the one before), Seq counts its updates. A
	// record older than one already seen is a replay of captured traffic (memberlist
	// starts a restarted member's incarnation at 1 again, so it would accept it) and
	// is ignored.
	Boot uint64
	Seq  uint32
	// apart: the claims did not fit in the metadata, which carries only their digest
	// and count; the claims travel as a claims record (claims.go). Set by DecodeMeta.
	apart  bool
	digest uint64
	count  int
}

// Newer reports whether m is a later record of its member than old.
func (m Meta) Newer(old Meta) bool {
	if m.Boot != old.Boot {
		return m.Boot > old.Boot
	}
	return m.Seq >= old.Seq
}

// Wire form (memberlist node metadata):
//
//	version(1) flags(1) grace(2) boot(8) seq(4), then either the claims, each
//	family-length(1: 4 or 16) ip gen(4), or, with flagApart, count(2) digest(8).
//
// The claims go in the metadata while they fit (up to 55 IPv4 or 23 IPv6 claims):
// memberlist spreads it with every alive message. A larger set goes apart (see
// claims.go), and the metadata names it by its digest.
//
// Up to 62 IPv4 claims and nothing else go in the previous version's form (version
// 2: each claim ip(4) gen(4), no family byte), which natds of that version read: a
// node that cannot read a holder's metadata sees no claims there and may take its IPs,
// so during a rolling upgrade both versions must read what the cluster mostly says.
const (
	metaVersion   = 3
	metaVersionV2 = 2
	v2ClaimSize   = 8
	v2MaxClaims   = (maxMetaLength - metaHeader) / v2ClaimSize
	metaHeader    = 16 // version, flags, grace(2), boot(8), seq(4)
	apartSize     = 10 // count(2), digest(8)
	flagDraining  = 1 << 0
	flagApart     = 1 << 1
	graceUnit     = 100 * time.Millisecond
	maxMetaLength = 512 // memberlist.MetaMaxSize
	// MaxClaims is how many IPs one member can announce: a claims record of that many
	// IPv6 claims is 21 KiB, sent over a stream. The dataplane's mark slots allow far
	// fewer egress IPs in a cluster (dataplane.MaxIndex).
	MaxClaims = 1024
)

// Encode renders m in its wire form.
func (m Meta) Encode() ([]byte, error) {
	if len(m.Claims) > MaxClaims {
		return nil, fmt.Errorf("%d claims: one member announces at most %d", len(m.Claims), MaxClaims)
	}
	claims, err := encodeClaims(m.Claims)
	if err != nil {
		return nil, err
	}
	b := make([]byte, metaHeader, maxMetaLength)
	b[0] = metaVersion
	v2 := !m.apart && len(m.Claims) <= v2MaxClaims && allIPv4(m.Claims)
	if v2 {
		b[0] = metaVersionV2
	}
	if m.Draining {
		b[1] |= flagDraining
	}
	grace := m.RestartGrace / graceUnit
	if grace > 0xffff {
		grace = 0xffff
	}
	binary.BigEndian.PutUint16(b[2:], uint16(grace))
	binary.BigEndian.PutUint64(b[4:], m.Boot)
	binary.BigEndian.PutUint32(b[12:], m.Seq)
	if m.apart && len(m.Claims) == 0 {
		// As decoded, without the record: the same digest again.
		b[1] |= flagApart
		b = binary.BigEndian.AppendUint16(b, uint16(m.count))
		return binary.BigEndian.AppendUint64(b, m.digest), nil
	}
	if v2 {
		return appendV2Claims(b, m.Claims), nil
	}
	if metaHeader+len(claims) <= maxMetaLength {
		return append(b, claims...), nil
	}
	b[1] |= flagApart
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Claims)))
	return binary.BigEndian.AppendUint64(b, claimsDigest(claims)), nil
}

// encodeClaims renders claims in their canonical wire form: sorted by IP, one per IP.
func encodeClaims(claims []Claim) ([]byte, error) {
	sorted := sortedClaims(claims)
	b := make([]byte, 0, len(sorted)*ipv4ClaimSize)
	for i, c := range sorted {
		if !c.IP.IsValid() || c.IP.Zone() != "" {
			return nil, fmt.Errorf("claim on %q: not an IP address", c.IP)
		}
		if i > 0 && sorted[i-1].IP == c.IP {
			return nil, fmt.Errorf("two claims on %s", c.IP)
		}
		b = appendClaim(b, c)
	}
	return b, nil
}

// claimsDigest names a claim set by its canonical encoding: a record and the metadata
// that announces it match only if they say the same.
func claimsDigest(encoded []byte) uint64 {
	sum := sha256.Sum256(encoded)
	return binary.BigEndian.Uint64(sum[:8])
}

// A claim on the wire (in metadata, claims records and routes reports): the address's
// length (4 or 16), the address, the generation.
const (
	ipv4ClaimSize = 1 + 4 + 4
	ipv6ClaimSize = 1 + 16 + 4
)

func appendClaim(b []byte, c Claim) []byte {
	ip := c.IP.Unmap()
	if ip.Is4() {
		a := ip.As4()
		b = append(append(b, 4), a[:]...)
	} else {
		a := ip.As16()
		b = append(append(b, 16), a[:]...)
	}
	return binary.BigEndian.AppendUint32(b, c.Gen)
}

// errBadClaim is a claim that cannot be read; it wraps into the caller's error.
var errBadClaim = errors.New("malformed claim")

// readClaim reads one claim from the front of b and returns the rest.
func readClaim(b []byte) (Claim, []byte, error) {
	if len(b) == 0 {
		return Claim{}, nil, errBadClaim
	}
	n := int(b[0])
	if (n != 4 && n != 16) || len(b) < 1+n+4 {
		return Claim{}, nil, errBadClaim
	}
	ip, _ := netip.AddrFromSlice(b[1 : 1+n])
	if n == 16 && ip.Is4In6() {
		return Claim{}, nil, errBadClaim // one address, one form
	}
	return Claim{IP: ip, Gen: binary.BigEndian.Uint32(b[1+n:])}, b[1+n+4:], nil
}

// readClaims reads a canonical claim list (sorted, one per IP) that fills b.
func readClaims(b []byte) ([]Claim, error) {
	var out []Claim
	for len(b) > 0 {
		c, rest, err := readClaim(b)
		if err != nil {
			return nil, err
		}
		if n := len(out); n > 0 && out[n-1].IP.Compare(c.IP) >= 0 {
			return nil, fmt.Errorf("%w: claims not sorted", errBadClaim)
		}
		if len(out) == MaxClaims {
			return nil, fmt.Errorf("%w: more than %d claims", errBadClaim, MaxClaims)
		}
		out, b = append(out, c), rest
	}
	return out, nil
}

func allIPv4(claims []Claim) bool {
	for _, c := range claims {
		if !c.IP.Unmap().Is4() {
			return false
		}
	}
	return true
}

// appendV2Claims appends IPv4 claims in the version 2 form, sorted by IP.
func appendV2Claims(b []byte, claims []Claim) []byte {
	for _, c := range sortedClaims(claims) {
		ip := c.IP.Unmap().As4()
		b = binary.BigEndian.AppendUint32(append(b, ip[:]...), c.Gen)
	}
	return b
}

// readV2Claims reads version 2 claims (IPv4, 8 bytes each) that fill b; the old form
// was not sorted: they are sorted here, and two claims on one IP refused.
func readV2Claims(b []byte) ([]Claim, error) {
	if len(b)%v2ClaimSize != 0 {
		return nil, fmt.Errorf("%w: %d bytes of version 2 claims", errBadClaim, len(b))
	}
	out := make([]Claim, 0, len(b)/v2ClaimSize)
	for ; len(b) > 0; b = b[v2ClaimSize:] {
		out = append(out, Claim{IP: netip.AddrFrom4([4]byte(b[:4])), Gen: binary.BigEndian.Uint32(b[4:8])})
	}
	out = sortedClaims(out)
	for i := 1; i < len(out); i++ {
		if out[i].IP == out[i-1].IP {
			return nil, fmt.Errorf("%w: two claims on %s", errBadClaim, out[i].IP)
		}
	}
	return out, nil
}

// ErrBadMeta is returned for metadata natd cannot read: a member with it holds nothing.
var ErrBadMeta = errors.New("unreadable gossip metadata")

// DecodeMeta parses a member's metadata. Anything malformed is an error, never a panic:
// it comes from the network. Claims sent apart are not in the result: it names them.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) == 0 {
		return m, nil // a member that has not said anything yet
	}
	if len(b) < metaHeader || (b[0] != metaVersion && b[0] != metaVersionV2) || (b[0] == metaVersionV2 && b[1]&flagApart != 0) {
		return Meta{}, fmt.Errorf("%w: %d bytes, version %d", ErrBadMeta, len(b), b[0])
	}
	m.Draining = b[1]&flagDraining != 0
	m.RestartGrace = time.Duration(binary.BigEndian.Uint16(b[2:])) * graceUnit
	m.Boot, m.Seq = binary.BigEndian.Uint64(b[4:]), binary.BigEndian.Uint32(b[12:])
	rest := b[metaHeader:]
	if b[1]&flagApart != 0 {
		if len(rest) != apartSize {
			return Meta{}, fmt.Errorf("%w: claims digest of %d bytes", ErrBadMeta, len(rest))
		}
		m.apart, m.count, m.digest = true, int(binary.BigEndian.Uint16(rest)), binary.BigEndian.Uint64(rest[2:])
		if m.count == 0 || m.count > MaxClaims {
			return Meta{}, fmt.Errorf("%w: %d claims announced apart", ErrBadMeta, m.count)
		}
		return m, nil
	}
	read := readClaims
	if b[0] == metaVersionV2 {
		read = readV2Claims
	}
	claims, err := read(rest)
	if err != nil {
		return Meta{}, fmt.Errorf("%w: %w", ErrBadMeta, err)
	}
	m.Claims = claims
	return m, nil
}
