package election

import (
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"k8s.io/klog/v2"
)

// memberlist reads a whole TCP stream message (up to 20 MB) before it can tell whether
// it was encrypted with the cluster's key, and accepts any number of streams at once.
// Every pod can reach a node's gossip port, so key-less connections could take natd's
// memory past its limit: an OOM kill, then a failover. guardedTransport bounds what
// streams cost before they are authenticated: streams from addresses that are not
// members' (a pod, a stranger, a node that has not joined yet) share a small budget,
// members' streams a larger one, and each stream is cut off past its size limit.
type guardedTransport struct {
	*socketTransport
	streams  chan net.Conn
	packets  chan *memberlist.Packet
	isMember func(netip.Addr) bool
	member   chan struct{} // a slot per concurrent stream from a member's address
	stranger chan struct{}
	done     chan struct{}
}

// Budgets of concurrent streams and bytes per stream. A member's push/pull carries the
// whole cluster state (hundreds of members' metadata and routes reports); a stranger's
// is a joining node's own small state.
const (
	memberStreams      = 4
	memberStreamBytes  = 4 << 20
	strangerStreams    = 2
	strangerStreamByte = 256 << 10
	// Datagrams from addresses that are not members': memberlist sends UDP only to
	// members, so a stranger's datagrams are garbage or replays; past this rate they are
	// dropped before memberlist spends a decryption (and a log line) on them.
	strangerPacketsPerSecond = 100
)

func newGuardedTransport(bind netip.Addr, port int, isMember func(netip.Addr) bool) (*guardedTransport, error) {
	st, err := newSocketTransport(bind, port)
	if err != nil {
		return nil, err
	}
	t := &guardedTransport{socketTransport: st, streams: make(chan net.Conn), packets: make(chan *memberlist.Packet), isMember: isMember,
		member: make(chan struct{}, memberStreams), stranger: make(chan struct{}, strangerStreams),
		done: make(chan struct{})}
	go t.admit()
	go t.admitPackets()
	return t, nil
}

// PacketCh hands memberlist members' datagrams and strangers' within their rate.
func (t *guardedTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

func (t *guardedTransport) admitPackets() {
	in := t.socketTransport.PacketCh()
	var window time.Time
	n := 0
	for {
		var p *memberlist.Packet
		select {
		case p = <-in:
		case <-t.done:
			return
		}
		if ap, err := netip.ParseAddrPort(p.From.String()); err != nil || !t.isMember(ap.Addr().Unmap()) {
			if p.Timestamp.Sub(window) >= time.Second {
				window, n = p.Timestamp, 0
			}
			if n++; n > strangerPacketsPerSecond {
				continue
			}
		}
		select {
		case t.packets <- p:
		case <-t.done:
			return
		}
	}
}

// StreamCh hands memberlist the streams that fit the budgets.
func (t *guardedTransport) StreamCh() <-chan net.Conn { return t.streams }

func (t *guardedTransport) admit() {
	in := t.socketTransport.StreamCh()
	for {
		var c net.Conn
		select {
		case c = <-in:
		case <-t.done:
			return
		}
		slots, limit := t.stranger, int64(strangerStreamByte)
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil && t.isMember(ap.Addr().Unmap()) {
			slots, limit = t.member, memberStreamBytes
		}
		select {
		case slots <- struct{}{}:
		default:
			// Over budget: refuse at once rather than queue (a flood must not delay
			// the members' own exchanges behind it).
			klog.V(2).InfoS("Refused a gossip stream over budget", "remote", c.RemoteAddr().String())
			c.Close() //nolint:errcheck // refused: nothing was read or written
			continue
		}
		gc := &guardedConn{Conn: c, r: io.LimitReader(c, limit), release: func() { <-slots }}
		select {
		case t.streams <- gc:
		case <-t.done:
			gc.Close() //nolint:errcheck // shutting down
			return
		}
	}
}

// Shutdown stops admitting streams and closes the listeners. The listeners hand over
// what they accepted last on unbuffered channels and are waited for: whatever still
// arrives is drained (and closed) until they are gone.
func (t *guardedTransport) Shutdown() error {
	select {
	case <-t.done:
	default:
		close(t.done)
	}
	drained := make(chan struct{})
	go func() {
		streams, packets := t.socketTransport.StreamCh(), t.socketTransport.PacketCh()
		for {
			select {
			case c := <-streams:
				c.Close() //nolint:errcheck // shutting down
			case <-packets:
			case <-drained:
				return
			}
		}
	}()
	err := t.socketTransport.Shutdown()
	close(drained)
	return err
}

// guardedConn is an admitted stream: it reads at most its budget and gives its slot
// back when memberlist closes it.
type guardedConn struct {
	net.Conn
	r       io.Reader
	once    sync.Once
	release func()
}

func (c *guardedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (c *guardedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
