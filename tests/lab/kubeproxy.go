package lab

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// kube-proxy's modes the lab runs.
const (
	ProxyModeNFTables = "nftables"
	ProxyModeIPTables = "iptables"

	kubeProxyUser    = "system:kube-proxy"
	kubeProxyHealthz = "127.0.0.1:10256"
	kubeProxyMetrics = "127.0.0.1:10249"
)

// kubeProxyCredentials gives kube-proxy the identity kubeadm gives it: a client
// certificate for the user system:kube-proxy, which the API server's bootstrap RBAC
// binds to the ClusterRole system:node-proxier. Should a version of the API server not
// bind it, the lab binds it itself.
func (u *upper) kubeProxyCredentials(ctx context.Context, client kubernetes.Interface) error {
	cert, key, err := u.pki.issue("kube-proxy", kubeProxyUser, nil, nil, nil)
	if err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(u.dir, "kube-proxy.kubeconfig"), "https://"+apiNodeIP+":6443", u.pki.caPEM,
		&clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}); err != nil {
		return err
	}
	crb, err := client.RbacV1().ClusterRoleBindings().Get(ctx, "system:node-proxier", metav1.GetOptions{})
	if err == nil && crb.RoleRef.Name == "system:node-proxier" {
		for _, s := range crb.Subjects {
			if s.Kind == rbacv1.UserKind && s.Name == kubeProxyUser {
				return nil
			}
		}
	} else if err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	u.say("binding %s to system:node-proxier (the API server's bootstrap policy did not)", kubeProxyUser)
	_, err = client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "natd-lab:kube-proxy"},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "system:node-proxier"},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: kubeProxyUser}},
	}, metav1.CreateOptions{})
	return err
}

// kubeProxyArgs are the flags of node n's kube-proxy. It must not change anything
// outside the node's network namespace: the conntrack limits and timeouts live in
// global sysctls (nf_conntrack_max) or would override the host's, so they are left
// alone (0); healthz and metrics listen on the namespace's loopback. In the dual mode
// it proxies both families (it does so by itself when the node has both), and both pod
// CIDRs are the cluster's.
func kubeProxyArgs(dir, mode string, t *Topology, n *Node) []string {
	clusterCIDR := ClusterCIDR
	if t.IPv6() {
		clusterCIDR += "," + t.ClusterCIDR6
	}
	return []string{
		"--kubeconfig", filepath.Join(dir, "kube-proxy.kubeconfig"),
		"--proxy-mode", mode,
		"--hostname-override", n.Name,
		"--cluster-cidr", clusterCIDR,
		// NodePorts on the node's IP only, in both modes (nftables' default; iptables
		// mode would otherwise also set route_localnet for NodePorts on 127.0.0.1).
		"--nodeport-addresses", "primary",
		"--conntrack-max-per-core", "0",
		"--conntrack-tcp-timeout-established", "0",
		"--conntrack-tcp-timeout-close-wait", "0",
		"--healthz-bind-address", kubeProxyHealthz,
		"--metrics-bind-address", kubeProxyMetrics,
		// A lab process is no more precious than the host's own.
		"--oom-score-adj", "0",
		"--v", "2",
	}
}

// startKubeProxies starts kube-proxy in every node's namespace.
func (u *upper) startKubeProxies(t *Topology) error {
	for i := range t.Nodes {
		n := &t.Nodes[i]
		pid, err := u.start(n.Netns, t.API.KubeProxyBinary, n.KubeProxyLog, kubeProxyArgs(u.dir, t.ProxyMode, t, n)...)
		if err != nil {
			return err
		}
		n.KubeProxyPid = pid
	}
	return nil
}

// WaitKubeProxyHealthy waits until node n's kube-proxy answers /healthz with 200: it
// has programmed the node's Services at least once.
func WaitKubeProxyHealthy(ctx context.Context, n *Node, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for time.Now().Before(deadline) {
		code, err := httpGetIn(ctx, n.Netns, kubeProxyHealthz, "/healthz")
		if err == nil && code == 200 {
			return nil
		}
		if err == nil {
			last = fmt.Sprintf("status %d", code)
		}
		if !Alive(n.KubeProxyPid) {
			return fmt.Errorf("kube-proxy on %s exited; see %s", n.Name, n.KubeProxyLog)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("kube-proxy on %s not healthy after %s (%s); see %s", n.Name, timeout, last, n.KubeProxyLog)
}

// httpGetIn makes a plain HTTP GET to addr inside network namespace ns and returns
// the status code.
func httpGetIn(ctx context.Context, ns, addr, path string) (int, error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := DialIn(rctx, ns, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr)
	b, err := io.ReadAll(io.LimitReader(c, 4096))
	if err != nil && len(b) == 0 {
		return 0, err
	}
	var proto string
	var code int
	if _, err := fmt.Sscanf(string(b), "%s %d", &proto, &code); err != nil || !strings.HasPrefix(proto, "HTTP/") {
		return 0, fmt.Errorf("not an HTTP answer from %s: %q", addr, b)
	}
	return code, nil
}
