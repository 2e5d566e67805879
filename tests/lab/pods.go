package lab

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// podNetns is the namespace of a lab pod; names stay unique and readable.
func podNetns(namespace, name string) string {
	return "natd-pod-" + namespace + "-" + name
}

// hostVeth was the node-side interface of a pod before pods were wired with CNI.
func hostVeth(namespace, name string) string {
	h := sha256.Sum256([]byte(namespace + "/" + name))
	return "vp" + hex.EncodeToString(h[:])[:10]
}

// PodOption changes how CreatePod makes a pod.
type PodOption func(*podOptions)

type podOptions struct {
	ip string
}

// WithIP asks the CNI chain (host-local) for this IPv4 address, e.g. one a deleted pod
// had. Creation fails when the address is outside the node's range or taken.
func WithIP(ip string) PodOption { return func(o *podOptions) { o.ip = ip } }

// CreatePod plays the kubelet and the container runtime: a Pod object bound to the
// node, a sandbox network namespace that the node's CNI chain (bridge and host-local,
// then natd-cni when the lab has it) wires to cni0, and the IP from the chain's result
// in the Pod's status.
func CreatePod(ctx context.Context, dir, namespace, name, node string, opts ...PodOption) (*Pod, error) {
	var o podOptions
	for _, opt := range opts {
		opt(&o)
	}
	var p *Pod
	err := withLock(dir, func() error {
		var err error
		p, err = createPod(ctx, dir, namespace, name, node, o)
		return err
	})
	return p, err
}

func createPod(ctx context.Context, dir, namespace, name, node string, o podOptions) (p *Pod, err error) {
	t, err := LoadTopology(dir)
	if err != nil {
		return nil, err
	}
	n, err := t.Node(node)
	if err != nil {
		return nil, err
	}
	if _, err := t.Pod(namespace, name); err == nil {
		return nil, fmt.Errorf("pod %s/%s already exists", namespace, name)
	}
	if o.ip != "" {
		if err := validPodIP(n, o.ip); err != nil {
			return nil, err
		}
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return nil, err
	}
	l, err := loadLedger(dir)
	if err != nil {
		return nil, err
	}
	pod := Pod{Namespace: namespace, Name: name, Node: node, Netns: podNetns(namespace, name), ContainerID: newContainerID()}
	p = &pod
	if t.Kubelet && o.ip != "" {
		return nil, fmt.Errorf("the real-node lab's pods get their IP from the kubelet's CNI call; --ip is not possible")
	}
	// As in a cluster, the Pod exists (Pending, bound to the node) before the node's
	// runtime makes its sandbox.
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, err
	}
	if t.Kubelet {
		if err := l.addNetns(p.Netns); err != nil {
			return nil, err
		}
		if err := createRealPod(ctx, client, t, n, p); err != nil {
			_ = deleteRealPod(context.Background(), client, p)
			_ = l.removeNetns(p.Netns)
			return nil, err
		}
		t.Pods = append(t.Pods, pod)
		return p, t.Save(dir)
	}
	// Undo the half-made pod on failure, so that the same name can be tried again.
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
		}
	}()

	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "natd.dev/lab-pod"}},
			AutomountServiceAccountToken: ptr.To(false)},
	}
	created, err := client.CoreV1().Pods(namespace).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	undo = append(undo, func() {
		_ = client.CoreV1().Pods(namespace).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	})

	if err := l.addNetns(p.Netns); err != nil {
		return nil, err
	}
	undo = append(undo, func() { _ = l.removeNetns(pod.Netns) })
	if _, err := Run("ip", "netns", "add", p.Netns); err != nil {
		return nil, err
	}
	undo = append(undo, func() { _, _ = Run("ip", "netns", "del", pod.Netns) })
	if _, err := NsRun(p.Netns, "ip", "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	if t.IPv6() {
		// The bridge plugin turns duplicate address detection off on the pod's eth0,
		// but the kernel also asks the namespace's "all": without this the plugin
		// waits about a second for the pod's IPv6 address to leave the tentative state.
		if _, err := NsRun(p.Netns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"); err != nil {
			return nil, err
		}
	}
	rt := podRuntimeConf(p, string(created.UID), o.ip)
	ip, ip6, err := cniAdd(ctx, t, n, rt)
	// A failed ADD is followed by a DEL too, as runtimes do: it frees what the chain
	// had done before it failed.
	undo = append(undo, func() { _ = cniDel(context.Background(), t, n, rt) })
	if err != nil {
		return nil, err
	}
	if o.ip != "" && ip.String() != o.ip {
		return nil, fmt.Errorf("asked the CNI chain for %s, got %s", o.ip, ip)
	}
	p.IP = ip.String()
	podIPs, hostIPs := []corev1.PodIP{{IP: p.IP}}, []corev1.HostIP{{IP: n.IP}}
	if ip6.IsValid() {
		p.IP6 = ip6.String()
		podIPs, hostIPs = append(podIPs, corev1.PodIP{IP: p.IP6}), append(hostIPs, corev1.HostIP{IP: n.IP6})
	}
	// The IP may have belonged to a deleted pod: forget its old MAC now rather than
	// after the neighbour entry times out.
	for _, a := range []string{p.IP, p.IP6} {
		if a == "" {
			continue
		}
		if _, err := NsRun(n.Netns, "ip", "neigh", "flush", "to", a); err != nil {
			return nil, err
		}
	}
	created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.IP, PodIPs: podIPs, HostIP: n.IP, HostIPs: hostIPs}
	if _, err := client.CoreV1().Pods(namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return nil, err
	}
	t.Pods = append(t.Pods, pod)
	return p, t.Save(dir)
}

// DeletePod undoes CreatePod.
func DeletePod(ctx context.Context, dir, namespace, name string) error {
	return withLock(dir, func() error { return deletePod(ctx, dir, namespace, name) })
}

func deletePod(ctx context.Context, dir, namespace, name string) error {
	t, err := LoadTopology(dir)
	if err != nil {
		return err
	}
	p, err := t.Pod(namespace, name)
	if err != nil {
		return err
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return err
	}
	if t.Kubelet {
		if err := deleteRealPod(ctx, client, p); err != nil {
			return err
		}
		if l, err := loadLedger(dir); err == nil {
			_ = l.removeNetns(p.Netns)
		}
		return forgetPod(t, dir, namespace, name)
	}
	if err := client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	// The runtime tears the sandbox's network down (CNI DEL, with the container ID of
	// the ADD) before it removes the namespace: the bridge plugin deletes the veth,
	// host-local frees the IP.
	var delErr error
	if n, err := t.Node(p.Node); err != nil {
		delErr = err
	} else if p.ContainerID != "" {
		delErr = cniDel(ctx, t, n, podRuntimeConf(p, "", ""))
	} else {
		// A pod wired by hand by an older natd-lab. Delete its veth first: a namespace
		// is torn down asynchronously, and the veth would linger on the node.
		_, _ = NsRun(n.Netns, "ip", "link", "del", hostVeth(namespace, name))
	}
	if _, err := Run("ip", "netns", "del", p.Netns); err != nil {
		return errors.Join(delErr, err)
	}
	if l, err := loadLedger(dir); err == nil {
		_ = l.removeNetns(p.Netns)
	}
	return errors.Join(delErr, forgetPod(t, dir, namespace, name))
}

// forgetPod removes a pod from the topology.
func forgetPod(t *Topology, dir, namespace, name string) error {
	out := t.Pods[:0]
	for _, q := range t.Pods {
		if q.Namespace != namespace || q.Name != name {
			out = append(out, q)
		}
	}
	t.Pods = out
	return t.Save(filepath.Clean(dir))
}
