package election

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// Each datagram reaches memberlist whole, with its sender, in a buffer of about its
// own size (not memberlist's 64 KiB per datagram); streams are accepted.
func TestSocketTransportHandsOverDatagramsAtTheirSize(t *testing.T) {
	st, err := newSocketTransport(netip.MustParseAddr("127.0.0.1"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Shutdown() //nolint:errcheck // test
	to := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(st.GetAutoBindPort())))
	c, err := net.DialUDP("udp", nil, to)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, n := range []int{1, 100, 1400, 65507} {
		msg := bytes.Repeat([]byte{byte(n)}, n)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-st.PacketCh():
			if !bytes.Equal(p.Buf, msg) || p.From.String() != c.LocalAddr().String() {
				t.Errorf("datagram of %d bytes arrived as %d bytes from %s; want it whole from %s", n, len(p.Buf), p.From, c.LocalAddr())
			}
			if cap(p.Buf) > 2*n+64 {
				t.Errorf("datagram of %d bytes handed over in a %d-byte buffer", n, cap(p.Buf))
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("datagram of %d bytes not handed over", n)
		}
	}
	// The reply path memberlist uses, and a stream.
	if _, err := st.WriteToAddress([]byte("pong"), memberlist.Address{Addr: c.LocalAddr().String()}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "pong" {
		t.Errorf("reply read %q, %v", buf[:n], err)
	}
	s, err := st.DialAddressTimeout(memberlist.Address{Addr: to.String()}, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	select {
	case a := <-st.StreamCh():
		a.Close()
	case <-time.After(2 * time.Second):
		t.Fatal("stream not accepted")
	}
}

// BenchmarkGossipDatagramReceive is what receiving one heartbeat-sized datagram
// allocates: natd's transport against memberlist's NetTransport.
func BenchmarkGossipDatagramReceive(b *testing.B) {
	for _, kind := range []string{"natd", "memberlist"} {
		b.Run(kind, func(b *testing.B) {
			var packets <-chan *memberlist.Packet
			var port int
			var stop func() error
			if kind == "natd" {
				st, err := newSocketTransport(netip.MustParseAddr("127.0.0.1"), 0)
				if err != nil {
					b.Fatal(err)
				}
				packets, port, stop = st.PacketCh(), st.GetAutoBindPort(), st.Shutdown
			} else {
				nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}})
				if err != nil {
					b.Fatal(err)
				}
				packets, port, stop = nt.PacketCh(), nt.GetAutoBindPort(), nt.Shutdown
			}
			defer stop() //nolint:errcheck // benchmark
			c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			msg := make([]byte, 120) // a sealed heartbeat
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				<-packets
			}
		})
	}
}
