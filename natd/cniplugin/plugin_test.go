package cniplugin

import (
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
)

// A conflist that puts natd-cni first (nothing assigned addresses yet) is a
// configuration error the runtime must report, not a pod natd silently ignores.
func TestAddNeedsAPrevResult(t *testing.T) {
	err := Add(&skel.CmdArgs{ContainerID: "c1", StdinData: []byte(`{"cniVersion":"1.0.0","name":"n","type":"natd-cni"}`)})
	if err == nil || !strings.Contains(err.Error(), "chained after") {
		t.Fatalf("Add without prevResult = %v", err)
	}
	if _, err := parse(&skel.CmdArgs{StdinData: []byte(`{`)}); err == nil {
		t.Fatal("garbage configuration accepted")
	}
}

// A pod without Kubernetes arguments (another runtime's container) passes through
// untouched, and so does every pod on a node where natd never ran.
func TestAddPassesOtherPodsThrough(t *testing.T) {
	conf := `{"cniVersion":"1.0.0","name":"n","type":"natd-cni","stateDir":"` + t.TempDir() + `",
		"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.10/24"}]}}`
	for _, args := range []string{"", "K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=p"} {
		if err := Add(&skel.CmdArgs{ContainerID: "c1", Args: args, StdinData: []byte(conf)}); err != nil {
			t.Errorf("Add(%q) = %v", args, err)
		}
	}
	if err := Del(&skel.CmdArgs{ContainerID: "c1", StdinData: []byte(conf)}); err != nil {
		t.Errorf("Del = %v", err)
	}
}
