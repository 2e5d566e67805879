package election

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"k8s.io/klog/v2"
)

// socketTransport is memberlist's UDP and TCP sockets on one address and port, as
// memberlist's own NetTransport, except that a datagram costs a buffer of its size:
// NetTransport reads each into a fresh 64 KiB buffer, and at the voters' heartbeat
// rate that was most of what natd allocated (several garbage collections a second,
// each a burst of CPU its heartbeats wait behind when the CPUs are saturated).
type socketTransport struct {
	udp      *net.UDPConn
	tcp      *net.TCPListener
	packets  chan *memberlist.Packet
	streams  chan net.Conn
	shutdown atomic.Bool
	wg       sync.WaitGroup
}

// udpRecvBuffer is the receive buffer asked for the UDP socket (memberlist's size): a
// burst of gossip must not be dropped by the kernel while natd is busy.
const udpRecvBuffer = 2 << 20

// maxUDPPayload is the largest UDP payload.
const maxUDPPayload = 65536

func newSocketTransport(bind netip.Addr, port int) (*socketTransport, error) {
	tcp, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(bind, uint16(port))))
	if err != nil {
		return nil, fmt.Errorf("listening on TCP: %w", err)
	}
	// Port 0 (tests): UDP takes the port TCP was given.
	bound := tcp.Addr().(*net.TCPAddr).AddrPort()
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(bound))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("listening on UDP: %w", err), tcp.Close())
	}
	if err := udp.SetReadBuffer(udpRecvBuffer); err != nil {
		klog.InfoS("Could not enlarge the gossip socket's receive buffer", "err", err)
	}
	t := &socketTransport{udp: udp, tcp: tcp, packets: make(chan *memberlist.Packet), streams: make(chan net.Conn)}
	t.wg.Add(2)
	go t.readDatagrams()
	go t.acceptStreams()
	return t, nil
}

// GetAutoBindPort is the port the sockets are bound to.
func (t *socketTransport) GetAutoBindPort() int { return t.tcp.Addr().(*net.TCPAddr).Port }

// FinalAdvertiseAddr is ip and port if given, else the bound address and port.
func (t *socketTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	if ip == "" {
		ip = t.tcp.Addr().(*net.TCPAddr).IP.String()
	}
	a := net.ParseIP(ip)
	if a == nil || a.IsUnspecified() {
		return nil, 0, fmt.Errorf("advertise address %q: not a usable IP", ip)
	}
	if port == 0 {
		port = t.GetAutoBindPort()
	}
	return a, port, nil
}

func (t *socketTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t *socketTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if ap, err := netip.ParseAddrPort(a.Addr); err == nil {
		_, err = t.udp.WriteToUDPAddrPort(b, ap)
		return time.Now(), err
	}
	to, err := net.ResolveUDPAddr("udp", a.Addr)
	if err != nil {
		return time.Time{}, fmt.Errorf("gossip address %q: %w", a.Addr, err)
	}
	_, err = t.udp.WriteTo(b, to)
	return time.Now(), err
}

func (t *socketTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

func (t *socketTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t *socketTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return (&net.Dialer{Timeout: timeout}).Dial("tcp", a.Addr)
}

func (t *socketTransport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown closes the sockets and waits for their readers, which hand over what they
// read last on unbuffered channels: the caller drains those meanwhile.
func (t *socketTransport) Shutdown() error {
	t.shutdown.Store(true)
	err := errors.Join(t.tcp.Close(), t.udp.Close())
	t.wg.Wait()
	return err
}

// readDatagrams hands every datagram to memberlist in a buffer of its own size, read
// through one reused 64 KiB buffer.
func (t *socketTransport) readDatagrams() {
	defer t.wg.Done()
	buf := make([]byte, maxUDPPayload)
	for {
		n, from, err := t.udp.ReadFromUDPAddrPort(buf)
		at := time.Now()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			klog.V(2).InfoS("Reading a gossip datagram failed", "err", err)
			continue
		}
		if n == 0 {
			continue
		}
		p := &memberlist.Packet{Buf: append([]byte(nil), buf[:n]...), From: net.UDPAddrFromAddrPort(from), Timestamp: at}
		t.packets <- p
	}
}

// acceptStreams hands every accepted TCP connection to memberlist; failed accepts are
// retried with a growing pause (5 ms to 1 s), as NetTransport does.
func (t *socketTransport) acceptStreams() {
	defer t.wg.Done()
	const base, most = 5 * time.Millisecond, time.Second
	pause := time.Duration(0)
	for {
		c, err := t.tcp.AcceptTCP()
		if err != nil {
			if t.shutdown.Load() {
				return
			}
			pause = min(max(2*pause, base), most)
			klog.V(2).InfoS("Accepting a gossip stream failed", "err", err, "retryIn", pause)
			time.Sleep(pause)
			continue
		}
		pause = 0
		t.streams <- c
	}
}

var _ memberlist.NodeAwareTransport = (*socketTransport)(nil)
