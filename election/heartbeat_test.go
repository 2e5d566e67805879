package election

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// simNet runs voters' heartbeats on a simulated clock and network: every node ticks on
// its own clock (which may run a little fast or slow), messages take a random delay and
// are dropped where the test cuts links (one way or both).
type simNet struct {
	t      testing.TB
	now    time.Duration // true time since the start
	nodes  map[string]*simNode
	names  []string
	flight []simMsg
	rng    *rand.Rand
	cut    func(from, to string) bool // true: the packet is lost
	delay  time.Duration              // maximum one-way delay
	timing HeartbeatTiming
}

type simNode struct {
	hb       *heartbeats
	rate     float64 // its clock runs at rate × true time
	nextTick time.Duration
	// frozenUntil: the process is stopped (no ticks, no renewals, nothing read) until
	// then; datagrams wait in its socket.
	frozenUntil time.Duration
}

func (n *simNet) frozen(name string) bool { return n.now < n.nodes[name].frozenUntil }

type simMsg struct {
	at   time.Duration
	to   string
	body []byte
}

var simEpoch = time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC)

func newSimNet(t testing.TB, seed uint64, voters []string, timing HeartbeatTiming) *simNet {
	n := &simNet{t: t, nodes: map[string]*simNode{}, names: voters, rng: rand.New(rand.NewPCG(seed, seed)),
		cut: func(string, string) bool { return false }, delay: 5 * time.Millisecond, timing: timing}
	for _, name := range voters {
		sn := &simNode{rate: 0.98 + 0.04*n.rng.Float64(), nextTick: time.Duration(n.rng.Int64N(int64(timing.Interval)))}
		sn.hb = newHeartbeats(name, timing, func() time.Time {
			return simEpoch.Add(time.Duration(float64(n.now) * sn.rate))
		})
		sn.hb.setVoters(voters, false)
		n.nodes[name] = sn
	}
	return n
}

// run advances true time by d in 1 ms steps, calling each after every step.
func (n *simNet) run(d time.Duration, each func()) {
	for end := n.now + d; n.now < end; {
		n.now += time.Millisecond
		for _, name := range n.names {
			sn := n.nodes[name]
			if n.now < sn.nextTick || n.frozen(name) {
				continue
			}
			sn.nextTick += time.Duration(float64(n.timing.Interval) / sn.rate)
			out, _ := sn.hb.tick()
			for _, o := range out {
				if n.cut(name, o.to) {
					continue
				}
				n.flight = append(n.flight, simMsg{at: n.now + time.Duration(n.rng.Int64N(int64(n.delay)+1)), to: o.to, body: o.msg})
			}
		}
		kept := n.flight[:0]
		for _, m := range n.flight {
			if m.at > n.now || n.frozen(m.to) {
				kept = append(kept, m)
				continue
			}
			if dst, ok := n.nodes[m.to]; ok {
				if err := dst.hb.receive(m.body); err != nil && !errors.Is(err, ErrReplayed) {
					n.t.Fatalf("receive: %v", err)
				}
			}
		}
		n.flight = kept
		if each != nil {
			each()
		}
	}
}

// kernelTime is how much true time d of node name's clock takes (its kernel's lease).
func (n *simNet) kernelTime(name string, d time.Duration) time.Duration {
	return time.Duration(float64(d) / n.nodes[name].rate)
}

func (n *simNet) evidence(name string) Evidence { return n.nodes[name].hb.evidence() }

func testTiming() HeartbeatTiming {
	return NewHeartbeatTiming(40*time.Millisecond, 300*time.Millisecond)
}

func names(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("node%03d", i)
	}
	return out
}

// Heartbeats bring every voter a quorum within a few intervals, and a voter that dies
// is reported down by the others after the silence bound.
func TestHeartbeatsQuorumAndDown(t *testing.T) {
	voters := names(3)
	net := newSimNet(t, 1, voters, testTiming())
	net.run(300*time.Millisecond, nil)
	for _, v := range voters {
		if e := net.evidence(v); !e.Quorum() || len(e.InTouch) != 3 || len(e.Down) != 0 {
			t.Fatalf("%s: quorum %v, in touch %v, down %v", v, e.Quorum(), e.InTouch, e.Down)
		}
	}
	dead := voters[0]
	net.cut = func(from, to string) bool { return from == dead || to == dead }
	var downAt time.Duration
	start := net.now
	net.run(2*time.Second, func() {
		if downAt == 0 && net.evidence(voters[1]).Down[dead] {
			downAt = net.now - start
		}
	})
	if e := net.evidence(voters[1]); !e.Quorum() || !e.Down[dead] || e.Down[voters[2]] || e.QuorumBreaks != 0 {
		t.Fatalf("survivor: quorum %v, down %v, %d quorum breaks", e.Quorum(), e.Down, e.QuorumBreaks)
	}
	if e := net.evidence(dead); e.Quorum() || e.QuorumBreaks != 1 {
		t.Fatalf("the cut-off voter: quorum %v, %d quorum breaks, want none and 1", e.Quorum(), e.QuorumBreaks)
	}
	if downAt < net.timing.Silence*97/100-net.timing.Interval || downAt > net.timing.Silence+3*net.timing.Interval {
		t.Fatalf("down after %s; silence bound %s", downAt, net.timing.Silence)
	}
	t.Logf("voter reported down %s after it was cut off (silence bound %s)", downAt, net.timing.Silence)
}

// twoHolderModel plays one egress IP over simulated heartbeats with the agent's rules: the
// holder renews its lease every lease/4 while its quorum has not broken since the last
// renewal; any other voter takes the IP over once it has a quorum and the voters report
// the holder down. It returns how long two nodes served at once.
func twoHolderModel(t *testing.T, net *simNet, lease time.Duration, faults func(step int)) (overlap time.Duration, takeovers int) {
	holder := net.names[0]
	net.run(time.Second, nil) // everyone in touch
	leaseEnd := map[string]time.Duration{holder: net.now + net.kernelTime(holder, lease)}
	leasedAt := map[string]time.Time{holder: net.evidence(holder).At}
	nextRenew := net.now
	step := 0
	net.run(20*time.Second, func() {
		if net.now%(100*time.Millisecond) == 0 {
			faults(step)
			step++
		}
		if net.now >= nextRenew {
			nextRenew += lease / 4
			for name := range leaseEnd {
				if net.frozen(name) {
					continue
				}
				e := net.evidence(name)
				if e.QuorumNow && e.Quorum() && !e.QuorumSince.After(leasedAt[name]) && e.At.Sub(leasedAt[name]) < lease {
					leasedAt[name], leaseEnd[name] = e.At, net.now+net.kernelTime(name, lease)
				}
			}
		}
		serving := 0
		var current string
		for name, end := range leaseEnd {
			if net.now < end {
				serving++
				current = name
			}
		}
		if serving > 1 {
			overlap += time.Millisecond
		}
		if serving == 1 {
			holder = current
		}
		if net.now%(5*time.Millisecond) != 0 {
			return // a sync every 5 ms at most
		}
		for _, name := range net.names {
			if name == holder || net.frozen(name) {
				continue
			}
			e := net.evidence(name)
			if e.QuorumNow && e.Down[holder] && net.now >= leaseEnd[name] {
				leaseEnd[name], leasedAt[name] = net.now+net.kernelTime(name, lease), e.At
				takeovers++
				holder = name
			}
		}
	})
	return overlap, takeovers
}

// The promise at any size: whatever links fail, one way or both, a holder cut off from
// the voters has stopped serving before any other voter takes its IP over. Random
// partitions (including ones that leave the holder reaching a few voters) on 3, 5, 10
// and 50 voters; clocks that run up to 2 % apart; up to 20 ms delay; 2 % loss.
func TestHeartbeatsNeverTwoHolders(t *testing.T) {
	cases := []struct{ size, seeds int }{{3, 25}, {5, 25}, {10, 25}, {50, 1}}
	if testing.Short() { // the race detector's run: the model has no goroutines to race
		cases = []struct{ size, seeds int }{{3, 3}, {5, 3}, {10, 1}}
	}
	for _, c := range cases {
		takeovers := 0
		for seed := 1; seed <= c.seeds; seed++ {
			overlap, n := partitionModel(t, c.size, uint64(seed), testTiming())
			if overlap != 0 {
				t.Fatalf("%d voters, seed %d: two holders for %s", c.size, seed, overlap)
			}
			takeovers += n
		}
		if takeovers < c.seeds {
			t.Fatalf("%d voters: %d takeovers in %d runs: the faults did not test much", c.size, takeovers, c.seeds)
		}
		t.Logf("%d voters: %d takeovers in %d runs, two holders for 0s", c.size, takeovers, c.seeds)
	}
}

// The same model finds two holders when the silence bound is shorter than the rule
// demands: the test above can fail.
func TestHeartbeatsModelCatchesBrokenBounds(t *testing.T) {
	short := testTiming()
	short.Silence = short.Fresh + 300*time.Millisecond/2
	for what, timing := range map[string]HeartbeatTiming{"a silence shorter than lease + 2W": short} {
		var worst time.Duration
		for seed := uint64(1); seed <= 40 && worst == 0; seed++ {
			overlap, _ := partitionModel(t, 3, seed, timing)
			worst = max(worst, overlap)
		}
		if worst == 0 {
			t.Errorf("no two holders with %s: the model tests nothing", what)
			continue
		}
		t.Logf("with %s: two holders for %s", what, worst)
	}
}

func partitionModel(t *testing.T, size int, seed uint64, timing HeartbeatTiming) (time.Duration, int) {
	net := newSimNet(t, seed, names(size), timing)
	net.delay = 20 * time.Millisecond
	cutOff := map[string]bool{}
	oneWay := false
	faults := func(step int) {
		if step%15 != 0 { // a new fault every 1.5 s
			return
		}
		clear(cutOff)
		switch net.rng.IntN(4) {
		case 0: // heal
		case 1: // a minority, the holder maybe among it
			for _, v := range net.names[:net.rng.IntN(size/2+1)+1] {
				cutOff[v] = true
			}
		default: // any subset
			for _, v := range net.names {
				cutOff[v] = net.rng.IntN(2) == 0
			}
		}
		oneWay = net.rng.IntN(3) == 0
		if net.rng.IntN(2) == 0 { // a process stops for a while (the holder, often)
			victim := net.names[0]
			if net.rng.IntN(2) == 0 {
				victim = net.names[net.rng.IntN(size)]
			}
			net.nodes[victim].frozenUntil = net.now + time.Duration(50+net.rng.IntN(900))*time.Millisecond
		}
	}
	net.cut = func(from, to string) bool {
		if cutOff[from] == cutOff[to] {
			return net.rng.IntN(50) == 0
		}
		return !oneWay || cutOff[from]
	}
	return twoHolderModel(t, net, 300*time.Millisecond, faults)
}

// Recorded heartbeats replayed later prove nothing: a cut-off voter whose old traffic an
// attacker replays to the others is still reported down, and the replays give the
// cut-off voter no quorum either.
func TestHeartbeatsReplayProvesNothing(t *testing.T) {
	voters := names(3)
	net := newSimNet(t, 7, voters, testTiming())
	var recorded [][]byte
	net.run(500*time.Millisecond, func() {
		for _, m := range net.flight {
			if len(recorded) < 200 {
				recorded = append(recorded, m.body)
			}
		}
	})
	victim := voters[0]
	net.cut = func(from, to string) bool { return from == victim || to == victim }
	i := 0
	net.run(3*time.Second, func() {
		for range 2 { // replay faster than the real rate
			m := recorded[i%len(recorded)]
			i++
			for _, name := range voters {
				_ = net.nodes[name].hb.receive(m)
			}
		}
	})
	if e := net.evidence(voters[1]); !e.Down[victim] {
		t.Fatalf("replays kept the cut-off voter up: %v", e.Down)
	}
	if e := net.evidence(victim); e.Quorum() {
		t.Fatal("replays gave the cut-off voter a quorum")
	}
	// A duplicate is refused as such.
	hb := net.nodes[voters[1]].hb
	err := hb.receive(recorded[len(recorded)-1])
	if err != nil && !errors.Is(err, ErrReplayed) {
		t.Fatalf("replay: %v", err)
	}
}

// A voter that restarts (a new boot) is heard again, and a voter's silence counts from
// when it was first watched: nobody is reported silent right after a start.
func TestHeartbeatsRestartAndStart(t *testing.T) {
	voters := names(3)
	net := newSimNet(t, 3, voters, testTiming())
	net.run(100*time.Millisecond, nil)
	if e := net.evidence(voters[0]); len(e.Down) != 0 {
		t.Fatalf("reported down right after the start: %v", e.Down)
	}
	net.run(time.Second, nil)
	old := net.nodes[voters[2]]
	fresh := &simNode{rate: old.rate, nextTick: net.now}
	fresh.hb = newHeartbeats(voters[2], net.timing, old.hb.now)
	fresh.hb.setVoters(voters, false)
	net.nodes[voters[2]] = fresh
	net.run(time.Second, nil)
	for _, v := range voters {
		if e := net.evidence(v); !e.Quorum() || len(e.InTouch) != 3 || len(e.Down) != 0 {
			t.Fatalf("%s after a restart: in touch %v, down %v", v, e.InTouch, e.Down)
		}
	}
}

// Garbage and truncations of a real heartbeat are errors, never panics, and change
// nothing.
func TestHeartbeatWireFormat(t *testing.T) {
	hb := heartbeat{From: "node1", Boot: 7, Seq: 9, Echo: bootSeq{3, 4}, HeardAge: 120 * time.Millisecond, Silent: []string{"node2", "node3"}}
	b, err := hb.encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeHeartbeat(b)
	if err != nil || got.From != hb.From || got.Boot != 7 || got.Seq != 9 || got.Echo != hb.Echo ||
		got.HeardAge != hb.HeardAge || !slices.Equal(got.Silent, hb.Silent) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	h := newHeartbeats("node2", testTiming(), time.Now)
	h.setVoters([]string{"node1", "node2", "node3"}, false)
	for i := range b {
		if _, err := decodeHeartbeat(b[:i]); !errors.Is(err, ErrBadHeartbeat) {
			t.Fatalf("truncated to %d bytes: %v", i, err)
		}
		if err := h.receive(b[:i]); err == nil {
			t.Fatalf("took a heartbeat truncated to %d bytes", i)
		}
	}
	if _, err := decodeHeartbeat(append(b, 0)); !errors.Is(err, ErrBadHeartbeat) {
		t.Fatal("took trailing garbage")
	}
	if e := h.evidence(); len(e.InTouch) != 1 || len(e.Down) != 0 {
		t.Fatalf("garbage changed the evidence: %+v", e)
	}
}

// A new egress node (one more voter) does not break the quorum of those that hold IPs.
func TestHeartbeatsNewVoterKeepsTheQuorum(t *testing.T) {
	voters := names(4)
	net := newSimNet(t, 5, voters, testTiming())
	for _, v := range voters[:3] {
		net.nodes[v].hb.setVoters(voters[:3], false)
	}
	net.nodes[voters[3]].hb.setVoters(voters, false)
	net.run(time.Second, nil)
	since := net.evidence(voters[0]).QuorumSince
	for _, v := range voters {
		net.nodes[v].hb.setVoters(voters, false)
	}
	net.run(time.Second, nil)
	e := net.evidence(voters[0])
	if !e.QuorumNow || !e.QuorumSince.Equal(since) || len(e.InTouch) != 4 {
		t.Fatalf("after a voter was added: quorum since %s (was %s), in touch %v", e.QuorumSince, since, e.InTouch)
	}
}
