package election

import (
	"crypto/rand"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

var loopback = netip.MustParseAddr("127.0.0.1")

// testGossip starts a member on a free loopback port.
func testGossip(t testing.TB, name string, key []byte) *Gossip {
	t.Helper()
	g, err := NewGossip(GossipConfig{NodeName: name, BindIP: loopback, Port: 0, Key: key,
		ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 50 * time.Millisecond, SuspicionMult: 3})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Shutdown() })
	return g
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestGossipSpreadsClaimsAndDetectsFailure(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	a := testGossip(t, "a", key)
	b := testGossip(t, "b", key)
	c := testGossip(t, "c", key)
	for _, g := range []*Gossip{b, c} {
		if _, err := g.Join([]string{PeerAddr(loopback, a.Port())}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "three members", func() bool { return len(a.View().Members) == 3 && len(c.View().Members) == 3 })

	if err := b.SetLocal(Meta{Claims: []Claim{{IP: ipA, Gen: 2}}}, time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b's claim at c", func() bool {
		m := c.View().Members["b"]
		return len(m.Meta.Claims) == 1 && m.Meta.Claims[0] == Claim{IP: ipA, Gen: 2}
	})

	start := time.Now()
	b.Shutdown() // a crash: no goodbye
	waitFor(t, "b declared dead", func() bool { return !a.View().Alive("b") && !c.View().Alive("b") })
	t.Logf("failure detected after %s", time.Since(start).Round(time.Millisecond))
	if m := c.View().Members["b"]; len(m.Meta.Claims) != 1 {
		t.Errorf("a dead member's last claims are lost: %+v", m)
	}
}

func TestGossipRestartGrace(t *testing.T) {
	a := testGossip(t, "a", nil)
	b := testGossip(t, "b", nil)
	if _, err := b.Join([]string{PeerAddr(loopback, a.Port())}); err != nil {
		t.Fatal(err)
	}
	if err := b.SetLocal(Meta{RestartGrace: 2 * time.Second, Claims: []Claim{{IP: ipA, Gen: 1}}}, time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b's grace at a", func() bool { return a.View().Members["b"].Meta.RestartGrace == 2*time.Second })
	b.Shutdown()
	waitFor(t, "b down", func() bool { return !a.View().Alive("b") })
	if !a.View().InGrace("b") {
		t.Fatal("b is not in its restart grace right after going down")
	}
	waitFor(t, "grace over", func() bool { return !a.View().InGrace("b") })
}

func TestGossipRejectsPeerWithoutKey(t *testing.T) {
	key := make([]byte, 16)
	rand.Read(key)
	a := testGossip(t, "a", key)
	intruder := testGossip(t, "intruder", nil)
	if _, err := intruder.Join([]string{PeerAddr(loopback, a.Port())}); err == nil {
		t.Error("a peer without the key joined")
	}
	other := make([]byte, 16)
	rand.Read(other)
	wrong := testGossip(t, "wrong", other)
	if _, err := wrong.Join([]string{PeerAddr(loopback, a.Port())}); err == nil {
		t.Error("a peer with another key joined")
	}
	time.Sleep(300 * time.Millisecond)
	if n := len(a.View().Members); n != 1 {
		t.Fatalf("members at a: %v, want only a", a.View().Members)
	}
}

// BenchmarkDetection measures how long the cluster takes to declare a crashed member
// dead, with n members simulated in this process on loopback.
func BenchmarkDetection(b *testing.B) {
	for _, n := range []int{50, 200} {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			var gs []*Gossip
			for i := 0; i < n; i++ {
				gs = append(gs, testGossip(b, fmt.Sprintf("m%d", i), nil))
			}
			for _, g := range gs[1:] {
				if _, err := g.Join([]string{PeerAddr(loopback, gs[0].Port())}); err != nil {
					b.Fatal(err)
				}
			}
			deadline := time.Now().Add(30 * time.Second)
			for len(gs[0].View().Members) < n || len(gs[n-1].View().Members) < n {
				if time.Now().After(deadline) {
					b.Fatal("cluster did not converge")
				}
				time.Sleep(50 * time.Millisecond)
			}
			victim := n - 1
			var total time.Duration
			for b.Loop() {
				// Crash one member and time until an observer declares it dead.
				name := fmt.Sprintf("m%d", victim)
				start := time.Now()
				gs[victim].Shutdown()
				for gs[0].View().Alive(name) {
					if time.Since(start) > 30*time.Second {
						b.Fatal("crash not detected")
					}
					time.Sleep(5 * time.Millisecond)
				}
				total += time.Since(start)
				victim--
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/detection")
		})
	}
}
