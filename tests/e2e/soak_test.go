package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"natd.dev/natd/tests/lab"
)

// soakLossPercent is the frames every node link loses during a soak, each direction.
const soakLossPercent = 5

// soakPatience is how long a soak connection's request may wait for its answer. A
// request from a pod to the partner crosses two node links each way (the pod's node's
// and the holder's, 5 % loss in and out of each on the lab's bridge), so about one
// exchange in four loses a segment, and TCP's retransmissions back off from 200 ms:
// seven losses in a row leave a healthy connection without an answer for 25 s. That
// made the one-minute soak fail on a 20 s deadline (an i/o timeout, natd steady: no
// move, no quorum break). Ten losses in a row (about one in 10^6) take 3.4 minutes.
const soakPatience = 3 * time.Minute

// soakResult is what moved while an egress IP was held on a loaded, lossy network.
type soakResult struct {
	duration time.Duration
	samples  int // of which nodes serve the IP, every 100 ms
	// moves: samples in which another node than the first holder served the IP;
	// lapses: samples in which none did; twoHolders: samples in which more than one did.
	moves, lapses, twoHolders int
	statusMoves               int // changes of the holder `kubectl get eip` shows
	// Summed over the nodes, from their metrics: quorums lost, lease renewals withheld,
	// IPs taken over.
	quorumBreaks, renewalsWithheld, failovers int
	sent, lost, leaked                        int // the pinned pod's datagrams
	longestGap                                time.Duration
	tcp                                       []tcpOutcome
}

func (r soakResult) String() string {
	survived, stall := 0, time.Duration(0)
	for _, c := range r.tcp {
		if c.survived {
			survived++
		}
		stall = max(stall, c.stall)
	}
	return fmt.Sprintf("soak %s with every node's CPUs saturated and %d %% loss on every node link: %d moves, %d samples without a holder, %d with two (of %d); "+
		"`kubectl get eip` changed holder %d times; quorum breaks %d, lease renewals withheld %d, takeovers %d; "+
		"datagrams lost %d of %d (longest gap %s), leaked %d; long-lived TCP connections survived %d of %d (longest stall %s)",
		r.duration, soakLossPercent, r.moves, r.lapses, r.twoHolders, r.samples, r.statusMoves, r.quorumBreaks, r.renewalsWithheld, r.failovers,
		r.lost, r.sent, r.longestGap.Round(time.Millisecond), r.leaked, survived, len(r.tcp), stall.Round(time.Millisecond))
}

// soak holds ip for d with a pinned pod on a node that does not hold it streaming
// datagrams and holding four long-lived TCP connections to the partner through it,
// while stress-ng saturates every node's CPUs and every node link loses
// soakLossPercent % of its frames. Nothing has failed, so nothing may move.
func soak(t testing.TB, ip string, d time.Duration) soakResult {
	t.Helper()
	waitGossipHealthy(t)
	ns := "soak"
	ensureNamespace(t, ns)
	annotate(t, ns, ip)
	t.Cleanup(func() { annotate(t, ns, "") })
	holder := waitServedBy(t, ip, 10*time.Second)
	p := newPod(t, ns, fmt.Sprintf("app-%d", time.Now().UnixNano()), notHolding(holder))
	waitSeenAt(t, p, tcp, partnerFor(ip), ip)

	before := nodeCounters()
	stopStress, err := lab.StressNodes(topo)
	if err != nil {
		t.Fatal(err)
	}
	defer stopStress()
	heal, err := lab.LoseOnNodeLinks(topo, soakLossPercent)
	if err != nil {
		t.Fatal(err)
	}
	defer heal()

	s := startStreamTo(t, p, fmt.Sprintf("soak-%d", time.Now().UnixNano()), partnerFor(ip))
	var conns []*connection
	for range 4 {
		conns = append(conns, startPatientConnectionTo(t, p, 0, partnerFor(ip), soakPatience))
	}
	r := soakResult{duration: d}
	statusHolder := holder
	eips, err := newEIPClient()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for lastStatus := start; time.Since(start) < d; time.Sleep(100 * time.Millisecond) {
		served := servedBy(t, ip)
		r.samples++
		switch {
		case len(served) == 0:
			r.lapses++
		case len(served) > 1:
			r.twoHolders++
		case served[0] != holder:
			r.moves++
		}
		if time.Since(lastStatus) >= time.Second {
			lastStatus = time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			o, err := eips.EgressV1alpha1().EgressIPs().Get(ctx, eipName(ip), metav1.GetOptions{})
			cancel()
			if err == nil && o.Status.Node != "" && o.Status.Node != statusHolder {
				r.statusMoves++
				t.Logf("after %s `kubectl get eip` shows %s on %s (was %s)", time.Since(start).Round(time.Second), ip, o.Status.Node, statusHolder)
				statusHolder = o.Status.Node
			}
		}
	}
	heal()
	stopStress()
	s.halt()
	for _, c := range conns {
		r.tcp = append(r.tcp, c.stop())
	}
	o := s.outcome(t, ip, start)
	r.sent, r.lost, r.leaked = o.sent, o.lost, o.leaked
	r.longestGap = o.gap
	after := nodeCounters()
	r.quorumBreaks = after["natd_quorum_breaks_total"] - before["natd_quorum_breaks_total"]
	r.renewalsWithheld = after["natd_lease_renewals_withheld_total"] - before["natd_lease_renewals_withheld_total"]
	r.failovers = after["natd_failovers_total"] - before["natd_failovers_total"]
	if o.leaked > 0 {
		t.Errorf("%d datagrams arrived with another source than %s: %s", o.leaked, ip, strings.Join(o.leaks, "; "))
	}
	return r
}

// nodeCounters sums natd's counters over the nodes.
func nodeCounters() map[string]int {
	sum := map[string]int{}
	for _, n := range topo.Nodes {
		sc := bufio.NewScanner(strings.NewReader(metrics(n.Netns)))
		for sc.Scan() {
			name, value, ok := strings.Cut(sc.Text(), " ")
			if !ok || !strings.HasPrefix(name, "natd_") || !strings.HasSuffix(name, "_total") {
				continue
			}
			if v, err := strconv.ParseFloat(value, 64); err == nil {
				sum[name] += int(v)
			}
		}
	}
	return sum
}

// checkNothingMoved fails t if the IP moved in the soak, was served twice, or a
// long-lived connection broke; strict, also if the holder lost its quorum or the IP
// went unserved for a moment (a quorum break: the holder gives the IP up and takes it
// back).
func checkNothingMoved(t testing.TB, r soakResult, strict bool) {
	t.Helper()
	if r.moves+r.twoHolders+r.statusMoves+r.failovers > 0 || (strict && r.lapses+r.quorumBreaks > 0) {
		t.Errorf("nothing failed, yet: %s", r)
	}
	for _, c := range r.tcp {
		if !c.survived {
			t.Errorf("a long-lived connection broke in the soak: %s", c)
		}
	}
}

// TestSoakUnderLoadAndLoss holds an egress IP for a minute on saturated CPUs and
// lossy links (BenchmarkSoak does it for 30): no false failover, no broken connection.
// A rare quorum break (about one in 10 minutes in the lab, the IP back on the same
// node within half a second) is reported, not failed on: the bench is strict.
func TestSoakUnderLoadAndLoss(t *testing.T) {
	r := soak(t, "198.18.0.246", time.Minute)
	t.Log(r)
	checkNothingMoved(t, r, false)
}

// BenchmarkSoak holds an egress IP for NATD_SOAK (30m) while stress-ng saturates
// every node's CPUs and every node link loses 5 % of its frames, and reports what
// moved: nothing may (issue 12: fast failover without false ones).
func BenchmarkSoak(b *testing.B) {
	d := 30 * time.Minute
	if v := os.Getenv("NATD_SOAK"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil {
			b.Fatalf("NATD_SOAK=%q: %v", v, err)
		}
	}
	for b.Loop() {
		r := soak(b, "198.18.0.247", d)
		fmt.Println(r)
		b.ReportMetric(float64(r.moves+r.lapses+r.twoHolders), "moved-samples")
		b.ReportMetric(float64(r.quorumBreaks), "quorum-breaks")
		b.ReportMetric(float64(r.lost)/float64(max(1, r.sent)), "lost-fraction")
		checkNothingMoved(b, r, true)
	}
}
