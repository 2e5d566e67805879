// Package election decides which egress-eligible node holds each egress IP.
//
// Every node runs the same pure function over the same inputs, so all nodes agree on
// the holder without talking to each other. Rendezvous (highest-random-weight) hashing
// spreads IPs evenly and moves only the IPs of a node that leaves the candidate set.
package election

import (
	"hash/fnv"
	"net/netip"
	"sort"
)

// Rendezvous picks holders by highest-random-weight hashing over the candidates.
type Rendezvous struct{}

// Holders returns the holder of every IP in ips, chosen among candidates (node names).
// IPs without any candidate are absent from the result.
func (Rendezvous) Holders(ips []netip.Addr, candidates []string) map[netip.Addr]string {
	out := make(map[netip.Addr]string, len(ips))
	if len(candidates) == 0 {
		return out
	}
	// Sort a copy so ties (astronomically unlikely) break the same way on every node.
	sorted := append([]string(nil), candidates...)
	sort.Strings(sorted)
	for _, ip := range ips {
		b := ip.As16()
		out[ip] = pick(b[:], sorted)
	}
	return out
}

// Pick chooses one of candidates for key the same way on every node: used to pick the
// one node that reports on an object, so that N agents do not write N copies.
func Pick(key string, candidates []string) string {
	if len(candidates) == 0 {
		return ""
	}
	sorted := append([]string(nil), candidates...)
	sort.Strings(sorted)
	return pick([]byte(key), sorted)
}

func pick(key []byte, sorted []string) string {
	var best string
	var bestScore uint64
	for i, node := range sorted {
		s := score(key, node)
		if i == 0 || s > bestScore {
			best, bestScore = node, s
		}
	}
	return best
}

// score is the weight of node for ip. FNV-1a alone mixes the low bits poorly for inputs
// that differ only at the end (node1, node2, ...), so the result goes through a 64-bit
// finalizer (splitmix64) to spread it over the whole range.
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
