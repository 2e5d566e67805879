package election

import (
	"fmt"
	"net/netip"
	"testing"
)

func ips(n int) []netip.Addr {
	var out []netip.Addr
	a := netip.MustParseAddr("198.18.0.192")
	for i := 0; i < n; i++ {
		out = append(out, a)
		a = a.Next()
	}
	return out
}

func TestHoldersDeterministicAndOrderIndependent(t *testing.T) {
	r := Rendezvous{}
	a := r.Holders(ips(50), []string{"node2", "node3", "node4"})
	b := r.Holders(ips(50), []string{"node4", "node2", "node3"})
	for ip, h := range a {
		if b[ip] != h {
			t.Fatalf("holder of %s differs with candidate order: %s vs %s", ip, h, b[ip])
		}
	}
	if len(a) != 50 {
		t.Fatalf("got %d holders, want 50", len(a))
	}
}

func TestHoldersNoCandidates(t *testing.T) {
	if got := (Rendezvous{}).Holders(ips(3), nil); len(got) != 0 {
		t.Fatalf("want no holders without candidates, got %v", got)
	}
}

func TestHoldersSpreadEvenly(t *testing.T) {
	nodes := []string{"node1", "node2", "node3", "node4"}
	count := map[string]int{}
	for _, h := range (Rendezvous{}).Holders(ips(4000), nodes) {
		count[h]++
	}
	for _, n := range nodes {
		// 1000 expected per node; allow ±15%.
		if count[n] < 850 || count[n] > 1150 {
			t.Fatalf("uneven spread: %v", count)
		}
	}
}

func TestHoldersMoveOnlyTheLostNodesIPs(t *testing.T) {
	r := Rendezvous{}
	before := r.Holders(ips(300), []string{"node1", "node2", "node3"})
	after := r.Holders(ips(300), []string{"node1", "node3"})
	moved := 0
	for ip, h := range before {
		if h != "node2" && after[ip] != h {
			t.Fatalf("%s moved from %s to %s although its holder stayed", ip, h, after[ip])
		}
		if h == "node2" {
			moved++
			if after[ip] == "node2" {
				t.Fatalf("%s still on removed node2", ip)
			}
		}
	}
	if moved == 0 {
		t.Fatal("node2 held nothing; test is meaningless")
	}
}

func BenchmarkHolders(b *testing.B) {
	var nodes []string
	for i := 0; i < 100; i++ {
		nodes = append(nodes, fmt.Sprintf("node%d", i))
	}
	in := ips(200)
	for b.Loop() {
		(Rendezvous{}).Holders(in, nodes)
	}
}
