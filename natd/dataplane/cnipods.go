package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ErrNoTables means natd's tables are missing although natd has programmed this node
// (someone flushed the ruleset while natd is down): a pod of a pinned namespace cannot
// be pinned now, and must not start.
var ErrNoTables = errors.New("natd's nftables tables are missing")

// RegisterPod is the CNI plugin's ADD, in the node's network namespace: it records the
// pod and classifies its addresses in the kernel at once (cni_pods, cni_pods6), before
// the pod's first packet. A pod of a pinned namespace jumps to its egress IP's chain;
// any other pod is marked unpinned, which also overrides whatever natd's view of the
// API still says about an older pod that had the same IP.
//
// It returns pinned=false and does nothing when natd has never programmed this node
// (no pinning.json: natd is not installed, or was uninstalled). An error for an
// unpinned pod is the caller's to ignore: such a pod must never pay for natd.
func RegisterPod(store PodStore, rec PodRecord) (pinned bool, err error) {
	if _, ok, err := store.ReadPinning(); err != nil || !ok {
		return false, err // natd never programmed this node: nothing to do, no lock
	}
	unlock, err := store.Lock()
	if err != nil {
		return false, err
	}
	defer unlock()
	// Read again under the lock: an Apply that changes the pinning writes it under
	// the same lock, together with the chains it names.
	pinning, _, err := store.ReadPinning()
	if err != nil {
		return false, err
	}
	egress := pinning.egress()
	_, pinned = egress[rec.Namespace]
	if err := store.Put(rec); err != nil {
		return pinned, err
	}
	conn, err := nftables.New()
	if err != nil {
		return pinned, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	for _, f := range []family{familyIPv4, familyIPv6} {
		s := cniPodsSet(f)
		s.Elements = cniPodElements([]PodRecord{rec}, egress, f)
		if err := replaceElements(conn, s); err != nil {
			return pinned, err
		}
	}
	if !pinned || rec.HostIfIndex <= 0 || pinning.FwmarkMask == 0 {
		return pinned, nil
	}
	return pinned, guardNewPod(rec, pinning.FwmarkMask)
}

// ErrPodGuard wraps a failure to put the pod guard on a new pinned pod's device: the
// pod is pinned (its elements are in place), only the guard against natd's tables
// being deleted is missing until natd's next sync tries again.
var ErrPodGuard = errors.New("pod guard not attached")

func guardNewPod(rec PodRecord, mask uint32) error {
	marks, err := NewMarks(mask)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPodGuard, err)
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("%w: opening netlink handle: %w", ErrPodGuard, err)
	}
	defer nl.Close()
	g := podGuard{nl: nl, marks: marks}
	defer g.close()
	link, err := g.link(podDevice{name: rec.HostIf, index: rec.HostIfIndex})
	if err == nil && link == nil {
		err = fmt.Errorf("device %s (index %d) not found", rec.HostIf, rec.HostIfIndex)
	}
	if err == nil {
		err = g.guard(link)
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPodGuard, err)
	}
	return nil
}

// UnregisterPod is the CNI plugin's DEL: the pod's addresses leave cni_pods and its
// record goes. A pod natd never recorded is no error.
func UnregisterPod(store PodStore, containerID string) error {
	if _, err := os.Stat(filepath.Join(store.Dir, podsSubdir)); errors.Is(err, os.ErrNotExist) {
		return nil // natd keeps no store on this node
	}
	unlock, err := store.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	rec, ok, err := store.Get(containerID)
	if err != nil || !ok {
		return err
	}
	// An IP a newer record claims belongs to that pod now (this DEL came late): its
	// classification stays.
	others, _ := store.List()
	owned := map[netip.Addr]bool{}
	for _, o := range others {
		if o.ContainerID != containerID {
			for _, ip := range o.IPs {
				owned[ip] = true
			}
		}
	}
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	for _, f := range []family{familyIPv4, familyIPv6} {
		s := cniPodsSet(f)
		for _, ip := range rec.IPs {
			if f.of(ip) && !owned[ip] {
				s.Elements = append(s.Elements, Element{Key: addrKey(ip)})
			}
		}
		if err := deleteExisting(conn, s, s.Elements); err != nil && !errors.Is(err, ErrNoTables) {
			return err
		}
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("removing pod %s from %s: %w", containerID, MapCNIPods, err)
	}
	return store.Remove(containerID)
}

func cniPodsSet(f family) *Set { return verdictMap(f.set(MapCNIPods), f.addrType, f.addrName) }

// familyOf is the family of a set's keys.
func familyOf(s *Set) family {
	if s.KeyType.Name == nftables.TypeIP6Addr.Name {
		return familyIPv6
	}
	return familyIPv4
}

func cniTable(f family) *nftables.Table { return &nftables.Table{Name: TableName, Family: f.table} }

// replaceElements puts s.Elements into the kernel's map, replacing elements of the
// same keys, in one transaction.
func replaceElements(conn *nftables.Conn, s *Set) error {
	if len(s.Elements) == 0 {
		return nil
	}
	if err := deleteExisting(conn, s, s.Elements); err != nil {
		return err
	}
	ks, err := conn.GetSetByName(cniTable(familyOf(s)), s.Name)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrNoTables, s.Name, err)
	}
	if err := addElements(conn, ks, s, s.Elements, 0); err != nil {
		return err
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("adding pod to %s: %w", s.Name, err)
	}
	return nil
}

// deleteExisting queues the deletion of those of els that the kernel's map has
// (deleting a missing element would fail the whole transaction).
func deleteExisting(conn *nftables.Conn, s *Set, els []Element) error {
	ks, err := conn.GetSetByName(cniTable(familyOf(s)), s.Name)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: %s", ErrNoTables, s.Name)
		}
		return fmt.Errorf("reading %s: %w", s.Name, err)
	}
	have, err := conn.GetSetElements(ks)
	if err != nil {
		return fmt.Errorf("reading elements of %s: %w", s.Name, err)
	}
	present := map[[16]byte]bool{}
	for _, e := range fromKernel(s, have) {
		present[e.Key] = true
	}
	var del []Element
	for _, e := range els {
		if present[e.Key] {
			del = append(del, e)
		}
	}
	if len(del) == 0 {
		return nil
	}
	return deleteElements(conn, ks, s, del)
}
