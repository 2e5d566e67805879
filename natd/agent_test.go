package natd

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"

	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/dataplane"
)

// fakeKernel records what the agent asks of the kernel. Apply can be made to fail or
// to block (a wedged netlink call).
type fakeKernel struct {
	mu           sync.Mutex
	applied      []dataplane.State
	applyErr     error
	block        chan struct{} // when set, Apply waits for it to close
	result       dataplane.Result
	renewals     int
	renewErr     error
	renewedUntil time.Time // the deadline of the last renewal
	drifted      bool
	bindings     []dataplane.Binding // what Bindings reads
}

func (k *fakeKernel) Apply(st dataplane.State) (dataplane.Result, error) {
	k.mu.Lock()
	block := k.block
	k.mu.Unlock()
	if block != nil {
		<-block
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.applyErr != nil {
		return dataplane.Result{}, k.applyErr
	}
	k.applied = append(k.applied, st)
	res := k.result
	k.result = dataplane.Result{}
	return res, nil
}

func (k *fakeKernel) Verify() (bool, time.Duration, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.drifted
	k.drifted = false
	return d, 0, nil
}

func (k *fakeKernel) RenewLeases(until time.Time) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.renewals++
	k.renewedUntil = until
	return k.renewErr
}

func (k *fakeKernel) HoldLeases(time.Duration) error             { return nil }
func (k *fakeKernel) WatchChanges(<-chan struct{}, func()) error { return nil }
func (k *fakeKernel) KernelClaims() ([]election.Claim, error)    { return nil, nil }
func (k *fakeKernel) Bindings([]netip.Addr) ([]dataplane.Binding, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.bindings), nil
}

func (k *fakeKernel) last() dataplane.State {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.applied[len(k.applied)-1]
}

func (k *fakeKernel) renewed() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.renewals
}

// fakeMembership is a gossip view the test sets. View can be made to block (a gossip
// delegate holding the lock).
type fakeMembership struct {
	mu      sync.Mutex
	view    election.View
	block   chan struct{}
	routes  []election.Claim
	changed chan struct{}
	voters  []string
	holding bool
	// handovers are what Handover returns; sent what SendHandover was given.
	handovers map[netip.Addr]election.Handover
	sent      []sentTo
	// unreachable peers' joins fail (a refused or lost push/pull); joined counts the
	// joins that went through.
	unreachable map[string]bool
	joined      int
}

type sentTo struct {
	to      []string
	ip      netip.Addr
	payload []byte
}

func (m *fakeMembership) View() election.View {
	m.mu.Lock()
	block := m.block
	m.mu.Unlock()
	if block != nil {
		<-block
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	v := m.view
	if v.Evidence.Quorum() && v.Evidence.QuorumNow {
		v.Evidence.QuorumSeen = v.Evidence.At // as the heartbeats say it
	}
	v.Members = map[string]election.Member{}
	for k, x := range m.view.Members {
		v.Members[k] = x
	}
	return v
}
func (m *fakeMembership) Evidence() election.Evidence                 { return m.View().Evidence }
func (m *fakeMembership) SetLocal(election.Meta, time.Duration) error { return nil }
func (m *fakeMembership) Join(peers []string) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, p := range peers {
		if !m.unreachable[p] {
			n++
		}
	}
	m.joined += n
	if n == 0 {
		return 0, errors.New("no peer answered")
	}
	return n, nil
}
func (m *fakeMembership) Changed() <-chan struct{}        { return m.changed }
func (m *fakeMembership) Forget(func(string) bool)        {}
func (m *fakeMembership) MembersChanged() <-chan struct{} { return nil }
func (m *fakeMembership) SetRoutes(r []election.Claim) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.routes = r
	return nil
}
func (m *fakeMembership) RoutesChanged() <-chan struct{} { return nil }
func (m *fakeMembership) SetKeys([][]byte) (bool, error) { return false, nil }
func (m *fakeMembership) SetVoters(voters []string, holding bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.voters, m.holding = voters, holding
}
func (m *fakeMembership) SendHandover(to []string, ip netip.Addr, payload []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.sent = append(m.sent, sentTo{to: slices.Clone(to), ip: ip, payload: payload})
	return nil
}
func (m *fakeMembership) Handover(ip netip.Addr) (election.Handover, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	h, ok := m.handovers[ip]
	return h, ok
}
func (m *fakeMembership) Leave(time.Duration) error { return nil }
func (m *fakeMembership) Shutdown() error           { return nil }

// fixture wires an Agent to a fake clientset, a fake kernel, fake gossip and a clock
// the test moves, as sample-controller's controller tests do.
type fixture struct {
	t       *testing.T
	kernel  *fakeKernel
	members *fakeMembership
	agent   *Agent
	mu      sync.Mutex
	clock   time.Time
}

func newFixture(t *testing.T, objects ...runtime.Object) *fixture {
	t.Helper()
	return newFixtureConfig(t, func(*Config) {}, objects...)
}

// newFixtureConfig is newFixture with the agent's configuration changed by configure.
func newFixtureConfig(t *testing.T, configure func(*Config), objects ...runtime.Object) *fixture {
	t.Helper()
	f := &fixture{t: t, kernel: &fakeKernel{}, clock: time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)}
	f.members = &fakeMembership{changed: make(chan struct{})}
	f.setAlive("node1", "node2", "node3")
	cfg := testConfig("node1")
	cfg.Lease, cfg.ResyncPeriod, cfg.RestartGrace = 400*time.Millisecond, time.Minute, time.Minute
	configure(cfg)
	client := k8sfake.NewSimpleClientset(objects...)
	f.agent = NewAgent(cfg, client, nil, f.kernel, func(netip.Addr) (Membership, error) { return f.members, nil }, nil, NewMetrics())
	f.agent.now = f.now
	f.agent.health = newHealth(f.now)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		f.agent.queue.ShutDown()
		f.agent.factory.Shutdown()
		if f.agent.dsFactory != nil {
			f.agent.dsFactory.Shutdown()
		}
	})
	if err := f.agent.start(ctx); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.clock
}

// advance moves the clock; the voters stay in touch.
func (f *fixture) advance(d time.Duration) {
	f.mu.Lock()
	f.clock = f.clock.Add(d)
	f.mu.Unlock()
	f.members.mu.Lock()
	f.members.view.At = f.members.view.At.Add(d)
	f.members.view.Evidence.At = f.members.view.At
	f.members.mu.Unlock()
}

// setAlive makes the named members alive and in recent contact with this node.
func (f *fixture) setAlive(names ...string) {
	f.members.mu.Lock()
	defer f.members.mu.Unlock()
	at := f.clock
	f.members.view = election.View{Self: "node1", At: at, Members: map[string]election.Member{}}
	for _, n := range names {
		f.members.view.Members[n] = election.Member{Name: n, Alive: true}
	}
	f.members.view.Evidence = evidence(at, names...)
}

func (f *fixture) probe(path string) int {
	rec := httptest.NewRecorder()
	f.agent.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code
}

func nodes3() []runtime.Object {
	return []runtime.Object{
		node("node1", "198.18.0.11", false, true),
		node("node2", "198.18.0.12", true, true),
		node("node3", "198.18.0.13", true, true),
	}
}

func terminating(p *corev1.Pod) *corev1.Pod {
	now := metav1.Now()
	p.DeletionTimestamp = &now
	return p
}

func podsOf(st dataplane.State) map[string]string {
	out := map[string]string{}
	for _, e := range st.Egress {
		for _, p := range e.Pods {
			out[p.String()] = e.IP.String()
		}
	}
	return out
}

// Two pods with one IP (normal while an IP is reused) must neither crash natd nor
// give the address two egress IPs: the running pod wins over the terminating one, and
// of two running pods the first namespace by name, on every node alike. Other nodes'
// pods are theirs to classify.
func TestAgentTwoPodsOneIP(t *testing.T) {
	objs := append(nodes3(),
		ns("team-a", "198.18.0.200"), ns("team-b", "198.18.0.201"), ns("team-c", "198.18.0.201"),
		terminating(pod("team-a", "old", "node1", "10.244.11.10")),
		pod("team-b", "new", "node1", "10.244.11.10"),
		pod("team-b", "x", "node1", "10.244.11.20"),
		pod("team-c", "y", "node1", "10.244.11.20"),
		pod("team-a", "z", "node1", "10.244.11.30"),
		pod("team-c", "z", "node1", "10.244.11.30"),
		pod("team-a", "remote", "node2", "10.244.12.10"),
	)
	f := newFixture(t, objs...)
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	got := podsOf(f.kernel.last())
	want := map[string]string{"10.244.11.10": "198.18.0.201", "10.244.11.20": "198.18.0.201", "10.244.11.30": "198.18.0.200"}
	for ip, eip := range want {
		if got[ip] != eip {
			t.Errorf("pod %s pinned to %q, want %s (all: %v)", ip, got[ip], eip, got)
		}
	}
	n := 0
	for _, e := range f.kernel.last().Egress {
		n += len(e.Pods)
	}
	if n != 3 {
		t.Errorf("%d pod elements for 3 addresses: %v", n, f.kernel.last().Egress)
	}
}

// A holder renews its leases only while it can show it may serve. A sync stuck in the
// kernel stops renewals within wedgeBound (the leases then lapse by themselves), and
// liveness fails once it has been stuck for livenessBound.
func TestAgentWedgedSyncStopsServing(t *testing.T) {
	f := newFixture(t, nodes3()...)
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 || f.probe("/healthz") != 200 || f.probe("/readyz") != 200 {
		t.Fatalf("healthy agent: renewals %d, healthz %d, readyz %d", f.kernel.renewed(), f.probe("/healthz"), f.probe("/readyz"))
	}
	f.kernel.mu.Lock()
	f.kernel.block = make(chan struct{})
	f.kernel.mu.Unlock()
	f.agent.queue.Add(syncKey)
	done := make(chan bool)
	go func() { done <- f.agent.processNext() }()
	waitFor(t, func() bool {
		f.agent.health.mu.Lock()
		defer f.agent.health.mu.Unlock()
		return !f.agent.health.busySince.IsZero()
	})

	f.advance(wedgeBound / 2) // a slow sync is not a wedged one
	f.agent.renewLeases()
	if f.kernel.renewed() != 2 {
		t.Fatalf("renewals during a sync shorter than wedgeBound: %d, want 2", f.kernel.renewed())
	}
	f.advance(wedgeBound)
	f.agent.renewLeases()
	if f.kernel.renewed() != 2 {
		t.Fatalf("a wedged agent renewed its leases (%d renewals)", f.kernel.renewed())
	}
	if got := testutil.ToFloat64(f.agent.metrics.LeaseRenewalsWithheld); got != 1 {
		t.Errorf("natd_lease_renewals_withheld_total = %v, want 1", got)
	}
	if f.probe("/readyz") == 200 {
		t.Error("readyz passes while the sync loop is stuck")
	}
	if f.probe("/healthz") != 200 {
		t.Error("healthz failed before livenessBound")
	}
	f.advance(livenessBound)
	if f.probe("/healthz") == 200 {
		t.Error("healthz passes while the sync loop has been stuck for longer than livenessBound")
	}
	f.kernel.mu.Lock()
	close(f.kernel.block)
	f.kernel.block = nil
	f.kernel.mu.Unlock()
	<-done
	f.agent.renewLeases()
	if f.kernel.renewed() != 3 || f.probe("/healthz") != 200 {
		t.Errorf("after the sync completed: renewals %d, healthz %d", f.kernel.renewed(), f.probe("/healthz"))
	}
}

// Gossip that hangs (a delegate holding its lock) blocks the renewal loop itself:
// nothing is renewed, and liveness fails once it has been stuck for renewStallBound.
func TestAgentWedgedGossipStopsServing(t *testing.T) {
	f := newFixture(t, nodes3()...)
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	f.members.mu.Lock()
	f.members.block = make(chan struct{})
	f.members.mu.Unlock()
	returned := make(chan struct{})
	go func() {
		f.agent.renewLeases()
		close(returned)
	}()
	select {
	case <-returned:
		t.Fatal("renewal went on while gossip was stuck")
	case <-time.After(100 * time.Millisecond):
	}
	if f.kernel.renewed() != 0 {
		t.Fatalf("renewed %d times while gossip was stuck", f.kernel.renewed())
	}
	f.advance(renewStallBound + time.Second)
	if f.probe("/healthz") == 200 {
		t.Error("healthz passes while the renewal loop is stuck")
	}
	close(f.members.block)
	<-returned
}

// A node that no longer sees a majority (its contacts went quiet) stops renewing at
// once, before any sync has run.
func TestAgentNoMajorityNoRenewal(t *testing.T) {
	f := newFixture(t, node("node1", "198.18.0.11", true, true), node("node2", "198.18.0.12", false, true),
		node("node3", "198.18.0.13", false, true), ns("team-a", "198.18.0.200"))
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { // the state exchange that follows a new quorum
		f.agent.mu.Lock()
		defer f.agent.mu.Unlock()
		return !f.agent.stateSyncedAt.IsZero()
	})
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 || len(f.agent.held) != 1 {
		t.Fatalf("the holder renewed %d times, holds %v", f.kernel.renewed(), f.agent.held)
	}
	f.mu.Lock()
	f.clock = f.clock.Add(time.Hour)
	f.mu.Unlock()
	f.members.mu.Lock()
	f.members.view.At = f.members.view.At.Add(time.Hour) // node2 and node3 have not answered for an hour
	f.members.view.Evidence.At = f.members.view.At
	f.members.view.Evidence.QuorumSince = time.Time{}
	f.members.mu.Unlock()
	for f.agent.queue.Len() > 0 {
		k, _ := f.agent.queue.Get()
		f.agent.queue.Done(k)
	}
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 {
		t.Fatalf("renewed %d times without a majority", f.kernel.renewed()-1)
	}
	// ... and a sync follows at once, which gives the IPs up: back in touch, the node
	// must not serve again what others may have taken meanwhile.
	if f.agent.queue.Len() == 0 {
		t.Fatal("losing the majority did not ask for a sync")
	}
}

// A node that comes to see a quorum takes nothing new until one state exchange reached
// every voter in touch: a push/pull that failed, or a round run in a moment no peer was
// in touch (it exchanged with nobody), once let a node back from a cut take an IP whose
// new holder's claim it had not heard, and both served it.
func TestAgentTakesNothingUntilStateExchanged(t *testing.T) {
	objs := []runtime.Object{node("node1", "198.18.0.11", true, true), node("node2", "198.18.0.12", false, true),
		node("node3", "198.18.0.13", false, true), ns("team-a", "198.18.0.200")}
	synced := func(f *fixture) bool {
		f.agent.mu.Lock()
		defer f.agent.mu.Unlock()
		return !f.agent.stateSyncedAt.IsZero()
	}
	holdsAfterExchange := func(t *testing.T, f *fixture) {
		t.Helper()
		waitFor(t, func() bool { return synced(f) })
		if err := f.agent.Sync(); err != nil || len(f.agent.held) != 1 {
			t.Fatalf("after a complete exchange: holds %v (%v), want 198.18.0.200", f.agent.held, err)
		}
	}
	holdsNothing := func(t *testing.T, f *fixture, why string) {
		t.Helper()
		time.Sleep(300 * time.Millisecond) // rounds repeat meanwhile
		if synced(f) {
			t.Fatalf("%s: counted as a state exchange", why)
		}
		if err := f.agent.Sync(); err != nil || len(f.agent.held) != 0 {
			t.Fatalf("%s: holds %v (%v), want nothing", why, f.agent.held, err)
		}
	}

	t.Run("a push/pull fails", func(t *testing.T) {
		f := newFixture(t, objs...)
		node2 := election.PeerAddr(netip.MustParseAddr("198.18.0.12"), f.agent.cfg.GossipPort)
		f.members.mu.Lock()
		f.members.unreachable = map[string]bool{node2: true}
		f.members.mu.Unlock()
		f.agent.Sync() // a new quorum: node3 answers the exchange, node2 does not
		holdsNothing(t, f, "node2 unreachable")
		f.members.mu.Lock()
		delete(f.members.unreachable, node2)
		f.members.mu.Unlock()
		holdsAfterExchange(t, f)
	})

	t.Run("no peer in touch when it begins", func(t *testing.T) {
		f := newFixture(t, objs...)
		f.members.mu.Lock()
		f.members.view.Evidence.InTouch = map[string]bool{"node1": true} // a flap: the quorum bridges it
		joined := f.members.joined                                       // at start
		f.members.mu.Unlock()
		f.agent.Sync()
		holdsNothing(t, f, "no peer in touch")
		f.members.mu.Lock()
		joined = f.members.joined - joined
		f.members.mu.Unlock()
		if joined != 0 {
			t.Fatalf("%d joins with no peer in touch", joined)
		}
		f.members.mu.Lock()
		f.members.view.Evidence = evidence(f.members.view.At, "node1", "node2", "node3")
		f.members.mu.Unlock()
		holdsAfterExchange(t, f)
	})
}

// A quorum that broke between two renewals, even if it is back by the next one, ends
// the leases: the holder may have been reported silent and its IPs taken meanwhile. It
// renews nothing, gives its IPs up, and takes them again only after the silence bound.
func TestAgentBrokenQuorumEndsTheLeases(t *testing.T) {
	f := newFixture(t, node("node1", "198.18.0.11", true, true), node("node2", "198.18.0.12", false, true),
		node("node3", "198.18.0.13", false, true), ns("team-a", "198.18.0.200"))
	f.agent.Sync()
	waitFor(t, func() bool {
		f.agent.mu.Lock()
		defer f.agent.mu.Unlock()
		return !f.agent.stateSyncedAt.IsZero()
	})
	if err := f.agent.Sync(); err != nil || len(f.agent.held) != 1 {
		t.Fatalf("not holding: %v, %v", f.agent.held, err)
	}
	// A moment out of touch, the quorum unbroken: the renewal extends the lease until
	// --lease after the last moment the quorum was seen, not after now, and nothing is
	// given up.
	f.advance(50 * time.Millisecond)
	f.members.mu.Lock()
	f.members.view.Evidence.QuorumNow = false
	seen := f.members.view.At.Add(-30 * time.Millisecond)
	f.members.view.Evidence.QuorumSeen = seen
	f.members.mu.Unlock()
	f.agent.renewLeases()
	if err := f.agent.Sync(); err != nil || f.kernel.renewed() != 1 || !f.kernel.renewedUntil.Equal(seen.Add(f.agent.cfg.Lease)) || len(f.agent.held) != 1 {
		t.Fatalf("a moment out of touch: renewed %d until %s (quorum seen %s), held %v, %v", f.kernel.renewed(), f.kernel.renewedUntil, seen, f.agent.held, err)
	}
	if got := f.kernel.last().LeaseUntil; !got.Equal(seen.Add(f.agent.cfg.Lease)) {
		t.Errorf("a sync out of touch leased until %s, want %s", got, seen.Add(f.agent.cfg.Lease))
	}
	// Out of touch for a whole lease: the quorum is as good as broken, and the lease
	// has run out; nothing is renewed.
	f.advance(f.agent.cfg.Lease)
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 {
		t.Fatalf("renewed a lease whose quorum was last seen %s ago", f.now().Sub(seen))
	}
	f.members.mu.Lock()
	f.members.view.Evidence.QuorumNow = true
	f.members.view.Evidence.QuorumSince = f.members.view.At.Add(-10 * time.Millisecond) // broke, and is back
	f.members.mu.Unlock()
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 {
		t.Fatal("renewed leases across a broken quorum")
	}
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	if len(f.agent.held) != 0 {
		t.Fatalf("still holds %v after its quorum broke", f.agent.held)
	}
	f.advance(f.agent.cfg.Heartbeat().Silence)
	f.agent.mu.Lock()
	f.agent.stateSyncedAt = f.now()
	f.agent.mu.Unlock()
	if err := f.agent.Sync(); err != nil || len(f.agent.held) != 1 {
		t.Fatalf("not taken again once settled: %v, %v", f.agent.held, err)
	}
	f.agent.renewLeases()
	if f.kernel.renewed() != 2 {
		t.Fatal("no renewal once the IP was taken again")
	}
}

// Syncs that keep failing stop renewals after syncFailBound; a renewal the kernel
// refuses is counted, fails readiness and asks for a repairing sync at once.
func TestAgentFailingSyncsAndRefusedRenewals(t *testing.T) {
	f := newFixture(t, nodes3()...)
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	f.kernel.mu.Lock()
	f.kernel.applyErr = errors.New("netlink: no such file or directory")
	f.kernel.mu.Unlock()
	if err := f.agent.Sync(); err == nil {
		t.Fatal("sync succeeded over a failing kernel")
	}
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 {
		t.Fatalf("renewals right after one failed sync: %d, want 1", f.kernel.renewed())
	}
	f.advance(syncFailBound + time.Millisecond)
	_ = f.agent.Sync()
	f.agent.renewLeases()
	if f.kernel.renewed() != 1 {
		t.Fatalf("renewed while syncs have failed for longer than syncFailBound")
	}
	f.syncThenRenewFailing(t, errors.New("no such file or directory"))
	f.agent.renewLeases()
	if got := testutil.ToFloat64(f.agent.metrics.LeaseRenewalFailures); got != 1 {
		t.Errorf("natd_lease_renewal_failures_total = %v, want 1", got)
	}
	if f.probe("/readyz") == 200 {
		t.Error("readyz passes while lease renewals fail")
	}
	if f.agent.queue.Len() != 1 {
		t.Error("a refused renewal did not ask for a repairing sync")
	}

	// A renewal that reached the kernel after its deadline (the node stalled): the
	// kernel ended the leases. Not a failure of the node's, but the sync that gives
	// the IPs up is asked for.
	f.syncThenRenewFailing(t, dataplane.ErrLeaseDeadlinePassed)
	withheld := testutil.ToFloat64(f.agent.metrics.LeaseRenewalsWithheld)
	f.agent.renewLeases()
	if got := testutil.ToFloat64(f.agent.metrics.LeaseRenewalFailures); got != 1 {
		t.Errorf("a late renewal counted as a failure: natd_lease_renewal_failures_total = %v, want 1", got)
	}
	if got := testutil.ToFloat64(f.agent.metrics.LeaseRenewalsWithheld); got != withheld+1 {
		t.Errorf("natd_lease_renewals_withheld_total = %v, want %v", got, withheld+1)
	}
	if f.agent.queue.Len() != 1 {
		t.Error("a late renewal did not ask for the sync that gives the IPs up")
	}
}

// syncThenRenewFailing syncs over a kernel that applies but refuses renewals with err,
// and leaves the work queue empty, so that what a renewal queues can be seen.
func (f *fixture) syncThenRenewFailing(t *testing.T, err error) {
	t.Helper()
	f.kernel.mu.Lock()
	f.kernel.applyErr, f.kernel.renewErr = nil, err
	f.kernel.mu.Unlock()
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	for f.agent.queue.Len() > 0 {
		k, _ := f.agent.queue.Get()
		f.agent.queue.Done(k)
	}
}

// A takeover that an Apply reports (also on the retry of one that failed half-way)
// is counted as a failover when another node claimed the IP; drift the kernel reports
// leads to a sync.
func TestAgentCountsTakeoversAndRepairsDrift(t *testing.T) {
	objs := append(nodes3(), ns("team-a", "198.18.0.200"))
	f := newFixture(t, objs...)
	f.members.mu.Lock()
	m := f.members.view.Members["node3"]
	m.Meta.Claims = []election.Claim{{IP: netip.MustParseAddr("198.18.0.200"), Gen: 4}}
	f.members.view.Members["node3"] = m
	f.members.mu.Unlock()
	f.kernel.mu.Lock()
	f.kernel.result = dataplane.Result{Announced: []netip.Addr{netip.MustParseAddr("198.18.0.200")}}
	f.kernel.mu.Unlock()
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(f.agent.metrics.Failovers); got != 1 {
		t.Errorf("natd_failovers_total = %v, want 1", got)
	}
	before := len(f.kernel.applied)
	f.kernel.mu.Lock()
	f.kernel.drifted = true
	f.kernel.mu.Unlock()
	if err := f.agent.process(verifyKey); err != nil {
		t.Fatal(err)
	}
	if len(f.kernel.applied) != before+1 || testutil.ToFloat64(f.agent.metrics.DriftRepairs) != 1 {
		t.Errorf("drift: %d applies (want %d), repairs %v", len(f.kernel.applied), before+1, testutil.ToFloat64(f.agent.metrics.DriftRepairs))
	}
	if err := f.agent.process(verifyKey); err != nil || len(f.kernel.applied) != before+1 {
		t.Errorf("no drift: %d applies, %v; want no sync", len(f.kernel.applied), err)
	}
}

// A pod of a pinned namespace on the host network cannot be pinned: one Warning Event
// per pod on the namespace, not repeated every sync.
func TestAgentWarnsAboutHostNetworkPods(t *testing.T) {
	host := pod("team-a", "agent", "node1", "198.18.0.11")
	host.Spec.HostNetwork = true
	other := pod("team-a", "agent-2", "node2", "198.18.0.12") // node2 warns about its own
	other.Spec.HostNetwork = true
	f := newFixture(t, append(nodes3(), ns("team-a", "198.18.0.200"), host, other)...)
	rec := record.NewFakeRecorder(10)
	f.agent.recorder = rec
	for i := 0; i < 2; i++ {
		if err := f.agent.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	for len(rec.Events) > 0 {
		got = append(got, <-rec.Events)
	}
	if len(got) != 1 || !strings.Contains(got[0], "Warning HostNetworkPodNotPinned pod agent uses the host network") {
		t.Fatalf("events = %q; want one HostNetworkPodNotPinned Warning", got)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("condition never held")
}

// natd tells an uninstall (its DaemonSet gone or being deleted) from a restart, and
// takes a restart when the API cannot say.
func TestAgentTellsUninstallFromRestart(t *testing.T) {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "natd-system", Name: "natd"}}
	f := newFixture(t, append(nodes3(), ds)...)
	f.agent.cfg.DaemonSet = "natd-system/natd"
	if f.agent.uninstalling() {
		t.Fatal("a DaemonSet in place taken for an uninstall")
	}
	now := metav1.Now()
	ds.DeletionTimestamp = &now
	ds.Finalizers = []string{"test"}
	if _, err := f.agent.client.AppsV1().DaemonSets("natd-system").Update(context.Background(), ds, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if !f.agent.uninstalling() {
		t.Fatal("a DaemonSet being deleted not taken for an uninstall")
	}
	if err := f.agent.client.AppsV1().DaemonSets("natd-system").Delete(context.Background(), "natd", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if !f.agent.uninstalling() {
		t.Fatal("a deleted DaemonSet not taken for an uninstall")
	}
	f.agent.cfg.DaemonSet = ""
	if f.agent.uninstalling() {
		t.Fatal("without --daemonset every stop is a restart")
	}
}

// `kubectl delete -k manifests/` deletes natd's namespace, DaemonSet, ServiceAccount
// and RBAC at once: when the kubelet stops natd, the API may already refuse natd. What
// natd's watches saw before (its namespace terminating, its DaemonSet deleted) still
// makes it an uninstall; with nothing seen and the API refusing, it is a restart.
func TestAgentUninstallSeenBeforeTheAPIRefuses(t *testing.T) {
	objects := func() []runtime.Object {
		return append(nodes3(),
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "natd-system"}},
			&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Namespace: "natd-system", Name: "natd"}})
	}
	withDaemonSet := func(c *Config) { c.DaemonSet = "natd-system/natd" }
	refuse := func(f *fixture) {
		f.agent.client.(*k8sfake.Clientset).PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewUnauthorized("the ServiceAccount's token is no longer valid")
		})
	}
	ctx := context.Background()

	f := newFixtureConfig(t, withDaemonSet, objects()...)
	waitFor(t, f.agent.daemonSets.HasSynced)
	refuse(f)
	if f.agent.uninstalling() {
		t.Fatal("nothing deleted and the API refusing: taken for an uninstall, want a restart")
	}
	now := metav1.Now()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "natd-system", DeletionTimestamp: &now, Finalizers: []string{"kubernetes"}}}
	if _, err := f.agent.client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		got, err := f.agent.namespaces.Get("natd-system")
		return err == nil && got.DeletionTimestamp != nil
	})
	if !f.agent.uninstalling() {
		t.Fatal("natd's namespace terminating, the API refusing: not taken for an uninstall")
	}

	f = newFixtureConfig(t, withDaemonSet, objects()...)
	waitFor(t, f.agent.daemonSets.HasSynced)
	if err := f.agent.client.AppsV1().DaemonSets("natd-system").Delete(ctx, "natd", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(f.agent.daemonSets.GetStore().List()) == 0 })
	refuse(f)
	if !f.agent.uninstalling() {
		t.Fatal("the DaemonSet seen deleted, the API refusing: not taken for an uninstall")
	}
}

// A node whose quorum broke and began anew (it was cut off) drops its API connections,
// which TCP would still be backing off on; the first quorum after the start does not.
func TestAgentReconnectsToTheAPIAfterARejoin(t *testing.T) {
	f := newFixture(t, nodes3()...)
	var reconnects int
	f.agent.reconnectAPI = func() { reconnects++ }
	if err := f.agent.Sync(); err != nil || reconnects != 0 {
		t.Fatalf("first quorum: %d reconnects, %v", reconnects, err)
	}
	f.advance(50 * time.Millisecond)
	if err := f.agent.Sync(); err != nil || reconnects != 0 {
		t.Fatalf("the same quorum: %d reconnects, %v", reconnects, err)
	}
	f.members.mu.Lock()
	f.members.view.Evidence.QuorumSince = f.members.view.At.Add(-10 * time.Millisecond) // broke, and is back
	f.members.mu.Unlock()
	if err := f.agent.Sync(); err != nil || reconnects != 1 {
		t.Fatalf("after a rejoin: %d reconnects, %v", reconnects, err)
	}
}

// A node that takes an egress IP writes what its previous holder handed over (and
// only then: an IP it holds already is not written again); a holder hands the
// bindings its kernel reads to every other node that may hold, when they change and
// every handoverRefresh, and an IP without any is not sent at all.
func TestAgentHandsOverNATBindings(t *testing.T) {
	eip := netip.MustParseAddr("198.18.0.200")
	binding := func(pod string, port uint16) dataplane.Binding {
		return dataplane.Binding{Proto: 6, Pod: netip.AddrPortFrom(netip.MustParseAddr(pod), 40000),
			Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.AddrPortFrom(eip, port)}
	}
	b1, b2 := binding("10.244.12.10", 51234), binding("10.244.13.10", 51235)
	objs := []runtime.Object{
		node("node1", "198.18.0.11", true, true),
		node("node2", "198.18.0.12", false, true),
		node("node3", "198.18.0.13", false, true),
		ns("team-a", "198.18.0.200"),
	}
	f := newFixture(t, objs...)
	f.members.mu.Lock()
	f.members.handovers = map[netip.Addr]election.Handover{
		eip: {From: "node2", At: f.now(), Payload: dataplane.EncodeBindings(eip, []dataplane.Binding{b1})}}
	f.members.mu.Unlock()
	f.agent.Sync() // a new quorum: the state exchange comes first
	waitFor(t, func() bool {
		f.agent.mu.Lock()
		defer f.agent.mu.Unlock()
		return !f.agent.stateSyncedAt.IsZero()
	})
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	if st := f.kernel.last(); !slices.Equal(st.Handover, []dataplane.Binding{b1}) {
		t.Fatalf("taking %s: handover %v, want %v (egress %+v)", eip, st.Handover, []dataplane.Binding{b1}, st.Egress)
	}
	if err := f.agent.Sync(); err != nil {
		t.Fatal(err)
	}
	if st := f.kernel.last(); len(st.Handover) != 0 {
		t.Errorf("holding %s already: handover %v written again", eip, st.Handover)
	}

	// node3 becomes an egress node: the successor the handover goes to.
	n3 := node("node3", "198.18.0.13", true, true)
	if _, err := f.agent.client.CoreV1().Nodes().Update(context.Background(), n3, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Equal(f.agent.successors(), []string{"node3"}) {
		if time.Now().After(deadline) {
			t.Fatalf("successors %v, want [node3]", f.agent.successors())
		}
		time.Sleep(10 * time.Millisecond)
	}
	sent := func() []sentTo {
		f.members.mu.Lock()
		defer f.members.mu.Unlock()
		return slices.Clone(f.members.sent)
	}
	f.agent.handOver()
	if n := len(sent()); n != 0 {
		t.Fatalf("no bindings to hand over, yet %d handovers sent", n)
	}
	f.kernel.mu.Lock()
	f.kernel.bindings = []dataplane.Binding{b1, b2}
	f.kernel.mu.Unlock()
	f.agent.handOver()
	f.agent.handOver() // unchanged: not sent again
	got := sent()
	if len(got) != 1 || !slices.Equal(got[0].to, []string{"node3"}) || got[0].ip != eip {
		t.Fatalf("handovers sent: %+v, want one of %s to node3", got, eip)
	}
	if ip, bs, err := dataplane.DecodeBindings(got[0].payload); err != nil || ip != eip || !slices.Equal(bs, []dataplane.Binding{b1, b2}) {
		t.Errorf("handover payload: %s %v %v", ip, bs, err)
	}
	f.advance(handoverRefresh)
	f.agent.handOver()
	if n := len(sent()); n != 2 {
		t.Errorf("after %s: %d handovers sent, want the refresh (2)", handoverRefresh, n)
	}
	f.kernel.mu.Lock()
	f.kernel.bindings = nil
	f.kernel.mu.Unlock()
	f.agent.handOver()
	f.advance(handoverRefresh)
	f.agent.handOver()
	got = sent()
	if len(got) != 3 {
		t.Fatalf("bindings gone: %d handovers sent, want one empty one more (3)", len(got))
	}
	if _, bs, err := dataplane.DecodeBindings(got[2].payload); err != nil || len(bs) != 0 {
		t.Errorf("the last handover: %v %v, want empty", bs, err)
	}
}
