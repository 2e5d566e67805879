package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"natd.dev/natd/manifests"
)

// The real-node mode (natd-lab up --kubelet): every node runs containerd and runc from
// Debian, a kubelet built from the Go module proxy, and natd as the manifests'
// DaemonSet in a container; pods are made by the kubelet through the CRI and the CNI.
//
// All nodes share the host's file system, while a DaemonSet's hostPath volumes and the
// kubelet and containerd use fixed paths (/etc/cni/net.d, /var/lib/kubelet, ...). Each
// node's containerd and kubelet therefore run in a mount namespace of their own (and
// the node's network namespace), in which the node's directory under DIR/nodes is
// bind-mounted over each of those paths: the host sees none of it, and a container's
// hostPath of one node is that node's alone. Their cgroups live under /natd-lab/NODE.
const (
	// PauseImage is containerd's sandbox image and the lab pods' one container.
	PauseImage = "natd.dev/lab-pause:1"
	// natdInImage is natd's path in its image (the image's entrypoint).
	natdInImage   = "/usr/local/bin/natd"
	kubeletHealth = "127.0.0.1:10248"
	cgroupParent  = "natd-lab"
	natdDaemonSet = "natd"
)

// shadowedPaths are the host paths each real node gets its own copy of.
var shadowedPaths = []string{"/etc/cni/net.d", "/opt/cni/bin", "/run/natd", "/var/lib/cni", "/var/lib/kubelet",
	"/var/log/pods", "/var/log/containers"}

// kubeletSysctls are the global settings the kubelet changes at start (its kernel
// defaults); down puts the values from before up back.
var kubeletSysctls = []string{"vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
	"kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes"}

// NodeDir is where node's own files live in the real-node mode.
func NodeDir(dir, node string) string { return filepath.Join(dir, "nodes", node) }

// ShadowPath is the directory the node's containers see at hostPath.
func ShadowPath(dir, node, hostPath string) string {
	return filepath.Join(NodeDir(dir, node), "fs", hostPath)
}

func containerdSocket(dir, node string) string {
	return filepath.Join(NodeDir(dir, node), "containerd", "containerd.sock")
}

// checkRealNodeTools fails early, with what to install, when the real-node mode lacks
// something.
func checkRealNodeTools(o Options) error {
	var missing []string
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr", "unshare", "nsenter"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	for _, f := range []string{o.NatdImage, o.PauseImage, filepath.Join(o.KubeBins, "kubelet"),
		filepath.Join(o.KubeBins, "kube-controller-manager"), filepath.Join(o.KubeBins, "kube-scheduler")} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("--kubelet needs %s (scripts/install-deps.sh installs containerd and runc; make image kube-bins builds the rest)",
			strings.Join(missing, ", "))
	}
	return nil
}

// realNodeCredentials issues each kubelet's client certificate (system:node:NAME in
// system:nodes, which the Node authorizer grants what a kubelet needs) and the
// controllers' kubeconfig.
func (u *upper) realNodeCredentials(t *Topology) error {
	for _, n := range t.Nodes {
		cert, key, err := u.pki.issue("kubelet-"+n.Name, "system:node:"+n.Name, []string{"system:nodes"}, nil, nil)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(NodeDir(u.dir, n.Name), 0o755); err != nil {
			return err
		}
		if err := writeKubeconfig(filepath.Join(NodeDir(u.dir, n.Name), "kubelet.kubeconfig"), "https://"+apiNodeIP+":6443",
			u.pki.caPEM, &clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}); err != nil {
			return err
		}
	}
	return nil
}

// controllers starts kube-controller-manager (default ServiceAccounts and their
// root CA, the DaemonSet controller, node lifecycle) and kube-scheduler beside the API
// server.
func (u *upper) controllers(t *Topology) error {
	pki := filepath.Join(u.dir, "pki")
	cm := filepath.Join(u.o.KubeBins, "kube-controller-manager")
	pid, err := u.start(nsAPI, cm, filepath.Join(u.dir, "kube-controller-manager.log"),
		"--kubeconfig", t.Kubeconfig, "--authentication-kubeconfig", t.Kubeconfig, "--authorization-kubeconfig", t.Kubeconfig,
		"--leader-elect=false", "--bind-address", "127.0.0.1",
		"--service-account-private-key-file", filepath.Join(pki, "sa.key"), "--root-ca-file", filepath.Join(pki, "ca.crt"),
		"--use-service-account-credentials=false")
	if err != nil {
		return err
	}
	t.API.ControllerManagerPid = pid
	sched := filepath.Join(u.o.KubeBins, "kube-scheduler")
	pid, err = u.start(nsAPI, sched, filepath.Join(u.dir, "kube-scheduler.log"),
		"--kubeconfig", t.Kubeconfig, "--authentication-kubeconfig", t.Kubeconfig, "--authorization-kubeconfig", t.Kubeconfig,
		"--leader-elect=false", "--bind-address", "127.0.0.1")
	if err != nil {
		return err
	}
	t.API.SchedulerPid = pid
	return nil
}

// realNodeCNI writes node n's conflist into its /etc/cni/net.d (bridge and host-local
// only: natd's DaemonSet chains natd-cni onto it, as it does on any node) and fills its
// /opt/cni/bin with the Debian plugins.
func (u *upper) realNodeCNI(t *Topology, n *Node) error {
	conf, err := nodeConfList(u.dir, n, nil)
	if err != nil {
		return err
	}
	confDir, binDir := ShadowPath(u.dir, n.Name, "/etc/cni/net.d"), ShadowPath(u.dir, n.Name, "/opt/cni/bin")
	for _, d := range []string{confDir, binDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	n.CNIConfList = filepath.Join(confDir, "10-natd-lab.conflist")
	if err := os.WriteFile(n.CNIConfList, conf, 0o644); err != nil {
		return err
	}
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if err := os.Symlink(filepath.Join(SystemCNIBinDir, p), filepath.Join(binDir, p)); err != nil {
			return err
		}
	}
	return nil
}

// realNodes makes every node a Kubernetes node and installs natd's DaemonSet.
func (u *upper) realNodes(ctx context.Context, client kubernetes.Interface, t *Topology) error {
	if err := u.saveKubeletSysctls(); err != nil {
		return err
	}
	for _, p := range shadowedPaths {
		if err := u.mountPoint(p); err != nil {
			return err
		}
	}
	start := time.Now()
	for i := range t.Nodes {
		n := &t.Nodes[i]
		n.NatdLog = ShadowPath(u.dir, n.Name, "/var/log/pods") // natd's container logs, below
		if err := u.cgroups(n.Name); err != nil {
			return err
		}
		for _, p := range shadowedPaths {
			if err := os.MkdirAll(ShadowPath(u.dir, n.Name, p), 0o755); err != nil {
				return err
			}
		}
		if err := u.startContainerd(n); err != nil {
			return err
		}
	}
	for i := range t.Nodes {
		n := &t.Nodes[i]
		if err := waitFile(n.ContainerdSocket, 30*time.Second); err != nil {
			return fmt.Errorf("containerd on %s: %w; see %s", n.Name, err, n.ContainerdLog)
		}
		for _, img := range []string{u.o.PauseImage, u.o.NatdImage} {
			if out, err := Run("ctr", "--address", n.ContainerdSocket, "--namespace", "k8s.io", "images", "import", img); err != nil {
				return fmt.Errorf("importing %s on %s: %w\n%s", img, n.Name, err, out)
			}
		}
		if err := u.startKubelet(t, n); err != nil {
			return err
		}
	}
	if err := t.Save(u.dir); err != nil {
		return err
	}
	if err := waitNodesReady(ctx, client, t, 90*time.Second); err != nil {
		return err
	}
	u.say("%d kubelets registered and Ready %.1fs after containerd started", len(t.Nodes), time.Since(start).Seconds())
	for i := range t.Nodes {
		if err := snapshotNode(u.dir, &t.Nodes[i]); err != nil {
			return err
		}
	}
	dsStart := time.Now()
	if err := InstallNatd(ctx, t, u.dir); err != nil {
		return err
	}
	for i := range t.Nodes {
		if err := WaitNatdReady(ctx, &t.Nodes[i], 90*time.Second); err != nil {
			return err
		}
	}
	u.say("natd's DaemonSet ready on %d nodes %.1fs after it was applied", len(t.Nodes), time.Since(dsStart).Seconds())
	return nil
}

// mountPoint makes sure hostPath exists on the host, to bind each node's copy over it;
// what it had to create, down removes.
func (u *upper) mountPoint(hostPath string) error {
	var missing []string
	for p := hostPath; p != "/"; p = filepath.Dir(p) {
		if _, err := os.Stat(p); err == nil {
			break
		}
		missing = append(missing, p)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		u.l.HostDirs = append(u.l.HostDirs, missing[i])
		if err := u.l.save(); err != nil {
			return err
		}
		if err := os.Mkdir(missing[i], 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	return nil
}

// saveKubeletSysctls records the global settings the kubelet will change (once: a
// second up after a failed one must not record the kubelet's values).
func (u *upper) saveKubeletSysctls() error {
	if u.l.Sysctls != nil {
		return nil
	}
	u.l.Sysctls = map[string]string{}
	for _, s := range kubeletSysctls {
		b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(s, ".", "/")))
		if err != nil {
			continue // not on this kernel: the kubelet will not set it either
		}
		u.l.Sysctls[s] = strings.TrimSpace(string(b))
	}
	return u.l.save()
}

// cgroups creates the node's cgroup root (/natd-lab/NODE) in every mounted hierarchy:
// the kubelet needs it to exist, and its pods' cgroups stay apart from other nodes'.
func (u *upper) cgroups(node string) error {
	hierarchies, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hierarchies {
		for _, rel := range []string{cgroupParent, filepath.Join(cgroupParent, node)} {
			p := filepath.Join(h, rel)
			if _, err := os.Stat(p); err == nil {
				continue
			}
			u.l.Cgroups = append(u.l.Cgroups, p)
			if err := u.l.save(); err != nil {
				return err
			}
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
			// A cgroup v1 cpuset takes no tasks until it has CPUs and memory nodes.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(filepath.Dir(p), f)); err == nil {
					if err := os.WriteFile(filepath.Join(p, f), b, 0o644); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// cgroupHierarchies are the mount points of the host's cgroup file systems.
func cgroupHierarchies() ([]string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && (fields[2] == "cgroup" || fields[2] == "cgroup2") {
			out = append(out, fields[1])
		}
	}
	return out, sc.Err()
}

// containerdConfig is node n's containerd configuration: its own root, state and
// socket, the CRI with runc (cgroupfs), the shadowed CNI directories, the lab's pause
// image as sandbox image, network namespaces under its state directory (so they exist
// only inside the node's mount namespace), and no OOM score below containerd's own,
// which runc cannot set here.
func containerdConfig(dir string, n *Node) string {
	root := filepath.Join(NodeDir(dir, n.Name), "containerd")
	return fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
`, filepath.Join(root, "root"), filepath.Join(root, "state"), n.ContainerdSocket, n.ContainerdSocket+".ttrpc", PauseImage)
}

// startContainerd starts node n's containerd in a new mount namespace, with the node's
// copies bound over the shadowed paths, in the node's network namespace.
func (u *upper) startContainerd(n *Node) error {
	n.ContainerdSocket = containerdSocket(u.dir, n.Name)
	n.ContainerdLog = filepath.Join(u.dir, "containerd-"+n.Name+".log")
	conf := filepath.Join(NodeDir(u.dir, n.Name), "containerd.toml")
	if err := os.MkdirAll(filepath.Dir(n.ContainerdSocket), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(conf, []byte(containerdConfig(u.dir, n)), 0o600); err != nil {
		return err
	}
	var script strings.Builder
	script.WriteString("set -e\n")
	for _, p := range shadowedPaths {
		fmt.Fprintf(&script, "mount --bind %q %q\n", ShadowPath(u.dir, n.Name, p), p)
	}
	fmt.Fprintf(&script, "exec nsenter --net=/run/netns/%s -- /usr/bin/containerd --config %q\n", n.Netns, conf)
	pid, err := startProcess(n.ContainerdLog, "unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script.String())
	if err != nil {
		return err
	}
	n.ContainerdPid = pid
	u.l.Runtimes = appendUnique(u.l.Runtimes, n.ContainerdSocket)
	return u.l.addPid(pid, "/usr/bin/containerd")
}

// kubeletConfig is node n's KubeletConfiguration. The API server is trusted with
// anything (the lab's kubelets listen only on the lab's node network); nothing is ever
// evicted or garbage-collected for lack of disk; and pods' cgroups go under the node's
// own cgroup root.
func kubeletConfig(n *Node) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /%s/%s
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://%s
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "1Mi", "nodefs.available": "1%%", "nodefs.inodesFree": "1%%", "imagefs.available": "1%%", "imagefs.inodesFree": "1%%"}
localStorageCapacityIsolation: false
maxPods: 60
`, n.IP, cgroupParent, n.Name, n.ContainerdSocket)
}

// startKubelet starts node n's kubelet in its containerd's mount and network
// namespaces.
func (u *upper) startKubelet(t *Topology, n *Node) error {
	n.KubeletLog = filepath.Join(u.dir, "kubelet-"+n.Name+".log")
	conf := filepath.Join(NodeDir(u.dir, n.Name), "kubelet.yaml")
	if err := os.WriteFile(conf, []byte(kubeletConfig(n)), 0o644); err != nil {
		return err
	}
	kubelet := filepath.Join(u.o.KubeBins, "kubelet")
	if target, err := filepath.EvalSymlinks(kubelet); err == nil {
		kubelet = target
	}
	pid, err := startProcess(n.KubeletLog, "nsenter", "--target", strconv.Itoa(n.ContainerdPid), "--mount", "--net", "--",
		kubelet, "--config", conf, "--kubeconfig", filepath.Join(NodeDir(u.dir, n.Name), "kubelet.kubeconfig"),
		"--hostname-override", n.Name, "--node-ip", n.IP, "-v", "1")
	if err != nil {
		return err
	}
	n.KubeletPid = pid
	return u.l.addPid(pid, kubelet)
}

func waitFile(path string, timeout time.Duration) error {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
	}
	return fmt.Errorf("no %s after %s", path, timeout)
}

func waitNodesReady(ctx context.Context, client kubernetes.Interface, t *Topology, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, n := range t.Nodes {
		for {
			node, err := client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err == nil && nodeReady(node) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("node %s not Ready after %s; see %s", n.Name, timeout, n.KubeletLog)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// NatdDaemonSet is the manifests' DaemonSet as the lab applies it: the lab's extra natd
// flags appended, nothing else changed (the manifests' CIDRs are the lab's).
func NatdDaemonSet(t *Topology) ([]byte, error) {
	var ds appsv1.DaemonSet
	if err := yaml.Unmarshal(manifests.DaemonSet, &ds); err != nil {
		return nil, fmt.Errorf("reading the DaemonSet manifest: %w", err)
	}
	c := &ds.Spec.Template.Spec.Containers[0]
	c.Args = append(c.Args, "--resync-period=10s", "-v=2")
	c.Args = append(c.Args, t.NatdArgs...)
	return yaml.Marshal(&ds)
}

// InstallNatd installs natd as the README says: the gossip key Secret from `natd
// gen-key`, then the DaemonSet.
func InstallNatd(ctx context.Context, t *Topology, dir string) error {
	key, err := Run(t.API.NatdBinary, "gen-key")
	if err != nil {
		return fmt.Errorf("natd gen-key: %w\n%s", err, key)
	}
	if out, err := Run(t.API.KubectlBinary, "--kubeconfig", t.Kubeconfig, "-n", ServiceAccountNamespace, "create", "secret",
		"generic", "natd-gossip-key", "--from-literal=key="+strings.TrimSpace(key)); err != nil && !strings.Contains(out, "AlreadyExists") {
		return fmt.Errorf("creating the gossip key Secret: %w\n%s", err, out)
	}
	ds, err := NatdDaemonSet(t)
	if err != nil {
		return err
	}
	f := filepath.Join(dir, "natd-daemonset.yaml")
	if err := os.WriteFile(f, ds, 0o644); err != nil {
		return err
	}
	if out, err := Run(t.API.KubectlBinary, "--kubeconfig", t.Kubeconfig, "apply", "--server-side", "--field-manager", "natd-lab", "-f", f); err != nil {
		return fmt.Errorf("applying the DaemonSet: %w\n%s", err, out)
	}
	return nil
}

// NatdPid is the PID of node n's natd: the lab's process, or in the real-node mode the
// natd container's process in the node's network namespace (0 when none runs).
func NatdPid(t *Topology, n *Node) int {
	if !t.Kubelet {
		return n.NatdPid
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join("/run/netns", n.Netns), &st); err != nil {
		return 0
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !isBinary(pid, natdInImage) || !Alive(pid) {
			continue
		}
		var ns syscall.Stat_t
		if err := syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &ns); err == nil && ns.Ino == st.Ino && ns.Dev == st.Dev {
			return pid
		}
	}
	return 0
}

// NatdLogs are the log files of node n's natd: the lab's log, or in the real-node mode
// the container logs of every natd pod the node's kubelet ran, oldest first.
func NatdLogs(dir string, t *Topology, n *Node) []string {
	if !t.Kubelet {
		return []string{n.NatdLog}
	}
	logs, _ := filepath.Glob(filepath.Join(ShadowPath(dir, n.Name, "/var/log/pods"), ServiceAccountNamespace+"_natd-*", "natd", "*.log"))
	slices.SortFunc(logs, func(a, b string) int {
		ai, _ := os.Stat(a)
		bi, _ := os.Stat(b)
		if ai == nil || bi == nil {
			return strings.Compare(a, b)
		}
		return ai.ModTime().Compare(bi.ModTime())
	})
	return logs
}

// natdProcess is node's natd process and the binary it runs, for signals.
func natdProcess(t *Topology, node string) (proc, error) {
	n, err := t.Node(node)
	if err != nil {
		return proc{}, err
	}
	p := proc{Pid: NatdPid(t, n), Binary: t.API.NatdBinary}
	if t.Kubelet {
		p.Binary = natdInImage
	}
	if p.Pid == 0 || !isBinary(p.Pid, p.Binary) {
		return proc{}, fmt.Errorf("natd of %s (pid %d) is not running", node, p.Pid)
	}
	return p, nil
}

// natdPodOn is the DaemonSet's pod on node that is not being deleted (nil: none).
func natdPodOn(ctx context.Context, client kubernetes.Interface, node string) (*corev1.Pod, error) {
	pods, err := client.CoreV1().Pods(ServiceAccountNamespace).List(ctx, metav1.ListOptions{
		LabelSelector: "app.kubernetes.io/name=natd", FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		return nil, err
	}
	for i := range pods.Items {
		if pods.Items[i].DeletionTimestamp == nil {
			return &pods.Items[i], nil
		}
	}
	return nil, nil
}

// restartNatdPod deletes node's natd pod as `kubectl delete pod` does (the kubelet
// sends SIGTERM: natd keeps serving while the DaemonSet's next pod starts).
func restartNatdPod(ctx context.Context, t *Topology, node string) error {
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return err
	}
	old, err := natdPodOn(ctx, client, node)
	if err != nil {
		return err
	}
	if old == nil {
		return fmt.Errorf("no natd pod on %s", node)
	}
	if err := client.CoreV1().Pods(ServiceAccountNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	// The old pod answers /readyz until it exits: wait for its successor.
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if p, err := natdPodOn(ctx, client, node); err == nil && p != nil && p.Name != old.Name && podReady(p) {
			return nil
		}
	}
	return fmt.Errorf("no new natd pod ready on %s within 90s", node)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// createRealPod makes a pod as a user does: a Pod object bound to the node (the lab's
// pause image, the lab's own, never pulled), made by the node's kubelet, containerd and
// CNI chain. The pod's network namespace is then bound under the lab's name for it.
func createRealPod(ctx context.Context, client kubernetes.Interface, t *Topology, n *Node, p *Pod) error {
	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, Labels: map[string]string{"app": p.Name}},
		Spec: corev1.PodSpec{NodeName: n.Name,
			Containers: []corev1.Container{{Name: "app", Image: PauseImage, ImagePullPolicy: corev1.PullNever}},
			// No token: nothing in the pod talks to the API.
			AutomountServiceAccountToken:  ptr.To(false),
			TerminationGracePeriodSeconds: ptr.To[int64](1),
		},
	}
	// The ServiceAccount admission refuses pods until the namespace's default
	// ServiceAccount exists, which kube-controller-manager creates moments after the
	// namespace.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := client.CoreV1().ServiceAccounts(p.Namespace).Get(ctx, "default", metav1.GetOptions{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("namespace %s has no default ServiceAccount after 30s: %w", p.Namespace, err)
		}
	}
	if _, err := client.CoreV1().Pods(p.Namespace).Create(ctx, obj, metav1.CreateOptions{}); err != nil {
		return err
	}
	var id string
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		got, err := client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err == nil && got.Status.Phase == corev1.PodRunning && got.Status.PodIP != "" &&
			len(got.Status.ContainerStatuses) == 1 && got.Status.ContainerStatuses[0].State.Running != nil {
			p.IP = got.Status.PodIP
			id = strings.TrimPrefix(got.Status.ContainerStatuses[0].ContainerID, "containerd://")
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pod %s/%s not running after 60s (last error %v); see %s", p.Namespace, p.Name, err, n.KubeletLog)
		}
	}
	p.ContainerID = id
	pid, err := containerPid(n, id)
	if err != nil {
		return err
	}
	return podNetnsOf(p.Netns, pid)
}

// deleteRealPod deletes the Pod and waits until the kubelet has torn it down (CNI DEL
// included), then drops the lab's name for its network namespace.
func deleteRealPod(ctx context.Context, client kubernetes.Interface, p *Pod) error {
	err := client.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pod %s/%s still there 60s after its deletion", p.Namespace, p.Name)
		}
	}
	_, err = Run("ip", "netns", "del", p.Netns)
	return err
}

// nodeSnapshot is what natd may change on a node, in a form two snapshots can be
// compared in: nftables tables, ip rules, routes of every table, addresses and links
// (not pods' veths, which come and go), the CNI configuration and plugins (the JSON, not
// its layout), and the
// node's sysctls under net.ipv4.conf.{all,default,eth0}.
func nodeSnapshot(dir string, n *Node) (string, error) {
	var b strings.Builder
	for _, c := range [][]string{
		{"nft", "list", "tables"},
		{"ip", "rule", "show"}, {"ip", "-6", "rule", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-o", "-4", "addr", "show"},
	} {
		out, err := NsRun(n.Netns, c...)
		if err != nil {
			return "", err
		}
		// cni0 is "linkdown" until its first pod, and kube-proxy makes its tables at
		// its first sync, whenever that is: neither is natd's doing.
		out = strings.ReplaceAll(out, " linkdown", "")
		out = strings.ReplaceAll(strings.ReplaceAll(out, "table ip kube-proxy\n", ""), "table ip6 kube-proxy\n", "")
		fmt.Fprintf(&b, "$ %s\n%s\n", strings.Join(c, " "), out)
	}
	links, err := NsRun(n.Netns, "ip", "-o", "link", "show")
	if err != nil {
		return "", err
	}
	b.WriteString("$ links\n")
	for _, l := range strings.Split(links, "\n") {
		if f := strings.Fields(l); len(f) > 1 && !strings.HasPrefix(f[1], "veth") {
			b.WriteString(strings.TrimSuffix(f[1], ":") + "\n")
		}
	}
	// The pod guard's filters and qdiscs, counted (pods' devices come and go).
	tc, err := NsRun(n.Netns, "sh", "-c", `q=0; f=0; for d in $(ls /sys/class/net); do
		tc qdisc show dev $d | grep -q clsact && q=$((q+1))
		tc filter show dev $d ingress 2>/dev/null | grep -q natd_origin && f=$((f+1)); done
		echo "devices with a clsact qdisc: $q"; echo "devices with natd's filter: $f"`)
	if err != nil {
		return "", err
	}
	b.WriteString("$ tc\n" + tc)
	conf, err := os.ReadFile(n.CNIConfList)
	if err != nil {
		return "", err
	}
	// As the CNI reads it: the same JSON, however it is laid out.
	var v any
	if err := json.Unmarshal(conf, &v); err != nil {
		return "", fmt.Errorf("reading %s: %w", n.CNIConfList, err)
	}
	if conf, err = json.MarshalIndent(v, "", "  "); err != nil {
		return "", err
	}
	fmt.Fprintf(&b, "$ cat %s\n%s\n", n.CNIConfList, conf)
	bins, err := os.ReadDir(ShadowPath(dir, n.Name, "/opt/cni/bin"))
	if err != nil {
		return "", err
	}
	b.WriteString("$ ls /opt/cni/bin\n")
	for _, e := range bins {
		b.WriteString(e.Name() + "\n")
	}
	state, _ := os.ReadDir(ShadowPath(dir, n.Name, "/run/natd"))
	fmt.Fprintf(&b, "$ ls /run/natd\n%d entries\n", len(state))
	var sysctls []string
	for _, dev := range []string{"all", "default", "eth0"} {
		files, _ := filepath.Glob(filepath.Join("/proc/sys/net/ipv4/conf", dev, "*"))
		sysctls = append(sysctls, files...)
	}
	slices.Sort(sysctls)
	err = InNetns(n.Netns, func() error {
		for _, f := range sysctls {
			v, err := os.ReadFile(f)
			if err == nil {
				fmt.Fprintf(&b, "%s = %s", strings.TrimPrefix(f, "/proc/sys/"), v)
			}
		}
		return nil
	})
	return b.String(), err
}

// snapshotNode keeps the node's state before natd is installed (DIR/nodes/NODE/
// before-natd.txt), for the uninstall test to compare with.
func snapshotNode(dir string, n *Node) error {
	s, err := nodeSnapshot(dir, n)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(NodeDir(dir, n.Name), "before-natd.txt"), []byte(s), 0o644)
}

// NodeDiffSinceInstall lists what differs on node n from before natd was installed.
func NodeDiffSinceInstall(dir string, n *Node) (string, error) {
	before, err := os.ReadFile(filepath.Join(NodeDir(dir, n.Name), "before-natd.txt"))
	if err != nil {
		return "", err
	}
	now, err := nodeSnapshot(dir, n)
	if err != nil {
		return "", err
	}
	return lineDiff(string(before), now), nil
}

// lineDiff lists the lines only in a (-) or only in b (+).
func lineDiff(a, b string) string {
	count := map[string]int{}
	for _, l := range strings.Split(a, "\n") {
		count[l]++
	}
	for _, l := range strings.Split(b, "\n") {
		count[l]--
	}
	var out []string
	for l, c := range count {
		switch {
		case c > 0:
			out = append(out, "- "+l)
		case c < 0:
			out = append(out, "+ "+l)
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// downRealNodes stops what the real-node mode started, in an order that lets nothing
// restart what was just stopped: kubelets, then every container (through its node's
// containerd), then containerd and the shims it left, then the cgroups, mount points
// and sysctls.
func downRealNodes(l *ledger) []error {
	var errs []error
	var kubelets, containerds []proc
	for _, p := range l.Pids {
		switch {
		case strings.HasSuffix(p.Binary, "/containerd"):
			containerds = append(containerds, p)
		case strings.Contains(filepath.Base(p.Binary), "kubelet"):
			kubelets = append(kubelets, p)
		}
	}
	for _, p := range kubelets {
		if err := stopProcess(p); err != nil {
			errs = append(errs, err)
		}
	}
	for _, sock := range l.Runtimes {
		if _, err := os.Stat(sock); err != nil {
			continue
		}
		out, err := Run("ctr", "--address", sock, "--namespace", "k8s.io", "tasks", "ls", "-q")
		if err != nil {
			continue // containerd is gone: its shims are handled below
		}
		for _, id := range strings.Fields(out) {
			_, _ = Run("ctr", "--address", sock, "--namespace", "k8s.io", "tasks", "rm", "-f", id)
		}
	}
	for _, p := range containerds {
		if err := stopProcess(p); err != nil {
			errs = append(errs, err)
		}
	}
	stopShims(l.Runtimes)
	for i := len(l.Cgroups) - 1; i >= 0; i-- {
		if err := removeCgroup(l.Cgroups[i]); err != nil {
			errs = append(errs, err)
		}
	}
	for name, v := range l.Sysctls {
		if err := os.WriteFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")), []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restoring %s: %w", name, err))
		}
	}
	for i := len(l.HostDirs) - 1; i >= 0; i-- {
		// Only if still empty: never anything somebody else put there.
		if err := os.Remove(l.HostDirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing %s, which up created: %w", l.HostDirs[i], err))
		}
	}
	return errs
}

// stopShims ends the containerd shims the lab's containerds started (their command
// line names the containerd socket): normally none is left once their tasks are gone.
func stopShims(sockets []string) {
	if len(sockets) == 0 {
		return
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(b), "containerd-shim") {
			continue
		}
		for _, s := range sockets {
			if strings.Contains(string(b), s) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// removeCgroup removes a cgroup and every cgroup below it, deepest first.
func removeCgroup(path string) error {
	var dirs []string
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		var rmErr error
		for try := 0; try < 50; try++ { // a cgroup's last task may take a moment to exit
			if rmErr = syscall.Rmdir(dirs[i]); rmErr == nil || errors.Is(rmErr, syscall.ENOENT) {
				rmErr = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if rmErr != nil {
			errs = append(errs, fmt.Errorf("removing cgroup %s: %w", dirs[i], rmErr))
		}
	}
	return errors.Join(errs...)
}

// podNetnsOf binds the network namespace of the process pid under /run/netns/name, as
// `ip netns attach` does: the lab's tools enter a real pod's namespace by that name.
func podNetnsOf(name string, pid int) error {
	_, err := Run("ip", "netns", "attach", name, strconv.Itoa(pid))
	return err
}

// containerPid is the PID of a running container's task on node n.
func containerPid(n *Node, containerID string) (int, error) {
	out, err := Run("ctr", "--address", n.ContainerdSocket, "--namespace", "k8s.io", "tasks", "ls")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == containerID && f[2] == "RUNNING" {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("container %s is not running on %s", containerID, n.Name)
}
