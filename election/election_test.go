package election

import (
	"fmt"
	"net/netip"
	"testing"
)

func TestPickIsDeterministicAndSpreads(t *testing.T) {
	nodes := []string{"node1", "node2", "node3", "node4"}
	count := map[string]int{}
	for i := 0; i < 4000; i++ {
		key := fmt.Sprintf("team-%d", i)
		got := Pick(key, nodes)
		if again := Pick(key, []string{"node4", "node3", "node2", "node1"}); again != got {
			t.Fatalf("Pick(%s) depends on candidate order: %s vs %s", key, got, again)
		}
		count[got]++
	}
	for _, n := range nodes {
		if count[n] < 850 || count[n] > 1150 { // 1000 expected; ±15%
			t.Fatalf("uneven: %v", count)
		}
	}
	if Pick("x", nil) != "" {
		t.Fatal("Pick with no candidates")
	}
}

func BenchmarkAssign(b *testing.B) {
	var nodes []string
	for i := 0; i < 100; i++ {
		nodes = append(nodes, fmt.Sprintf("node%d", i))
	}
	var ips []netip.Addr
	a := netip.MustParseAddr("198.18.0.1")
	for i := 0; i < 200; i++ {
		ips = append(ips, a)
		a = a.Next()
	}
	for b.Loop() {
		Assign(Input{IPs: ips, Candidates: nodes, Keepers: nodes})
	}
}
