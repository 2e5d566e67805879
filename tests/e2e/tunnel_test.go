package e2e

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"natd.dev/natd/natd/dataplane"
	"natd.dev/natd/tests/lab"
)

// A new pinned pod on a node that does not hold its egress IP: its first datagram and
// its first TCP connection reach the partner with the egress IP, nothing lost or
// retransmitted — the holder learns the egress IP from the tunnel device the packet
// arrives on, not from an API watch that may lag the pod's start.
func TestNewPodsFirstPacketsOnAnotherNode(t *testing.T) {
	const ns, eip = "first-packet", "198.18.0.219"
	pin(t, ns, eip)
	holder := waitHolder(t, eip)
	waitSeen(t, newPod(t, ns, "warm", holder), udp, eip, nodeIPs()...)
	for _, n := range topo.Nodes {
		if n.Name == holder {
			continue
		}
		for i := 0; i < 5; i++ {
			p := newPod(t, ns, fmt.Sprintf("new-%s-%d", n.Name, i), n.Name)
			// One datagram, sent once: lost, there is no echo within the deadline.
			got, err := oneDatagram(p, 900*time.Millisecond)
			if err != nil || got != eip {
				t.Errorf("%s: first datagram: partner saw %q (%v), want %s at once", p.Name, got, err, eip)
			}
			p2 := newPod(t, ns, fmt.Sprintf("new-tcp-%s-%d", n.Name, i), n.Name)
			start := time.Now()
			got, err = seen(p2, tcp, 900*time.Millisecond) // a retransmitted SYN takes 1 s
			if err != nil || got != eip {
				t.Errorf("%s: first TCP connection: partner saw %q (%v) after %s, want %s without a retransmit",
					p2.Name, got, err, time.Since(start).Round(time.Millisecond), eip)
			}
		}
	}
}

// oneDatagram sends a single datagram from p and waits for the partner's echo. Unlike
// seen, it never sends again: the first datagram itself must get through.
func oneDatagram(p *lab.Pod, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := lab.DialIn(ctx, p.Netns, "udp", partnerAddr())
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	payload := fmt.Sprintf("once-%d", time.Now().UnixNano())
	if _, err := c.Write([]byte(payload)); err != nil {
		return "", err
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		return "", err
	}
	host, rest, _ := strings.Cut(string(buf[:n]), " ")
	if rest != payload {
		return "", fmt.Errorf("echo %q is not of %q", rest, payload)
	}
	return host, nil
}

// A pod that wraps its own packet in natd's tunnel, addressed to the holder with the
// egress IP's VNI, would have it sent out with the egress IP: an allow-list bypass for
// anyone who can reach a node. Neither a pod's own address nor a forged node address
// gets such a packet through; the partner never sees it.
func TestPodsCannotUseTheTunnel(t *testing.T) {
	const ns, eip = "tunnel-forger", "198.18.0.220"
	pin(t, "tunnel-victim", eip)
	holder := waitHolder(t, eip)
	waitSeen(t, newPod(t, "tunnel-victim", "app", holder), udp, eip, nodeIPs()...)
	ensureNamespace(t, ns)
	var forger *lab.Pod
	var other string
	for _, n := range topo.Nodes {
		if n.Name != holder {
			if forger == nil {
				forger = newPod(t, ns, "forger", n.Name)
			} else if other == "" {
				other = n.Name
			}
		}
	}
	local := newPod(t, ns, "forger-local", holder) // on the holder itself
	vni := dataplane.TunnelVNI(netip.MustParseAddr(eip))
	id := fmt.Sprintf("forged-%d", time.Now().UnixNano())
	for round := 0; round < 20; round++ {
		for _, c := range []struct {
			pod  *lab.Pod
			src  string // the outer source: the pod's own, or a node's
			name string
		}{
			{forger, forger.IP, "own address"},
			{forger, nodeIP(other), "forged address of " + other},
			{local, local.IP, "own address, on the holder"},
			{local, nodeIP(other), "forged address of " + other + ", on the holder"},
		} {
			inner := udpPacket(c.pod.IP, topo.Partner.IP, 40000, uint16(topo.Partner.Port), []byte(fmt.Sprintf("stream %s %d", id, round)))
			frame := append(vxlanHeader(vni), ethernet(dataplane.TunnelMAC(netip.MustParseAddr(nodeIP(holder))), inner)...)
			outer := udpPacket(c.src, nodeIP(holder), 40001, 4799, frame)
			if err := sendRaw(c.pod.Netns, outer); err != nil {
				t.Fatalf("%s (%s): %v", c.pod.Name, c.name, err)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := lab.StreamArrivals(ctx, topo, id)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > 0 {
		t.Fatalf("the partner received %d forged tunnel packets, the first from %s", len(got), got[0].Src)
	}
}

// udpPacket builds an IPv4/UDP packet (UDP checksum 0: none).
func udpPacket(src, dst string, sport, dport uint16, payload []byte) []byte {
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	total := 20 + 8 + len(payload)
	b := make([]byte, total)
	b[0], b[8], b[9] = 0x45, 64, syscall.IPPROTO_UDP
	binary.BigEndian.PutUint16(b[2:], uint16(total))
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	binary.BigEndian.PutUint16(b[10:], ipChecksum(b[:20]))
	binary.BigEndian.PutUint16(b[20:], sport)
	binary.BigEndian.PutUint16(b[22:], dport)
	binary.BigEndian.PutUint16(b[24:], uint16(8+len(payload)))
	copy(b[28:], payload)
	return b
}

func ipChecksum(h []byte) uint16 {
	var sum uint32
	for i := 0; i < len(h); i += 2 {
		sum += uint32(h[i])<<8 | uint32(h[i+1])
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

func vxlanHeader(vni uint32) []byte {
	b := make([]byte, 8)
	b[0] = 0x08
	binary.BigEndian.PutUint32(b[4:], vni<<8)
	return b
}

// ethernet wraps an IPv4 packet in a frame to dst (the holder's tunnel MAC: the forger
// knows the scheme).
func ethernet(dst net.HardwareAddr, ip []byte) []byte {
	f := make([]byte, 14, 14+len(ip))
	copy(f[0:6], dst)
	copy(f[6:12], net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01})
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	return append(f, ip...)
}

// sendRaw sends a complete IPv4 packet from inside network namespace ns.
func sendRaw(ns string, pkt []byte) error {
	return lab.InNetns(ns, func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		var to syscall.SockaddrInet4
		copy(to.Addr[:], pkt[16:20])
		return syscall.Sendto(fd, pkt, 0, &to)
	})
}

// Bulk TCP both ways between a pinned pod on a node that does not hold its egress IP
// and the partner: every segment fits the tunnels (50 bytes of encapsulation each
// way), so nothing stalls on a path MTU.
func TestLargeTransfersThroughTheTunnel(t *testing.T) {
	const ns, eip, size = "bulk", "198.18.0.221", 4 << 20
	pin(t, ns, eip)
	holder := waitHolder(t, eip)
	node := notHolding(holder)
	p := newPod(t, ns, "bulk", node)
	waitSeen(t, p, tcp, eip, nodeIPs()...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := lab.DialIn(ctx, p.Netns, "tcp", partnerAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	rd := bufio.NewReader(c)
	start := time.Now()
	fmt.Fprintf(c, "GET /bytes?n=%d HTTP/1.1\r\nHost: partner\r\n\r\n", size)
	resp, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != size {
		t.Fatalf("download: %d of %d bytes (%v)", n, size, err)
	}
	down := time.Since(start)
	start = time.Now()
	fmt.Fprintf(c, "POST /upload HTTP/1.1\r\nHost: partner\r\nContent-Length: %d\r\n\r\n", size)
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	resp, err = http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if got := strings.TrimSpace(string(body)); got != fmt.Sprintf("%s %d", eip, size) {
		t.Fatalf("upload: partner says %q, want %q", got, fmt.Sprintf("%s %d", eip, size))
	}
	t.Logf("%d MiB down in %s, up in %s through the tunnels (pod on %s, holder %s)", size>>20,
		down.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), node, holder)
}
