// Package election decides which node holds each egress IP, and carries what every
// node needs to know for that over gossip.
//
// Every node runs the same pure function (Assign) over the same inputs: the egress-
// eligible nodes whose natd gossip says is alive, and the IPs each member claims. It is
// sticky (a live holder keeps its IPs), orders competing claims by generation (the
// newest takeover wins), and spreads new IPs over the least loaded nodes, ties broken by
// rendezvous (highest-random-weight) hashing. Gossip (hashicorp/memberlist) tells who is
// alive, within a second, without the API server.
package election

import (
	"hash/fnv"
	"sort"
)

// Pick chooses one of candidates for key the same way on every node: used to pick the
// one node that reports on an object, so that N agents do not write N copies.
func Pick(key string, candidates []string) string {
	if len(candidates) == 0 {
		return ""
	}
	sorted := append([]string(nil), candidates...)
	sort.Strings(sorted)
	var best string
	var bestScore uint64
	for i, node := range sorted {
		s := score([]byte(key), node)
		if i == 0 || s > bestScore {
			best, bestScore = node, s
		}
	}
	return best
}

// Rank orders candidates for key by rendezvous score, highest first, the same way on
// every node.
func Rank(key string, candidates []string) []string {
	sorted := append([]string(nil), candidates...)
	sort.Slice(sorted, func(i, j int) bool {
		si, sj := score([]byte(key), sorted[i]), score([]byte(key), sorted[j])
		if si != sj {
			return si > sj
		}
		return sorted[i] < sorted[j]
	})
	return sorted
}

// score is the rendezvous weight of node for key. FNV-1a alone mixes the low bits
// poorly for inputs that differ only at the end (node1, node2, ...), so the result goes
// through a 64-bit finalizer (splitmix64) to spread it over the whole range.
func score(key []byte, node string) uint64 {
	h := fnv.New64a()
	h.Write(key)
	h.Write([]byte{0})
	h.Write([]byte(node))
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
