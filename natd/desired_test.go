package natd

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"natd.dev/natd/election"
)

func testConfig(node string) *Config {
	return &Config{
		NodeName:            node,
		HandoverTimeout:     3 * time.Second,
		Lease:               250 * time.Millisecond,
		HeartbeatInterval:   50 * time.Millisecond,
		GossipProbeInterval: 150 * time.Millisecond,
		GossipProbeTimeout:  75 * time.Millisecond,
		MaxEgressIPs:        32,
		EgressCIDRs:         []netip.Prefix{netip.MustParsePrefix("198.18.0.192/26")},
		ClusterCIDRs:        []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
		ServiceCIDRs:        []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")},
		ExcludeCIDRs:        []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")},
	}
}

func node(name, ip string, egress, ready bool) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{}}}
	if egress {
		n.Labels[LabelEgressNode] = "true"
	}
	status := corev1.ConditionFalse
	if ready {
		status = corev1.ConditionTrue
	}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: status}}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}}
	n.Spec.PodCIDRs = []string{"10.244." + strings.TrimPrefix(ip, "198.18.0.") + ".0/24"}
	return n
}

func ns(name, egress string) *corev1.Namespace {
	n := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if egress != "" {
		n.Annotations = map[string]string{AnnotationEgressIP: egress}
	}
	return n
}

func pod(namespace, name, nodeName, ip string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
}

func cluster() Cluster {
	hostNet := pod("team-a", "host", "node1", "198.18.0.11")
	hostNet.Spec.HostNetwork = true
	done := pod("team-a", "done", "node1", "10.244.11.99")
	done.Status.Phase = corev1.PodSucceeded
	return clusterOf([]*corev1.Node{
		node("node1", "198.18.0.11", false, true),
		node("node2", "198.18.0.12", true, true),
		node("node3", "198.18.0.13", true, false), // eligible but not Ready
	}, []*corev1.Namespace{
		ns("team-a", "198.18.0.200"), ns("team-b", "198.18.0.200"), ns("team-c", ""),
		ns("bad", "198.18.0.12"),
	}, []*corev1.Pod{
		pod("team-a", "a1", "node1", "10.244.11.10"),
		pod("team-a", "a2", "node2", "10.244.12.10"),
		pod("team-b", "b1", "node3", "10.244.13.10"),
		pod("team-c", "c1", "node1", "10.244.11.11"),
		pod("bad", "x1", "node1", "10.244.11.12"),
		hostNet, done,
	}, "node1")
}

// clusterOf indexes pods as the agent's informer does: by namespace.
func clusterOf(nodes []*corev1.Node, namespaces []*corev1.Namespace, pods []*corev1.Pod, _ string) Cluster {
	byNS := map[string][]*podRecord{}
	for _, p := range pods {
		o, _ := recordOf(p)
		r := o.(*podRecord)
		byNS[p.Namespace] = append(byNS[p.Namespace], r)
	}
	return Cluster{Nodes: nodes, Namespaces: namespaces,
		PodsIn: func(ns string) []*podRecord { return byNS[ns] }}
}

// view is a gossip view in which the named members are alive and claim nothing; the
// test clusters' voters are node1, node2 and node3, and the alive ones have been in
// touch with this node for an hour.
func view(self string, alive ...string) election.View {
	v := election.View{Self: self, Members: map[string]election.Member{}, At: time.Now()}
	for _, n := range alive {
		v.Members[n] = election.Member{Name: n, Alive: true}
	}
	v.Evidence = evidence(v.At, alive...)
	return v
}

// evidence is what heartbeats prove when the voters node1..node3 are all there and
// the inTouch ones answer: the others are down if a majority is left to say so.
func evidence(at time.Time, inTouch ...string) election.Evidence {
	e := election.Evidence{At: at, Voters: []string{"node1", "node2", "node3"}, VotersSince: at.Add(-time.Hour),
		InTouch: map[string]bool{}, Down: map[string]bool{}}
	for _, n := range inTouch {
		if e.IsVoter(n) {
			e.InTouch[n] = true
		}
	}
	quorum := 2*len(e.InTouch) > len(e.Voters)
	for _, n := range e.Voters {
		if !e.InTouch[n] && quorum {
			e.Down[n] = true
		}
	}
	if quorum {
		e.QuorumSince, e.QuorumNow, e.QuorumSeen = at.Add(-time.Hour), true, at
	}
	return e
}

// elect is an election input for a node that has seen a majority for a long time.
func elect(self string, alive ...string) Election {
	now := time.Now()
	return Election{View: view(self, alive...), Now: now, StateSyncedAt: now.Add(-time.Minute)}
}

func TestPlanOnWorker(t *testing.T) {
	p := &Planner{Config: testConfig("node1")}
	plan, err := p.Plan(cluster(), elect("node1", "node1", "node2")) // node3's natd is down
	if err != nil {
		t.Fatal(err)
	}
	st := plan.State
	if st.NodeIP.String() != "198.18.0.11" {
		t.Errorf("NodeIP = %s", st.NodeIP)
	}
	if got := prefixes(st.ClusterDestinations); got != "10.96.0.0/12 10.244.0.0/16 192.0.2.0/24 198.18.0.11/32 198.18.0.12/32 198.18.0.13/32" {
		t.Errorf("ClusterDestinations = %s", got)
	}
	if got := fmt.Sprint(st.PinnedNamespaces); got != "map[team-a:198.18.0.200 team-b:198.18.0.200]" {
		t.Errorf("PinnedNamespaces = %s (the CNI plugin pins new pods by it)", got)
	}
	if got := fmt.Sprint(plan.HostNetworkPods); got != "map[team-a:[host]]" {
		t.Errorf("HostNetworkPods = %s; want team-a's host-network pod (it cannot be pinned: a Warning)", got)
	}
	if len(st.Egress) != 1 {
		t.Fatalf("Egress = %+v; want one IP shared by team-a and team-b", st.Egress)
	}
	e := st.Egress[0]
	if e.IP.String() != "198.18.0.200" || e.Local || e.HolderIP.String() != "198.18.0.12" {
		t.Errorf("egress = %+v; want 198.18.0.200 held by node2 (node3's natd is down)", e)
	}
	if got := addrs(e.Pods); got != "10.244.11.10" {
		t.Errorf("pinned pods = %s; want this node's pod of team-a and team-b only (other nodes' arrive through the tunnel)", got)
	}
	if got := strings.Join(plan.Namespaces[e.IP], " "); got != "team-a team-b" {
		t.Errorf("namespaces = %s", got)
	}
	if r := plan.Rejected["bad"]; r == nil || r.Reason != ReasonNodeIP {
		t.Errorf("rejected = %+v; want bad rejected for naming node2's IP", plan.Rejected)
	}
}

func TestPlanOnHolderAndWithoutEligibleNode(t *testing.T) {
	p := &Planner{Config: testConfig("node2")}
	plan, err := p.Plan(cluster(), elect("node2", "node1", "node2"))
	if err != nil {
		t.Fatal(err)
	}
	if e := plan.State.Egress[0]; !e.Local || e.Gen != 1 || len(plan.Claims) != 1 {
		t.Errorf("node2 should take %s with generation 1: %+v, claims %v", e.IP, e, plan.Claims)
	}
	c := cluster()
	c.Nodes[1].Labels = nil // node2 no longer eligible; node3's natd is down
	plan, err = p.Plan(c, elect("node2", "node1", "node2"))
	if err != nil {
		t.Fatal(err)
	}
	if e := plan.State.Egress[0]; e.HasHolder() || e.FailOpen {
		t.Errorf("with no eligible node: %+v; want no holder, fail closed", e)
	}
	if plan.Holders[plan.State.Egress[0].IP] != "" {
		t.Errorf("Holders = %v", plan.Holders)
	}
}

func TestPlanNeedsOwnNode(t *testing.T) {
	p := &Planner{Config: testConfig("node9")}
	if _, err := p.Plan(cluster(), elect("node9", "node9")); err == nil {
		t.Fatal("planning for a node the API does not know succeeded")
	}
}

// Every node computes the same holders from the same inputs.
func TestPlanAgreesAcrossNodes(t *testing.T) {
	var holder string
	for _, n := range []string{"node1", "node2", "node3"} {
		plan, err := (&Planner{Config: testConfig(n)}).Plan(cluster(), elect(n, "node1", "node2", "node3"))
		if err != nil {
			t.Fatal(err)
		}
		h := plan.Holders[netip.MustParseAddr("198.18.0.200")]
		if holder != "" && h != holder {
			t.Fatalf("%s thinks the holder is %s, others %s", n, h, holder)
		}
		holder = h
	}
}

func prefixes(ps []netip.Prefix) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return strings.Join(s, " ")
}

func addrs(as []netip.Addr) string {
	as = slices.Clone(as)
	slices.SortFunc(as, netip.Addr.Compare)
	var s []string
	for _, a := range as {
		s = append(s, a.String())
	}
	return strings.Join(s, " ")
}

func TestRelevantChange(t *testing.T) {
	rec := func(p *corev1.Pod) any { r, _ := recordOf(p); return r }
	a := pod("ns", "a", "node1", "10.244.1.10")
	b := a.DeepCopy()
	b.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", Ready: true}}
	if relevantChange(rec(a), rec(b)) {
		t.Error("a container status change triggers a sync")
	}
	b.Status.PodIPs = []corev1.PodIP{{IP: "10.244.1.11"}}
	if !relevantChange(rec(a), rec(b)) {
		t.Error("a pod IP change does not trigger a sync")
	}
	n := node("node1", "198.18.0.11", false, true)
	m := n.DeepCopy()
	m.Status.Conditions[0].LastHeartbeatTime = metav1.Now()
	if relevantChange(n, m) {
		t.Error("a node heartbeat triggers a sync")
	}
	m.Labels[LabelEgressNode] = "true"
	if !relevantChange(n, m) {
		t.Error("an egress label change does not trigger a sync")
	}
	x, y := ns("team", ""), ns("team", "198.18.0.200")
	if !relevantChange(x, y) {
		t.Error("an annotation change does not trigger a sync")
	}
}

var eip = netip.MustParseAddr("198.18.0.200")

func claim(v election.View, node string, gen uint32) election.View {
	m := v.Members[node]
	m.Meta.Claims = []election.Claim{{IP: eip, Gen: gen}}
	v.Members[node] = m
	return v
}

// A holder keeps its IP when another eligible node comes back (no move back).
func TestPlanIsSticky(t *testing.T) {
	el := elect("node2", "node1", "node2", "node3")
	el.View = claim(el.View, "node3", 4)
	plan, err := (&Planner{Config: testConfig("node2")}).Plan(cluster(), el)
	if err != nil {
		t.Fatal(err)
	}
	if e := plan.State.Egress[0]; e.Local || e.HolderIP.String() != "198.18.0.13" {
		t.Fatalf("node2 took node3's IP: %+v", e)
	}
}

// Planned move: the old holder keeps the IP until the new holder claims it.
func TestPlanMakeBeforeBreak(t *testing.T) {
	c := cluster()
	c.Nodes[1].Spec.Unschedulable = true // node2 cordoned: its IP moves
	p := &Planner{Config: testConfig("node2")}
	now := time.Now()
	el := elect("node2", "node1", "node2", "node3")
	el.View = claim(el.View, "node2", 4)
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4}}
	el.Now = now
	plan, err := p.Plan(c, el)
	if err != nil {
		t.Fatal(err)
	}
	if h, ok := plan.Held[eip]; !ok || h.HandoverSince != now || plan.RetryAfter == 0 {
		t.Fatalf("old holder let go before the new one claimed: %+v", plan.Held)
	}
	if plan.Holders[eip] != "node3" {
		t.Fatalf("new holder %q, want node3", plan.Holders[eip])
	}
	// node3 claims it: node2 keeps serving while the others re-route, then lets go.
	el.Held = plan.Held
	el.View = claim(el.View, "node3", 5)
	plan, _ = p.Plan(c, el)
	if h, ok := plan.Held[eip]; !ok || h.ClaimedSince != now || plan.RetryAfter != handoverLinger {
		t.Fatalf("old holder let go the moment the new one claimed it: %+v, retry %s", plan.Held, plan.RetryAfter)
	}
	el.Held = plan.Held
	el.Now = now.Add(handoverLinger / 2)
	if plan, _ = p.Plan(c, el); len(plan.Held) != 1 {
		t.Fatal("old holder let go before the linger ended")
	}
	el.Now = now.Add(handoverLinger)
	if plan, _ = p.Plan(c, el); len(plan.Held) != 0 {
		t.Fatal("old holder kept the IP after the linger")
	}
	// node3 claimed it before node2 saw it was cordoned (both acted on one update):
	// still a planned move, node2 serves on for the linger.
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4}}
	el.Now = now
	plan, _ = p.Plan(c, el)
	if h, ok := plan.Held[eip]; !ok || h.HandoverSince != now || h.ClaimedSince != now || plan.RetryAfter != handoverLinger {
		t.Fatalf("a cordoned holder that saw the new claim first let go at once: %+v, retry %s", plan.Held, plan.RetryAfter)
	}
	el.Held, el.Now = plan.Held, now.Add(handoverLinger)
	if plan, _ = p.Plan(c, el); len(plan.Held) != 0 {
		t.Fatal("old holder kept the IP after the linger")
	}
	// An eligible node whose IP another node claims newer (a conflict, no planned
	// move) lets it go at once.
	el.Held, el.Now = map[netip.Addr]Holding{eip: {Gen: 4}}, now
	if plan, _ = p.Plan(cluster(), el); len(plan.Held) != 0 {
		t.Fatal("kept an IP another node claimed, outside a handover")
	}
	// node3 never claims: node2 lets go after the handover timeout.
	el.View = claim(el.View, "node3", 0)
	el.View.Members["node3"] = election.Member{Name: "node3", Alive: true}
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4, HandoverSince: now}}
	el.Now = now.Add(4 * time.Second)
	plan, _ = p.Plan(c, el)
	if _, ok := plan.Held[eip]; ok {
		t.Fatal("old holder kept the IP past the handover timeout")
	}
}

// The new holder takes over a dead holder's IP with a newer generation; a restarted
// natd with the old claim then loses.
func TestPlanTakeoverAndRestartedClaimLoses(t *testing.T) {
	el := elect("node3", "node1", "node3")
	el.View.Members["node2"] = election.Member{Name: "node2", Alive: false,
		Meta: election.Meta{Claims: []election.Claim{{IP: eip, Gen: 4}}}}
	plan, err := (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if err != nil {
		t.Fatal(err)
	}
	if h, ok := plan.Held[eip]; !ok || h.Gen != 5 {
		t.Fatalf("node3 did not take over with generation 5: %+v", plan.Held)
	}
	// node2's natd restarts with its kernel's claim (generation 4) and sees node3's.
	el = elect("node2", "node1", "node2", "node3")
	el.View = claim(el.View, "node3", 5)
	el.View = claim(el.View, "node2", 4)
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4}}
	plan, _ = (&Planner{Config: testConfig("node2")}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; ok {
		t.Fatal("a restarted natd re-claimed an IP another node took over")
	}
}

// A member down for a planned restart keeps its IPs for its grace time.
func TestPlanRestartGrace(t *testing.T) {
	el := elect("node3", "node1", "node3")
	el.View.Members["node2"] = election.Member{Name: "node2", Alive: false, DownSince: el.View.At,
		Meta: election.Meta{RestartGrace: 30 * time.Second, Claims: []election.Claim{{IP: eip, Gen: 4}}}}
	plan, _ := (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; ok || plan.Holders[eip] != "node2" {
		t.Fatalf("IP moved during a restart grace: held %v, holder %q", plan.Held, plan.Holders[eip])
	}
	m := el.View.Members["node2"]
	m.DownSince = el.View.At.Add(-31 * time.Second)
	el.View.Members["node2"] = m
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; !ok {
		t.Fatal("IP not taken over after the restart grace")
	}
}

// A node whose peers are alive in gossip but whose heartbeats no longer come back is
// cut off: it holds nothing.
func TestPlanCutOffHoldsNothing(t *testing.T) {
	el := elect("node2", "node1", "node2", "node3")
	el.View.Evidence = evidence(el.Now, "node2")
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4}}
	plan, _ := (&Planner{Config: testConfig("node2")}).Plan(cluster(), el)
	if len(plan.Held) != 0 || plan.Quorum {
		t.Fatalf("cut-off node holds %v (quorum %v)", plan.Held, plan.Quorum)
	}
}

// A node that has only just come to see a quorum keeps what it holds but takes nothing
// new until it has been in touch for the voters' silence bound, and has exchanged
// state since.
func TestPlanNoTakeoverRightAfterQuorum(t *testing.T) {
	el := elect("node3", "node1", "node3")
	el.View.Evidence.QuorumSince = el.Now // it has just (re)joined
	cfg := testConfig("node3")
	plan, _ := (&Planner{Config: cfg}).Plan(cluster(), el)
	if len(plan.Held) != 0 || plan.RetryAfter != cfg.Heartbeat().Silence {
		t.Fatalf("took over right after regaining quorum: held %v, retry %s", plan.Held, plan.RetryAfter)
	}
	el.Now = el.Now.Add(cfg.Heartbeat().Silence)
	el.StateSyncedAt = el.Now.Add(-2 * cfg.Heartbeat().Silence)
	// Not before a full state exchange since the quorum came back.
	plan, _ = (&Planner{Config: cfg}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; ok {
		t.Fatal("took over before exchanging state with the peers")
	}
	el.StateSyncedAt = el.View.Evidence.QuorumSince.Add(time.Millisecond)
	plan, _ = (&Planner{Config: cfg}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; !ok {
		t.Fatal("no takeover once settled")
	}
	// Voters that changed a moment ago (a label): nothing new for the bound either.
	el.View.Evidence.VotersSince = el.Now.Add(-time.Millisecond)
	plan, _ = (&Planner{Config: cfg}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; ok {
		t.Fatal("took over right after the voters changed")
	}
}

// A voter goes by the voters' evidence, not by gossip's failure detector: a holder that
// gossip already calls dead keeps its IP until a majority of voters reports it silent
// (its leases have run out by then), and then the IP moves.
func TestPlanVoterTakesOverOnlyWhenTheVotersSaySo(t *testing.T) {
	el := elect("node3", "node1", "node2", "node3")
	el.View = claim(el.View, "node2", 4)
	m := el.View.Members["node2"]
	m.Alive = false // gossip's verdict
	el.View.Members["node2"] = m
	plan, _ := (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; ok || plan.Holders[eip] != "node2" {
		t.Fatalf("took over on gossip's word alone: held %v, holder %q", plan.Held, plan.Holders[eip])
	}
	el.View.Evidence.Down["node2"] = true
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if h, ok := plan.Held[eip]; !ok || h.Gen != 5 {
		t.Fatalf("no takeover once the voters report node2 silent: %v", plan.Held)
	}
	// A node that is not a voter only follows: gossip's verdict and the newest claim.
	nodes := cluster()
	el4 := el
	el4.View.Members = maps.Clone(el.View.Members)
	for _, n := range []string{"node4", "node5"} {
		nodes.Nodes = append(nodes.Nodes, node(n, "198.18.0.1"+n[4:], false, true))
		el4.View.Members[n] = election.Member{Name: n, Alive: true}
	}
	el4.View.Self = "node4"
	if slices.Contains(votersOf([]string{"node2", "node3"}, nodes.Nodes, el4.View), "node4") {
		el4.View.Self = "node5" // the one that is not a witness
	}
	el4.View.Evidence = election.Evidence{}
	plan, _ = (&Planner{Config: testConfig(el4.View.Self)}).Plan(nodes, el4)
	if plan.Holders[eip] != "node3" || plan.Quorum || len(plan.Held) != 0 {
		t.Fatalf("follower: holder %q, quorum %v, held %v", plan.Holders[eip], plan.Quorum, plan.Held)
	}
}

// In a planned move the other nodes send the IP's traffic to the old holder until the
// new one claims it: the old holder is no keeper any more, but it serves until then.
func TestPlanRoutesToTheOldHolderUntilTheNewOneClaims(t *testing.T) {
	c := cluster()
	c.Nodes[1].Spec.Unschedulable = true // node2 cordoned: its IP moves to node3
	el := elect("node1", "node1", "node2", "node3")
	el.View = claim(el.View, "node2", 4)
	plan, err := (&Planner{Config: testConfig("node1")}).Plan(c, el)
	if err != nil {
		t.Fatal(err)
	}
	if e := plan.State.Egress[0]; e.HolderIP.String() != "198.18.0.12" || plan.Holders[eip] != "node3" {
		t.Fatalf("before node3 claims: traffic to %s (holder-to-be %s), want node2's 198.18.0.12", e.HolderIP, plan.Holders[eip])
	}
	if len(plan.Routes) != 1 || plan.Routes[0].Gen != 4 {
		t.Fatalf("routes report %v, want node2's claim", plan.Routes)
	}
	el.View = claim(el.View, "node3", 5)
	plan, _ = (&Planner{Config: testConfig("node1")}).Plan(c, el)
	if e := plan.State.Egress[0]; e.HolderIP.String() != "198.18.0.13" || plan.Routes[0].Gen != 5 {
		t.Fatalf("after node3 claims: traffic to %s, routes %v", e.HolderIP, plan.Routes)
	}
	// node3 itself, taking the IP while node2 still serves it, announces it late;
	// taking it from a node the voters report down, at once.
	el3 := elect("node3", "node1", "node2", "node3")
	el3.View = claim(el3.View, "node2", 4)
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(c, el3)
	if e := plan.State.Egress[0]; !e.Local || e.AnnounceAfter != handoverAnnounceDelay {
		t.Fatalf("planned takeover: local %v, announce after %s", e.Local, e.AnnounceAfter)
	}
	el3.View.Evidence.Down["node2"] = true
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(c, el3)
	if e := plan.State.Egress[0]; !e.Local || e.AnnounceAfter != 0 {
		t.Fatalf("unplanned takeover: local %v, announce after %s", e.Local, e.AnnounceAfter)
	}
	// A claimant the voters report down serves nothing: no traffic goes there.
	el.View = claim(el.View, "node3", 0)
	el.View.Members["node3"] = election.Member{Name: "node3", Alive: true}
	el.View.Evidence.Down["node2"] = true
	plan, _ = (&Planner{Config: testConfig("node1")}).Plan(c, el)
	if e := plan.State.Egress[0]; e.HolderIP.String() == "198.18.0.12" {
		t.Fatal("traffic sent to a claimant the voters report down")
	}
}

// A member whose claims are pending (its record has not arrived) may claim the IP: the
// node the IP would go to takes it only once the claims are known, or once the voters
// report that member down.
func TestPlanTakesNothingWhileClaimsArePending(t *testing.T) {
	winner := ""
	for _, n := range []string{"node1", "node2", "node3"} {
		if plan, _ := (&Planner{Config: testConfig(n)}).Plan(cluster(), elect(n, "node1", "node2", "node3")); len(plan.Held) == 1 {
			winner = n
		}
	}
	other := "node1"
	if winner == other {
		other = "node2"
	}
	el := elect(winner, "node1", "node2", "node3")
	m := el.View.Members[other]
	m.ClaimsPending = true
	el.View.Members[other] = m
	if plan, _ := (&Planner{Config: testConfig(winner)}).Plan(cluster(), el); len(plan.Held) != 0 || plan.RetryAfter == 0 {
		t.Fatalf("%s took the IP while %s's claims were pending: %v (retry %s)", winner, other, plan.Held, plan.RetryAfter)
	}
	el.View.Evidence.Down[other] = true
	if plan, _ := (&Planner{Config: testConfig(winner)}).Plan(cluster(), el); len(plan.Held) != 1 {
		t.Fatalf("%s did not take the IP once %s was reported down: %v", winner, other, plan.Held)
	}
	m.ClaimsPending = false
	el.View.Members[other] = m
	el.View.Evidence.Down[other] = false
	if plan, _ := (&Planner{Config: testConfig(winner)}).Plan(cluster(), el); len(plan.Held) != 1 {
		t.Fatalf("%s did not take the IP once the claims arrived: %v", winner, plan.Held)
	}
}

// Voters: the eligible nodes, and witnesses (natd nodes, the same on every node) while
// there are fewer than three; nodes where natd does not run are never counted.
func TestVotersOf(t *testing.T) {
	nodes := []*corev1.Node{node("a", "198.18.0.1", true, true), node("b", "198.18.0.2", true, true),
		node("c", "198.18.0.3", false, true), node("d", "198.18.0.4", false, true), node("win", "198.18.0.5", false, true)}
	v := view("a", "a", "b", "c", "d") // no natd on "win"
	got := votersOf([]string{"a", "b"}, nodes, v)
	if len(got) != 3 || !slices.Contains(got, "a") || !slices.Contains(got, "b") || slices.Contains(got, "win") {
		t.Fatalf("voters %v", got)
	}
	v2 := view("d", "d", "c", "b", "a")
	if again := votersOf([]string{"b", "a"}, nodes, v2); !slices.Equal(got, again) {
		t.Fatalf("voters differ between nodes: %v and %v", got, again)
	}
	four := []string{"a", "b", "c", "d"}
	if got := votersOf(four, nodes, v); !slices.Equal(got, four) {
		t.Fatalf("four egress nodes need no witness: %v", got)
	}
}

// A node back from a partition does not take the IP of a member it saw die while it was
// cut off: that member may be alive and hold the IP under a claim it has not heard of.
func TestPlanBackFromPartitionTakesNothingOfTheUnsure(t *testing.T) {
	c := cluster()
	for i := range 20 {
		c.Namespaces = append(c.Namespaces, ns(fmt.Sprintf("many-%d", i), fmt.Sprintf("198.18.0.%d", 210+i)))
	}
	el := elect("node3", "node1", "node3")
	el.View.Evidence.QuorumSince = el.Now.Add(-2 * time.Second)                                        // majority again, settled
	el.View.Members["node2"] = election.Member{Name: "node2", DownSince: el.Now.Add(-5 * time.Second)} // died before that
	el.StateSyncedAt = el.Now.Add(-time.Second)                                                        // state exchanged since
	el.View.Evidence.Down["node2"] = false                                                             // the voters do not say it is down
	plan, _ := (&Planner{Config: testConfig("node3")}).Plan(c, el)
	if len(plan.Held) != 0 || plan.RetryAfter < time.Second {
		t.Fatalf("took IPs although node2's death was seen while cut off: %v (retry %s)", plan.Held, plan.RetryAfter)
	}
	// A death seen with a majority behind it is trusted: node3 takes what is its own.
	m := el.View.Members["node2"]
	m.DownSince = el.Now.Add(-time.Second)
	el.View.Members["node2"] = m
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(c, el)
	if n := len(plan.Held); n == 0 || n == 21 {
		t.Fatalf("after a death seen with a majority node3 holds %d of 21 IPs", n)
	}
	// The voters reporting it down is proof enough, whenever it died: its leases have
	// run out, and node3 takes every IP.
	m.DownSince = el.Now.Add(-5 * time.Second)
	el.View.Members["node2"] = m
	el.View.Evidence.Down["node2"] = true
	plan, _ = (&Planner{Config: testConfig("node3")}).Plan(c, el)
	if len(plan.Held) != 21 {
		t.Fatalf("node3 holds %d of 21 IPs with node2 reported down", len(plan.Held))
	}
}

// Gossip calling a member dead that the voters' evidence shows in touch (a healed
// partition's stale verdict) does not cost the majority its IPs.
func TestPlanStaleDeathVerdictKeepsQuorum(t *testing.T) {
	el := elect("node3", "node1", "node3")
	el.View.Members["node2"] = election.Member{Name: "node2"} // partitioned
	m := el.View.Members["node1"]
	m.Alive = false // said dead by node2's gossip, but node1 answered node3 just now
	el.View.Members["node1"] = m
	el.View = claim(el.View, "node3", 5)
	el.Held = map[netip.Addr]Holding{eip: {Gen: 5}}
	plan, _ := (&Planner{Config: testConfig("node3")}).Plan(cluster(), el)
	if _, ok := plan.Held[eip]; !ok || !plan.Quorum {
		t.Fatalf("majority holder gave its IP up over a stale death verdict: %v", plan.Held)
	}
}

// Without a majority in sight, a node holds nothing.
func TestPlanMinorityHoldsNothing(t *testing.T) {
	el := elect("node2", "node2") // node1 and node3 unreachable
	el.View.Members["node1"] = election.Member{Name: "node1"}
	el.View.Members["node3"] = election.Member{Name: "node3"}
	el.View = claim(el.View, "node2", 4)
	el.Held = map[netip.Addr]Holding{eip: {Gen: 4}}
	plan, _ := (&Planner{Config: testConfig("node2")}).Plan(cluster(), el)
	if len(plan.Held) != 0 || plan.Quorum {
		t.Fatalf("minority node holds %v (quorum %v)", plan.Held, plan.Quorum)
	}
}

// A namespace pins each family to its own egress IP: a pod's IPv4 address to the IPv4
// one, its IPv6 address to the IPv6 one; an address of a family the namespace has no
// egress IP in is dropped (NoEgress), never left unpinned. Replies to the other nodes'
// pods of both families go through the reply tunnel.
func TestPlanDualStackPinning(t *testing.T) {
	cfg := testConfig("node1")
	cfg.EgressCIDRs = append(cfg.EgressCIDRs, netip.MustParsePrefix("2001:db8:18::c0/122"))
	cfg.ClusterCIDRs = append(cfg.ClusterCIDRs, netip.MustParsePrefix("fd00:10:244::/56"))
	dual := func(namespace, name, nodeName, ip4, ip6 string) *corev1.Pod {
		p := pod(namespace, name, nodeName, ip4)
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip6})
		return p
	}
	nodes := []*corev1.Node{node("node1", "198.18.0.11", false, true), node("node2", "198.18.0.12", true, true),
		node("node3", "198.18.0.13", true, true)}
	for i, n := range nodes[:2] { // node3 has no IPv6: it may hold no IPv6 egress IP
		n.Spec.PodCIDRs = append(n.Spec.PodCIDRs, fmt.Sprintf("fd00:10:244:%d::/64", 11+i))
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("2001:db8:18::%d", 11+i)})
	}
	c := clusterOf(nodes, []*corev1.Namespace{
		ns("both", "198.18.0.200,2001:db8:18::c8"), ns("six", "2001:db8:18::c9"), ns("four", "198.18.0.201"),
		ns("node-ip", "2001:db8:18::12"), ns("plain", ""),
	}, []*corev1.Pod{
		dual("both", "b", "node1", "10.244.11.10", "fd00:10:244:11::10"),
		dual("six", "s", "node1", "10.244.11.11", "fd00:10:244:11::11"),
		dual("four", "f", "node1", "10.244.11.12", "fd00:10:244:11::12"),
		dual("plain", "p", "node1", "10.244.11.13", "fd00:10:244:11::13"),
		dual("both", "remote", "node2", "10.244.12.10", "fd00:10:244:12::10"),
	}, "node1")
	plan, err := (&Planner{Config: cfg}).Plan(c, elect("node1", "node1", "node2", "node3"))
	if err != nil {
		t.Fatal(err)
	}
	st := plan.State
	got := map[string]string{}
	for _, e := range st.Egress {
		got[e.IP.String()] = fmt.Sprint(e.Pods)
	}
	want := map[string]string{"198.18.0.200": "[10.244.11.10]", "198.18.0.201": "[10.244.11.12]",
		"2001:db8:18::c8": "[fd00:10:244:11::10]", "2001:db8:18::c9": "[fd00:10:244:11::11]"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("egress IPs' pods = %v\nwant %v", got, want)
	}
	if got := fmt.Sprint(st.NoEgress); got != "[10.244.11.11 fd00:10:244:11::12]" {
		t.Errorf("NoEgress = %s; want six's IPv4 and four's IPv6 address", got)
	}
	if got := fmt.Sprint(st.PinnedNamespaces); got != "map[both:198.18.0.200,2001:db8:18::c8 four:198.18.0.201 six:2001:db8:18::c9]" {
		t.Errorf("PinnedNamespaces = %s", got)
	}
	if r := plan.Rejected["node-ip"]; r == nil || r.Reason != ReasonNodeIP {
		t.Errorf("an annotation naming a node's IPv6 address: %v; want %s", r, ReasonNodeIP)
	}
	for _, e := range st.Egress {
		if h := plan.Holders[e.IP]; (h != "node2" && h != "node3") || (e.IP.Is6() && h != "node2") {
			t.Errorf("%s held by %q; want an egress node, with IPv6 for an IPv6 IP (node2)", e.IP, h)
		}
	}
	if st.NodeIP6.String() != "2001:db8:18::11" {
		t.Errorf("NodeIP6 = %s; want node1's IPv6 InternalIP (BGP's next hop)", st.NodeIP6)
	}
	if got := fmt.Sprint(st.Peers); !strings.Contains(got, "fd00:10:244:12::/64") || !strings.Contains(got, "10.244.12.0/24") {
		t.Errorf("Peers = %s; want both families' pod CIDRs", got)
	}
}
