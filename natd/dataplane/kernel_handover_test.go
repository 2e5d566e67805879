package dataplane

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Two pods, one on each node, both use source port 40000 to one partner port: the old
// holder gave one of them another port. node2 takes the egress IP with the bindings
// handed over, and their next datagrams reach the partner from exactly the ports the
// partner knew; a connection without a binding keeps its own port, and a binding
// that is not a pod's connection is not written.
func TestKernelHandedOverBindingsKeepTheirPorts(t *testing.T) {
	l := newPathLab(t)
	s1, s2 := l.states(0, 0)
	l.record(l.d1, l.pinnedOther, "vp1b")
	l.record(l.d2, l.pinnedHolder, "vp2")
	// node2 holds nothing yet (no holder: fail closed), node1 sends to node2.
	before := s2
	before.Egress = []EgressIP{{IP: s2.Egress[0].IP, Pods: s2.Egress[0].Pods}}
	if _, err := l.d2.Apply(before); err != nil {
		t.Fatal(err)
	}
	if _, err := l.d1.Apply(s1); err != nil {
		t.Fatal(err)
	}

	var sink net.PacketConn
	if err := inNetns(&l.partner.h, func() (err error) {
		sink, err = net.ListenPacket("udp4", net.JoinHostPort(pathPartner, "7009"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	eip := netip.MustParseAddr(pathEgressIP)
	partner := netip.AddrPortFrom(netip.MustParseAddr(pathPartner), 7009)
	binding := func(pod string, port uint16) Binding {
		return Binding{Proto: unix.IPPROTO_UDP, Pod: netip.AddrPortFrom(netip.MustParseAddr(pod), 40000),
			Partner: partner, Egress: netip.AddrPortFrom(eip, port)}
	}
	handed := []Binding{binding(l.pinnedOther.ip, 51234), binding(l.pinnedHolder.ip, 51235)}
	s2.Handover = append(slices.Clone(handed),
		binding("10.99.0.1", 51236), // not a pod
		Binding{Proto: unix.IPPROTO_UDP, Pod: netip.MustParseAddrPort("10.244.2.99:40000"), Partner: partner,
			Egress: netip.AddrPortFrom(eip, 51237)}) // a pod on node2 that is not pinned
	res, err := l.d2.Apply(s2)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(res.Announced, eip) {
		t.Fatalf("node2 did not take %s: %+v", eip, res)
	}

	seen := func(p *pathPod, sport int) string {
		t.Helper()
		var c *net.UDPConn
		if err := inNetns(&p.ns.h, func() (err error) {
			c, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(p.ip), Port: sport}, net.UDPAddrFromAddrPort(partner))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		id := fmt.Sprintf("%s:%d", p.ip, sport)
		for range 20 {
			c.Write([]byte(id))
			sink.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			buf := make([]byte, 100)
			for {
				n, from, err := sink.ReadFrom(buf)
				if err != nil {
					break
				}
				if string(buf[:n]) == id {
					return from.String()
				}
			}
		}
		return "nothing"
	}
	for _, c := range []struct {
		pod   *pathPod
		sport int
		want  string
	}{
		{l.pinnedOther, 40000, pathEgressIP + ":51234"},  // through the tunnel
		{l.pinnedHolder, 40000, pathEgressIP + ":51235"}, // on the holder itself
		{l.pinnedOther, 40001, pathEgressIP + ":40001"},  // no binding: the port is kept
	} {
		if got := seen(c.pod, c.sport); got != c.want {
			t.Errorf("pod %s from port %d: the partner saw %s, want %s", c.pod.ip, c.sport, got, c.want)
		}
	}
	// What node2 would hand on: exactly the two bindings (a kept port needs none; the
	// refused ones were never written).
	got, err := l.d2.Bindings([]netip.Addr{eip})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(handed, compareBindings)
	if !slices.Equal(got, handed) {
		t.Errorf("node2's bindings to hand over:\n%v\nwant\n%v", got, handed)
	}
	flows, err := l.d2.nl.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		if src := f.Forward.SrcIP.String(); src == "10.99.0.1" || src == "10.244.2.99" {
			t.Errorf("a refused binding was written: %s", f)
		}
	}
}
