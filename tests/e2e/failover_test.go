package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/tests/lab"
)

// stream sends numbered UDP datagrams (every 10 ms) and HTTP requests over a kept-open
// TCP connection (every 50 ms) from a pod to the partner, which records the source
// address each one arrived with.
type stream struct {
	id   string
	pod  *lab.Pod
	mu   sync.Mutex
	sent []time.Time // by sequence number
	stop chan struct{}
	done sync.WaitGroup
}

func startStream(t testing.TB, p *lab.Pod, id string) *stream {
	t.Helper()
	return startStreamTo(t, p, id, partnerAddr())
}

// startStreamTo is startStream to addr, e.g. the partner's IPv6 address. The id gets
// a suffix of its own: the partner keeps what it received for the lab's life, and a
// test run again in the same lab (-count, a benchmark's rounds) must not count the
// arrivals of an earlier run as its own.
func startStreamTo(t testing.TB, p *lab.Pod, id, addr string) *stream {
	t.Helper()
	id = fmt.Sprintf("%s.%x", id, time.Now().UnixNano())
	s := &stream{id: id, pod: p, stop: make(chan struct{})}
	c, err := lab.DialIn(context.Background(), p.Netns, "udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s.done.Add(2)
	go func() {
		defer s.done.Done()
		defer c.Close()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for seq := 0; ; seq++ {
			s.mu.Lock()
			s.sent = append(s.sent, time.Now())
			s.mu.Unlock()
			fmt.Fprintf(c, "stream %s %d", id, seq)
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	go func() {
		defer s.done.Done()
		var conn net.Conn
		var rd *bufio.Reader
		for seq := 0; ; seq++ {
			select {
			case <-s.stop:
				if conn != nil {
					conn.Close()
				}
				return
			case <-time.After(50 * time.Millisecond):
			}
			if conn == nil {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				conn, _ = lab.DialIn(ctx, p.Netns, "tcp", addr)
				cancel()
				if conn == nil {
					continue
				}
				rd = bufio.NewReader(conn)
			}
			conn.SetDeadline(time.Now().Add(time.Second))
			fmt.Fprintf(conn, "GET /?stream=%s-tcp&seq=%d HTTP/1.1\r\nHost: partner\r\n\r\n", id, seq)
			resp, err := http.ReadResponse(rd, nil)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			if err != nil { // the connection died with its holder: open a new one
				conn.Close()
				conn = nil
			}
		}
	}()
	return s
}

func (s *stream) halt() {
	close(s.stop)
	s.done.Wait()
}

// outcome is what the partner saw of a stream around a fault.
type outcome struct {
	recovery time.Duration // fault to the first datagram sent after it that arrived with the egress IP
	// gap is the longest time between two datagrams arriving with the egress IP from
	// the last one before the fault on (the stream sends one every 10 ms): the
	// interruption a planned move causes, if any, shows here when nothing is lost.
	gap    time.Duration
	leaked int // datagrams and requests that arrived with another source
	lost   int // datagrams sent that never arrived
	sent   int
	// status: fault to `kubectl get eip` showing the new holder (0: it did not within
	// the watch, or the IP was not to move). READY may lag: a node cut off cannot say
	// it has re-pointed.
	status time.Duration
	tcp    tcpOutcome // the long-lived connection opened before the fault
	leaks  []string   // the first leaked arrivals, described
	// The benchmark's extra connections (failoverExtras): more long-lived ones from the
	// pod, and a pair from two pods on two nodes using one source port.
	more, pair []tcpOutcome
}

// failoverExtras, when set (the benchmark), opens more long-lived connections in each
// failover: conns more from the pod, and a pair of connections from two pods on two
// nodes that are not the holder, both from local port pairPort.
var failoverExtras struct {
	conns    int
	pairPort int
}

func (o *outcome) leak(what string) {
	o.leaked++
	if len(o.leaks) < 5 {
		o.leaks = append(o.leaks, what)
	}
}

// leakDiagnosis is what every node's kernel says about pod's flows when some of them
// left with another source: conntrack entries, natd's table and tunnels, ip rules.
func leakDiagnosis(pod *lab.Pod) string {
	var b strings.Builder
	for _, n := range topo.Nodes {
		ct, _ := lab.NsRun(n.Netns, "grep", "-F", "src="+pod.IP+" ", "/proc/net/nf_conntrack")
		table, _ := lab.NsRun(n.Netns, "nft", "-t", "list", "table", "ip", "natd")
		rules, _ := lab.NsRun(n.Netns, "ip", "rule")
		links, _ := lab.NsRun(n.Netns, "ip", "-d", "-o", "link", "show", "type", "vxlan")
		fmt.Fprintf(&b, "--- %s conntrack of %s:\n%s\n--- %s ip rules:\n%s\n--- %s tunnels:\n%s\n--- %s natd table:\n%s\n",
			n.Name, pod.IP, ct, n.Name, rules, n.Name, links, n.Name, table)
	}
	return b.String()
}

func (s *stream) outcome(t testing.TB, egressIP string, faultAt time.Time) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	udp, err := lab.StreamArrivals(ctx, topo, s.id)
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := lab.StreamArrivals(ctx, topo, s.id+"-tcp")
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	sent := append([]time.Time(nil), s.sent...)
	s.mu.Unlock()
	o := outcome{sent: len(sent), recovery: -1}
	seen := map[int]bool{}
	for _, a := range udp {
		seen[a.Seq] = true
	}
	// The outage starts with the first datagram sent after the fault that never
	// arrived (a holder whose natd died keeps serving until its lease lapses); the
	// stream is back with the first egress-IP datagram sent after that one.
	// Datagrams sent in the last moments before the stream halted may still have been
	// on their way: they are neither lost nor the start of an outage.
	if len(sent) > 0 {
		inFlight := sent[len(sent)-1].Add(-100 * time.Millisecond)
		for len(sent) > 0 && sent[len(sent)-1].After(inFlight) && !seen[len(sent)-1] {
			sent = sent[:len(sent)-1]
		}
	}
	o.sent = len(sent)
	firstLost := -1
	for seq, at := range sent {
		if at.After(faultAt) && !seen[seq] {
			firstLost = seq
			break
		}
	}
	sort.Slice(udp, func(i, j int) bool { return udp[i].At.Before(udp[j].At) })
	for _, a := range udp {
		if a.Src != egressIP {
			o.leak(fmt.Sprintf("datagram %d of %s arrived from %s, not %s", a.Seq, s.id, a.Src, egressIP))
			continue
		}
		if o.recovery >= 0 || a.Seq >= len(sent) || !sent[a.Seq].After(faultAt) {
			continue
		}
		if firstLost < 0 || a.Seq > firstLost {
			o.recovery = max(0, a.At.Sub(faultAt))
			if firstLost < 0 {
				o.recovery = 0 // no datagram lost: no interruption
			}
		}
	}
	o.gap = arrivalGap(udp, egressIP, faultAt)
	for _, a := range tcp {
		if a.Src != egressIP {
			o.leak(fmt.Sprintf("TCP request %d of %s arrived from %s, not %s", a.Seq, s.id, a.Src, egressIP))
		}
	}
	for seq := range sent {
		if !seen[seq] {
			o.lost++
		}
	}
	return o
}

// arrivalGap is the longest time between two arrivals with src, sorted by arrival,
// counted from the last one before from.
func arrivalGap(arrivals []lab.Arrival, src string, from time.Time) time.Duration {
	var gap time.Duration
	var last time.Time
	for _, a := range arrivals {
		if a.Src != src {
			continue
		}
		if !last.IsZero() && a.At.After(from) {
			gap = max(gap, a.At.Sub(last))
		}
		last = a.At
	}
	return gap
}

// servedBy lists the nodes whose kernel serves ip: its lease is current in natd's
// table (a node whose natd was killed may still have the address, but not the lease).
func servedBy(t testing.TB, ip string) []string {
	t.Helper()
	want, err := netip.ParseAddr(ip)
	if err != nil {
		t.Fatal(err)
	}
	family, set := nftables.TableFamilyIPv4, "held_marks"
	if want.Is6() {
		family, set = nftables.TableFamilyIPv6, "held_marks6"
	}
	n := want.BitLen() / 8
	// Every node at once: read one after the other on a loaded machine, the reads of
	// one sample could lie further apart than a handover's gap, and an IP moved
	// between two reads would look held twice.
	leased := make([]bool, len(topo.Nodes))
	var wg sync.WaitGroup
	for i, node := range topo.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Over netlink, not by running nft: sampled every 20 ms on ten nodes, a
			// process per node and sample would starve the lab's two cores.
			lab.InNetns(node.Netns, func() error {
				c, err := nftables.New()
				if err != nil {
					return err
				}
				defer c.CloseLasting()
				s, err := c.GetSetByName(&nftables.Table{Name: "natd", Family: family}, set)
				if err != nil {
					return err
				}
				els, err := c.GetSetElements(s)
				for _, e := range els {
					if a, ok := netip.AddrFromSlice(e.Key[:min(len(e.Key), n)]); ok && a == want {
						leased[i] = true
					}
				}
				return err
			})
		}()
	}
	wg.Wait()
	var out []string
	for i, node := range topo.Nodes {
		if leased[i] {
			out = append(out, node.Name)
		}
	}
	return out
}

// waitServedBy waits until exactly one node serves ip, and returns it.
func waitServedBy(t testing.TB, ip string, timeout time.Duration) string {
	t.Helper()
	var s []string
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if s = servedBy(t, ip); len(s) == 1 {
			return s[0]
		}
	}
	t.Fatalf("%s is served by %v, want exactly one node", ip, s)
	return ""
}

// waitGossipHealthy waits until every running natd sees all nodes alive.
func waitGossipHealthy(t testing.TB) {
	t.Helper()
	want := fmt.Sprintf("natd_gossip_members_alive %d", len(topo.Nodes))
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		ok := true
		for _, n := range topo.Nodes {
			if m := metrics(n.Netns); !strings.Contains(m, want) {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("gossip did not heal: not every natd reports %q", want)
		}
	}
}

func metrics(ns string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := lab.DialIn(ctx, ns, "tcp", "127.0.0.1:9793")
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\n\r\n")
	b, _ := io.ReadAll(c)
	return string(b)
}

// restartNatd (re)starts a node's natd, with extra flags if any, and waits until it is
// ready; it returns the topology with the new PID.
func restartNatd(t testing.TB, node string, extra ...string) *lab.Topology {
	t.Helper()
	cur, err := lab.RestartNatd(labDir, node, extra)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := cur.Node(node)
	if err := lab.WaitNatdReady(context.Background(), n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	topo = cur
	return cur
}

// fault injects a failure of the holder and returns how to heal it.
type fault func(t testing.TB, holder string) (heal func())

// move is what a fault must do to the egress IP.
type move int

const (
	mustMove move = iota
	mustStay
	// mayMove: either; on real nodes the kubelet restarts a killed natd, which serves
	// again if it is back before the others may take over.
	mayMove
)

// failover pins a namespace, streams from its pod on node1 through the holder, injects
// the fault, and checks what the partner and the router saw. It returns the holder
// before and after, and the outcome.
func failover(t testing.TB, name, ip string, f fault, want move) (before, after string, o outcome) {
	t.Helper()
	waitGossipHealthy(t)
	ns := "fo-" + name
	p := newPod(t, ns, "app", "node1")
	annotate(t, ns, ip)
	t.Cleanup(func() { annotate(t, ns, "") })
	waitSeenAt(t, p, tcp, partnerFor(ip), ip)
	before = waitServedBy(t, ip, 10*time.Second)

	s := startStreamTo(t, p, fmt.Sprintf("%s-%d", name, time.Now().UnixNano()), partnerFor(ip))
	conn := startConnectionTo(t, p, 0, partnerFor(ip))
	var more, pair []*connection
	for i := 0; i < failoverExtras.conns; i++ {
		more = append(more, startConnectionTo(t, p, 0, partnerFor(ip)))
	}
	if failoverExtras.pairPort != 0 {
		// The second pod of the pair: on the node that neither holds nor is node1.
		for _, n := range topo.Nodes {
			if n.Name != before && n.Name != "node1" {
				q := newPod(t, ns, "pair", n.Name)
				pair = append(pair, startConnectionTo(t, p, failoverExtras.pairPort, partnerFor(ip)),
					startConnectionTo(t, q, failoverExtras.pairPort, partnerFor(ip)))
				break
			}
		}
	}
	settle := 500 * time.Millisecond
	if len(pair) > 0 {
		// The holder hands a binding over at its next read of conntrack
		// (--handover-interval, 1 s): one made less than that before an unplanned
		// failure is not continued.
		settle = 1500 * time.Millisecond
	}
	time.Sleep(settle)
	faultAt := time.Now()
	statusAt := make(chan time.Duration, 1)
	if want != mustStay {
		go watchStatusMove(ip, before, faultAt, statusAt)
	}
	// An unplanned fault must never leave two nodes serving the IP, not even for a
	// moment: the leases (held_marks) of every node are sampled every 20 ms while it
	// runs. A planned move overlaps on purpose (make-before-break), so it is not watched.
	twice := watchTwoServers(t, ip, want != mustStay && !plannedMoves[strings.SplitN(strings.TrimPrefix(name, "bench-"), "-", 2)[0]])
	heal := f(t, before)
	healed := false
	defer func() {
		if !healed {
			heal()
		}
	}()
	// Recovered: after the outage (if any), datagrams arrive with the egress IP again.
	// A fault that causes no loss is over when nothing was lost for 3 s.
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if o = s.outcome(t, ip, faultAt); o.recovery > 0 || (o.recovery == 0 && time.Since(faultAt) > 3*time.Second) {
			break
		}
	}
	time.Sleep(1500 * time.Millisecond) // let gratuitous ARP repeats and handovers settle
	s.halt()
	tcpOut := conn.stop()
	var moreOut, pairOut []tcpOutcome
	for _, k := range more {
		moreOut = append(moreOut, k.stop())
	}
	for _, k := range pair {
		pairOut = append(pairOut, k.stop())
	}
	if samples := twice(); len(samples) > 0 {
		t.Errorf("%s: two nodes served %s at once in %d samples: %v", name, ip, len(samples), samples[0])
	}
	o = s.outcome(t, ip, faultAt)
	o.tcp, o.more, o.pair = tcpOut, moreOut, pairOut
	if o.leaked > 0 {
		t.Errorf("%s: %d datagrams and requests arrived with another source than %s, first: %s\n%s",
			name, o.leaked, ip, strings.Join(o.leaks, "; "), leakDiagnosis(p))
	}
	// An established connection survives every move (the benchmark counts instead).
	if _, test := t.(*testing.T); test && !o.tcp.survived {
		t.Errorf("%s: the long-lived TCP connection did not survive the move: %s", name, o.tcp)
	}
	if o.recovery < 0 {
		mac, _ := lab.RouterNeighbour(topo, ip)
		diag := fmt.Sprintf("served by %v; router has %s for it;", servedBy(t, ip), mac)
		for _, n := range topo.Nodes {
			rt, _ := lab.NsRun(n.Netns, "ip", "route", "show", "table", "all", "proto", "78")
			m, _ := lab.UplinkMAC(topo, n.Name)
			diag += fmt.Sprintf(" %s (%s) routes: %q;", n.Name, m, strings.TrimSpace(rt))
		}
		t.Fatalf("%s: the partner never again saw the pod with %s (%d of %d datagrams arrived): %s",
			name, ip, o.sent-o.lost, o.sent, diag)
	}
	after = waitServedBy(t, ip, 5*time.Second)
	if want == mustMove && after == before {
		t.Errorf("%s: %s still served by %s after the fault", name, ip, before)
	}
	if want == mustStay && after != before {
		t.Errorf("%s: %s moved from %s to %s; it should not move", name, ip, before, after)
	}
	checkRouterPointsAt(t, ip, after)
	if want != mustStay && after != before {
		select {
		case o.status = <-statusAt:
		case <-time.After(3 * time.Second):
		}
	}
	t.Logf("%s: %s %s → %s; recovery %s, %d/%d datagrams lost, %d leaked; status showed it after %s; %s",
		name, ip, before, after, o.recovery.Round(time.Millisecond), o.lost, o.sent, o.leaked, o.status.Round(time.Millisecond), o.tcp)
	heal()
	healed = true
	return before, after, o
}

// connection is one long-lived TCP connection to the partner: a request every 50 ms on
// the same connection, never reopened, as a database session or a message consumer
// would hold it.
type connection struct {
	stopc chan struct{}
	done  chan tcpOutcome
}

// tcpOutcome is what happened to a long-lived connection across a move.
type tcpOutcome struct {
	survived bool          // every request was answered on the one connection
	stall    time.Duration // the longest time between two answers
	answered int
	retrans  int // segments the pod sent again (-1: unknown)
	err      error
}

func (o tcpOutcome) String() string {
	if o.survived {
		return fmt.Sprintf("TCP connection survived (longest stall %s, %d requests, %d retransmitted by the pod)", o.stall.Round(time.Millisecond), o.answered, o.retrans)
	}
	return fmt.Sprintf("TCP connection broke after %d requests (longest stall %s, %d retransmitted by the pod): %v", o.answered, o.stall.Round(time.Millisecond), o.retrans, o.err)
}

// startConnectionTo opens a long-lived connection from p (local port port, 0: any) to
// addr, the partner's address of a family. A request not answered within 20 s breaks
// it: no failover leaves a connection without answers that long.
func startConnectionTo(t testing.TB, p *lab.Pod, port int, addr string) *connection {
	t.Helper()
	return startPatientConnectionTo(t, p, port, addr, 20*time.Second)
}

// startPatientConnectionTo is startConnectionTo where a request may wait patience for
// its answer: on lossy links TCP's own retransmission backoff can leave a healthy
// connection without an answer for longer than 20 s.
func startPatientConnectionTo(t testing.TB, p *lab.Pod, port int, addr string, patience time.Duration) *connection {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := lab.DialFromPortIn(ctx, p.Netns, port, addr)
	if err != nil {
		t.Fatal(err)
	}
	k := &connection{stopc: make(chan struct{}), done: make(chan tcpOutcome, 1)}
	go func() {
		defer c.Close()
		rd := bufio.NewReader(c)
		o := tcpOutcome{survived: true}
		last := time.Now()
		for {
			select {
			case <-k.stopc:
				o.retrans = lab.TCPRetransmissions(c)
				k.done <- o
				return
			case <-time.After(50 * time.Millisecond):
			}
			c.SetDeadline(time.Now().Add(patience))
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: partner\r\n\r\n")
			resp, err := http.ReadResponse(rd, nil)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			if err != nil {
				o.survived, o.err = false, err
				o.retrans = lab.TCPRetransmissions(c)
				<-k.stopc
				k.done <- o
				return
			}
			o.answered++
			if gap := time.Since(last); gap > o.stall {
				o.stall = gap
			}
			last = time.Now()
		}
	}()
	return k
}

// stop ends the connection and reports; a request still waiting for its answer gets
// the rest of its patience.
func (k *connection) stop() tcpOutcome {
	close(k.stopc)
	return <-k.done
}

// plannedMoves are the fault kinds that hand an IP over make-before-break.
var plannedMoves = map[string]bool{"unlabel": true, "drain": true, "label": true, "cordon": true}

// watchTwoServers samples which nodes serve ip every 20 ms until the returned function
// is called; that returns the samples in which more than one node did.
func watchTwoServers(t testing.TB, ip string, watch bool) func() [][]string {
	if !watch {
		return func() [][]string { return nil }
	}
	stop, done := make(chan struct{}), make(chan [][]string)
	go func() {
		var twice [][]string
		for {
			select {
			case <-stop:
				done <- twice
				return
			case <-time.After(20 * time.Millisecond):
			}
			if s := servedBy(t, ip); len(s) > 1 {
				twice = append(twice, s)
			}
		}
	}()
	return func() [][]string {
		close(stop)
		return <-done
	}
}

// watchStatusMove polls the EgressIP of ip from faultAt until its status names a holder
// other than before, and sends how long that took (for 20 s at most; an API that is
// down delays it).
func watchStatusMove(ip, before string, faultAt time.Time, done chan<- time.Duration) {
	c, err := newEIPClient()
	if err != nil {
		return
	}
	for time.Since(faultAt) < 20*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		o, err := c.EgressV1alpha1().EgressIPs().Get(ctx, eipName(ip), metav1.GetOptions{})
		cancel()
		if err == nil && o.Status.Node != "" && o.Status.Node != before {
			done <- time.Since(faultAt)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkRouterPointsAt checks that the router sends ip's traffic to node: its
// neighbour entry (the new holder repeats its gratuitous ARP for 5 s), or in the routed
// mode its BGP route.
func checkRouterPointsAt(t testing.TB, ip, node string) {
	t.Helper()
	var got string
	for deadline := time.Now().Add(6 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got, _ = lab.RouterNextHop(topo, ip); got == node {
			return
		}
	}
	t.Errorf("the router sends %s's traffic to %q, want %s", ip, got, node)
}

// afterwards checks that, once the failed node is back, the IP does not move back and
// the pod still leaves with it.
func afterwards(t testing.TB, ip, holder string) {
	t.Helper()
	// From the moment the failed node is back until gossip has healed, it must not
	// serve the IP again beside the new holder (it may not have heard of the move yet).
	watchDone := make(chan struct{})
	twice := make(chan []string, 1)
	go func() {
		for {
			select {
			case <-watchDone:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if s := servedBy(t, ip); len(s) > 1 {
				select {
				case twice <- s:
				default:
				}
			}
		}
	}()
	waitGossipHealthy(t)
	time.Sleep(time.Second)
	close(watchDone)
	select {
	case s := <-twice:
		t.Errorf("after the failed node came back, %s was served by %v at once", ip, s)
	default:
	}
	if s := servedBy(t, ip); len(s) != 1 || s[0] != holder {
		t.Errorf("after the failed node came back, %s is served by %v; want it to stay on %s", ip, s, holder)
	}
	checkRouterPointsAt(t, ip, holder)
}

// labFault applies one of the lab's faults to the holder and returns its heal, which
// reports a failure to heal.
func labFault(t testing.TB, holder string, apply func(*lab.Topology, string) (func() error, error)) func() {
	heal, err := apply(topo, holder)
	if err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := heal(); err != nil {
			t.Error(err)
		}
	}
}

func cutUplink(t testing.TB, holder string) func() { return labFault(t, holder, lab.CutUplink) }

func killNatd(t testing.TB, holder string) func() {
	if err := lab.KillNatd(topo, holder); err != nil {
		t.Fatal(err)
	}
	return func() { restartNatd(t, holder) }
}

func removeLabel(t testing.TB, holder string) func() {
	setEgressLabel(t, holder, "")
	return func() { setEgressLabel(t, holder, "true") }
}

func drainNatd(t testing.TB, holder string) func() {
	if err := lab.DrainNatd(topo, holder); err != nil {
		t.Fatal(err)
	}
	return func() { restartNatd(t, holder) }
}

func freezeNatd(t testing.TB, holder string) func() {
	resume, err := lab.FreezeNatd(topo, holder)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resume() }) // SIGCONT again is harmless; a frozen natd is not
	return labFault(t, holder, func(*lab.Topology, string) (func() error, error) { return resume, nil })
}

// noFault leaves the holder alone: the control rounds.
func noFault(testing.TB, string) func() { return func() {} }

// cordon marks the holder unschedulable (kubectl cordon): natd hands its IPs over.
func cordon(t testing.TB, holder string) func() {
	setUnschedulable(t, holder, true)
	return func() { setUnschedulable(t, holder, false) }
}

func setUnschedulable(t testing.TB, node string, on bool) {
	t.Helper()
	patch := fmt.Sprintf(`{"spec":{"unschedulable":%t}}`, on)
	if _, err := client.CoreV1().Nodes().Patch(context.Background(), node, types.StrategicMergePatchType,
		[]byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("cordoning %s (%t): %v", node, on, err)
	}
}

func TestFailoverUplinkCut(t *testing.T) {
	const ip = "198.18.0.230"
	_, after, _ := failover(t, "uplink", ip, cutUplink, mustMove)
	afterwards(t, ip, after)
}

func TestFailoverNatdKilled(t *testing.T) {
	const ip = "198.18.0.231"
	want := mustMove
	if topo.Kubelet {
		want = mayMove
	}
	_, after, _ := failover(t, "sigkill", ip, killNatd, want)
	afterwards(t, ip, after) // the restarted natd does not re-claim the IP
}

// A frozen natd (SIGSTOP) renews nothing: the kernel stops serving within the lease
// and the IP moves; resumed, the old natd finds its quorum broken and its leases
// lapsed, and serves nothing again (afterwards samples for a second holder).
func TestFailoverNatdFrozen(t *testing.T) {
	const ip = "198.18.0.229"
	_, after, _ := failover(t, "frozen", ip, freezeNatd, mustMove)
	afterwards(t, ip, after)
}

// Two pods on two nodes connect from one source port to one partner port: the holder
// had to give one of them another port, which a new holder would not know. Both
// connections survive the holder's uplink cut: the old holder handed the binding
// over, and the new one wrote it into conntrack before it took the IP. One of the two
// pods runs on the new holder itself.
func TestFailoverKeepsSameSourcePortPair(t *testing.T) {
	failoverExtras.pairPort = 40223
	defer func() { failoverExtras.pairPort = 0 }()
	_, after, o := failover(t, "pair", "198.18.0.223", cutUplink, mustMove)
	if len(o.pair) != 2 {
		t.Fatalf("%d connections of the pair, want 2", len(o.pair))
	}
	for i, c := range o.pair {
		if !c.survived {
			t.Errorf("connection %d of the pair (source port 40223): %s", i+1, c)
		}
	}
	afterwards(t, "198.18.0.223", after)
}

func partition(t testing.TB, holder string) func() { return labFault(t, holder, lab.Partition) }

func TestFailoverPartition(t *testing.T) {
	const ip = "198.18.0.232"
	_, after, _ := failover(t, "partition", ip, partition, mustMove)
	afterwards(t, ip, after)
}

func TestFailoverWithAPIServerDown(t *testing.T) {
	const ip = "198.18.0.233"
	before, after, _ := failover(t, "apidown", ip, func(t testing.TB, holder string) func() {
		// The status shows the holder before the API goes away...
		waitEIP(t, ip, "the holder in the status", func(o *egressv1alpha1.EgressIP) bool { return o != nil && o.Status.Node == holder })
		healAPI, err := lab.StopAPIServer(topo)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { healAPI() })    // SIGCONT again is harmless; a frozen API is not
		time.Sleep(500 * time.Millisecond) // the API is down before the holder fails
		healUplink := cutUplink(t, holder)
		return func() {
			healUplink()
			if err := healAPI(); err != nil {
				t.Error(err)
			}
		}
	}, mustMove)
	afterwards(t, ip, after)
	// ... and catches up once it is back: the new holder, the failover counted, Events.
	obj := waitEIP(t, ip, "the new holder in the status", func(o *egressv1alpha1.EgressIP) bool {
		return o != nil && o.Status.Node == after && o.Status.Ready == readyAll()
	})
	if obj.Status.Failovers < 1 || obj.Status.LastFailoverTime == nil {
		t.Errorf("status after the failover: %+v", obj.Status)
	}
	msg := fmt.Sprintf("to node %s", after)
	waitEventAbout(t, "fo-apidown", "Namespace", "fo-apidown", "EgressIPFailover", msg)
	waitEventAbout(t, "default", "EgressIP", ip, "EgressIPFailover", msg)
	t.Logf("status after the API came back: %s → %s, failovers %d", before, obj.Status.Node, obj.Status.Failovers)
}

// plannedMove hands ip over with f (make-before-break): the stream may not be
// interrupted for long, and the IP stays where it went.
func plannedMove(t *testing.T, name, ip string, f fault) {
	_, after, o := failover(t, name, ip, f, mustMove)
	if o.recovery > 300*time.Millisecond {
		t.Errorf("%s: the planned move interrupted the stream for %s", name, o.recovery)
	}
	afterwards(t, ip, after)
}

func TestPlannedMoveLabelRemoved(t *testing.T) {
	plannedMove(t, "unlabel", "198.18.0.234", removeLabel)
}

// TestPlannedMoveToThePodsNode moves the IP onto the pinned pod's own node while the
// router misses that node's gratuitous ARPs for a second and goes on sending replies
// to the old holder. Taking the IP, the pod's node deletes the pod's connections (it
// had relayed them un-NATed to the old holder) and must SNAT their next packets
// itself; the replies that still reach the old holder must neither come back as new
// connections (TestConnectionsLostOnThePodsNode) nor open any other way out.
func TestPlannedMoveToThePodsNode(t *testing.T) {
	const ip = "198.18.0.238"
	t.Cleanup(func() { // the lab's labels again: node1 is a plain worker
		for _, n := range topo.Nodes {
			setEgressLabel(t, n.Name, map[bool]string{true: "true"}[n.Egress])
		}
	})
	setEgressLabel(t, "node1", "") // the IP starts on node2 or node3
	_, after, o := failover(t, "unlabel-own-node", ip, func(t testing.TB, holder string) func() {
		for _, n := range topo.Nodes {
			if n.Name != holder && n.Name != "node1" {
				setEgressLabel(t, n.Name, "")
			}
		}
		setEgressLabel(t, "node1", "true")
		time.Sleep(2 * time.Second) // the new voters settle; the IP stays where it is
		unblock, err := lab.BlockARPFrom(topo, "node1")
		if err != nil {
			t.Fatal(err)
		}
		healed := make(chan error, 1)
		time.AfterFunc(time.Second, func() { healed <- unblock() })
		setEgressLabel(t, holder, "") // node1 is the only candidate left
		return func() {
			if err := <-healed; err != nil {
				t.Error(err)
			}
		}
	}, mustMove)
	if after != "node1" {
		t.Errorf("%s moved to %s, not to the pod's node", ip, after)
	}
	t.Logf("%d datagrams lost in the move", o.lost)
}

func TestPlannedMoveCordon(t *testing.T) { plannedMove(t, "cordon", "198.18.0.222", cordon) }

func TestDrainHandsOver(t *testing.T) { plannedMove(t, "drain", "198.18.0.235", drainNatd) }

// A plain restart of the holder's natd (SIGTERM, start again) moves nothing.
func TestRestartDoesNotMove(t *testing.T) {
	const ip = "198.18.0.236"
	failover(t, "restart", ip, func(t testing.TB, holder string) func() {
		restartNatd(t, holder)
		return func() {}
	}, mustStay)
}

// BenchmarkFailover repeats each kind of failover NATD_FAILOVER_ROUNDS times (20 by
// default) and reports, from what the partner saw, the time from the fault to the first
// datagram after the outage (p50, p99, max), datagrams leaked with another source
// (must be 0), and datagrams lost.
func BenchmarkFailover(b *testing.B) {
	rounds := 20
	if v := os.Getenv("NATD_FAILOVER_ROUNDS"); v != "" {
		fmt.Sscan(v, &rounds)
	}
	// Four long-lived connections per failover (one, plus three more), and a pair of
	// pods on two nodes connecting from one source port to the partner's port.
	failoverExtras.conns, failoverExtras.pairPort = 3, 40123
	defer func() { failoverExtras.conns, failoverExtras.pairPort = 0, 0 }()
	kinds := []struct {
		name string
		ip   string
		f    fault
		want move
	}{
		{"uplink-cut", "198.18.0.240", cutUplink, mustMove},
		{"natd-sigkill", "198.18.0.241", killNatd, mustMove},
		{"label-removed", "198.18.0.242", removeLabel, mustMove},
		{"drain", "198.18.0.243", drainNatd, mustMove},
		{"cordon", "198.18.0.244", cordon, mustMove},
		{"natd-frozen", "198.18.0.245", freezeNatd, mustMove},
		// The control: the same rounds with no fault, so that the planned moves' gaps
		// and stalls can be told from what the lab's scheduling costs anyway.
		{"none", "198.18.0.248", noFault, mustStay},
	}
	if os.Getenv("NATD_FAILOVER_FAMILY") == "6" {
		// IPv6 egress IPs (a lab with IPv6: NATD_E2E_NETWORK=dual or routed).
		for i := range kinds {
			kinds[i].ip = fmt.Sprintf("2001:db8:18::%x", 0xf0+i)
		}
	}
	only := os.Getenv("NATD_FAILOVER_KINDS") // e.g. "label-removed,drain"; empty: all
	for _, k := range kinds {
		if only != "" && !slices.Contains(strings.Split(only, ","), k.name) {
			continue
		}
		b.Run(k.name, func(b *testing.B) {
			var rec, gaps, status, stalls []time.Duration
			var broken []string // how each long-lived connection that broke (or, planned, stalled) did
			leaked, lost, sent, survived, conns, pairSurvived, pairs := 0, 0, 0, 0, 0, 0, 0
			for b.Loop() {
				for i := 0; i < rounds; i++ {
					_, _, o := failover(b, fmt.Sprintf("bench-%s-%d-%d", k.name, i, time.Now().Unix()), k.ip, k.f, k.want)
					rec = append(rec, o.recovery)
					gaps = append(gaps, o.gap)
					if o.status > 0 {
						status = append(status, o.status)
					}
					leaked += o.leaked
					lost += o.lost
					sent += o.sent
					for j, c := range append([]tcpOutcome{o.tcp}, o.more...) {
						conns++
						if c.survived {
							survived++
							stalls = append(stalls, c.stall)
						} else {
							broken = append(broken, fmt.Sprintf("round %d: %s", i, c))
						}
						if c.survived && c.stall > 200*time.Millisecond && plannedMoves[strings.SplitN(k.name, "-", 2)[0]] {
							// A planned move should cost no retransmission: say which did.
							broken = append(broken, fmt.Sprintf("round %d, connection %d: %s", i, j, c))
						}
					}
					for j, c := range o.pair {
						pairs++
						if c.survived {
							pairSurvived++
						} else {
							broken = append(broken, fmt.Sprintf("round %d, pair connection %d: %s", i, j, c))
						}
					}
				}
			}
			slices.Sort(rec)
			slices.Sort(status)
			slices.Sort(stalls)
			slices.Sort(gaps)
			pctOf := func(d []time.Duration, p float64) time.Duration {
				if len(d) == 0 {
					return 0
				}
				return d[min(len(d)-1, int(p*float64(len(d))))]
			}
			pct := func(p float64) time.Duration { return pctOf(rec, p) }
			b.ReportMetric(float64(pct(0.50).Milliseconds()), "p50-ms")
			b.ReportMetric(float64(pct(0.99).Milliseconds()), "p99-ms")
			b.ReportMetric(float64(rec[len(rec)-1].Milliseconds()), "max-ms")
			b.ReportMetric(float64(leaked), "leaked")
			b.ReportMetric(float64(lost)/float64(len(rec)), "lost/failover")
			b.ReportMetric(float64(pctOf(gaps, 0.99).Milliseconds()), "gap-p99-ms")
			b.ReportMetric(float64(pctOf(status, 0.50).Milliseconds()), "status-p50-ms")
			b.ReportMetric(float64(survived)/float64(max(1, conns)), "tcp-survived")
			b.ReportMetric(float64(pctOf(stalls, 0.99).Milliseconds()), "tcp-stall-p99-ms")
			fmt.Printf("failover %-14s n=%d p50=%s p99=%s max=%s leaked=%d lost=%d of %d datagrams; longest gap between datagrams (one every 10 ms) p50=%s p99=%s; kubectl get eip showed the new holder after p50=%s p99=%s (%d of %d)\n",
				k.name, len(rec), pct(0.50).Round(time.Millisecond), pct(0.99).Round(time.Millisecond), rec[len(rec)-1].Round(time.Millisecond),
				leaked, lost, sent, pctOf(gaps, 0.50).Round(time.Millisecond), pctOf(gaps, 0.99).Round(time.Millisecond), pctOf(status, 0.50).Round(time.Millisecond), pctOf(status, 0.99).Round(time.Millisecond), len(status), len(rec))
			fmt.Printf("failover %-14s long-lived TCP connections survived %d of %d; stall of the survivors p50=%s p99=%s; same-source-port pairs on two nodes: %d of %d connections survived\n",
				k.name, survived, conns, pctOf(stalls, 0.50).Round(time.Millisecond), pctOf(stalls, 0.99).Round(time.Millisecond), pairSurvived, pairs)
			for _, x := range broken {
				fmt.Printf("failover %-14s broken or stalled: %s\n", k.name, x)
			}
		})
	}
}
