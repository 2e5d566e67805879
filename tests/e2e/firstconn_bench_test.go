package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"testing"
	"time"

	"natd.dev/natd/tests/lab"
)

// BenchmarkFirstConnection measures, side by side in one lab, how long a new pod's
// first exchange with the partner takes right after the pod was created (its CNI ADD
// and its Pod object): a TCP connection with one HTTP request, and one UDP datagram
// and its echo. Cases: a node without natd (natd cleaned up: the baseline), an
// unpinned pod beside natd, a pinned pod on a node that does not hold the egress IP,
// and a pinned pod on the holder. A first exchange that takes a second or more is a
// retransmitted SYN (or, for UDP, a lost datagram resent after 1 s).
func BenchmarkFirstConnection(b *testing.B) {
	rounds := 20
	if v := os.Getenv("NATD_FIRSTCONN_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	const pinned, plain, eip = "fc-pinned", "fc-plain", "198.18.0.218"
	ensureNamespace(b, pinned)
	annotate(b, pinned, eip)
	defer annotate(b, pinned, "")
	holder := ""
	for i := 0; i < 100 && holder == ""; i++ {
		if h := servedBy(b, eip); len(h) == 1 {
			holder = h[0]
		}
		time.Sleep(100 * time.Millisecond)
	}
	if holder == "" {
		b.Fatalf("%s has no holder", eip)
	}
	type result struct{ tcp, udp []time.Duration }
	measure := func(ns, node, tag string) result {
		var r result
		for i := 0; i < rounds; i++ {
			name := fmt.Sprintf("%s-%d-%d", tag, i, time.Now().UnixNano()%1e6)
			p, err := lab.CreatePod(context.Background(), labDir, ns, name, node)
			if err != nil {
				b.Fatal(err)
			}
			for _, pr := range []proto{tcp, udp} {
				start := time.Now()
				for {
					_, err := seen(p, pr, time.Second)
					if err == nil || time.Since(start) > 5*time.Second {
						break
					}
				}
				d := time.Since(start)
				if pr == tcp {
					r.tcp = append(r.tcp, d)
				} else {
					r.udp = append(r.udp, d)
				}
			}
			if err := lab.DeletePod(context.Background(), labDir, ns, name); err != nil {
				b.Fatal(err)
			}
		}
		return r
	}
	report := func(name, unit string, r result) {
		for _, x := range []struct {
			proto string
			d     []time.Duration
		}{{"tcp", r.tcp}, {"udp", r.udp}} {
			slices.Sort(x.d)
			slow := 0
			for _, d := range x.d {
				if d >= 900*time.Millisecond {
					slow++
				}
			}
			p := func(q float64) time.Duration { return x.d[min(len(x.d)-1, int(q*float64(len(x.d))))] }
			fmt.Printf("first connection %-28s %s n=%d p50=%s p99=%s max=%s retransmitted=%d\n", name, x.proto, len(x.d),
				p(0.5).Round(10*time.Microsecond), p(0.99).Round(10*time.Microsecond), x.d[len(x.d)-1].Round(10*time.Microsecond), slow)
			b.ReportMetric(float64(p(0.5).Microseconds()), unit+"-"+x.proto+"-p50-us")
		}
	}
	for b.Loop() {
		// The baseline: node1 without natd at all (killed and cleaned up).
		if err := lab.KillNatd(topo, "node1"); err != nil {
			b.Fatal(err)
		}
		n1, _ := topo.Node("node1")
		if out, err := lab.NsRun(n1.Netns, topo.API.NatdBinary, "cleanup", "--state-dir", lab.NatdStateDir(labDir, "node1")); err != nil {
			b.Fatalf("natd cleanup: %v\n%s", err, out)
		}
		without := measure(plain, "node1", "none")
		restartNatd(b, "node1")
		waitGossipHealthy(b)
		report("unpinned, node without natd", "no-natd", without)
		report("unpinned, natd running", "unpinned", measure(plain, "node1", "plain"))
		report("pinned, on another node", "pinned-remote", measure(pinned, "node1", "pinned"))
		report("pinned, on the holder", "pinned-holder", measure(pinned, holder, "holder"))
	}
}
