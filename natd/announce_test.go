package natd

import (
	"errors"
	"maps"
	"net/netip"
	"testing"
	"time"

	"natd.dev/natd/natd/dataplane"
)

// fakeAnnouncer records what the kernel wrapper tells the BGP speaker.
type fakeAnnouncer struct {
	served map[netip.Addr]uint32
	until  time.Time
	calls  int
}

func (f *fakeAnnouncer) Serve(held map[netip.Addr]uint32, until time.Time) error {
	f.served, f.until = maps.Clone(held), until
	f.calls++
	return nil
}

func (f *fakeAnnouncer) Extend(until time.Time) { f.until = until }

// What a routed fabric's router learns follows exactly what the kernel serves: held
// IPs after a successful Apply (with their claim generation), nothing after a failed
// one, for as long as the leases, and as long as the kernel keeps serving for a
// restart.
func TestAnnouncingKernelFollowsTheKernel(t *testing.T) {
	now := time.Date(2026, 11, 27, 1, 0, 0, 0, time.UTC)
	fa := &fakeAnnouncer{}
	var startedWith, startedWith6 netip.Addr
	fk := &fakeKernel{}
	k := &announcingKernel{Kernel: fk, lease: 300 * time.Millisecond, now: func() time.Time { return now },
		start: func(ip, ip6 netip.Addr) (announcer, error) { startedWith, startedWith6 = ip, ip6; return fa, nil }}
	ip1, ip2 := netip.MustParseAddr("198.18.0.200"), netip.MustParseAddr("198.18.0.201")
	node := netip.MustParseAddr("198.18.11.10")
	node6 := netip.MustParseAddr("2001:db8:11::10")
	st := dataplane.State{NodeIP: node, NodeIP6: node6, LeaseUntil: now.Add(time.Second), Egress: []dataplane.EgressIP{
		{IP: ip1, Local: true, Gen: 4}, {IP: ip2, HolderIP: netip.MustParseAddr("198.18.12.10")}}}
	if _, err := k.Apply(st); err != nil {
		t.Fatal(err)
	}
	if startedWith != node || startedWith6 != node6 || !maps.Equal(fa.served, map[netip.Addr]uint32{ip1: 4}) || !fa.until.Equal(now.Add(time.Second)) {
		t.Fatalf("after the first Apply: speaker for %s serves %v until %s", startedWith, fa.served, fa.until)
	}
	if err := k.RenewLeases(now.Add(2 * time.Second)); err != nil || !fa.until.Equal(now.Add(2*time.Second)) {
		t.Fatalf("a renewal did not extend the announcements: until %s, %v", fa.until, err)
	}
	fk.renewErr = errors.New("kernel refused")
	if err := k.RenewLeases(now.Add(3 * time.Second)); err == nil || fa.until.Equal(now.Add(3*time.Second)) {
		t.Fatal("a renewal the kernel refused extended the announcements")
	}
	fk.applyErr = errors.New("half-applied")
	calls := fa.calls
	st.Egress[1].Local, st.Egress[1].HolderIP = true, netip.Addr{}
	if _, err := k.Apply(st); err == nil || fa.calls != calls {
		t.Fatal("a failed Apply changed the announcements")
	}
	fk.applyErr = nil
	st.LeaseUntil = time.Time{}
	if _, err := k.Apply(st); err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(fa.served, map[netip.Addr]uint32{ip1: 4, ip2: 0}) || !fa.until.Equal(now.Add(300*time.Millisecond)) {
		t.Fatalf("after taking a second IP: %v until %s", fa.served, fa.until)
	}
	if err := k.HoldLeases(30 * time.Second); err != nil || !fa.until.Equal(now.Add(30*time.Second)) {
		t.Fatalf("a restart's hold did not keep the announcements: until %s, %v", fa.until, err)
	}
	if _, err := k.Apply(dataplane.State{NodeIP: node}); err != nil || len(fa.served) != 0 {
		t.Fatalf("after giving everything up the speaker still serves %v", fa.served)
	}
}
