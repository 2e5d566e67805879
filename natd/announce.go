package natd

import (
	"fmt"
	"net/netip"
	"sync"
	"time"

	"natd.dev/natd/natd/dataplane"
)

// announcer is where a holder's egress IPs are announced besides its uplink's
// gratuitous ARP: the BGP peers of a routed fabric (--bgp-peer). bgp.Speaker
// implements it.
type announcer interface {
	// Serve announces exactly held (IP -> claim generation) until until.
	Serve(held map[netip.Addr]uint32, until time.Time) error
	// Extend keeps the announcements until until.
	Extend(until time.Time)
}

// announcingKernel announces what the kernel serves, for exactly as long as the kernel
// serves it: an IP is announced after the Apply that makes this node serve it,
// withdrawn after the one that stops it, and withdrawn by itself when its lease runs
// out unrenewed, as the kernel's own lease lapses.
type announcingKernel struct {
	Kernel
	// start makes the announcer once the node's address is known (the first Apply).
	start func(nodeIP, nodeIP6 netip.Addr) (announcer, error)
	lease time.Duration
	now   func() time.Time

	mu sync.Mutex // a: Apply runs in the sync loop, renewals in their own
	a  announcer
}

func (k *announcingKernel) Apply(st dataplane.State) (dataplane.Result, error) {
	res, err := k.Kernel.Apply(st)
	if err != nil {
		return res, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.a == nil {
		if k.a, err = k.start(st.NodeIP, st.NodeIP6); err != nil {
			return res, fmt.Errorf("starting BGP: %w", err)
		}
	}
	held := map[netip.Addr]uint32{}
	for _, e := range st.Egress {
		if e.Local {
			held[e.IP] = e.Gen
		}
	}
	until := st.LeaseUntil
	if until.IsZero() {
		until = k.now().Add(k.lease)
	}
	return res, k.a.Serve(held, until)
}

func (k *announcingKernel) RenewLeases(until time.Time) error {
	if err := k.Kernel.RenewLeases(until); err != nil {
		return err
	}
	k.extend(until)
	return nil
}

// HoldLeases keeps the announcements as long as the kernel keeps serving for a
// restart; natd's exit then closes the BGP sessions, and the routers keep the routes
// for the graceful-restart time.
func (k *announcingKernel) HoldLeases(grace time.Duration) error {
	err := k.Kernel.HoldLeases(grace)
	if err == nil {
		k.extend(k.now().Add(grace))
	}
	return err
}

func (k *announcingKernel) extend(until time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.a != nil {
		k.a.Extend(until)
	}
}
