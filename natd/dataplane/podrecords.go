package dataplane

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// PodStore is the node-local directory that natd and its chained CNI plugin share
// (on tmpfs: /run/natd by default, so it is gone after a reboot, as the pods are).
//
// The container runtime calls the plugin when it creates a pod's network, before any
// of the pod's processes run, with the pod's namespace and IPs. The plugin records the
// pod here and puts it into the kernel at once: pinned, with its namespace's egress IP
// as natd last wrote it (pinning.json), or explicitly unpinned. So a new pod's first
// packet is classified, whether or not natd has seen the pod in the API yet, and
// whether or not natd runs at all; and a pod that reuses another's IP is never
// classified by the old pod's pinning.
//
// Both sides take the directory's lock around a change of records and kernel
// elements, so that natd never rebuilds its tables from records that miss an element
// the plugin just added.
type PodStore struct {
	Dir string
}

// PodRecord is one pod sandbox as the CNI plugin saw it.
type PodRecord struct {
	ContainerID string       `json:"containerID"`
	Namespace   string       `json:"namespace"`
	Name        string       `json:"name"`
	IPs         []netip.Addr `json:"ips"`
	// HostIf and HostIfIndex name the host side of the pod's veth, where the pod
	// guard's filter goes (podguard.go); empty for a pod without one.
	HostIf      string `json:"hostIf,omitempty"`
	HostIfIndex int    `json:"hostIfIndex,omitempty"`
	// Added orders records that claim one IP: the newest wins (an older one is a
	// sandbox whose DEL never came).
	Added int64 `json:"added"`
}

// Pinning is what natd tells the CNI plugin (pinning.json).
type Pinning struct {
	// Namespaces maps each pinned namespace to its egress IPs.
	Namespaces map[string][]netip.Addr `json:"namespaces"`
	// FwmarkMask is natd's part of the packet mark: the pod guard's filter sets the
	// origin value in it (0: a natd from before the pod guard; the plugin adds none).
	FwmarkMask uint32 `json:"fwmarkMask,omitempty"`
}

// egress reads the pinned namespaces' egress IPs (the first of each family).
func (p Pinning) egress() map[string]NamespaceEgress {
	out := make(map[string]NamespaceEgress, len(p.Namespaces))
	for ns, ips := range p.Namespaces {
		var e NamespaceEgress
		for _, ip := range ips {
			switch {
			case ip.Is4() && !e.V4.IsValid():
				e.V4 = ip
			case ip.Is6() && !e.V6.IsValid():
				e.V6 = ip
			}
		}
		out[ns] = e
	}
	return out
}

const (
	podsSubdir  = "pods"
	pinningName = "pinning.json"
	lockName    = "lock"
	// lockTimeout bounds how long either side waits for the other. natd holds the lock
	// for one Apply (well under a second even at 50k pods); the plugin for a few
	// netlink messages.
	lockTimeout = 5 * time.Second
)

// ErrLockTimeout means the other side held the store's lock for too long.
var ErrLockTimeout = errors.New("timed out waiting for the pod store lock")

// Lock takes the store's exclusive lock; the returned function releases it.
func (s PodStore) Lock() (func(), error) {
	if err := os.MkdirAll(filepath.Join(s.Dir, podsSubdir), 0o755); err != nil {
		return nil, fmt.Errorf("creating pod store: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(s.Dir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening pod store lock: %w", err)
	}
	deadline := time.Now().Add(lockTimeout)
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil //nolint:errcheck // closing releases the lock; nothing was written
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return nil, errors.Join(fmt.Errorf("locking pod store: %w", err), f.Close())
		}
		if time.Now().After(deadline) {
			return nil, errors.Join(ErrLockTimeout, f.Close())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (s PodStore) recordPath(containerID string) string {
	return filepath.Join(s.Dir, podsSubdir, containerID+".json")
}

// validContainerID keeps a runtime's ID from naming a path outside the store.
func validContainerID(id string) error {
	if id == "" || len(id) > 256 || strings.ContainsAny(id, "/\\\x00") || id == "." || id == ".." {
		return fmt.Errorf("invalid container ID %q", id)
	}
	return nil
}

// Put writes a record (atomically: a reader sees the old file or the new one).
func (s PodStore) Put(r PodRecord) error {
	if err := validContainerID(r.ContainerID); err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return writeAtomic(s.recordPath(r.ContainerID), b)
}

// Get reads one record; ok is false when there is none.
func (s PodStore) Get(containerID string) (PodRecord, bool, error) {
	var r PodRecord
	if err := validContainerID(containerID); err != nil {
		return r, false, err
	}
	b, err := os.ReadFile(s.recordPath(containerID))
	if errors.Is(err, os.ErrNotExist) {
		return r, false, nil
	}
	if err != nil {
		return r, false, fmt.Errorf("reading pod record: %w", err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, false, fmt.Errorf("pod record %s: %w", containerID, err)
	}
	return r, true, nil
}

// Remove deletes a record; a missing one is not an error.
func (s PodStore) Remove(containerID string) error {
	if err := validContainerID(containerID); err != nil {
		return err
	}
	if err := os.Remove(s.recordPath(containerID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing pod record: %w", err)
	}
	return nil
}

// List reads every record. Of records that claim one IP, only the newest keeps it: an
// older record is a sandbox whose DEL never came, and its IP now belongs to the new pod.
// Unreadable files are skipped (and reported), never fatal: one bad file must not stop
// the node's programming.
func (s PodStore) List() ([]PodRecord, error) {
	entries, err := os.ReadDir(filepath.Join(s.Dir, podsSubdir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing pod records: %w", err)
	}
	var out []PodRecord
	var bad []error
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() {
			continue
		}
		r, found, err := s.Get(id)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		if found {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b PodRecord) int {
		if c := cmp.Compare(b.Added, a.Added); c != 0 {
			return c // newest first
		}
		return strings.Compare(a.ContainerID, b.ContainerID)
	})
	owner := map[netip.Addr]bool{}
	for i := range out {
		ips := out[i].IPs[:0:0]
		for _, ip := range out[i].IPs {
			if !owner[ip] {
				owner[ip] = true
				ips = append(ips, ip)
			}
		}
		out[i].IPs = ips
	}
	return out, errors.Join(bad...)
}

// WritePinning tells the CNI plugin which namespaces are pinned to which egress IP.
func (s PodStore) WritePinning(pinned map[string]NamespaceEgress, marks Marks) error {
	f := Pinning{Namespaces: map[string][]netip.Addr{}, FwmarkMask: marks.Mask}
	for ns, eips := range pinned {
		f.Namespaces[ns] = eips.IPs()
	}
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(s.Dir, pinningName), b)
}

// ReadPinning reads what natd last wrote; ok is false when natd never wrote it (natd
// has not programmed this node, or was uninstalled).
func (s PodStore) ReadPinning() (pinning Pinning, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(s.Dir, pinningName))
	if errors.Is(err, os.ErrNotExist) {
		return pinning, false, nil
	}
	if err != nil {
		return pinning, false, fmt.Errorf("reading %s: %w", pinningName, err)
	}
	if err := json.Unmarshal(b, &pinning); err != nil {
		return pinning, false, fmt.Errorf("parsing %s: %w", pinningName, err)
	}
	return pinning, true, nil
}

// RemoveAll deletes the store (cleanup).
func (s PodStore) RemoveAll() error {
	for _, p := range []string{filepath.Join(s.Dir, podsSubdir), filepath.Join(s.Dir, pinningName), filepath.Join(s.Dir, lockName)} {
		if err := os.RemoveAll(p); err != nil {
			return err
		}
	}
	return nil
}

func writeAtomic(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	_, werr := tmp.Write(b)
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}
