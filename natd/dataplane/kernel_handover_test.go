package dataplane

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	mdnetlink "github.com/mdlayher/netlink"
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

// What a holder pays each --handover-interval: reading conntrack with n entries SNATed
// to its egress IP, one in a hundred of them with a changed port.
func BenchmarkBindings(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			ns := newTestNS(b, "198.18.0.12")
			d := ns.dataplane()
			eip := netip.MustParseAddr("198.18.0.200")
			ns.run("sysctl", "-qw", fmt.Sprintf("net.netfilter.nf_conntrack_max=%d", 2*n))
			pod := netip.MustParseAddr("10.244.1.2")
			for i := range n {
				// Unique reply tuples: a partner port per 60,000 connections.
				port := uint16(1024 + i%60000)
				partner := netip.AddrPortFrom(netip.MustParseAddr("203.0.113.10"), uint16(443+i/60000))
				natPort := port // kept: an ordinary pinned connection
				if i%100 == 0 {
					natPort = 65535 - uint16(i/100) // above every kept port
				}
				bd := Binding{Proto: unix.IPPROTO_TCP, Pod: netip.AddrPortFrom(pod, port), Partner: partner,
					Egress: netip.AddrPortFrom(eip, natPort)}
				if err := d.createBinding(bd, 0); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			var got []Binding
			for range b.N {
				var err error
				if got, err = d.Bindings([]netip.Addr{eip}); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(got)), "bindings")
		})
	}
}

// A held IP's TCP connections are made liberal both ways when the handover loop reads
// them (Bindings), and an IP this node starts handing over has the ones younger than
// that made liberal then: the replies that acknowledge what went through the new
// holder are un-NATed here. Other connections are left alone.
func TestKernelHandingOverMakesConnectionsLiberal(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	conn := func(egress string) Binding {
		return Binding{Proto: unix.IPPROTO_TCP, Pod: netip.MustParseAddrPort("10.244.1.10:40000"),
			Partner: netip.MustParseAddrPort("203.0.113.10:443"), Egress: netip.MustParseAddrPort(egress)}
	}
	held, other := conn("198.18.0.200:40000"), conn("198.18.0.201:40000")
	other.Partner = netip.MustParseAddrPort("203.0.113.11:443")
	for _, b := range []Binding{held, other} {
		if err := d.createBinding(b, 0); err != nil {
			t.Fatal(err)
		}
	}
	if f := tcpFlags(t, d, held); f != [2]byte{} {
		t.Fatalf("liberal before the handover loop read it: %v", f)
	}
	liberal := func(b Binding, why string) {
		t.Helper()
		if f := tcpFlags(t, d, b); f[0]&ipCtTCPFlagBeLiberal == 0 || f[1]&ipCtTCPFlagBeLiberal == 0 {
			t.Errorf("%s: flags %v, want liberal both ways", why, f)
		}
	}
	if _, err := d.Bindings([]netip.Addr{held.Egress.Addr()}); err != nil {
		t.Fatal(err)
	}
	liberal(held, "a held IP's connection the handover loop read")
	younger := conn("198.18.0.200:40001")
	younger.Pod = netip.MustParseAddrPort("10.244.1.10:40001")
	if err := d.createBinding(younger, 0); err != nil {
		t.Fatal(err)
	}
	st.Egress[0].HandingOver = true
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	liberal(younger, "a connection of the IP handed over, younger than the last read")
	if f := tcpFlags(t, d, other); f != [2]byte{} {
		t.Errorf("a connection of another IP: flags %v, want none", f)
	}
}

// tcpFlags reads the conntrack TCP flags (original, reply direction) of b's entry.
func tcpFlags(t *testing.T, d *Dataplane, b Binding) [2]byte {
	t.Helper()
	req, err := ctRequest(1, mdnetlink.Acknowledge, false, func(ae *mdnetlink.AttributeEncoder) { // IPCTNL_MSG_CT_GET
		ctTuple(ae, ctaTupleOrig, b.Proto, b.Pod, b.Partner)
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := mdnetlink.Dial(unix.NETLINK_NETFILTER, &mdnetlink.Config{NetNS: int(*d.cfg.NetNS)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msgs, err := c.Execute(req)
	if err != nil || len(msgs) == 0 || len(msgs[0].Data) < 4 { // the entry, then the acknowledgement
		t.Fatalf("reading %s→%s: %d messages, %v", b.Pod, b.Partner, len(msgs), err)
	}
	var flags [2]byte
	ad, err := mdnetlink.NewAttributeDecoder(msgs[0].Data[4:])
	if err != nil {
		t.Fatal(err)
	}
	for ad.Next() {
		if ad.Type() != ctaProtoinfo {
			continue
		}
		ad.Nested(func(ad *mdnetlink.AttributeDecoder) error {
			for ad.Next() {
				if ad.Type() == ctaProtoinfoTCP {
					ad.Nested(func(ad *mdnetlink.AttributeDecoder) error {
						for ad.Next() {
							switch ad.Type() {
							case ctaProtoinfoTCPFlagsOrig:
								flags[0] = ad.Bytes()[0]
							case ctaProtoinfoTCPFlagsReply:
								flags[1] = ad.Bytes()[0]
							}
						}
						return nil
					})
				}
			}
			return nil
		})
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return flags
}

// A holder that gave its IP up for a moment (a quorum break) and takes it back keeps
// the pod's port: a partner's datagram that reached it in between (the router still
// sends the IP there) was forwarded and left a conntrack entry holding the
// connection's tuple, which the takeover deletes.
func TestKernelTakingBackKeepsThePort(t *testing.T) {
	l := newPathLab(t)
	l.applyNatd(0, 0)
	_, s2 := l.states(0, 0)
	var sink *net.UDPConn
	if err := inNetns(&l.partner.h, func() (err error) {
		sink, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(pathPartner), Port: 7010})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var pod *net.UDPConn
	if err := inNetns(&l.pinnedOther.ns.h, func() (err error) {
		pod, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.ParseIP(l.pinnedOther.ip), Port: 40010}, sink.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	seen := func() string {
		t.Helper()
		for range 20 {
			pod.Write([]byte("x"))
			sink.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, from, err := sink.ReadFromUDP(make([]byte, 10)); err == nil {
				return from.String()
			}
		}
		return "nothing"
	}
	want := pathEgressIP + ":40010"
	if got := seen(); got != want {
		t.Fatalf("before: the partner saw %s, want %s", got, want)
	}
	// node2 gives the IP up (no holder: fail closed) ...
	released := s2
	released.Egress = []EgressIP{{IP: s2.Egress[0].IP, Pods: s2.Egress[0].Pods}}
	if _, err := l.d2.Apply(released); err != nil {
		t.Fatal(err)
	}
	// ... the partner's next datagram still reaches it and is forwarded ...
	sink.WriteToUDP([]byte("y"), &net.UDPAddr{IP: net.ParseIP(pathEgressIP), Port: 40010})
	time.Sleep(100 * time.Millisecond)
	// ... and node2 takes the IP back: the pod's next datagram keeps its port.
	if _, err := l.d2.Apply(s2); err != nil {
		t.Fatal(err)
	}
	if got := seen(); got != want {
		t.Errorf("taken back: the partner saw %s, want %s", got, want)
	}
}
