package election

import (
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
}

// Newer reports whether m is a later record of its member than old.
func (m Meta) Newer(old Meta) bool {
	if m.Boot != old.Boot {
		return m.Boot > old.Boot
	}
	return m.Seq >= old.Seq
}

const (
	metaVersion   = 2
	metaHeader    = 16 // version, flags, grace(2), boot(8), seq(4)
	claimSize     = 8
	flagDraining  = 1 << 0
	graceUnit     = 100 * time.Millisecond
	maxMetaLength = 512 // memberlist.MetaMaxSize
	// MaxClaims is how many IPs one member can announce.
	MaxClaims = (maxMetaLength - metaHeader) / claimSize
)

// Encode renders m in its wire form.
func (m Meta) Encode() ([]byte, error) {
	if len(m.Claims) > MaxClaims {
		return nil, fmt.Errorf("%d claims do not fit in gossip metadata (at most %d)", len(m.Claims), MaxClaims)
	}
	b := make([]byte, metaHeader, metaHeader+claimSize*len(m.Claims))
	b[0] = metaVersion
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
	for _, c := range m.Claims {
		b = appendClaim(b, c)
	}
	return b, nil
}

// A claim on the wire (in metadata and in routes reports): IPv4 address, generation.
func appendClaim(b []byte, c Claim) []byte {
	ip := c.IP.As4()
	return binary.BigEndian.AppendUint32(append(b, ip[:]...), c.Gen)
}

func readClaim(b []byte) Claim {
	return Claim{IP: netip.AddrFrom4([4]byte(b[:4])), Gen: binary.BigEndian.Uint32(b[4:8])}
}

// ErrBadMeta is returned for metadata natd cannot read: a member with it holds nothing.
var ErrBadMeta = errors.New("unreadable gossip metadata")

// DecodeMeta parses a member's metadata. Anything malformed is an error, never a panic:
// it comes from the network.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) == 0 {
		return m, nil // a member that has not said anything yet
	}
	if len(b) < metaHeader || b[0] != metaVersion || (len(b)-metaHeader)%claimSize != 0 {
		return Meta{}, fmt.Errorf("%w: %d bytes, version %d", ErrBadMeta, len(b), b[0])
	}
	m.Draining = b[1]&flagDraining != 0
	m.RestartGrace = time.Duration(binary.BigEndian.Uint16(b[2:])) * graceUnit
	m.Boot, m.Seq = binary.BigEndian.Uint64(b[4:]), binary.BigEndian.Uint32(b[12:])
	for rest := b[metaHeader:]; len(rest) > 0; rest = rest[claimSize:] {
		m.Claims = append(m.Claims, readClaim(rest))
	}
	return m, nil
}
