package natd

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/connrotation"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/bgp"
	"natd.dev/natd/natd/client/clientset/versioned"
	"natd.dev/natd/natd/cniplugin"
	"natd.dev/natd/natd/dataplane"
)

func dataplaneConfig(cfg *Config) (dataplane.Config, error) {
	marks, err := dataplane.NewMarks(cfg.FwmarkMask)
	if err != nil {
		return dataplane.Config{}, err
	}
	return dataplane.Config{Marks: marks, RulePriority: cfg.RulePriority, TableBase: cfg.TableBase,
		EgressCIDRs: cfg.EgressCIDRs, StateDir: cfg.StateDir, Lease: cfg.Lease, LeaseCommitSlack: cfg.HeartbeatInterval, VerifyEvery: time.Second,
		GossipPort: uint16(cfg.GossipPort),
		TunnelPort: uint16(cfg.TunnelPort),
		// Repeats reach neighbours that ignored the first announcement (Linux ignores
		// an ARP update within neigh locktime, 1 s, of the previous one) or lost it.
		Announce: []time.Duration{250 * time.Millisecond, 1100 * time.Millisecond, 2500 * time.Millisecond, 5 * time.Second}}, nil
}

// Setup builds the agent from its configuration: API client, kernel programmer,
// holder election, Event recorder and metrics.
func Setup(ctx context.Context, cfg *Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := setNiceness(cfg.Nice); err != nil {
		klog.InfoS("Could not raise natd's scheduling priority; on saturated CPUs its heartbeats may be late", "nice", cfg.Nice, "err", err)
	}
	if err := setRealtime(cfg.RealtimePriority); err != nil {
		klog.InfoS("Could not make natd's threads real-time; on saturated CPUs its heartbeats may be late", "realtimePriority", cfg.RealtimePriority, "err", err)
	}
	dcfg, err := dataplaneConfig(cfg)
	if err != nil {
		return nil, err
	}
	var rc *rest.Config
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("loading API client config: %w", err)
	}
	rc.UserAgent = "natd/" + cfg.NodeName
	// Connections that can be dropped at once when natd was cut off (the agent's
	// reconnectAPI), as the kubelet does when its heartbeats fail.
	dialer := connrotation.NewDialer((&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext)
	rc.Dial = dialer.DialContext
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("creating API client: %w", err)
	}
	egress, err := versioned.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("creating EgressIP client: %w", err)
	}
	dp, err := dataplane.New(dcfg)
	if err != nil {
		return nil, err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartStructuredLogging(2)
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "natd", Host: cfg.NodeName})
	keys, err := gossipKeys(cfg)
	if err != nil {
		return nil, err
	}
	boot := bootStamp(cfg.StateDir)
	newMembership := func(nodeIP netip.Addr) (Membership, error) {
		gc := cfg.Gossip(nodeIP, keys)
		gc.Boot = boot
		return election.NewGossip(gc)
	}
	metrics := NewMetrics()
	metrics.ExportCounters(dp.Counters)
	klog.InfoS("Starting natd", "version", Version, "revision", Revision(), "node", cfg.NodeName, "egressCIDRs", cfg.EgressCIDRs, "failOpen", cfg.FailOpen,
		"encryptedGossip", keys != nil, "gossipKeys", len(keys), "lease", cfg.Lease, "heartbeatInterval", cfg.HeartbeatInterval, "silence", cfg.Heartbeat().Silence)
	var kernel Kernel = dp
	if len(cfg.BGPPeers) > 0 {
		kernel = &announcingKernel{Kernel: dp, lease: cfg.Lease, now: time.Now,
			start: func(nodeIP, nodeIP6 netip.Addr) (announcer, error) {
				return bgp.Start(ctx, bgp.Config{ASN: cfg.BGPASN, NodeIP: nodeIP, NodeIP6: nodeIP6, Peers: cfg.BGPPeers,
					HoldTime: cfg.BGPHoldTime, RestartTime: cfg.RestartGrace})
			}}
	}
	agent := NewAgent(cfg, client, egress, kernel, newMembership, recorder, metrics)
	agent.reconnectAPI = dialer.CloseAll
	return agent, nil
}

// gossipKeys reads the keys in --gossip-key-file: one base64 key per line (16, 24 or 32
// bytes), the first one primary; blank lines and lines starting with # are skipped.
// nil with --insecure-gossip.
func gossipKeys(cfg *Config) ([][]byte, error) {
	if cfg.GossipKeyFile == "" {
		return nil, nil // Validate allowed it: --insecure-gossip
	}
	b, err := os.ReadFile(cfg.GossipKeyFile)
	if err != nil {
		return nil, fmt.Errorf("reading --gossip-key-file: %w", err)
	}
	var keys [][]byte
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("--gossip-key-file %s, line %d: not base64: %w", cfg.GossipKeyFile, i+1, err)
		}
		if n := len(key); n != 16 && n != 24 && n != 32 {
			return nil, fmt.Errorf("--gossip-key-file %s, line %d: a %d-byte key; it must be 16, 24 or 32 bytes", cfg.GossipKeyFile, i+1, n)
		}
		if !slices.ContainsFunc(keys, func(k []byte) bool { return bytes.Equal(k, key) }) {
			keys = append(keys, key)
		}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("--gossip-key-file %s holds no key", cfg.GossipKeyFile)
	}
	return keys, nil
}

// bootStamp orders this natd's gossip metadata after its previous lives' on this node:
// the clock now, but never at or below the last start's (kept in the state dir), even
// if the clock went back.
func bootStamp(stateDir string) uint64 {
	boot := uint64(time.Now().UnixNano())
	file := filepath.Join(stateDir, "boot")
	if b, err := os.ReadFile(file); err == nil {
		var last uint64
		if _, err := fmt.Sscan(string(b), &last); err == nil && last >= boot {
			boot = last + 1
		}
	}
	err := os.MkdirAll(stateDir, 0o755)
	if err == nil {
		err = os.WriteFile(file, []byte(fmt.Sprint(boot)), 0o644)
	}
	if err != nil {
		klog.InfoS("Cannot keep the boot stamp; a clock that goes back could hide this node's claims", "err", err)
	}
	return boot
}

// keyFingerprint names a key in logs and metrics without revealing it.
func keyFingerprint(key []byte) string {
	sum := sha256.Sum256(key)
	return hex.EncodeToString(sum[:4])
}

// GenerateKey returns a new gossip key, base64-encoded, for --gossip-key-file.
func GenerateKey() (string, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(key), nil
}

// CNIInstaller is how natd-cni is chained on this node; ok is false when natd does not
// manage the CNI chain (--cni-conf-dir empty).
func (c *Config) CNIInstaller() (in cniplugin.Installer, ok bool) {
	if c.CNIConfDir == "" {
		return in, false
	}
	src := c.CNIPlugin
	if src == "" {
		if exe, err := os.Executable(); err == nil {
			src = filepath.Join(filepath.Dir(exe), cniplugin.PluginType)
		}
	}
	return cniplugin.Installer{BinDir: c.CNIBinDir, ConfDir: c.CNIConfDir, Source: src, StateDir: c.StateDir}, true
}

// Cleanup removes everything natd put into this node: the CNI chain entry first (new
// pods stop being classified), then its kernel state.
func Cleanup(cfg *Config) error {
	if in, ok := cfg.CNIInstaller(); ok {
		if err := in.Remove(); err != nil {
			return err
		}
	}
	dcfg, err := dataplaneConfig(cfg)
	if err != nil {
		return err
	}
	dp, err := dataplane.New(dcfg)
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := dp.Cleanup(); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(cfg.StateDir, "boot")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	klog.InfoS("Removed natd's kernel state")
	return nil
}

// setNiceness gives every thread of natd the niceness nice (0: leaves it). Linux keeps
// niceness per thread and a new thread inherits its creator's, so the threads the Go
// runtime has started so far are set one by one and the ones it starts later follow.
// Niceness orders natd against the tasks of its own scheduling group only (its
// container's cgroup, or its session's autogroup): against workloads in other groups
// it is the groups' weights that count, which is why --realtime-priority exists.
func setNiceness(nice int) error {
	if nice == 0 {
		return nil
	}
	return eachThread(func(tid int) error {
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil {
			return fmt.Errorf("setting thread %d's niceness to %d: %w", tid, nice, err)
		}
		return nil
	})
}

// setRealtime puts every thread of natd in the round-robin real-time class at
// priority prio (0: leaves them in the normal class). A holder that is not scheduled
// for a lease gives its IPs up, and on a node whose CPUs a workload saturates, natd's
// process is in a different scheduling group from the workload, where its niceness
// does not reach: the lab's soak saw goroutines of natd wait 80 ms to run during a
// garbage collection, and the holder's quorum break. A real-time thread runs as soon
// as it wakes, whatever the groups (corosync runs its heartbeats so, at priority 99).
// natd's threads sleep almost all the time (a few per cent of one CPU); the kernel's
// real-time throttling (sched_rt_runtime_us) bounds what a runaway could take.
func setRealtime(prio int) error {
	if prio == 0 {
		return nil
	}
	return eachThread(func(tid int) error {
		attr := unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_RR, Priority: uint32(prio)}
		if err := unix.SchedSetAttr(tid, &attr, 0); err != nil {
			return fmt.Errorf("making thread %d real-time (round robin, priority %d): %w", tid, prio, err)
		}
		return nil
	})
}

// eachThread calls f for each of natd's threads so far; a thread the Go runtime starts
// later inherits its creator's scheduling.
func eachThread(f func(tid int) error) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("listing natd's threads: %w", err)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := f(tid); err != nil {
			return err
		}
	}
	return nil
}
