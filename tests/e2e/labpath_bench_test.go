package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"natd.dev/natd/tests/iperf"
	"natd.dev/natd/tests/lab"
)

// BenchmarkLabPath is the pinned path's cost in the lab's network mode
// (NATD_E2E_NETWORK: flat, overlay, routed, dual), side by side in one run: from an
// unpinned pod, a pinned pod on the holder and a pinned pod on another node to the
// partner, iperf3 TCP (one stream), iperf3 UDP (64-byte datagrams, as fast as the sender
// can) and UDP round trips to the partner's echo. NATD_LABPATH_SECONDS (3) per iperf3
// run, NATD_LABPATH_ROUNDS (3) interleaved rounds; medians. Sender, nodes, router and
// partner share this machine's cores.
func BenchmarkLabPath(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Fatal("iperf3 is not installed")
	}
	secs, rounds := 3, 3
	if v := os.Getenv("NATD_LABPATH_SECONDS"); v != "" {
		fmt.Sscan(v, &secs)
	}
	if v := os.Getenv("NATD_LABPATH_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	const ns, plain, eip, eip6 = "lp-pinned", "lp-plain", "198.18.0.227", "2001:db8:18::e2"
	ensureNamespace(b, ns)
	if topo.IPv6() {
		annotate(b, ns, eip+","+eip6) // and the same paths over IPv6
	} else {
		annotate(b, ns, eip)
	}
	defer annotate(b, ns, "")
	holder := waitHolder(b, eip)
	other := ""
	for _, n := range topo.Nodes {
		if n.Name != holder && other == "" {
			other = n.Name
		}
	}
	type path struct {
		name    string
		pod     *lab.Pod
		source  string
		partner string // the partner's address of the path's family
	}
	unpinned, onHolder, onOther := newPod(b, plain, "app", other), newPod(b, ns, "holder", holder), newPod(b, ns, "other", other)
	paths := []path{
		{"unpinned pod", unpinned, nodeIP(other), topo.Partner.IP},
		{"pinned, on holder", onHolder, eip, topo.Partner.IP},
		{"pinned, other node", onOther, eip, topo.Partner.IP},
	}
	if topo.IPv6() {
		// The IPv6 egress IP may have another holder: "on holder" is the IPv4 one's.
		holder6 := waitHolder(b, eip6)
		b.Logf("IPv6 egress IP %s held by %s", eip6, holder6)
		paths = append(paths,
			path{"unpinned pod, IPv6", unpinned, nodeIP6(other), topo.Partner.IP6},
			path{"pinned, holder, IPv6", newPod(b, ns, "holder6", holder6), eip6, topo.Partner.IP6},
			path{"pinned, other, IPv6", newPod(b, ns, "other6", notHolding(holder6)), eip6, topo.Partner.IP6})
	}
	for _, p := range paths {
		addr := net.JoinHostPort(p.partner, fmt.Sprint(topo.Partner.Port))
		waitSeenAt(b, p.pod, udp, addr, p.source)
		waitSeenAt(b, p.pod, tcp, addr, p.source)
	}
	type figures struct {
		gbps, kpps float64
		p50, p99   time.Duration
	}
	samples := map[string][]figures{}
	for b.Loop() {
		for range rounds {
			for _, p := range paths {
				var f figures
				var err error
				if f.gbps, err = iperf.TCP(p.pod.Netns, topo.Partner.Netns, p.partner, secs); err != nil {
					b.Fatalf("from %s: %v", p.name, err)
				}
				if f.kpps, err = iperf.UDP(p.pod.Netns, topo.Partner.Netns, p.partner, secs); err != nil {
					b.Fatalf("from %s: %v", p.name, err)
				}
				f.p50, f.p99 = udpRoundTrips(b, p.pod, net.JoinHostPort(p.partner, fmt.Sprint(topo.Partner.Port)), 2000)
				samples[p.name] = append(samples[p.name], f)
			}
		}
	}
	mode := os.Getenv("NATD_E2E_NETWORK")
	if mode == "" {
		mode = "flat"
	}
	median := func(fs []figures, v func(figures) float64) float64 {
		vals := make([]float64, len(fs))
		for i, f := range fs {
			vals[i] = v(f)
		}
		slices.Sort(vals)
		return vals[len(vals)/2]
	}
	fmt.Printf("\n%s network, holder %s, medians of %d rounds\n%-20s %10s %10s %10s %10s\n", mode, holder, rounds,
		"path", "TCP Gbit/s", "UDP kpps", "RTT p50", "RTT p99")
	for _, p := range paths {
		fs := samples[p.name]
		gbps, kpps := median(fs, func(f figures) float64 { return f.gbps }), median(fs, func(f figures) float64 { return f.kpps })
		p50 := time.Duration(median(fs, func(f figures) float64 { return float64(f.p50) }))
		p99 := time.Duration(median(fs, func(f figures) float64 { return float64(f.p99) }))
		fmt.Printf("%-20s %10.1f %10.0f %10s %10s\n", p.name, gbps, kpps, p50.Round(time.Microsecond), p99.Round(time.Microsecond))
		key := mode + "-" + strings.ReplaceAll(strings.ReplaceAll(p.name, ",", ""), " ", "-")
		b.ReportMetric(gbps, key+"-Gbit/s")
		b.ReportMetric(kpps, key+"-kpps")
		b.ReportMetric(float64(p99.Microseconds()), key+"-rtt-p99-us")
	}
}

// udpRoundTrips sends n datagrams to the partner's echo one at a time and returns the
// round trips' p50 and p99.
func udpRoundTrips(b *testing.B, p *lab.Pod, addr string, n int) (p50, p99 time.Duration) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := lab.DialIn(ctx, p.Netns, "udp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	rtts := make([]time.Duration, 0, n)
	buf := make([]byte, 2048)
	for i := range n {
		start := time.Now()
		fmt.Fprintf(c, "rtt-%d", i)
		c.SetReadDeadline(time.Now().Add(time.Second)) //nolint:errcheck // a UDP socket
		if _, err := c.Read(buf); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // lost: not a round trip
			}
			b.Fatalf("round trip from %s: %v", p.Name, err)
		}
		rtts = append(rtts, time.Since(start))
	}
	if len(rtts) < n/2 {
		b.Fatalf("round trips from %s: %d of %d answered", p.Name, len(rtts), n)
	}
	slices.Sort(rtts)
	return rtts[len(rtts)/2], rtts[len(rtts)*99/100]
}
