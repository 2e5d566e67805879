package lab

import (
	"context"
	"fmt"
	"net"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

// CreateEndpointService makes a Service without a selector and, since the lab runs no
// controller-manager, its EndpointSlice: one ready endpoint, endpoint (IP:PORT, e.g.
// the partner's 203.0.113.10:8080), behind ports "tcp" and "udp" that both have the
// endpoint's port number. kube-proxy on every node then DNATs the returned ClusterIP
// to it. The namespace is created when missing.
func CreateEndpointService(ctx context.Context, dir, namespace, name, endpoint string) (clusterIP string, err error) {
	host, portStr, err := net.SplitHostPort(endpoint)
	if err != nil {
		return "", err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 || port > 65535 {
		return "", fmt.Errorf("bad port in %q", endpoint)
	}
	ip := net.ParseIP(host)
	if ip == nil || ip.To4() == nil {
		return "", fmt.Errorf("endpoint %q is not an IPv4 address and port", endpoint)
	}
	t, err := LoadTopology(dir)
	if err != nil {
		return "", err
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return "", err
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return "", err
	}
	p32 := int32(port)
	svc, err := client.CoreV1().Services(namespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, Ports: []corev1.ServicePort{
			{Name: "tcp", Protocol: corev1.ProtocolTCP, Port: p32},
			{Name: "udp", Protocol: corev1.ProtocolUDP, Port: p32},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	_, err = client.DiscoveryV1().EndpointSlices(namespace).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-lab", Namespace: namespace, Labels: map[string]string{
			discoveryv1.LabelServiceName: name,
			discoveryv1.LabelManagedBy:   "natd-lab",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{ip.String()},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)}}},
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr.To("tcp"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To(p32)},
			{Name: ptr.To("udp"), Protocol: ptr.To(corev1.ProtocolUDP), Port: ptr.To(p32)},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		_ = client.CoreV1().Services(namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
		return "", err
	}
	return svc.Spec.ClusterIP, nil
}

// DeleteEndpointService removes what CreateEndpointService made.
func DeleteEndpointService(ctx context.Context, dir, namespace, name string) error {
	t, err := LoadTopology(dir)
	if err != nil {
		return err
	}
	client, err := Client(t.Kubeconfig)
	if err != nil {
		return err
	}
	if err := client.DiscoveryV1().EndpointSlices(namespace).Delete(ctx, name+"-lab", metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	if err := client.CoreV1().Services(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return nil
}
