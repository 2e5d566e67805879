package election

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"k8s.io/klog/v2"
)

// A holder hands what a successor needs to continue its egress IPs' connections (the
// agent's NAT bindings, opaque here) to the nodes that may take them next, ahead of
// any failure: a node that takes an IP reads the latest handover of it. Only the
// latest handover of each IP is kept, and only while fresh: the holder sends it again
// every so often, and one from a holder that stopped sending long ago describes
// connections that have ended.
//
// Wire form (a gossip message, sealed like all gossip):
//
//	version(1) 'B' nameLen(1) sender ipLen(1) ip payload
const (
	handoverWireVersion = 1
	kindHandover        = 'B'
	// HandoverMaxAge is how long a handover is used after it arrived.
	HandoverMaxAge = 30 * time.Second
	// maxHandovers bounds the IPs this node keeps handovers of (a member that sends
	// handovers of ever new IPs must not grow it without end).
	maxHandovers = 4096
)

// Handover is the latest handover of one egress IP this node received.
type Handover struct {
	From    string
	At      time.Time
	Payload []byte
}

var errBadHandover = errors.New("unreadable handover")

func encodeHandover(from string, ip netip.Addr, payload []byte) ([]byte, error) {
	if len(from) == 0 || len(from) > maxNameLen {
		return nil, fmt.Errorf("node name %q: length %d out of 1..%d", from, len(from), maxNameLen)
	}
	b := make([]byte, 0, 4+len(from)+16+len(payload))
	b = append(b, handoverWireVersion, kindHandover, byte(len(from)))
	b = append(b, from...)
	b = append(b, byte(ip.BitLen()/8))
	b = append(b, ip.AsSlice()...)
	return append(b, payload...), nil
}

func decodeHandover(b []byte) (from string, ip netip.Addr, payload []byte, err error) {
	if len(b) < 3 || b[0] != handoverWireVersion || b[1] != kindHandover {
		return "", ip, nil, fmt.Errorf("%w: header", errBadHandover)
	}
	n := int(b[2])
	if n == 0 || len(b) < 4+n {
		return "", ip, nil, fmt.Errorf("%w: name", errBadHandover)
	}
	from, rest := string(b[3:3+n]), b[3+n:]
	alen := int(rest[0])
	if (alen != 4 && alen != 16) || len(rest) < 1+alen {
		return "", ip, nil, fmt.Errorf("%w: address", errBadHandover)
	}
	ip, _ = netip.AddrFromSlice(rest[1 : 1+alen])
	return from, ip, rest[1+alen:], nil
}

// SendHandover sends payload, this node's handover of ip, to the members named in to.
func (g *Gossip) SendHandover(to []string, ip netip.Addr, payload []byte) error {
	msg, err := encodeHandover(g.cfg.NodeName, ip, payload)
	if err != nil {
		return err
	}
	for _, name := range to {
		if name != g.cfg.NodeName {
			g.sendTo(name, msg)
		}
	}
	return nil
}

// Handover is the latest handover of ip this node received, if it is fresh.
func (g *Gossip) Handover(ip netip.Addr) (Handover, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	h, ok := g.handovers[ip]
	if !ok || g.cfg.Now().Sub(h.At) > HandoverMaxAge {
		return Handover{}, false
	}
	return h, true
}

func (g *Gossip) receiveHandover(b []byte) {
	from, ip, payload, err := decodeHandover(b)
	if err != nil {
		klog.V(2).InfoS("Ignoring unreadable gossip message", "err", err)
		return
	}
	now := g.cfg.Now()
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, member := g.members[from]; !member {
		return // a node that left: what it held has been taken over without it
	}
	if _, ok := g.handovers[ip]; !ok && len(g.handovers) >= maxHandovers {
		for k, h := range g.handovers {
			if now.Sub(h.At) > HandoverMaxAge {
				delete(g.handovers, k)
			}
		}
		if len(g.handovers) >= maxHandovers {
			klog.V(2).InfoS("Ignoring handover: too many egress IPs", "from", from, "ip", ip)
			return
		}
	}
	g.handovers[ip] = Handover{From: from, At: now, Payload: payload}
}
