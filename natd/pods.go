package natd

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// maxPodIPv4s is how many IPv4 addresses natd keeps per pod; Kubernetes gives a pod at
// most one per family.
const maxPodIPv4s = 2

// podRecord is all natd keeps of a Pod: the pod informer's transform turns every Pod
// into one. A sync reads a record for every pinned pod, so the fields it reads come
// first and fit in one cache line; a full Pod spreads them over several, and at 50k
// pods the cache misses alone cost more than the rest of the sync. It also keeps the
// agent's memory at a fraction of what full Pods take.
type podRecord struct {
	ipv4    [maxPodIPv4s][4]byte
	nIPv4   uint8
	hasIPv6 bool
	inert   bool // host network or finished: not natd's to pin
	hostNet bool // host network: shares the node's addresses, so natd cannot pin it
	node    string
	ipv6    [16]byte

	metav1.TypeMeta
	metav1.ObjectMeta // name, namespace, UID and resource version only: the informer's key
}

var _ runtime.Object = &podRecord{}
var _ metav1.Object = &podRecord{}

func (p *podRecord) DeepCopyObject() runtime.Object {
	c := *p
	c.ObjectMeta = *p.DeepCopy()
	return &c
}

// terminating reports whether the pod is being deleted: of two pods that the API shows
// with one IP, the other one is the IP's new owner.
func (p *podRecord) terminating() bool { return p.DeletionTimestamp != nil }

// recordOf reduces a Pod to a podRecord. It is the pod informer's transform, which
// client-go may apply to an object twice: a record passes through unchanged.
func recordOf(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a record already, or a tombstone
	}
	r := &podRecord{
		// Host-network pods use the node's address; finished pods' IPs may already
		// belong to another pod.
		inert:   pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed,
		hostNet: pod.Spec.HostNetwork,
		node:    pod.Spec.NodeName,
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID,
			ResourceVersion: pod.ResourceVersion, DeletionTimestamp: pod.DeletionTimestamp},
	}
	add := func(s string) {
		ip, err := netip.ParseAddr(s)
		switch {
		case err != nil:
		case ip.Is4() && r.nIPv4 < maxPodIPv4s:
			r.ipv4[r.nIPv4] = ip.As4()
			r.nIPv4++
		case ip.Is6() && !ip.Is4In6() && !r.hasIPv6:
			r.ipv6, r.hasIPv6 = ip.As16(), true
		}
	}
	// status.podIPs lists every address (podIP is its first entry); older writers set
	// only podIP.
	if len(pod.Status.PodIPs) == 0 {
		add(pod.Status.PodIP)
	}
	for _, pip := range pod.Status.PodIPs {
		add(pip.IP)
	}
	return r, nil
}
