// Package memnet is an in-memory network for memberlist: every member of a large
// natd cluster can run in one process, with natd's real gossip code, over a network
// that loses, delays, duplicates and partitions packets as the test says. It exists for
// the scale harness and its partition tests; natd itself never uses it.
//
// Datagrams behave like UDP: sent to nobody, to a stopped member, into a partition or
// into a full receive buffer, they vanish without an error. Streams behave like TCP
// through a partition: the dial hangs until its timeout, then fails.
package memnet

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Network connects Transports by address. Its zero value is not usable: use New.
type Network struct {
	mu         sync.RWMutex
	transports map[netip.AddrPort]*Transport
	loss, dup  float64
	delay      time.Duration
	jitter     time.Duration
	reaches    func(from, to netip.Addr) bool // nil: everyone reaches everyone
	rng        *rand.Rand                     // under rngMu
	rngMu      sync.Mutex

	// Counters of what the network did to datagrams.
	Sent, Dropped, Duplicated, Overflowed atomic.Int64
}

// New returns a network without faults.
func New(seed uint64) *Network {
	return &Network{transports: map[netip.AddrPort]*Transport{}, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// SetLoss drops each datagram with probability p.
func (n *Network) SetLoss(p float64) { n.mu.Lock(); n.loss = p; n.mu.Unlock() }

// SetDuplicate delivers each datagram twice with probability p.
func (n *Network) SetDuplicate(p float64) { n.mu.Lock(); n.dup = p; n.mu.Unlock() }

// SetDelay delays each datagram by d plus up to jitter.
func (n *Network) SetDelay(d, jitter time.Duration) {
	n.mu.Lock()
	n.delay, n.jitter = d, jitter
	n.mu.Unlock()
}

// SetReach decides, for every datagram and every new stream, whether from reaches to
// (one way: a stream needs both ways). nil heals every partition.
func (n *Network) SetReach(reaches func(from, to netip.Addr) bool) {
	n.mu.Lock()
	n.reaches = reaches
	n.mu.Unlock()
}

// Transport returns a new member's transport at addr.
func (n *Network) Transport(addr netip.AddrPort) (*Transport, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if old, ok := n.transports[addr]; ok && !old.closed.Load() {
		return nil, fmt.Errorf("address %s is in use", addr)
	}
	t := &Transport{net: n, addr: addr, packets: make(chan *memberlist.Packet, packetBuffer),
		streams: make(chan net.Conn), done: make(chan struct{})}
	n.transports[addr] = t
	return t, nil
}

// packetBuffer is a receive buffer's size in datagrams (a UDP socket's, roughly).
const packetBuffer = 2048

func (n *Network) random() float64 {
	n.rngMu.Lock()
	defer n.rngMu.Unlock()
	return n.rng.Float64()
}

func (n *Network) lookup(to string) (*Transport, bool) {
	ap, err := netip.ParseAddrPort(to)
	if err != nil {
		return nil, false
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	t, ok := n.transports[ap]
	return t, ok && !t.closed.Load()
}

func (n *Network) reach(from, to netip.Addr) bool {
	n.mu.RLock()
	r := n.reaches
	n.mu.RUnlock()
	return r == nil || r(from, to)
}

// Transport is one member's end of the network; it implements memberlist.Transport.
type Transport struct {
	net     *Network
	addr    netip.AddrPort
	packets chan *memberlist.Packet
	streams chan net.Conn
	closed  atomic.Bool
	done    chan struct{}
	once    sync.Once
}

var _ memberlist.Transport = (*Transport)(nil)

// FinalAdvertiseAddr is the transport's own address, whatever memberlist was told.
func (t *Transport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return t.addr.Addr().AsSlice(), int(t.addr.Port()), nil
}

// WriteTo sends a datagram: it arrives later, twice, or never, as the network says.
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	now := time.Now()
	if t.closed.Load() {
		return now, errors.New("transport is shut down")
	}
	n := t.net
	n.Sent.Add(1)
	n.mu.RLock()
	loss, dup, delay, jitter := n.loss, n.dup, n.delay, n.jitter
	n.mu.RUnlock()
	if loss > 0 && n.random() < loss {
		n.Dropped.Add(1)
		return now, nil
	}
	copies := 1
	if dup > 0 && n.random() < dup {
		copies = 2
		n.Duplicated.Add(1)
	}
	buf := append([]byte(nil), b...)
	for range copies {
		d := delay
		if jitter > 0 {
			d += time.Duration(n.random() * float64(jitter))
		}
		if d <= 0 {
			t.deliver(buf, addr, now)
			continue
		}
		time.AfterFunc(d, func() { t.deliver(buf, addr, now) })
	}
	return now, nil
}

// deliver hands a datagram to its addressee, if the network lets it through now.
func (t *Transport) deliver(buf []byte, to string, sent time.Time) {
	dst, ok := t.net.lookup(to)
	if !ok || !t.net.reach(t.addr.Addr(), dst.addr.Addr()) {
		t.net.Dropped.Add(1)
		return
	}
	p := &memberlist.Packet{Buf: buf, From: net.UDPAddrFromAddrPort(t.addr), Timestamp: time.Now()}
	select {
	case dst.packets <- p:
	default:
		t.net.Overflowed.Add(1) // a full receive buffer drops, as a socket's does
	}
}

// PacketCh delivers the datagrams sent to this transport.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// DialTimeout opens a stream. Through a partition (either way) it hangs for timeout,
// as a TCP connect into a black hole does, and fails.
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if t.closed.Load() {
		return nil, errors.New("transport is shut down")
	}
	dst, ok := t.net.lookup(addr)
	if ok && (!t.net.reach(t.addr.Addr(), dst.addr.Addr()) || !t.net.reach(dst.addr.Addr(), t.addr.Addr())) {
		select {
		case <-time.After(timeout):
		case <-t.done:
		}
		return nil, fmt.Errorf("dial %s: i/o timeout", addr)
	}
	if !ok {
		return nil, fmt.Errorf("dial %s: connection refused", addr)
	}
	client, server := net.Pipe()
	c := &conn{Conn: client, local: t.addr, remote: dst.addr}
	s := &conn{Conn: server, local: dst.addr, remote: t.addr}
	select {
	case dst.streams <- s:
		return c, nil
	case <-dst.done:
	case <-t.done:
	case <-time.After(timeout):
	}
	client.Close() //nolint:errcheck // never handed out
	server.Close() //nolint:errcheck // never accepted
	return nil, fmt.Errorf("dial %s: i/o timeout", addr)
}

// StreamCh delivers the streams others opened to this transport.
func (t *Transport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown takes the member off the network: what is sent to it is lost.
func (t *Transport) Shutdown() error {
	t.once.Do(func() {
		t.closed.Store(true)
		close(t.done)
	})
	return nil
}

// conn is one end of a stream, with the addresses memberlist logs.
type conn struct {
	net.Conn
	local, remote netip.AddrPort
}

func (c *conn) LocalAddr() net.Addr  { return net.TCPAddrFromAddrPort(c.local) }
func (c *conn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.remote) }
