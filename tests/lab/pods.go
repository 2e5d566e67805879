package lab

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// podNetns is the namespace of a lab pod; names stay unique and readable.
func podNetns(namespace, name string) string {
	return "natd-pod-" + namespace + "-" + name
}

// hostVeth is the node-side interface of a pod, short enough for IFNAMSIZ.
func hostVeth(namespace, name string) string {
	h := sha256.Sum256([]byte(namespace + "/" + name))
	return "vp" + hex.EncodeToString(h[:])[:10]
}

// CreatePod plays the kubelet and CNI: a network namespace wired to the node's cni0
// bridge, and a Pod object bound to the node with its IP in the status.
func CreatePod(ctx context.Context, dir, namespace, name, node string) (*Pod, error) {
	var p *Pod
	err := withLock(dir, func() error {
		var err error
		p, err = createPod(ctx, dir, namespace, name, node)
		return err
	})
	return p, err
}

func createPod(ctx context.Context, dir, namespace, name, node string) (p *Pod, err error) {
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
	ip, err := freePodIP(t, n)
	if err != nil {
		return nil, err
	}
	pod := Pod{Namespace: namespace, Name: name, Node: node, Netns: podNetns(namespace, name), IP: ip.String()}
	p = &pod
	l, err := loadLedger(dir)
	if err != nil {
		return nil, err
	}
	if err := l.addNetns(p.Netns); err != nil {
		return nil, err
	}
	veth := hostVeth(namespace, name)
	defer func() {
		if err != nil { // undo the half-made pod so that the same name can be tried again
			_, _ = NsRun(n.Netns, "ip", "link", "del", veth)
			_, _ = Run("ip", "netns", "del", pod.Netns)
			_ = l.removeNetns(pod.Netns)
		}
	}()
	gw := strings.TrimSuffix(n.PodCIDR, "0/24") + "1"
	if _, err := Run("ip", "netns", "add", p.Netns); err != nil {
		return nil, err
	}
	// A pod of the same name may just have been deleted; its veth may still be there.
	_, _ = NsRun(n.Netns, "ip", "link", "del", veth)
	for _, c := range [][]string{
		{n.Netns, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", p.Netns},
		{n.Netns, "ip", "link", "set", veth, "master", "cni0"},
		{n.Netns, "ip", "link", "set", veth, "up"},
		{p.Netns, "ip", "link", "set", "lo", "up"},
		{p.Netns, "ip", "addr", "add", p.IP + "/24", "dev", "eth0"},
		{p.Netns, "ip", "link", "set", "eth0", "up"},
		{p.Netns, "ip", "route", "add", "default", "via", gw},
		// The IP may have belonged to a deleted pod: forget its old MAC now rather than
		// after the neighbour entry times out, as a CNI's ARP on sandbox start does.
		{n.Netns, "ip", "neigh", "flush", "to", p.IP},
	} {
		if _, err := NsRun(c[0], c[1:]...); err != nil {
			return nil, err
		}
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return nil, err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, err
	}
	obj := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "natd.dev/lab-pod"}},
			AutomountServiceAccountToken: ptr.To(false)},
	}
	created, err := client.CoreV1().Pods(namespace).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return nil, err
	}
	created.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: p.IP, PodIPs: []corev1.PodIP{{IP: p.IP}},
		HostIP: n.IP, HostIPs: []corev1.HostIP{{IP: n.IP}}}
	if _, err := client.CoreV1().Pods(namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return nil, err
	}
	t.Pods = append(t.Pods, pod)
	return p, t.Save(dir)
}

func freePodIP(t *Topology, n *Node) (netip.Addr, error) {
	prefix := netip.MustParsePrefix(n.PodCIDR)
	used := map[string]bool{}
	for _, p := range t.Pods {
		used[p.IP] = true
	}
	ip := prefix.Addr()
	for i := 0; i < 10; i++ {
		ip = ip.Next()
	}
	for ; prefix.Contains(ip.Next()); ip = ip.Next() {
		if !used[ip.String()] {
			return ip, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("pod CIDR %s of %s is full", n.PodCIDR, n.Name)
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
	if err := client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	// Delete the veth first: a namespace is torn down asynchronously, and its veth
	// would linger on the node and block a pod of the same name.
	if n, err := t.Node(p.Node); err == nil {
		_, _ = NsRun(n.Netns, "ip", "link", "del", hostVeth(namespace, name))
	}
	if _, err := Run("ip", "netns", "del", p.Netns); err != nil {
		return err
	}
	if l, err := loadLedger(dir); err == nil {
		_ = l.removeNetns(p.Netns)
	}
	out := t.Pods[:0]
	for _, q := range t.Pods {
		if q.Namespace != namespace || q.Name != name {
			out = append(out, q)
		}
	}
	t.Pods = out
	return t.Save(filepath.Clean(dir))
}
