package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A gossip key rotation while a pinned pod streams through the holder, done as the
// README says: the new key added to the key file (second line), then made primary
// (first line), then the old one removed. Every natd follows within seconds, the IP
// does not move, and the partner loses no datagram.
func TestGossipKeyRotationLosesNothing(t *testing.T) {
	const ip = "198.18.0.237"
	waitGossipHealthy(t)
	p := newPod(t, "keys", "app", "node1")
	annotate(t, "keys", ip)
	t.Cleanup(func() { annotate(t, "keys", "") })
	waitSeen(t, p, tcp, ip)
	before := waitServedBy(t, ip, 10*time.Second)

	keyFile := filepath.Join(labDir, "gossip.key")
	b, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	oldKey := strings.TrimSpace(string(b))
	raw := make([]byte, 32)
	rand.Read(raw)
	newKey := base64.StdEncoding.EncodeToString(raw)

	s := startStream(t, p, fmt.Sprintf("keys-%d", time.Now().UnixNano()))
	start := time.Now()
	twice := watchTwoServers(t, ip, true)
	for _, step := range []struct {
		file    string
		keys    int
		primary string
	}{
		{oldKey + "\n" + newKey + "\n", 2, oldKey},
		{newKey + "\n" + oldKey + "\n", 2, newKey},
		{newKey + "\n", 1, newKey},
	} {
		if err := os.WriteFile(keyFile, []byte(step.file), 0o600); err != nil {
			t.Fatal(err)
		}
		want := []string{fmt.Sprintf("natd_gossip_keys %d", step.keys),
			fmt.Sprintf("natd_gossip_primary_key{fingerprint=%q} 1", fingerprint(t, step.primary))}
		waitAllMetrics(t, want, 15*time.Second)
		time.Sleep(time.Second) // every node sends with the new primary a while
	}
	time.Sleep(time.Second)
	s.halt()
	o := s.outcome(t, ip, start)
	if samples := twice(); len(samples) > 0 {
		t.Errorf("two nodes served %s during the rotation: %v", ip, samples[0])
	}
	if o.lost != 0 || o.leaked != 0 || o.sent == 0 {
		t.Errorf("rotation: %d of %d datagrams lost, %d leaked", o.lost, o.sent, o.leaked)
	}
	if after := waitServedBy(t, ip, 5*time.Second); after != before {
		t.Errorf("the rotation moved %s from %s to %s", ip, before, after)
	}
	t.Logf("rotation in %s: %d datagrams, %d lost, %d leaked, %s stayed on %s",
		time.Since(start).Round(time.Millisecond), o.sent, o.lost, o.leaked, ip, before)
}

func fingerprint(t *testing.T, key string) string {
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:4])
}

// waitAllMetrics waits until every node's /metrics shows every line of want.
func waitAllMetrics(t *testing.T, want []string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(200 * time.Millisecond) {
		missing := ""
		for _, n := range topo.Nodes {
			m := metrics(n.Netns)
			for _, w := range want {
				if !strings.Contains(m, w) {
					missing = n.Name + ": " + w
				}
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("natd did not follow the key file: %s", missing)
		}
	}
}
