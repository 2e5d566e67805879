package dataplane

import (
	"net"
	"net/netip"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// sendMarked sends n UDP datagrams from src to 203.0.113.10 inside the namespace,
// marked as a pinned packet of slot mark, as a pod's packet would be after prerouting.
func (ns *testNS) sendMarked(src string, mark uint32, n int) {
	ns.t.Helper()
	done := make(chan error, 1)
	go func() {
		// The thread enters the namespace and is thrown away afterwards.
		runtime.LockOSThread()
		if err := netns.Set(ns.h); err != nil {
			done <- err
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			done <- err
			return
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			done <- err
			return
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte(net.ParseIP(src).To4())}); err != nil {
			done <- err
			return
		}
		dst := &unix.SockaddrInet4{Port: 9, Addr: [4]byte{203, 0, 113, 10}}
		for i := 0; i < n; i++ {
			// A packet the leak guard drops fails with EPERM: that is the point.
			if err := unix.Sendto(fd, []byte("natd counter test"), 0, dst); err != nil && err != unix.EPERM {
				done <- err
				return
			}
		}
		done <- nil
	}()
	if err := <-done; err != nil {
		ns.t.Fatal(err)
	}
}

// The SNAT and drop counters count real packets, survive a table rebuild, and an egress
// IP that is released disappears from them.
func TestKernelCounters(t *testing.T) {
	ns := newTestNS(t, "198.18.0.12")
	ns.run("ip", "route", "add", "default", "via", "198.18.0.1", "dev", "uplink0")
	d := ns.dataplane()
	st := sampleState()
	if _, err := d.Apply(st); err != nil {
		t.Fatal(err)
	}
	held, remote := netip.MustParseAddr("198.18.0.200"), netip.MustParseAddr("198.18.0.201")
	// Pinned to the held IP, from the node's address: SNATed to the egress IP, counted.
	ns.sendMarked("198.18.0.12", d.cfg.Marks.Value(d.slots[held]), 5)
	// Pinned to an IP held elsewhere, but leaving this node with its own address (no
	// next hop in node_ips): the leak guard drops it.
	ns.sendMarked("198.18.0.12", d.cfg.Marks.Value(d.slots[remote]), 2)
	c, err := d.Counters()
	if err != nil {
		t.Fatal(err)
	}
	if got := c.SNAT[held]; got.Packets != 5 || got.Bytes == 0 {
		t.Errorf("SNAT count of %s: %+v, want 5 packets", held, got)
	}
	for ip, n := range c.SNAT {
		if ip != held && (ip != netip.MustParseAddr("2001:db8:18::c8") || n.Packets != 0) {
			t.Errorf("SNAT counts for IPs not held here, or without traffic: %+v", c.SNAT)
		}
	}
	if got := c.Drops[DropLeakGuard].Packets; got != 2 {
		t.Errorf("leak guard drops: %d, want 2", got)
	}

	// A new egress IP in use replaces the table; the totals carry on.
	next := sampleState()
	next.Egress = append(next.Egress, EgressIP{IP: netip.MustParseAddr("198.18.0.203"),
		Pods: []netip.Addr{netip.MustParseAddr("10.244.1.14")}})
	if res, err := d.Apply(next); err != nil || !res.Rebuilt {
		t.Fatalf("apply: %+v, %v; want a rebuild", res, err)
	}
	ns.sendMarked("198.18.0.12", d.cfg.Marks.Value(d.slots[held]), 1)
	if c, err = d.Counters(); err != nil {
		t.Fatal(err)
	}
	if got := c.SNAT[held].Packets; got != 6 {
		t.Errorf("SNAT count after rebuild: %d, want 6", got)
	}
	if got := c.Drops[DropLeakGuard].Packets; got != 2 {
		t.Errorf("leak guard drops after rebuild: %d, want 2", got)
	}

	// Released: the IP's counts are gone.
	next.Egress[0].Local, next.Egress[0].HolderIP = false, netip.MustParseAddr("198.18.0.11")
	if _, err := d.Apply(next); err != nil {
		t.Fatal(err)
	}
	if c, err = d.Counters(); err != nil {
		t.Fatal(err)
	}
	for ip := range c.SNAT {
		if ip.Is4() {
			t.Errorf("released IP still counted: %+v", c.SNAT)
		}
	}
}

func TestCounterTotalsSurviveResets(t *testing.T) {
	var c counterTotals
	a := counterKey{SNAT: netip.MustParseAddr("198.18.0.200")}
	c.observe(map[counterKey]Count{a: {10, 100}})
	c.observe(map[counterKey]Count{a: {15, 150}})
	c.reset() // table replaced
	c.observe(map[counterKey]Count{a: {2, 20}})
	c.observe(map[counterKey]Count{a: {1, 10}}) // element re-added behind our back
	if got := c.total[a]; got != (Count{18, 180}) {
		t.Errorf("total %+v, want {18 180}", got)
	}
	c.forget(a)
	if _, ok := c.total[a]; ok {
		t.Error("forgotten counter still there")
	}
}

// BenchmarkCounters is what one Prometheus scrape costs natd: reading the counters with
// 60 egress IPs in use, 20 of them held here and 20 failing closed.
func BenchmarkCounters(b *testing.B) {
	ns := newTestNS(b, "198.18.0.12")
	d := ns.dataplane()
	st := sampleState()
	st.Egress = nil
	for i := 0; i < 60; i++ {
		e := EgressIP{IP: netip.AddrFrom4([4]byte{198, 18, 0, byte(193 + i)}),
			Pods: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 1, byte(10 + i)})}}
		switch i % 3 {
		case 0:
			e.Local, e.Gen, e.HolderIP = true, 1, st.NodeIP
		case 1:
			e.HolderIP = netip.MustParseAddr("198.18.0.11")
		}
		st.Egress = append(st.Egress, e)
	}
	if _, err := d.Apply(st); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		c, err := d.Counters()
		if err != nil || len(c.SNAT) != 20 {
			b.Fatalf("counters: %d SNAT series, %v", len(c.SNAT), err)
		}
	}
}
