package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Down removes everything the lab in dir made: its processes (by PID, only those it
// started), network namespaces, the host link, and its files.
func Down(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	l, err := loadLedger(dir)
	if err != nil {
		return err
	}
	// The real-node mode first: its kubelets would restart what is stopped below.
	errs := downRealNodes(l)
	// natd restarts and pods change the topology after up; take its PIDs too.
	pids := append([]proc(nil), l.Pids...)
	if t, err := LoadTopology(dir); err == nil {
		for _, n := range t.Nodes {
			pids = append(pids, proc{Pid: n.NatdPid, Binary: t.API.NatdBinary})
		}
		for _, p := range t.Pods {
			l.Netns = appendUnique(l.Netns, p.Netns)
		}
	}
	for _, p := range pids {
		if err := stopProcess(p); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(l.Netns) - 1; i >= 0; i-- {
		ns := l.Netns[i]
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if _, err := Run("ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	for _, link := range l.HostLinks {
		if _, err := os.Stat(filepath.Join("/sys/class/net", link)); err == nil {
			if _, err := Run("ip", "link", "del", link); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err // keep the ledger so that down can be run again
	}
	if l.CreatedDir {
		return os.RemoveAll(dir)
	}
	for _, name := range []string{"pki", "etcd", "topology.json", "lab-ledger.json", "kubeconfig", "partner.log",
		"etcd.log", "kube-apiserver.log", "gossip.key", ".lock", "nodes", "kube-controller-manager.log",
		"kube-scheduler.log", "natd-daemonset.yaml", "bird.conf", "bird.log", "bird.ctl", "bird.pid"} {
		os.RemoveAll(filepath.Join(dir, name))
	}
	for _, pattern := range []string{"natd-*.log", "kube-proxy-*.log", "*.kubeconfig", "state-*", "containerd-*.log", "kubelet-*.log"} {
		m, _ := filepath.Glob(filepath.Join(dir, pattern))
		for _, f := range m {
			os.RemoveAll(f)
		}
	}
	for _, p := range l.Paths {
		// Only what lies inside the lab directory.
		if rel, err := filepath.Rel(dir, p); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			os.RemoveAll(p)
		}
	}
	return nil
}

func appendUnique(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// stopProcess ends p if it is still the process the lab started (the PID may have been
// reused): SIGTERM, then SIGKILL after 5 s.
func stopProcess(p proc) error {
	if !Alive(p.Pid) || !isBinary(p.Pid, p.Binary) {
		return nil
	}
	if err := syscall.Kill(p.Pid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stopping %d: %w", p.Pid, err)
	}
	for i := 0; i < 50; i++ {
		if !Alive(p.Pid) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := syscall.Kill(p.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("killing %d: %w", p.Pid, err)
	}
	for i := 0; i < 50 && Alive(p.Pid); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

func isBinary(pid int, bin string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	// Either the binary itself or `ip netns exec NS binary` before it execs.
	for _, a := range args {
		if a == bin {
			return true
		}
	}
	return false
}

// StopNatd ends the natd of node n (SIGTERM, then SIGKILL). In the real-node mode the
// kubelet starts it again.
func StopNatd(t *Topology, n *Node) error {
	p, err := natdProcess(t, n.Name)
	if err != nil {
		return nil // not running
	}
	return stopProcess(p)
}

// RestartNatd (re)starts natd on a node, after a crash, a kill, or while it runs.
func RestartNatd(dir, node string, extra []string) (*Topology, error) {
	var t *Topology
	err := withLock(dir, func() error {
		var err error
		t, err = restartNatd(dir, node, extra)
		return err
	})
	return t, err
}

func restartNatd(dir, node string, extra []string) (*Topology, error) {
	t, err := LoadTopology(dir)
	if err != nil {
		return nil, err
	}
	n, err := t.Node(node)
	if err != nil {
		return nil, err
	}
	if t.Kubelet {
		// As a user restarts it: delete the pod, the DaemonSet makes the next one.
		if len(extra) > 0 {
			return nil, fmt.Errorf("the real-node lab runs natd with the DaemonSet's flags only")
		}
		return t, restartNatdPod(context.Background(), t, node)
	}
	if err := StopNatd(t, n); err != nil {
		return nil, err
	}
	if n.NatdPid, err = StartNatd(dir, t, n, extra); err != nil {
		return nil, err
	}
	return t, t.Save(dir)
}
