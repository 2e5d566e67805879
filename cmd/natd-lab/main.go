// Command natd-lab builds a whole natd cluster on one Linux machine: a real etcd and
// kube-apiserver, network namespaces as nodes and pods, a router and a partner server.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"natd.dev/natd/tests/lab"
)

const usage = `natd-lab: a natd cluster in network namespaces

  natd-lab up [--nodes N] [--proxy-mode nftables|iptables] [--network flat|dual|overlay|routed] [--kubelet]
                                               build the lab; start kube-proxy and natd on every node
                                               (dual: nodes, pods and partner get IPv6 addresses too;
                                               --kubelet: real nodes, containerd and a kubelet each,
                                               natd as the DaemonSet from make image)
  natd-lab down                                remove everything the lab made
  natd-lab pod create NAMESPACE NAME --node NODE [--ip A.B.C.D]
                                               a pod wired by the node's CNI chain (--ip: ask for that IP)
  natd-lab pod delete NAMESPACE NAME
  natd-lab node restart NODE                   (re)start that node's natd
  natd-lab service create NAMESPACE NAME [--endpoint IP:PORT]
                                               a Service without selector, TCP and UDP, whose one
                                               endpoint is IP:PORT (default: the partner); prints its ClusterIP
  natd-lab service delete NAMESPACE NAME
  natd-lab probe NAMESPACE NAME [--udp] [--6] [--to IP:PORT]
                                               print the source IP the partner sees from a pod
                                               (--6: over IPv6, to the partner's IPv6 address;
                                               --to: connect there instead, e.g. a ClusterIP)
  natd-lab partner --listen ADDR [--listen ADDR]
                                               the partner server (run by up)

Every verb takes --dir DIR (default ` + lab.DefaultDir + `).
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	verb, args := os.Args[1], os.Args[2:]
	if (verb == "pod" || verb == "node" || verb == "service") && len(args) > 0 {
		verb, args = verb+" "+args[0], args[1:]
	}
	if err := run(ctx, verb, args); err != nil {
		fmt.Fprintln(os.Stderr, "natd-lab:", err)
		os.Exit(1)
	}
}

// parse accepts flags before and after positional arguments.
func parse(fs *flag.FlagSet, args []string) []string {
	var pos []string
	for {
		_ = fs.Parse(args)
		args = fs.Args()
		if len(args) == 0 {
			return pos
		}
		pos, args = append(pos, args[0]), args[1:]
	}
}

func defaultKubeBins() string {
	if c := os.Getenv("NATD_CACHE"); c != "" {
		return filepath.Join(c, "bin")
	}
	if c := os.Getenv("XDG_CACHE_HOME"); c != "" {
		return filepath.Join(c, "natd", "bin")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "natd", "bin")
}

func run(ctx context.Context, verb string, args []string) error {
	fs := flag.NewFlagSet("natd-lab "+verb, flag.ExitOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	dir := fs.String("dir", lab.DefaultDir, "lab directory")
	self, _ := os.Executable()
	switch verb {
	case "up":
		nodes := fs.Int("nodes", 3, "number of nodes (node1 is not egress-eligible)")
		natdBin := fs.String("natd", filepath.Join(filepath.Dir(self), "natd"), "natd binary")
		kubeBins := fs.String("kube-bins", defaultKubeBins(), "directory with etcd, kube-apiserver and kubectl")
		natdArgs := fs.String("natd-args", "", "extra natd flags, space-separated")
		proxyMode := fs.String("proxy-mode", lab.ProxyModeNFTables, "kube-proxy's mode: nftables or iptables")
		network := fs.String("network", lab.NetworkFlat, "network mode: flat, dual (dual-stack), overlay (a VXLAN CNI on an underlay that drops foreign sources) or routed (nodes in subnets of their own, egress IPs announced over BGP to the router)")
		kubelet := fs.Bool("kubelet", false, "real nodes: containerd, runc and a kubelet on each, natd as the manifests' DaemonSet, pods made by the kubelets")
		image := fs.String("image", filepath.Join(filepath.Dir(self), "natd-image.tar"), "--kubelet: natd's image archive (make image)")
		pause := fs.String("pause-image", filepath.Join(filepath.Dir(self), "lab-pause-image.tar"), "--kubelet: the lab's pause image archive (make image)")
		parse(fs, args)
		natd, _ := filepath.Abs(*natdBin)
		start := time.Now()
		fmt.Printf("Bringing up the natd lab in %s (%d nodes, %s network)\n", *dir, *nodes, *network)
		t, err := lab.Up(ctx, lab.Options{Dir: *dir, Nodes: *nodes, Natd: natd, Self: self, KubeBins: *kubeBins,
			NatdArgs: strings.Fields(*natdArgs), ProxyMode: *proxyMode, Network: *network, Out: os.Stdout,
			Kubelet: *kubelet, NatdImage: *image, PauseImage: *pause})
		if err != nil {
			if _, serr := os.Stat(filepath.Join(*dir, "lab-ledger.json")); serr != nil {
				return err // nothing was made
			}
			return fmt.Errorf("%w (natd-lab down --dir %s removes what was made)", err, *dir)
		}
		fmt.Printf("Lab up in %.1fs. kubectl: KUBECONFIG=%s %s get nodes\n", time.Since(start).Seconds(), t.Kubeconfig, t.API.KubectlBinary)
		return nil
	case "down":
		parse(fs, args)
		return lab.Down(*dir)
	case "pod create":
		node := fs.String("node", "", "node to run the pod on")
		ip := fs.String("ip", "", "ask the CNI chain for this pod IP")
		pos := parse(fs, args)
		if len(pos) != 2 || *node == "" {
			return fmt.Errorf("usage: natd-lab pod create NAMESPACE NAME --node NODE [--ip A.B.C.D]")
		}
		var opts []lab.PodOption
		if *ip != "" {
			opts = append(opts, lab.WithIP(*ip))
		}
		p, err := lab.CreatePod(ctx, *dir, pos[0], pos[1], *node, opts...)
		if err != nil {
			return err
		}
		ips := p.IP
		if p.IP6 != "" {
			ips += ", " + p.IP6
		}
		fmt.Printf("pod %s/%s on %s: %s (netns %s)\n", p.Namespace, p.Name, p.Node, ips, p.Netns)
		return nil
	case "pod delete":
		pos := parse(fs, args)
		if len(pos) != 2 {
			return fmt.Errorf("usage: natd-lab pod delete NAMESPACE NAME")
		}
		return lab.DeletePod(ctx, *dir, pos[0], pos[1])
	case "service create":
		endpoint := fs.String("endpoint", fmt.Sprintf("%s:%d", lab.PartnerIP, lab.PartnerPort), "the Service's one endpoint")
		pos := parse(fs, args)
		if len(pos) != 2 {
			return fmt.Errorf("usage: natd-lab service create NAMESPACE NAME [--endpoint IP:PORT]")
		}
		ip, err := lab.CreateEndpointService(ctx, *dir, pos[0], pos[1], *endpoint)
		if err != nil {
			return err
		}
		fmt.Println(ip)
		return nil
	case "service delete":
		pos := parse(fs, args)
		if len(pos) != 2 {
			return fmt.Errorf("usage: natd-lab service delete NAMESPACE NAME")
		}
		return lab.DeleteEndpointService(ctx, *dir, pos[0], pos[1])
	case "node restart":
		natdArgs := fs.String("natd-args", "", "extra natd flags, space-separated")
		pos := parse(fs, args)
		if len(pos) != 1 {
			return fmt.Errorf("usage: natd-lab node restart NODE")
		}
		t, err := lab.RestartNatd(*dir, pos[0], strings.Fields(*natdArgs))
		if err != nil {
			return err
		}
		n, _ := t.Node(pos[0])
		fmt.Printf("natd on %s restarted (pid %d)\n", n.Name, n.NatdPid)
		return lab.WaitNatdReady(ctx, n, 60*time.Second)
	case "probe":
		udp := fs.Bool("udp", false, "probe with a UDP datagram instead of TCP")
		six := fs.Bool("6", false, "probe the partner's IPv6 address (dual network mode)")
		to := fs.String("to", "", "where to connect (default: the partner), e.g. a ClusterIP:PORT")
		pos := parse(fs, args)
		if len(pos) != 2 {
			return fmt.Errorf("usage: natd-lab probe NAMESPACE NAME [--udp] [--to IP:PORT]")
		}
		t, err := lab.LoadTopology(*dir)
		if err != nil {
			return err
		}
		p, err := t.Pod(pos[0], pos[1])
		if err != nil {
			return err
		}
		pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		addr := net.JoinHostPort(t.Partner.IP, strconv.Itoa(t.Partner.Port))
		if *six {
			if t.Partner.IP6 == "" {
				return fmt.Errorf("--6: the lab's partner has no IPv6 address (natd-lab up --network dual makes one)")
			}
			addr = net.JoinHostPort(t.Partner.IP6, strconv.Itoa(t.Partner.Port))
		}
		if *to != "" {
			addr = *to
		}
		var src string
		if *udp {
			src, err = lab.SourceSeenUDP(pctx, p.Netns, addr)
		} else {
			src, err = lab.SourceSeenTCP(pctx, p.Netns, addr)
		}
		if err != nil {
			return fmt.Errorf("no answer from the partner: %w", err)
		}
		fmt.Println(src)
		return nil
	case "partner":
		var listen []string
		fs.Func("listen", "address to serve on (repeatable; default 0.0.0.0:8080)", func(v string) error {
			listen = append(listen, v)
			return nil
		})
		parse(fs, args)
		if len(listen) == 0 {
			listen = []string{fmt.Sprintf("0.0.0.0:%d", lab.PartnerPort)}
		}
		return lab.ServePartner(ctx, listen, os.Stdout)
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown verb %q", verb)
}
