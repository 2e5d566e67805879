package natd

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/cache"

	"natd.dev/natd/natd/dataplane"
)

// benchCluster is 100 nodes and n pods in 10 pinned namespaces over 5 egress IPs.
func benchCluster(n int) ([]*corev1.Node, []*corev1.Namespace, []*corev1.Pod) {
	var nodes []*corev1.Node
	var namespaces []*corev1.Namespace
	var pods []*corev1.Pod
	for i := 1; i <= 100; i++ {
		nodes = append(nodes, node(fmt.Sprintf("node%d", i), fmt.Sprintf("198.18.0.%d", 10+i), i <= 5, true))
	}
	for i := 0; i < 10; i++ {
		namespaces = append(namespaces, ns(fmt.Sprintf("team-%d", i), fmt.Sprintf("198.18.0.%d", 200+i%5)))
	}
	for i := 0; i < n; i++ {
		ip := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		pods = append(pods, pod(fmt.Sprintf("team-%d", i%10), fmt.Sprintf("pod-%d", i),
			fmt.Sprintf("node%d", 1+i%100), ip.String()))
	}
	return nodes, namespaces, pods
}

func benchClusterOf(n int) Cluster {
	nodes, namespaces, pods := benchCluster(n)
	return clusterOf(nodes, namespaces, pods, "node1")
}

// syncOnce is one agent sync: plan the node, apply it.
func syncOnce(b *testing.B, p *Planner, c Cluster, d *dataplane.Dataplane) dataplane.Result {
	b.Helper()
	plan, err := p.Plan(c, benchElection())
	if err != nil {
		b.Fatal(err)
	}
	res, err := d.Apply(plan.State)
	if err != nil {
		b.Fatal(err)
	}
	return res
}

func benchElection() Election {
	var alive []string
	for i := 1; i <= 100; i++ {
		alive = append(alive, fmt.Sprintf("node%d", i))
	}
	return elect("node1", alive...)
}

func benchConfig() *Config {
	cfg := testConfig("node1")
	cfg.ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	return cfg
}

// benchNetns makes a fresh network namespace with the node's uplink.
func benchNetns(b *testing.B) *netns.NsHandle {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	name := fmt.Sprintf("natd-bench-%d", os.Getpid())
	for _, args := range [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0"},
		{"-n", name, "link", "set", "uplink0", "up"},
		{"-n", name, "addr", "add", "198.18.0.11/24", "dev", "uplink0"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			b.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	b.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	h, err := netns.GetFromName(name)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	return &h
}

func benchDataplane(b *testing.B, h *netns.NsHandle) *dataplane.Dataplane {
	marks, _ := dataplane.NewMarks(0x00ff0000)
	d, err := dataplane.New(dataplane.Config{Marks: marks, RulePriority: 7000, TableBase: 7100, NetNS: h,
		EgressCIDRs: benchConfig().EgressCIDRs, StateDir: b.TempDir(), VerifyEvery: time.Second, TunnelPort: 4799})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(d.Close)
	return d
}

// BenchmarkSyncFull: plan the node from the listers' content and replace natd's table
// in the kernel, as the first sync after a start does.
func BenchmarkSyncFull(b *testing.B) {
	for _, n := range []int{1000, 10000, 50000} {
		b.Run(fmt.Sprintf("pods=%d", n), func(b *testing.B) {
			h := benchNetns(b)
			c := benchClusterOf(n)
			p := &Planner{Config: benchConfig()}
			for b.Loop() {
				b.StopTimer()
				// No tables in the kernel (a fresh node): a full build.
				d := benchDataplane(b, h)
				if err := d.Cleanup(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if res := syncOnce(b, p, c, d); !res.Rebuilt {
					b.Fatal("expected a rebuild")
				}
				d.Close()
			}
		})
	}
}

// BenchmarkSyncOnePodAdded: one pod joins a pinned namespace among 50k pinned pods.
func BenchmarkSyncOnePodAdded(b *testing.B) {
	h := benchNetns(b)
	nodes, namespaces, pods := benchCluster(50000)
	c := clusterOf(nodes, namespaces, pods, "node1")
	team1 := c.PodsIn("team-1")
	current := team1
	others := c.PodsIn
	c.PodsIn = func(ns string) []*podRecord {
		if ns == "team-1" {
			return current
		}
		return others(ns)
	}
	p := &Planner{Config: benchConfig()}
	d := benchDataplane(b, h)
	syncOnce(b, p, c, d) // the first sync builds the table
	o, _ := recordOf(pod("team-1", "extra", "node1", "10.200.0.1"))
	extra := o.(*podRecord)
	i := 0
	for b.Loop() {
		// Alternate adding and removing the pod so each iteration is one change.
		if i%2 == 0 {
			current = append(team1[:len(team1):len(team1)], extra)
		} else {
			current = team1
		}
		i++
		if res := syncOnce(b, p, c, d); res.Rebuilt {
			b.Fatal("one pod caused a rebuild")
		}
	}
}

// BenchmarkAgentMemory50k reports the heap the agent keeps for 50k pods: the informer
// store (slimmed by the transform, as the agent's informers do) and the desired state.
func BenchmarkAgentMemory50k(b *testing.B) {
	for b.Loop() {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		nodes, namespaces, pods := benchCluster(50000)
		store := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
		for _, p := range pods {
			// What the API delivers carries much more; the transform keeps this much.
			full := p.DeepCopy()
			full.Spec.Containers = []corev1.Container{{Name: "app", Image: "registry.example/app:v1"}}
			rec, _ := recordOf(full)
			if err := store.Add(rec); err != nil {
				b.Fatal(err)
			}
		}
		byNS := map[string][]*podRecord{}
		for _, o := range store.List() {
			r := o.(*podRecord)
			byNS[r.Namespace] = append(byNS[r.Namespace], r)
		}
		c := Cluster{Nodes: nodes, Namespaces: namespaces, PodsIn: func(ns string) []*podRecord { return byNS[ns] }}
		plan, err := (&Planner{Config: benchConfig()}).Plan(c, benchElection())
		if err != nil {
			b.Fatal(err)
		}
		rs := dataplane.BuildRuleset(plan.State, nil, mustMarks(), map[netip.Addr]int{}, time.Second, 7946, 4799)
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MiB-retained")
		runtime.KeepAlive(store)
		runtime.KeepAlive(plan)
		runtime.KeepAlive(rs)
	}
}

func mustMarks() dataplane.Marks {
	m, _ := dataplane.NewMarks(0x00ff0000)
	return m
}
