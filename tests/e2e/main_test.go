// Package e2e runs natd end to end in the lab: a real kube-apiserver, one natd per node
// namespace, and every result observed at the partner.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"

	"natd.dev/natd/tests/lab"
)

var (
	labDir string
	topo   *lab.Topology
	client *kubernetes.Clientset
)

// TestMain builds natd and natd-lab (and natd-cni, when the tree has it), brings a lab
// up (or uses the one named by NATD_LAB_DIR), runs the tests and takes the lab down.
// With NATD_E2E=required a lab that cannot be built fails the run instead of skipping
// it. NATD_E2E_NETWORK=dual brings the lab up dual-stack (--network dual): the dual
// tests (TestDualStack*) run only there, and `make test` runs them with a few of the
// others in a second, dual lab. NATD_E2E_NODES sets the lab's size (default 3): `make
// test` runs the unplanned failovers in a 10-node lab too (nine voters), with
// NATD_E2E_NATD_ARGS slowing the heartbeats for ten nodes sharing two cores.
func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	required := os.Getenv("NATD_E2E") == "required"
	skip := func(format string, args ...any) int {
		msg := fmt.Sprintf(format, args...)
		if required {
			fmt.Fprintln(os.Stderr, "e2e: cannot run (NATD_E2E=required):", msg)
			return 1
		}
		fmt.Fprintln(os.Stderr, "e2e: skipped:", msg)
		return 0
	}
	if os.Geteuid() != 0 {
		return skip("needs root for network namespaces")
	}
	ctx := context.Background()
	if dir := os.Getenv("NATD_LAB_DIR"); dir != "" {
		labDir = dir
	} else {
		bins, err := os.MkdirTemp("", "natd-e2e-bin-")
		if err != nil {
			return skip("%v", err)
		}
		defer os.RemoveAll(bins)
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		pkgs := []string{"./cmd/natd", "./cmd/natd-lab"}
		// natd's CNI plugin, when the tree has it: beside natd, the lab chains it.
		if _, err := os.Stat(filepath.Join(root, "cmd", "natd-cni")); err == nil {
			pkgs = append(pkgs, "./cmd/natd-cni")
		}
		build := exec.Command("go", append([]string{"build", "-o", bins + "/"}, pkgs...)...)
		build.Dir, build.Stdout, build.Stderr = root, os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return skip("building natd: %v", err)
		}
		// NATD_E2E_KUBELET=1: the real-node lab (natd-lab up --kubelet), with natd's
		// image and the lab's pause image built as make image builds them.
		kubelet := os.Getenv("NATD_E2E_KUBELET") != ""
		if kubelet {
			if err := buildImages(root, bins); err != nil {
				return skip("building the images: %v", err)
			}
		}
		kubeBins := os.Getenv("NATD_KUBE_BINS")
		if kubeBins == "" {
			home, _ := os.UserHomeDir()
			kubeBins = filepath.Join(home, ".cache", "natd", "bin")
			if c := os.Getenv("NATD_CACHE"); c != "" {
				kubeBins = filepath.Join(c, "bin")
			}
		}
		need := []string{"kube-apiserver", "kube-proxy"}
		if kubelet {
			need = append(need, "kubelet", "kube-controller-manager", "kube-scheduler")
		}
		for _, b := range need {
			if _, err := os.Stat(filepath.Join(kubeBins, b)); err != nil {
				return skip("no %s in %s (make kube-bins builds it)", b, kubeBins)
			}
		}
		labDir, err = os.MkdirTemp("", "natd-e2e-lab-")
		if err != nil {
			return skip("%v", err)
		}
		os.Remove(labDir) // Up creates it, and Down then removes it whole
		start := time.Now()
		// NATD_E2E_PROXY_MODE=iptables runs the suite with kube-proxy in iptables mode.
		nodes := 3
		if v := os.Getenv("NATD_E2E_NODES"); v != "" {
			if _, err := fmt.Sscan(v, &nodes); err != nil {
				return skip("NATD_E2E_NODES=%q: %v", v, err)
			}
		}
		// NATD_E2E_NATD_ARGS: more flags for every natd (space-separated).
		natdArgs := strings.Fields(os.Getenv("NATD_E2E_NATD_ARGS"))
		_, err = lab.Up(ctx, lab.Options{Dir: labDir, Nodes: nodes, NatdArgs: natdArgs, Natd: filepath.Join(bins, "natd"),
			Self: filepath.Join(bins, "natd-lab"), KubeBins: kubeBins, ProxyMode: os.Getenv("NATD_E2E_PROXY_MODE"),
			Network: os.Getenv("NATD_E2E_NETWORK"), Out: os.Stderr, Kubelet: kubelet,
			NatdImage: filepath.Join(bins, "natd-image.tar"), PauseImage: filepath.Join(bins, "lab-pause-image.tar")})
		defer func() {
			if err := lab.Down(labDir); err != nil {
				fmt.Fprintln(os.Stderr, "e2e: lab down:", err)
			}
		}()
		if err != nil {
			return skip("lab up: %v", err)
		}
		fmt.Fprintf(os.Stderr, "e2e: lab up in %s\n", time.Since(start).Round(time.Millisecond))
	}
	var err error
	if topo, err = lab.LoadTopology(labDir); err != nil {
		return skip("%v", err)
	}
	if client, err = lab.Client(topo.Kubeconfig); err != nil {
		return skip("%v", err)
	}
	code := m.Run()
	if code != 0 {
		dumpAgentLogs()
	}
	return code
}

// buildImages builds natd's image and the lab's pause image into bins, as make image
// does.
func buildImages(root, bins string) error {
	static := []string{"CGO_ENABLED=0"}
	steps := [][]string{
		{"go", "build", "-trimpath", "-o", filepath.Join(bins, "static", "natd"), "./cmd/natd"},
		{"go", "build", "-trimpath", "-o", filepath.Join(bins, "static", "natd-cni"), "./cmd/natd-cni"},
		{"go", "build", "-trimpath", "-o", filepath.Join(bins, "static", "natd-lab-pause"), "./cmd/natd-lab-pause"},
		{"go", "run", "./cmd/natd-image", "--binary", filepath.Join(bins, "static", "natd"),
			"--cni-plugin", filepath.Join(bins, "static", "natd-cni"), "--out", filepath.Join(bins, "natd-image.tar")},
		{"go", "run", "./cmd/natd-image", "--binary", filepath.Join(bins, "static", "natd-lab-pause"), "--path", "/pause",
			"--title", "natd lab pause", "--tag", lab.PauseImage, "--out", filepath.Join(bins, "lab-pause-image.tar")},
	}
	for _, s := range steps {
		cmd := exec.Command(s[0], s[1:]...)
		cmd.Dir, cmd.Stdout, cmd.Stderr = root, os.Stderr, os.Stderr
		cmd.Env = append(os.Environ(), static...)
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("%s: %w", strings.Join(s, " "), err)
		}
	}
	return nil
}

// dumpAgentLogs prints what the agents said about holders and membership, so a failed
// run (in CI, where the lab is gone afterwards) can be understood.
func dumpAgentLogs() {
	cur, err := lab.LoadTopology(labDir)
	if err != nil {
		return
	}
	for _, n := range cur.Nodes {
		var b []byte
		for _, f := range lab.NatdLogs(labDir, cur, &n) {
			more, _ := os.ReadFile(f)
			b = append(b, more...)
		}
		var keep []string
		for _, l := range strings.Split(string(b), "\n") {
			for _, k := range []string{"Took over", "Released", "majority", "evidence", "stalled", "Member state", "rror", "Found egress", "Not renewing", "failed", "Repairing", "Exchanged state"} {
				if strings.Contains(l, k) {
					keep = append(keep, l)
					break
				}
			}
		}
		if len(keep) > 150 {
			keep = keep[len(keep)-150:]
		}
		fmt.Fprintf(os.Stderr, "--- natd on %s (holder and membership lines)\n%s\n", n.Name, strings.Join(keep, "\n"))
	}
}
