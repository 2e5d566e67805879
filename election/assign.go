package election

import (
	"net/netip"
	"slices"
	"sort"
)

// Claim is a member's statement that it holds an egress IP. Gen orders claims of one
// IP: whoever takes an IP over claims one more than the highest generation seen for it,
// so the newest holder wins any conflict, and a restarted natd that still has an old
// claim in its kernel loses to the node that took over meanwhile.
type Claim struct {
	IP  netip.Addr
	Gen uint32
}

// Generations are compared as serial numbers (RFC 1982): b is newer than a when it is
// ahead by less than half the space. A claim at 0xffffffff is followed by one at 0, and
// the newer still wins: the counter wraps harmlessly, as long as no two claims of one
// IP that are both still around are 2^31 generations apart.

// NewerGen reports whether generation b is newer than a.
func NewerGen(a, b uint32) bool { return int32(b-a) > 0 }

// LaterGen returns the newer of two generations.
func LaterGen(a, b uint32) uint32 {
	if NewerGen(a, b) {
		return b
	}
	return a
}

// Input is everything Assign needs; every node builds the same Input from the same
// membership view and API objects.
type Input struct {
	IPs []netip.Addr
	// Candidates may be given new IPs: alive, eligible, not draining.
	Candidates []string
	// Keepers are members whose claims stand: the candidates, plus eligible members
	// that went down for a planned restart and are still within their grace time.
	Keepers []string
	// Claims by member (only the keepers' are considered).
	Claims map[string][]Claim
	// MaxGen is the highest generation seen for each IP, from any member, alive or not.
	MaxGen map[netip.Addr]uint32
	// MaxPerNode caps how many IPs one node is given (0: no cap). Claims are kept even
	// beyond it: moving an IP breaks connections.
	MaxPerNode int
	// MayHold, when set, says whether a candidate can serve an IP at all (an IPv6 one
	// needs a node with IPv6): an unclaimed IP goes to the best candidate that can.
	// Every member must compute it alike (from the Node objects, say).
	MayHold func(member string, ip netip.Addr) bool
}

// Assignment is the holder of one egress IP.
type Assignment struct {
	Holder string // "" when no node can hold it
	Gen    uint32
	// Claimed is true when Holder already claims the IP (it is not a new assignment).
	Claimed bool
}

// Assign decides the holder of every IP. It is sticky: an IP stays with a keeper that
// claims it (the claim with the highest generation wins, then the highest
// rendezvous score). An unclaimed IP goes to the candidate with the highest rendezvous
// score for it that is under MaxPerNode.
//
// Not to the least loaded candidate: loads come from claims, and claims reach the
// voters at different moments. Two voters that both see an IP unclaimed — its holder
// just went down — but count the others' fresh claims differently would each give it
// to a different node, and both would take it. The rendezvous winner depends only on
// the candidates; and two voters that disagree on those (one already counts a node
// down, or draining) cannot both pick themselves: each ranks the other above or
// below itself the same way, so one of them must be missing from the other's list —
// down (then its lease has run out) or draining (then it takes nothing). The spread is
// even on average, not exact. MaxPerNode brings loads back in: while a node is at its
// cap, a voter that has not yet seen it let go of an IP gives the next IP to the next
// node; keep the cap above the expected share.
func Assign(in Input) map[netip.Addr]Assignment {
	out := make(map[netip.Addr]Assignment, len(in.IPs))
	keeper := map[string]bool{}
	for _, k := range in.Keepers {
		keeper[k] = true
	}
	claimants := make(map[netip.Addr][]string, len(in.IPs))
	gens := map[string]map[netip.Addr]uint32{}
	members := make([]string, 0, len(in.Claims))
	for m := range in.Claims {
		members = append(members, m)
	}
	sort.Strings(members)
	for _, m := range members {
		if !keeper[m] {
			continue
		}
		gens[m] = make(map[netip.Addr]uint32, len(in.Claims[m]))
		for _, c := range in.Claims[m] {
			claimants[c.IP] = append(claimants[c.IP], m)
			gens[m][c.IP] = c.Gen
		}
	}
	load := map[string]int{}
	ips := slices.Clone(in.IPs)
	slices.SortFunc(ips, netip.Addr.Compare)
	var unclaimed []netip.Addr
	for _, ip := range ips {
		cs := claimants[ip]
		if len(cs) == 0 {
			unclaimed = append(unclaimed, ip)
			continue
		}
		key := ip.As16()
		best := cs[0]
		for _, m := range cs[1:] {
			gb, gm := gens[best][ip], gens[m][ip]
			if NewerGen(gb, gm) || (gm == gb && score(key[:], m) > score(key[:], best)) {
				best = m
			}
		}
		out[ip] = Assignment{Holder: best, Gen: gens[best][ip], Claimed: true}
		load[best]++
	}
	for _, ip := range unclaimed {
		key := ip.As16()
		best := ""
		var bestScore uint64
		for _, c := range in.Candidates {
			if (in.MaxPerNode > 0 && load[c] >= in.MaxPerNode) || (in.MayHold != nil && !in.MayHold(c, ip)) {
				continue
			}
			if sc := score(key[:], c); best == "" || sc > bestScore || (sc == bestScore && c < best) {
				best, bestScore = c, sc
			}
		}
		a := Assignment{Holder: best}
		if best != "" {
			a.Gen = in.MaxGen[ip] + 1 // wraps from 0xffffffff to 0, still newer
			load[best]++
		}
		out[ip] = a
	}
	return out
}
