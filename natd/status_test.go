package natd

import (
	"context"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"natd.dev/natd/election"
	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/natd/client/clientset/versioned/fake"
	egresslisters "natd.dev/natd/natd/client/listers/egress/v1alpha1"
)

var eipA = netip.MustParseAddr("198.18.0.200")

// writerFor builds a status writer for node on a fake clientset holding objs; its
// lister reads the same objects (as the informer would after a sync).
func writerFor(t *testing.T, node string, objs ...*egressv1alpha1.EgressIP) (*statusWriter, *fake.Clientset, *record.FakeRecorder) {
	t.Helper()
	client := fake.NewSimpleClientset()
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	for _, o := range objs {
		if _, err := client.EgressV1alpha1().EgressIPs().Create(context.Background(), o, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		idx.Add(o)
	}
	rec := record.NewFakeRecorder(100)
	clock := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	w := &statusWriter{node: node, client: client, lister: egresslisters.NewEgressIPLister(idx), recorder: rec,
		now: func() time.Time { return clock }, unusedSince: map[string]time.Time{},
		queue: workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())}
	t.Cleanup(w.queue.ShutDown)
	return w, client, rec
}

func routes(node string, alive bool, claims ...election.Claim) election.Member {
	return election.Member{Name: node, Alive: alive, Routes: &election.Routes{Node: node, Claims: claims}}
}

func threeNodes() map[string]bool {
	return map[string]bool{"node1": true, "node2": true, "node3": true}
}

func events(rec *record.FakeRecorder) []string {
	var out []string
	for {
		select {
		case e := <-rec.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

func TestStatusHolderCreatesObjectWithReadyCount(t *testing.T) {
	w, client, rec := writerFor(t, "node2")
	w.view = func() election.View {
		return election.View{Self: "node2", Members: map[string]election.Member{
			"node1": routes("node1", true, election.Claim{IP: eipA, Gen: 4}),
			"node2": routes("node2", true, election.Claim{IP: eipA, Gen: 4}),
			"node3": routes("node3", true, election.Claim{IP: eipA, Gen: 3}), // still routes to the old holder
		}}
	}
	w.snap = &statusSnapshot{Speakers: []string{"node1", "node2", "node3"}, Nodes: threeNodes(),
		IPs: map[string]ipFacts{"198.18.0.200": {IP: eipA, Namespaces: []string{"team-a", "team-b"}, Holder: "node2", HeldHere: true, Gen: 4}}}
	if err := w.write(context.Background(), "198.18.0.200"); err != nil {
		t.Fatal(err)
	}
	got, err := client.EgressV1alpha1().EgressIPs().Get(context.Background(), "198.18.0.200", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := got.Status
	if got.Spec.IP != "198.18.0.200" || s.Node != "node2" || s.NamespaceList != "team-a,team-b" || s.Ready != "2/3" || s.Failovers != 0 {
		t.Errorf("status: %+v", s)
	}
	if c := meta.FindStatusCondition(s.Conditions, ConditionAssigned); c == nil || c.Status != metav1.ConditionTrue || c.Reason != ReasonHeld {
		t.Errorf("Assigned: %+v", c)
	}
	if c := meta.FindStatusCondition(s.Conditions, ConditionReady); c == nil || c.Status != metav1.ConditionFalse || c.Reason != ReasonProgramming {
		t.Errorf("Ready: %+v", c)
	}
	ev := events(rec)
	if len(ev) != 3 || !strings.HasPrefix(ev[0], "Normal EgressIPAssigned egress IP 198.18.0.200 is held by node node2") {
		t.Errorf("events: %q", ev)
	}
}

func TestStatusFailoverCountsAndRecords(t *testing.T) {
	old := &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: "198.18.0.200"},
		Spec:   egressv1alpha1.EgressIPSpec{IP: "198.18.0.200"},
		Status: egressv1alpha1.EgressIPStatus{Node: "node1", Namespaces: []string{"team-a"}, NamespaceList: "team-a", Ready: "3/3"}}
	w, client, rec := writerFor(t, "node2", old)
	all := []election.Claim{{IP: eipA, Gen: 5}}
	w.view = func() election.View {
		return election.View{Self: "node2", Members: map[string]election.Member{
			"node1": routes("node1", false, all...), // dead: not counted, whatever it said
			"node2": routes("node2", true, all...),
			"node3": routes("node3", true, all...),
		}}
	}
	w.snap = &statusSnapshot{Speakers: []string{"node2", "node3"}, Nodes: threeNodes(),
		IPs: map[string]ipFacts{"198.18.0.200": {IP: eipA, Namespaces: []string{"team-a"}, Holder: "node2", HeldHere: true, Gen: 5}}}
	if err := w.write(context.Background(), "198.18.0.200"); err != nil {
		t.Fatal(err)
	}
	got, _ := client.EgressV1alpha1().EgressIPs().Get(context.Background(), "198.18.0.200", metav1.GetOptions{})
	s := got.Status
	if s.Node != "node2" || s.PreviousNode != "node1" || s.Failovers != 1 || s.LastFailoverTime == nil || s.Ready != "2/3" {
		t.Errorf("status after failover: %+v", s)
	}
	ev := events(rec)
	want := "Normal EgressIPFailover egress IP 198.18.0.200 moved from node node1 to node node2"
	if len(ev) != 2 || ev[0] != want || ev[1] != want {
		t.Errorf("events: %q", ev)
	}
}

func TestStatusFailoverThroughNoHolderStillCounts(t *testing.T) {
	old := egressv1alpha1.EgressIPStatus{Node: "node1"}
	now := metav1.Now()
	gone := desiredStatus(old, ipFacts{IP: eipA}, "node3", 0, 3, now)
	if gone.Node != "" || gone.PreviousNode != "node1" || gone.Failovers != 0 {
		t.Fatalf("unheld: %+v", gone)
	}
	if c := meta.FindStatusCondition(gone.Conditions, ConditionAssigned); c.Reason != ReasonNoEligibleNode || !strings.Contains(c.Message, "fail closed") {
		t.Errorf("Assigned while unheld: %+v", c)
	}
	back := desiredStatus(gone, ipFacts{IP: eipA, HeldHere: true, Holder: "node2", Gen: 2}, "node2", 3, 3, now)
	if back.Node != "node2" || back.PreviousNode != "node1" || back.Failovers != 1 {
		t.Errorf("held again by another node: %+v", back)
	}
	if c := meta.FindStatusCondition(back.Conditions, ConditionReady); c.Status != metav1.ConditionTrue || c.Reason != ReasonProgrammed {
		t.Errorf("Ready: %+v", c)
	}
	// The same holder coming back is no failover.
	same := desiredStatus(gone, ipFacts{IP: eipA, HeldHere: true, Holder: "node1", Gen: 2}, "node1", 3, 3, now)
	if same.Failovers != 0 {
		t.Errorf("same holder back counted as failover: %+v", same)
	}
	// Writing an unchanged status again changes nothing (no update storms).
	if again := desiredStatus(back, ipFacts{IP: eipA, HeldHere: true, Holder: "node2", Gen: 2}, "node2", 3, 3, metav1.NewTime(now.Add(time.Minute))); !equalStatus(again, back) {
		t.Errorf("rewrite changed status:\n%+v\n%+v", back, again)
	}
}

func equalStatus(a, b egressv1alpha1.EgressIPStatus) bool {
	return a.Node == b.Node && a.Ready == b.Ready && a.Failovers == b.Failovers && len(a.Conditions) == len(b.Conditions) &&
		a.Conditions[0] == b.Conditions[0] && a.Conditions[1] == b.Conditions[1]
}

func TestStatusRejectedIPAndDeletion(t *testing.T) {
	stale := &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: "198.18.0.201"}, Spec: egressv1alpha1.EgressIPSpec{IP: "198.18.0.201"}}
	speakers := []string{"node1", "node2", "node3"}
	outside := netip.MustParseAddr("198.18.1.5")
	facts := map[string]ipFacts{"198.18.1.5": {IP: outside, Namespaces: []string{"team-x"},
		Rejected: &AnnotationError{Reason: ReasonOutsideEgressCIDR, Message: "egress IP 198.18.1.5 is outside every egress CIDR (198.18.0.192/26)", IP: outside}}}
	for _, name := range []string{"198.18.1.5", "198.18.0.201"} {
		speaker := election.Pick(name, speakers)
		for _, node := range speakers {
			w, client, _ := writerFor(t, node, stale.DeepCopy())
			w.view = func() election.View { return election.View{Self: node} }
			w.snap = &statusSnapshot{Speakers: speakers, Nodes: threeNodes(), IPs: facts}
			if err := w.write(context.Background(), name); err != nil {
				t.Fatal(err)
			}
			if name == "198.18.0.201" {
				// Unused, but not for long enough yet: a lagging speaker must not delete
				// what a holder has just created.
				if _, err := client.EgressV1alpha1().EgressIPs().Get(context.Background(), name, metav1.GetOptions{}); err != nil {
					t.Errorf("%s: deleted before the grace: %v", node, err)
				}
				later := w.now().Add(deleteGrace)
				w.now = func() time.Time { return later }
				if err := w.write(context.Background(), name); err != nil {
					t.Fatal(err)
				}
			}
			got, err := client.EgressV1alpha1().EgressIPs().Get(context.Background(), name, metav1.GetOptions{})
			switch {
			case name == "198.18.0.201" && node == speaker && err == nil:
				t.Errorf("%s: unused object not deleted by its speaker", node)
			case name == "198.18.0.201" && node != speaker && err != nil:
				t.Errorf("%s: deleted an object it does not speak for", node)
			case name == "198.18.1.5" && node == speaker:
				if err != nil {
					t.Fatalf("rejected IP's object: %v", err)
				}
				c := meta.FindStatusCondition(got.Status.Conditions, ConditionAssigned)
				if c == nil || c.Reason != ReasonOutsideEgressCIDR || got.Status.NamespaceList != "team-x" || got.Status.Node != "" {
					t.Errorf("rejected IP's status: %+v", got.Status)
				}
			case name == "198.18.1.5" && err == nil:
				t.Errorf("%s wrote an object it does not speak for", node)
			}
		}
	}
}

func TestStatusFactsFromPlan(t *testing.T) {
	plan := &Plan{
		Namespaces: map[netip.Addr][]string{eipA: {"team-a"}},
		Holders:    map[netip.Addr]string{eipA: "node1"},
		Held:       map[netip.Addr]Holding{eipA: {Gen: 3}},
		Rejected: map[string]*AnnotationError{
			"bad":   {Reason: ReasonInvalidIP, Message: "not an IP"},
			"far-1": {Reason: ReasonOutsideEgressCIDR, IP: netip.MustParseAddr("10.1.1.1")},
			"far-2": {Reason: ReasonOutsideEgressCIDR, IP: netip.MustParseAddr("10.1.1.1")},
		},
	}
	s := statusFacts(Cluster{}, plan, []string{"node1"}, map[string]bool{"node1": true}, false)
	if len(s.IPs) != 2 {
		t.Fatalf("facts: %+v", s.IPs)
	}
	if f := s.IPs["198.18.0.200"]; !f.HeldHere || f.Gen != 3 || f.Holder != "node1" {
		t.Errorf("held IP: %+v", f)
	}
	if f := s.IPs["10.1.1.1"]; f.Rejected == nil || strings.Join(f.Namespaces, ",") != "far-1,far-2" {
		t.Errorf("rejected IP: %+v", f)
	}
}

func TestStatusObserveEnqueuesWhatChanged(t *testing.T) {
	w, _, _ := writerFor(t, "node1")
	w.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer w.queue.ShutDown()
	facts := func(holder string) map[string]ipFacts {
		return map[string]ipFacts{
			"198.18.0.200": {IP: eipA, Namespaces: []string{"team-a"}, Holder: holder,
				Rejected: &AnnotationError{Reason: "r", IP: eipA}},
			"198.18.0.201": {IP: netip.MustParseAddr("198.18.0.201"), Holder: "node2"},
		}
	}
	snap := func(holder string) *statusSnapshot {
		return &statusSnapshot{IPs: facts(holder), Speakers: []string{"node1", "node2"}, Nodes: threeNodes()}
	}
	drain := func() []string {
		var keys []string
		for w.queue.Len() > 0 {
			k, _ := w.queue.Get()
			w.queue.Done(k)
			keys = append(keys, k)
		}
		sort.Strings(keys)
		return keys
	}
	w.observe(snap("node1"))
	if got := drain(); strings.Join(got, " ") != "198.18.0.200 198.18.0.201" {
		t.Errorf("first facts enqueued %q, want every IP", got)
	}
	w.observe(snap("node1"))
	if got := drain(); len(got) != 0 {
		t.Errorf("unchanged facts enqueued %q", got)
	}
	w.observe(snap("node3"))
	if got := drain(); strings.Join(got, " ") != "198.18.0.200" {
		t.Errorf("a holder change enqueued %q, want only its IP", got)
	}
	w.observe(nil)
	if w.snap != nil {
		t.Error("no majority: the writer still has facts to write from")
	}
}

// A holder that has just let go (its facts lag one sync) does not overwrite the new
// holder's status, and a speaker that has not heard of a live claim does not write
// "no holder" over it.
func TestStatusStaleWritersStayQuiet(t *testing.T) {
	newer := &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: "198.18.0.200"},
		Spec:   egressv1alpha1.EgressIPSpec{IP: "198.18.0.200"},
		Status: egressv1alpha1.EgressIPStatus{Node: "node3", ClaimGeneration: 6, Ready: "3/3"}}
	w, client, rec := writerFor(t, "node2", newer)
	w.view = func() election.View {
		return election.View{Self: "node2", Members: map[string]election.Member{
			"node3": {Name: "node3", Alive: true, Meta: election.Meta{Claims: []election.Claim{{IP: eipA, Gen: 6}}}}}}
	}
	w.snap = &statusSnapshot{Speakers: []string{"node2"}, Nodes: threeNodes(),
		IPs: map[string]ipFacts{"198.18.0.200": {IP: eipA, Holder: "node2", HeldHere: true, Gen: 5}}}
	if err := w.write(context.Background(), "198.18.0.200"); err != nil {
		t.Fatal(err)
	}
	w.snap.IPs["198.18.0.200"] = ipFacts{IP: eipA} // no holder in this node's view
	if err := w.write(context.Background(), "198.18.0.200"); err != nil {
		t.Fatal(err)
	}
	got, _ := client.EgressV1alpha1().EgressIPs().Get(context.Background(), "198.18.0.200", metav1.GetOptions{})
	if got.Status.Node != "node3" || got.Status.ClaimGeneration != 6 {
		t.Errorf("a stale writer changed the status: %+v", got.Status)
	}
	if ev := events(rec); len(ev) != 0 {
		t.Errorf("a stale writer recorded events: %q", ev)
	}
}

// The generation a status records is remembered even when no node does any more (every
// natd restarted): a new claim beats it, so the status takes the new holder.
func TestStatusRecordedGenerationsSeedNewClaims(t *testing.T) {
	w, _, _ := writerFor(t, "node2", &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: ObjectName(eipA)},
		Spec: egressv1alpha1.EgressIPSpec{IP: eipA.String()}, Status: egressv1alpha1.EgressIPStatus{Node: "node3", ClaimGeneration: 6}})
	gens := w.recordedGens()
	if gens[eipA] != 6 {
		t.Fatalf("recorded generations: %v", gens)
	}
	el := elect("node2", "node1", "node2")
	el.SeenGen = gens
	plan, err := (&Planner{Config: testConfig("node2")}).Plan(cluster(), el)
	if err != nil || plan.Held[eip].Gen != 7 {
		t.Fatalf("new claim: %+v, %v", plan.Held, err)
	}
}
