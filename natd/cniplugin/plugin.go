// Package cniplugin is natd's chained CNI plugin. The container runtime calls it after
// the plugin that gave a pod its addresses, before any of the pod's processes run: it
// classifies the pod in the node's kernel (pinned by its namespace, or not) from what
// natd last wrote to the node, so a new pod's first packet never waits for natd — nor
// leaks when natd has not seen the pod yet or is not running at all.
package cniplugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"natd.dev/natd/natd/dataplane"
)

// DefaultStateDir is natd's --state-dir default, where the plugin finds natd's pod store.
const DefaultStateDir = "/run/natd"

// Conf is the plugin's entry in a conflist.
type Conf struct {
	types.PluginConf
	// StateDir is natd's --state-dir on this node.
	StateDir string `json:"stateDir,omitempty"`
}

// podArgs are the Kubernetes arguments kubelet and containerd pass in CNI_ARGS.
type podArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // the runtime's names
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

// Main runs the plugin (the natd-cni binary).
func Main() {
	// Every version: natd-cni chains onto whatever conflist the node has (flannel,
	// Calico and Cilium still write 0.3.1), and a refused version fails every pod.
	skel.PluginMainFuncs(skel.CNIFuncs{Add: Add, Del: Del, Check: Check},
		version.All, "natd: pins new pods of pinned namespaces to their egress IP")
}

func parse(args *skel.CmdArgs) (*Conf, error) {
	conf := &Conf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, fmt.Errorf("natd-cni: parsing network configuration: %w", err)
	}
	if conf.StateDir == "" {
		conf.StateDir = DefaultStateDir
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, fmt.Errorf("natd-cni: parsing prevResult: %w", err)
	}
	return conf, nil
}

// Add records the pod and classifies its addresses. For a pod of a pinned namespace a
// failure fails the ADD: the runtime retries, and the pod does not run unpinned. For
// any other pod natd's trouble is never the pod's: the ADD succeeds whatever happens.
func Add(args *skel.CmdArgs) error {
	conf, err := parse(args)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return errors.New("natd-cni must be chained after a plugin that assigns addresses (no prevResult)")
	}
	result, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return fmt.Errorf("natd-cni: converting prevResult: %w", err)
	}
	var pa podArgs
	if err := types.LoadArgs(args.Args, &pa); err != nil {
		return fmt.Errorf("natd-cni: parsing CNI_ARGS: %w", err)
	}
	if ns := string(pa.K8S_POD_NAMESPACE); ns != "" {
		rec := dataplane.PodRecord{ContainerID: args.ContainerID, Namespace: ns, Name: string(pa.K8S_POD_NAME),
			Added: time.Now().UnixNano()}
		for _, ipc := range result.IPs {
			if ip, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
				rec.IPs = append(rec.IPs, ip.Unmap())
			}
		}
		var derr error
		rec.HostIf, rec.HostIfIndex, derr = hostDevice(args.Netns, args.IfName)
		if derr != nil {
			fmt.Fprintf(os.Stderr, "natd-cni: pod %s/%s: no host device for the pod guard: %v\n", ns, rec.Name, derr)
		}
		pinned, err := dataplane.RegisterPod(dataplane.PodStore{Dir: conf.StateDir}, rec)
		switch {
		case errors.Is(err, dataplane.ErrPodGuard):
			// Pinned all the same; natd's next sync tries the guard again.
			fmt.Fprintf(os.Stderr, "natd-cni: pod %s/%s: %v\n", ns, rec.Name, err)
		case err != nil && pinned:
			return fmt.Errorf("natd-cni: pod %s/%s of a pinned namespace cannot be pinned: %w", ns, rec.Name, err)
		case err != nil:
			fmt.Fprintf(os.Stderr, "natd-cni: pod %s/%s (not pinned) not recorded: %v\n", ns, rec.Name, err)
		}
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// hostDevice finds the host side of the pod's veth: the peer of its interface ifName in
// the pod's network namespace. A pod whose interface is not a veth (ipvlan, macvlan)
// has none, and no error.
func hostDevice(netnsPath, ifName string) (string, int, error) {
	if netnsPath == "" || ifName == "" {
		return "", 0, nil
	}
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return "", 0, fmt.Errorf("opening %s: %w", netnsPath, err)
	}
	defer ns.Close() //nolint:errcheck // read only
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return "", 0, fmt.Errorf("opening netlink in %s: %w", netnsPath, err)
	}
	defer h.Close()
	l, err := h.LinkByName(ifName)
	if err != nil {
		return "", 0, fmt.Errorf("finding %s in the pod: %w", ifName, err)
	}
	if l.Type() != "veth" || l.Attrs().ParentIndex <= 0 {
		return "", 0, nil
	}
	peer, err := netlink.LinkByIndex(l.Attrs().ParentIndex)
	if err != nil {
		return "", 0, fmt.Errorf("finding the peer of %s: %w", ifName, err)
	}
	if peer.Type() != "veth" {
		return "", 0, nil
	}
	return peer.Attrs().Name, peer.Attrs().Index, nil
}

// Del forgets the pod: its addresses may soon belong to another pod.
func Del(args *skel.CmdArgs) error {
	conf, err := parse(args)
	if err != nil {
		return err
	}
	return dataplane.UnregisterPod(dataplane.PodStore{Dir: conf.StateDir}, args.ContainerID)
}

// Check has nothing of its own to verify: natd repairs its kernel state itself.
func Check(args *skel.CmdArgs) error {
	_, err := parse(args)
	return err
}
