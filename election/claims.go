package election

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"
)

// Claims that do not fit in a member's metadata travel apart, as a claims record: the
// metadata carries their count and digest (Meta), the record the claims themselves.
// Other members fetch a record they lack from its owner, or from any voter (every
// member keeps the records it has seen), and every full state exchange carries them
// all. Until a member has the record its owner's metadata names, that member's claims
// are pending: it routes by the claims it knew before, and a node with a pending
// member takes no IP (the planner waits), so an unknown claim can never be taken
// twice.
//
// Wire forms (gossip messages, sealed like all gossip):
//
//	record:  version(1) 'C' nameLen(1) name count(2) claims
//	request: version(1) 'Q' nameLen(1) requester nameLen(1) owner digest(8)
//
// and the push/pull state: version(1) 'S' routes block, records block (see
// appendRoutesBlock; a records block is the same with records for reports).
const (
	claimsWireVersion = 1
	kindClaims        = 'C'
	kindClaimsRequest = 'Q'
	kindState         = 'S'
	stateWireVersion  = 3
	// stateWireVersionV1 is the previous version's state: its reports only.
	stateWireVersionV1 = 1
	// recordsPerMember is how many recent records of one member a node keeps: a
	// record can arrive before the metadata that names it, and after a newer one.
	recordsPerMember = 4
	// claimsAskEvery is how often a node asks again for a record it still lacks.
	claimsAskEvery = 100 * time.Millisecond
)

// ErrBadClaims is returned for a claims record or request natd cannot read; it comes
// from the network and is dropped.
var ErrBadClaims = errors.New("unreadable claims message")

// ErrBadState is returned for a push/pull state natd cannot read.
var ErrBadState = errors.New("unreadable gossip state")

// claimsRecord is one member's claim set as sent apart from its metadata.
type claimsRecord struct {
	Node   string
	Claims []Claim // sorted by IP
	digest uint64
}

func newClaimsRecord(node string, claims []Claim) (claimsRecord, error) {
	enc, err := encodeClaims(claims)
	if err != nil {
		return claimsRecord{}, err
	}
	return claimsRecord{Node: node, Claims: sortedClaims(claims), digest: claimsDigest(enc)}, nil
}

func (r claimsRecord) encode() ([]byte, error) {
	if len(r.Node) == 0 || len(r.Node) > maxNameLen {
		return nil, fmt.Errorf("node name %q: length %d out of 1..%d", r.Node, len(r.Node), maxNameLen)
	}
	if len(r.Claims) > MaxClaims {
		return nil, fmt.Errorf("%d claims: one member announces at most %d", len(r.Claims), MaxClaims)
	}
	enc, err := encodeClaims(r.Claims)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, 5+len(r.Node)+len(enc))
	b = append(b, claimsWireVersion, kindClaims, byte(len(r.Node)))
	b = append(b, r.Node...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Claims)))
	return append(b, enc...), nil
}

func decodeClaimsRecord(b []byte) (claimsRecord, error) {
	bad := func(why string) (claimsRecord, error) {
		return claimsRecord{}, fmt.Errorf("%w: %s (%d bytes)", ErrBadClaims, why, len(b))
	}
	if len(b) < 3 || b[0] != claimsWireVersion || b[1] != kindClaims {
		return bad("unknown header")
	}
	n := int(b[2])
	rest := b[3:]
	if n == 0 || len(rest) < n+2 {
		return bad("truncated name")
	}
	r := claimsRecord{Node: string(rest[:n])}
	count := int(binary.BigEndian.Uint16(rest[n:]))
	rest = rest[n+2:]
	claims, err := readClaims(rest)
	if err != nil {
		return bad(err.Error())
	}
	if len(claims) != count || count == 0 {
		return bad("length does not match count")
	}
	r.Claims, r.digest = claims, claimsDigest(rest)
	return r, nil
}

// claimsRequest asks for owner's record with digest, to be sent to requester.
type claimsRequest struct {
	Requester, Owner string
	Digest           uint64
}

func (q claimsRequest) encode() []byte {
	b := []byte{claimsWireVersion, kindClaimsRequest, byte(len(q.Requester))}
	b = append(b, q.Requester...)
	b = append(b, byte(len(q.Owner)))
	b = append(b, q.Owner...)
	return binary.BigEndian.AppendUint64(b, q.Digest)
}

func decodeClaimsRequest(b []byte) (claimsRequest, error) {
	bad := fmt.Errorf("%w: request of %d bytes", ErrBadClaims, len(b))
	if len(b) < 3 || b[0] != claimsWireVersion || b[1] != kindClaimsRequest {
		return claimsRequest{}, bad
	}
	n := int(b[2])
	rest := b[3:]
	if n == 0 || len(rest) < n+1 {
		return claimsRequest{}, bad
	}
	q := claimsRequest{Requester: string(rest[:n])}
	rest = rest[n:]
	n = int(rest[0])
	rest = rest[1:]
	if n == 0 || len(rest) != n+8 {
		return claimsRequest{}, bad
	}
	q.Owner, q.Digest = string(rest[:n]), binary.BigEndian.Uint64(rest[n:])
	return q, nil
}

// recentRecords are the last records seen of one member, newest last.
type recentRecords []claimsRecord

func (rs recentRecords) find(digest uint64) (claimsRecord, bool) {
	for _, r := range rs {
		if r.digest == digest {
			return r, true
		}
	}
	return claimsRecord{}, false
}

func (rs recentRecords) add(r claimsRecord) recentRecords {
	if _, ok := rs.find(r.digest); ok {
		return rs
	}
	if len(rs) == recordsPerMember {
		rs = rs[1:]
	}
	return append(rs, r)
}

// encodeState renders this node's side of a full state exchange: the routes reports
// it keeps and the claims records of every member whose current claims went apart.
func encodeState(routes map[string]Routes, records []claimsRecord) []byte {
	return appendBlock(appendRoutesBlock([]byte{stateWireVersion, kindState}, routes), records)
}

func decodeState(b []byte) ([]Routes, []claimsRecord, error) {
	if len(b) == 0 {
		return nil, nil, nil // a peer with nothing to tell
	}
	if len(b) < 2 || (b[0] != stateWireVersion && b[0] != stateWireVersionV1) || b[1] != kindState {
		return nil, nil, fmt.Errorf("%w: unknown header (%d bytes)", ErrBadState, len(b))
	}
	routes, rest, err := readRoutesBlock(b[2:])
	if err != nil {
		return nil, nil, err
	}
	if b[0] == stateWireVersionV1 {
		// A natd of the previous version: its reports only.
		if len(rest) != 0 {
			return nil, nil, fmt.Errorf("%w: trailing bytes", ErrBadState)
		}
		return routes, nil, nil
	}
	var records []claimsRecord
	rest, err = readBlock(rest, func(item []byte) error {
		r, err := decodeClaimsRecord(item)
		if err == nil {
			records = append(records, r)
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	if len(rest) != 0 {
		return nil, nil, fmt.Errorf("%w: trailing bytes", ErrBadState)
	}
	return routes, records, nil
}

// mergeRecord keeps a claims record of a member and resolves that member's pending
// claims if it is the one its metadata names. The caller holds g.mu. It reports
// whether the view changed.
func (g *Gossip) mergeRecord(r claimsRecord) bool {
	if r.Node == g.cfg.NodeName {
		return false
	}
	m, ok := g.members[r.Node]
	if !ok {
		return false // not a member (yet): its metadata will come first
	}
	g.records[r.Node] = g.records[r.Node].add(r)
	if !m.ClaimsPending || m.Meta.digest != r.digest {
		return false
	}
	m.Meta.Claims, m.ClaimsPending = r.Claims, false
	klog.V(2).InfoS("Claims record received", "member", r.Node, "claims", len(r.Claims))
	return true
}

// currentRecords lists the records that the members' current metadata names (this
// node's own included): what a full state exchange passes on. The caller holds g.mu.
func (g *Gossip) currentRecords() []claimsRecord {
	var out []claimsRecord
	if g.localRecord.Node != "" {
		out = append(out, g.localRecord)
	}
	for name, m := range g.members {
		if !m.Meta.apart || m.ClaimsPending || name == g.cfg.NodeName {
			continue
		}
		if r, ok := g.records[name].find(m.Meta.digest); ok {
			out = append(out, r)
		}
	}
	return out
}

// answerClaimsRequest sends the requested record to the requester, if this node has it.
func (g *Gossip) answerClaimsRequest(q claimsRequest) {
	g.mu.Lock()
	var r claimsRecord
	ok := false
	if q.Owner == g.cfg.NodeName {
		r, ok = g.localRecord, g.localRecord.digest == q.Digest && g.localRecord.Node != ""
	} else {
		r, ok = g.records[q.Owner].find(q.Digest)
	}
	g.mu.Unlock()
	if !ok {
		return
	}
	msg, err := r.encode()
	if err != nil {
		return
	}
	g.sendTo(q.Requester, msg)
}

// fetchClaims asks for the records of members whose claims are pending, every
// claimsAskEvery until they arrive: first from the owner, then in turn from the
// voters (a holder cut off from this node may still be heard through gossip).
func (g *Gossip) fetchClaims() {
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	type ask struct {
		digest uint64
		sent   int // requests sent for this digest so far
	}
	asked := map[string]ask{} // owner -> what is pending of it
	for {
		select {
		case <-g.stop:
			return
		case <-g.claimsKick:
		case <-retry.C:
		}
		next := map[string]ask{}
		g.mu.Lock()
		for name, m := range g.members {
			if m.ClaimsPending && m.Alive {
				a := ask{digest: m.Meta.digest}
				if prev := asked[name]; prev.digest == a.digest {
					a.sent = prev.sent
				}
				next[name] = a
			}
		}
		g.mu.Unlock()
		voters := g.hb.votersNow()
		for owner, a := range next {
			to := owner
			if i := a.sent % (len(voters) + 1); i > 0 && voters[i-1] != g.cfg.NodeName {
				to = voters[i-1]
			}
			g.sendTo(to, claimsRequest{Requester: g.cfg.NodeName, Owner: owner, Digest: a.digest}.encode())
			a.sent++
			next[owner] = a
		}
		asked = next
		if len(asked) > 0 {
			retry.Reset(claimsAskEvery)
		}
	}
}

func (g *Gossip) kickClaims() {
	select {
	case g.claimsKick <- struct{}{}:
	default:
	}
}
