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
}

const (
	metaVersion   = 1
	metaHeader    = 4
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
	for rest := b[metaHeader:]; len(rest) > 0; rest = rest[claimSize:] {
		m.Claims = append(m.Claims, readClaim(rest))
	}
	return m, nil
}
