package e2e

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"natd.dev/natd/tests/lab"
)

// Who may pin what (manifests/multitenancy): the real API server refuses an egress IP
// that the allowlist does not give the namespace, with a message that says what to do,
// and lets an allowed one through; a namespace edited for something else keeps an
// annotation the allowlist no longer covers.
func TestAdmissionPolicyDecidesWhoMayPinWhat(t *testing.T) {
	run := func(args ...string) (string, error) {
		return lab.Run(topo.API.KubectlBinary, append([]string{"--kubeconfig", topo.Kubeconfig}, args...)...)
	}
	dir := filepath.Join(manifestsDir(), "multitenancy")
	kubectl(t, "apply", "--server-side", "--field-manager", "natd-e2e", "-f", filepath.Join(manifestsDir(), "namespace.yaml"))
	kubectl(t, "apply", "--server-side", "--field-manager", "natd-e2e", "-k", dir)
	t.Cleanup(func() {
		// The policy first, and until the API server has let it go: the tests after
		// this one pin namespaces freely.
		run("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", "natd-egress-ip-allowed")
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if _, err := run("annotate", "--overwrite", "namespace", "tenant-a", "egress.natd.dev/ip=198.18.0.219"); err == nil {
				break
			}
		}
		run("delete", "-k", dir, "--ignore-not-found")
		run("delete", "namespace", "tenant-a", "--wait=false")
	})
	kubectl(t, "create", "namespace", "tenant-a")
	// Without the allowlist the policy is off (a missing one must not stop every
	// namespace change in the cluster): the API server needs it for any request.
	kubectl(t, "-n", "natd-system", "delete", "configmap", "natd-egress-allow")
	time.Sleep(2 * time.Second)
	kubectl(t, "create", "namespace", "tenant-b")
	kubectl(t, "label", "namespace", "tenant-b", "team=b")
	kubectl(t, "delete", "namespace", "tenant-b", "--wait=false")
	kubectl(t, "apply", "--server-side", "--field-manager", "natd-e2e", "-k", dir)
	annotateNS := func(ip string) (string, error) {
		return run("annotate", "--overwrite", "namespace", "tenant-a", "egress.natd.dev/ip="+ip)
	}
	// The API server picks the policy up within a second or so.
	var out string
	var err error
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if out, err = annotateNS("198.18.0.210"); err != nil || time.Now().After(deadline) {
			break
		}
		run("annotate", "namespace", "tenant-a", "egress.natd.dev/ip-") // let through before the policy took effect
	}
	if err == nil || !strings.Contains(out, "may not use egress IP 198.18.0.210") || !strings.Contains(out, "natd-system/natd-egress-allow") {
		t.Fatalf("an IP nobody allowed was not refused as it should be: %v\n%s", err, out)
	}
	t.Logf("refused: %s", strings.TrimSpace(out))

	kubectl(t, "-n", "natd-system", "patch", "configmap", "natd-egress-allow", "--type=merge",
		"-p", `{"data":{"tenant-a":"198.18.0.210, 198.18.0.212"}}`)
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if out, err = annotateNS("198.18.0.210"); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("an allowed IP was refused: %v\n%s", err, out)
	}
	if out, err = annotateNS("198.18.0.211"); err == nil || !strings.Contains(out, "allowed: 198.18.0.210,198.18.0.212") {
		t.Fatalf("another namespace's IP was not refused: %v\n%s", err, out)
	}
	// The admin takes the IP back: the namespace can still be edited otherwise.
	kubectl(t, "-n", "natd-system", "patch", "configmap", "natd-egress-allow", "--type=merge", "-p", `{"data":{"tenant-a":""}}`)
	time.Sleep(2 * time.Second)
	if out, err = run("label", "--overwrite", "namespace", "tenant-a", "team=a"); err != nil {
		t.Fatalf("an unrelated edit of a pinned namespace was refused: %v\n%s", err, out)
	}
}
