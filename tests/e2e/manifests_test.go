package e2e

import (
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"natd.dev/natd/tests/lab"
)

func manifestsDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "manifests")
}

// The manifests apply as they are (server-side; no kubelet runs the DaemonSet here),
// and the ServiceAccount they create may do what natd needs and nothing more. (The lab's
// agents run with that ServiceAccount's tokens: every other end-to-end test shows the
// permissions suffice.)
func TestManifestsApplyWithLeastPrivilege(t *testing.T) {
	kubectl := func(args ...string) (string, error) {
		return lab.Run(topo.API.KubectlBinary, append([]string{"--kubeconfig", topo.Kubeconfig}, args...)...)
	}
	if out, err := kubectl("apply", "--server-side", "--field-manager", "natd-e2e", "-k", manifestsDir()); err != nil {
		t.Fatalf("applying manifests/: %v\n%s", err, out)
	}
	if out, err := kubectl("get", "daemonset", "-n", "natd-system", "natd", "-o", "jsonpath={.spec.template.spec.containers[0].securityContext.capabilities.add}"); err != nil || !strings.Contains(out, "NET_ADMIN") {
		t.Errorf("DaemonSet not accepted as written: %q %v", out, err)
	}
	if out, err := kubectl("get", "daemonset", "-n", "natd-system", "natd", "-o", "jsonpath={.spec.template.spec.containers[0].securityContext.seccompProfile.type}"); err != nil || out != "RuntimeDefault" {
		t.Errorf("DaemonSet's seccomp profile: %q %v", out, err)
	}
	// Under a cluster whose default Pod Security level is baseline, natd's pods (host
	// network, NET_ADMIN) are admitted only because the namespace says privileged.
	if out, err := kubectl("get", "namespace", "natd-system", "-o", `jsonpath={.metadata.labels.pod-security\.kubernetes\.io/enforce}`); err != nil || out != "privileged" {
		t.Errorf("natd-system's Pod Security level: %q %v", out, err)
	}
	sa := "system:serviceaccount:natd-system:natd"
	for _, c := range []struct {
		verb, resource string
		want           string
		extra          []string
	}{
		{"watch", "pods", "yes", nil}, {"list", "namespaces", "yes", nil}, {"get", "nodes", "yes", nil}, {"create", "events", "yes", nil},
		{"create", "egressips.egress.natd.dev", "yes", nil}, {"delete", "egressips.egress.natd.dev", "yes", nil},
		{"update", "egressips.egress.natd.dev", "yes", []string{"--subresource", "status"}},
		{"get", "daemonsets.apps/natd", "yes", []string{"-n", "natd-system"}},
		// Not needed, so not granted:
		{"delete", "pods", "no", nil}, {"update", "nodes", "no", nil}, {"get", "secrets", "no", nil}, {"patch", "namespaces", "no", nil},
		{"update", "egressips.egress.natd.dev", "no", nil}, {"get", "daemonsets.apps/other", "no", []string{"-n", "natd-system"}},
		{"get", "daemonsets.apps/natd", "no", []string{"-n", "kube-system"}}, {"delete", "daemonsets.apps/natd", "no", []string{"-n", "natd-system"}}, {"get", "egressips.egress.natd.dev", "no", nil}, {"patch", "egressips.egress.natd.dev", "no", []string{"--subresource", "status"}},
	} {
		out, _ := kubectl(append([]string{"auth", "can-i", c.verb, c.resource, "--as", sa}, c.extra...)...)
		// The answer is the last word; kubectl may warn before it.
		got := ""
		if f := strings.Fields(out); len(f) > 0 {
			got = f[len(f)-1]
		}
		if got != c.want {
			t.Errorf("can natd %s %s %v? %q, want %q", c.verb, c.resource, c.extra, got, c.want)
		}
	}
}
