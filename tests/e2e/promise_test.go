package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"natd.dev/natd/tests/lab"
)

// The promise under conditions every cluster has: Services whose endpoints are
// outside, pod IPs that are reused, namespaces that move to another egress IP, and
// someone changing natd's kernel state. Each test watches what the partner saw.

// pin annotates ns (created when missing) with ip until the test ends.
func pin(t *testing.T, ns, ip string) {
	t.Helper()
	ensureNamespace(t, ns)
	annotate(t, ns, ip)
	unpinOnCleanup(t, ns)
}

// whileNatdRunsAndIsDead runs scenario with node's natd running, then again with it
// killed (it is restarted when the test ends).
func whileNatdRunsAndIsDead(t *testing.T, node string, scenario func(label string)) {
	t.Helper()
	scenario("natd-running")
	if err := lab.KillNatd(topo, node); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { restartNatd(t, node) })
	scenario("natd-dead")
}

// arrivals returns the sources of a stream's datagrams and requests at the partner, in
// the order they were sent (UDP by sequence number, then TCP).
func arrivals(t *testing.T, id string) (udp, tcp []lab.Arrival) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if udp, err = lab.StreamArrivals(ctx, topo, id); err != nil {
		t.Fatal(err)
	}
	if tcp, err = lab.StreamArrivals(ctx, topo, id+"-tcp"); err != nil {
		t.Fatal(err)
	}
	sort.Slice(udp, func(i, j int) bool { return udp[i].Seq < udp[j].Seq })
	sort.Slice(tcp, func(i, j int) bool { return tcp[i].Seq < tcp[j].Seq })
	return udp, tcp
}

// onlyFrom fails the test for every arrival of the stream whose source is not want,
// and returns how many arrived with want.
func onlyFrom(t *testing.T, s *stream, want string) int {
	t.Helper()
	udp, tcp := arrivals(t, s.id)
	good := 0
	for _, list := range [][]lab.Arrival{udp, tcp} {
		for _, a := range list {
			if a.Src != want {
				t.Errorf("%s: datagram/request %d arrived from %s, want %s", s.id, a.Seq, a.Src, want)
				continue
			}
			good++
		}
	}
	return good
}

// Item 1: a pinned pod reaching the outside through a ClusterIP whose endpoint is
// outside the cluster leaves with its egress IP, from the holder and from other
// nodes, over TCP and UDP; kube-proxy's DNAT decides, not the ClusterIP.
func TestPinnedThroughServiceToTheOutside(t *testing.T) {
	const ns, eip = "svc-pinned", "198.18.0.212"
	pin(t, ns, eip)
	ip, err := lab.CreateEndpointService(context.Background(), labDir, ns, "partner", partnerAddr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lab.DeleteEndpointService(context.Background(), labDir, ns, "partner") })
	addr := net.JoinHostPort(ip, strconv.Itoa(topo.Partner.Port))
	holder := waitHolder(t, eip)
	for _, node := range []string{"node1", holder} {
		p := newPod(t, ns, "app-"+node, node)
		for _, pr := range []proto{tcp, udp} {
			waitSeenAt(t, p, pr, addr, eip, nodeIPs()...)
			for i := 0; i < 5; i++ {
				if got, err := seenAt(p, pr, addr, 2*time.Second); err != nil || got != eip {
					t.Errorf("%s via ClusterIP %s over %s: partner saw %q (%v), want %s", p.Name, addr, pr, got, err, eip)
				}
			}
		}
	}
}

// Item 3: a pod IP that moves between namespaces. An unpinned pod's IP given to a
// pinned pod never leaves with the node's IP; a pinned pod's IP given to an unpinned
// pod never leaves with the egress IP (an allow-list bypass) — also while the node's
// natd is dead, since the CNI plugin classifies the new pod before its first packet.
func TestPodIPReuse(t *testing.T) {
	const pinned, plain, eip = "reuse-pinned", "reuse-plain", "198.18.0.213"
	pin(t, pinned, eip)
	waitHolder(t, eip)
	const reused = "10.244.1.200"
	node1 := nodeIP("node1")
	round := func(label string) {
		// unpinned -> pinned
		p1 := newPod(t, plain, "p1", "node1", lab.WithIP(reused))
		waitSeen(t, p1, udp, node1)
		if err := lab.DeletePod(context.Background(), labDir, plain, "p1"); err != nil {
			t.Fatal(err)
		}
		p2 := newPod(t, pinned, "p2", "node1", lab.WithIP(reused))
		s := startStream(t, p2, label+"-to-pinned")
		time.Sleep(1500 * time.Millisecond)
		s.halt()
		if n := onlyFrom(t, s, eip); n == 0 {
			t.Errorf("%s: nothing of the pinned pod on the reused IP arrived with %s", label, eip)
		}
		// pinned -> unpinned
		if err := lab.DeletePod(context.Background(), labDir, pinned, "p2"); err != nil {
			t.Fatal(err)
		}
		p3 := newPod(t, plain, "p3", "node1", lab.WithIP(reused))
		s = startStream(t, p3, label+"-to-plain")
		time.Sleep(1500 * time.Millisecond)
		s.halt()
		if n := onlyFrom(t, s, node1); n == 0 {
			t.Errorf("%s: nothing of the unpinned pod on the reused IP arrived with %s", label, node1)
		}
		if err := lab.DeletePod(context.Background(), labDir, plain, "p3"); err != nil {
			t.Fatal(err)
		}
	}
	whileNatdRunsAndIsDead(t, "node1", round)
}

// Item 4: a namespace moved from one egress IP to another on the same holder. A flow
// with a fixed source port (the stream's UDP socket) was NATed to the old IP; from the
// moment the new IP shows up at the partner, the old one never does again.
func TestRepinnedFlowNeverKeepsTheOldEgressIP(t *testing.T) {
	const ns, a, b = "repin", "198.18.0.214", "198.18.0.215"
	// One egress node: both IPs on node2.
	setEgressLabel(t, "node3", "")
	t.Cleanup(func() { setEgressLabel(t, "node3", "true") })
	pin(t, ns, a)
	if h := waitHolder(t, a); h != "node2" {
		t.Fatalf("%s held by %s, want node2", a, h)
	}
	p := newPod(t, ns, "app", "node1")
	waitSeen(t, p, udp, a)
	s := startStream(t, p, "repin")
	time.Sleep(time.Second)
	annotate(t, ns, b)
	deadline := time.Now().Add(10 * time.Second)
	for {
		udp, _ := arrivals(t, s.id)
		if len(udp) > 0 && udp[len(udp)-1].Src == b {
			break
		}
		if time.Now().After(deadline) {
			s.halt()
			t.Fatalf("the stream never arrived with %s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second)
	s.halt()
	udp, tcp := arrivals(t, s.id)
	for _, list := range [][]lab.Arrival{udp, tcp} {
		sawB := false
		for _, x := range list {
			switch {
			case x.Src == b:
				sawB = true
			case x.Src == a && !sawB:
			default:
				t.Errorf("seq %d arrived from %s after the stream had moved to %s (or from neither egress IP)", x.Seq, x.Src, b)
			}
		}
	}
}

// Item 5: whatever someone does to natd's kernel state — elements deleted, maps
// flushed, ip rules deleted, a whole table deleted — natd puts it back within a
// second, on the pod's node and on the holder. While natd's own guard is in place the
// pinned stream never arrives with another source; when its whole table is deleted,
// established flows can leave un-NATed until the repair (milliseconds): those are
// counted and logged, not hidden.
// TestConnectionsLostOnThePodsNode deletes a pinned pod's connections on its own node
// (natd does so after a takeover or a re-pinning; an operator's conntrack flush or a
// full table does too) while the partner's replies are 150 ms in flight. The holder
// still has each connection and sends the replies back through the reply tunnel. Let
// in, one would start a connection from the partner to the pod whose replies — the
// pod's next datagrams — no rule of natd looks at: they would leave with the pod's own
// address for as long as the stream lasts.
func TestConnectionsLostOnThePodsNode(t *testing.T) {
	const ns, eip = "ct-loss", "198.18.0.239"
	pin(t, ns, eip)
	holder := waitHolder(t, eip)
	node := notHolding(holder)
	p := newPod(t, ns, "app", node)
	waitSeen(t, p, udp, eip)
	if err := lab.SetPartnerDelay(context.Background(), topo, 150*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.SetPartnerDelay(context.Background(), topo, 0); err != nil {
			t.Error(err)
		}
	})
	s := startStream(t, p, fmt.Sprintf("ct-loss-%d", time.Now().UnixNano()))
	time.Sleep(500 * time.Millisecond)
	deleted := uint(0)
	for range 5 {
		n, err := lab.DeleteConnections(topo, node, p.IP)
		if err != nil {
			s.halt()
			t.Fatal(err)
		}
		deleted += n
		time.Sleep(300 * time.Millisecond)
	}
	s.halt()
	good := onlyFrom(t, s, eip)
	t.Logf("%d connections deleted on %s (holder %s) in 5 rounds; %d arrivals, all from %s; stray replies dropped there: %s",
		deleted, node, holder, good, eip, strayReplies(t, node))
}

// strayReplies is node's natd_pinned_packets_dropped_total{reason="stray_reply"}.
func strayReplies(t *testing.T, node string) string {
	n, err := topo.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(metrics(n.Netns), "\n") {
		if strings.HasPrefix(l, `natd_pinned_packets_dropped_total{reason="stray_reply"}`) {
			return strings.TrimSpace(strings.TrimPrefix(l, `natd_pinned_packets_dropped_total{reason="stray_reply"}`))
		}
	}
	return "not exported"
}

func TestTamperingIsRepaired(t *testing.T) {
	const ns, eip = "tamper", "198.18.0.216"
	pin(t, ns, eip)
	holder := waitHolder(t, eip)
	p := newPod(t, ns, "app", "node1")
	waitSeen(t, p, udp, eip)
	type tamper struct{ node, cmd string }
	var tampers []tamper
	for _, node := range []string{"node1", holder} {
		tampers = append(tampers,
			tamper{node, "nft delete element ip natd cni_pods { " + p.IP + " }"},
			tamper{node, "nft delete element ip natd pod_egress { " + p.IP + " }"},
			tamper{node, "nft flush map ip natd pod_egress && nft flush map ip natd cni_pods"},
			tamper{node, "ip rule flush priority 7000"}, // natd's rules (--rule-priority)
			tamper{node, "ip rule flush priority 7001"}, // the route guard
			tamper{node, "ip rule flush priority 6999"}, // the skip past the per-IP rules
			tamper{node, "nft delete table ip natd"},
			tamper{node, "nft flush ruleset"},
		)
	}
	dev := podDevice(t, p)
	tampers = append(tampers, tamper{holder, "nft flush set ip natd held_addrs"},
		tamper{p.Node, "tc filter del dev " + dev + " ingress"}) // the pod guard
	if n, err := topo.Node(p.Node); err != nil || !strings.Contains(natdSnapshot(t, n.Netns), "pod guard on "+dev+"\n") {
		t.Fatalf("the pinned pod's device %s on %s has no pod guard (%v):\n%s", dev, p.Node, err, natdSnapshot(t, n.Netns))
	}
	for i, tp := range tampers {
		n, err := topo.Node(tp.node)
		if err != nil {
			t.Fatal(err)
		}
		s := startStream(t, p, fmt.Sprintf("tamper-%d", i))
		repaired, done := tamperWhileStreaming(t, n, tp.cmd, s)
		if !done { // nothing to delete on this node
			continue
		}
		// Whatever went, a pinned packet leaves with its egress IP or not at all: on the
		// holder the route guard, on the pod's node the pod guard keep in what natd's
		// tables no longer classify.
		udp, tcp := arrivals(t, s.id)
		good := onlyFrom(t, s, eip)
		t.Logf("%-75s on %s: repaired in %4s, %d of %d arrivals, all from %s", tp.cmd, tp.node, repaired.Round(time.Millisecond),
			good, len(udp)+len(tcp), eip)
	}
	waitSeen(t, p, udp, eip)
}

// tamperWhileStreaming runs cmd in node n while stream s runs, waits until natd has put
// its own state back as it was (failing after 1 s), and halts s 300 ms later. A
// `nft flush ruleset` also takes the node's other tables (kube-proxy's, the CNI's
// masquerade): they are put back afterwards. It returns how long the repair took, and
// false when cmd found nothing to delete.
func tamperWhileStreaming(t *testing.T, n *lab.Node, cmd string, s *stream) (time.Duration, bool) {
	t.Helper()
	before := natdSnapshot(t, n.Netns)
	var others string
	if strings.Contains(cmd, "flush ruleset") {
		others = foreignTables(t, n.Netns)
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := lab.NsRun(n.Netns, "sh", "-c", cmd); err != nil {
		s.halt()
		if strings.Contains(err.Error(), "No such file") {
			return 0, false
		}
		t.Fatalf("%s on %s: %v", cmd, n.Name, err)
	}
	start := time.Now()
	for natdSnapshot(t, n.Netns) != before {
		if time.Since(start) > time.Second {
			s.halt()
			t.Fatalf("%s on %s: not repaired within 1 s\n--- before:\n%s\n--- now:\n%s", cmd, n.Name, before, natdSnapshot(t, n.Netns))
		}
		time.Sleep(2 * time.Millisecond)
	}
	repaired := time.Since(start)
	time.Sleep(300 * time.Millisecond)
	s.halt()
	if others != "" {
		restoreTables(t, n.Netns, others)
	}
	return repaired, true
}

// podDevice is the host side of the pod's veth on its node (the pod guard's filter is
// there).
func podDevice(t *testing.T, p *lab.Pod) string {
	t.Helper()
	n, err := topo.Node(p.Node)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lab.NsRun(p.Netns, "sh", "-c", "ip -o link show dev eth0 | sed -n 's/.*@if\\([0-9]*\\).*/\\1/p'")
	if err != nil || strings.TrimSpace(idx) == "" {
		t.Fatalf("the peer of %s's eth0: %q, %v", p.Name, idx, err)
	}
	out, err := lab.NsRun(n.Netns, "sh", "-c", "ip -o link | sed -n 's/^"+strings.TrimSpace(idx)+": \\([^@:]*\\).*/\\1/p'")
	if err != nil || strings.TrimSpace(out) == "" {
		t.Fatalf("device %s on %s: %q, %v", idx, p.Node, out, err)
	}
	return strings.TrimSpace(out)
}

// foreignTables is every nftables table of the node but natd's, as `nft -f` reads it:
// what a test that flushes the ruleset must put back (kube-proxy's, the CNI's masquerade).
func foreignTables(t *testing.T, netns string) string {
	t.Helper()
	list, err := lab.NsRun(netns, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimSpace(list), "\n") {
		f := strings.Fields(l) // table FAMILY NAME
		if len(f) != 3 || f[2] == "natd" {
			continue
		}
		out, err := lab.NsRun(netns, "nft", "list", "table", f[1], f[2])
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(out + "\n")
	}
	return b.String()
}

func restoreTables(t *testing.T, netns, tables string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "tables.nft")
	if err := os.WriteFile(f, []byte(tables), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := lab.NsRun(netns, "nft", "-f", f); err != nil {
		t.Fatalf("restoring the node's other tables: %v\n%s", err, out)
	}
}

// natdSnapshot is natd's kernel state in a node: its tables' elements and rules, ip
// rules and routes, comparable across a repair (lease timeouts and counters left out).
func natdSnapshot(t *testing.T, netns string) string {
	t.Helper()
	var b strings.Builder
	for _, fam := range []string{"ip", "ip6"} {
		out, err := lab.NsRun(netns, "nft", "-s", "list", "table", fam, "natd")
		if err != nil {
			out = "no table " + fam
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "timeout") || strings.Contains(l, "expires") {
				continue // leases: renewed all the time
			}
			b.WriteString(strings.TrimSpace(l) + "\n")
		}
	}
	skip, _ := lab.NsRun(netns, "ip", "rule", "show", "priority", "6999") // unmarked packets skip the next
	rules, _ := lab.NsRun(netns, "ip", "rule", "show", "priority", "7000")
	guard, _ := lab.NsRun(netns, "ip", "rule", "show", "priority", "7001") // the route guard
	routes, _ := lab.NsRun(netns, "ip", "route", "show", "table", "all", "proto", "78")
	// The pod guard: which devices carry natd's filter.
	pods, _ := lab.NsRun(netns, "sh", "-c", `for d in $(ls /sys/class/net); do
		tc filter show dev $d ingress 2>/dev/null | grep -q natd_origin && echo "pod guard on $d"; done; true`)
	b.WriteString(skip + rules + guard + routes + pods)
	return sortedLines(b.String())
}

func sortedLines(s string) string {
	l := strings.Split(s, "\n")
	sort.Strings(l)
	return strings.Join(l, "\n")
}

// Item 9: a new pod's first connection. A pod of a namespace nobody pinned reaches the
// partner at once — with natd running and with natd dead on its node; a pod of a
// pinned namespace never leaves with another source, even with natd dead.
func TestNewPodsFirstConnection(t *testing.T) {
	const pinned, plain, eip = "first-pinned", "first-plain", "198.18.0.217"
	pin(t, pinned, eip)
	waitHolder(t, eip)
	try := func(label string) {
		for i, pr := range []proto{tcp, udp} {
			p := newPod(t, plain, fmt.Sprintf("%s-%d", label, i), "node1")
			start := time.Now()
			got, err := seen(p, pr, 900*time.Millisecond) // a SYN retransmit would take 1 s
			if err != nil || got != nodeIP("node1") {
				t.Errorf("%s: a new unpinned pod's first %s exchange: %q, %v after %s; want %s at once", label, pr, got, err,
					time.Since(start).Round(time.Millisecond), nodeIP("node1"))
			}
			q := newPod(t, pinned, fmt.Sprintf("%s-%d", label, i), "node1")
			s := startStream(t, q, fmt.Sprintf("first-%s-%d", label, i))
			time.Sleep(time.Second)
			s.halt()
			if n := onlyFrom(t, s, eip); n == 0 {
				t.Errorf("%s: nothing of the new pinned pod arrived", label)
			}
		}
	}
	whileNatdRunsAndIsDead(t, "node1", try)
}

// An ordinary pod opens 64 key-less connections to the holder's gossip port, each
// announcing a 20 MB message and streaming it, and floods the port with garbage
// datagrams: the holder's natd grows by at most 20 MiB and nothing fails over.
func TestGossipFloodFromAPod(t *testing.T) {
	const ns, eip = "flood", "198.18.0.219"
	pin(t, ns, eip)
	holder := waitHolder(t, eip)
	h, err := topo.Node(holder)
	if err != nil {
		t.Fatal(err)
	}
	rss := func() int {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", h.NatdPid))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				var kb int
				fmt.Sscanf(strings.TrimPrefix(l, "VmRSS:"), "%d", &kb)
				return kb
			}
		}
		return 0
	}
	p := newPod(t, ns, "attacker", "node1")
	target := net.JoinHostPort(h.IP, "7946")
	before, peak := rss(), 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	junk := make([]byte, 64<<10)
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				conn, err := lab.DialIn(ctx, p.Netns, "tcp", target)
				cancel()
				if err != nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				hdr := []byte{10, 0, 0, 0, 0}
				binary.BigEndian.PutUint32(hdr[1:], 20<<20)
				_, err = conn.Write(hdr)
				for err == nil {
					select {
					case <-stop:
						conn.Close()
						return
					case <-time.After(20 * time.Millisecond):
					}
					conn.SetWriteDeadline(time.Now().Add(time.Second))
					_, err = conn.Write(junk)
				}
				conn.Close()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		conn, err := lab.DialIn(context.Background(), p.Netns, "udp", target)
		if err != nil {
			return
		}
		defer conn.Close()
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			for i := 0; i < 20; i++ {
				conn.Write(junk[:1200])
			}
		}
	}()
	for end := time.Now().Add(8 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		peak = max(peak, rss())
		if got := holdersOf(t, eip); len(got) != 1 || got[0] != holder {
			t.Errorf("during the flood %s is held by %v, want %s", eip, got, holder)
		}
	}
	close(stop)
	wg.Wait()
	grew := float64(peak-before) / 1024
	t.Logf("holder's natd: %.1f MiB before, %.1f MiB at most during the flood (+%.1f MiB)", float64(before)/1024, float64(peak)/1024, grew)
	if grew > 20 {
		t.Errorf("natd grew by %.1f MiB under the flood, more than 20 MiB", grew)
	}
}
