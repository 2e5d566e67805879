package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
)

// Config is how natd's kernel state is laid out on a node.
type Config struct {
	Marks        Marks
	RulePriority int // priority of natd's ip rules (before the main table's 32766)
	TableBase    int // egress IP slot i routes through table TableBase+i
	// EgressCIDRs: host addresses (/32, /128) inside them on the uplink are natd's to add and remove.
	EgressCIDRs []netip.Prefix
	// NetNS, when set, is the network namespace to program (tests); otherwise the
	// caller's own.
	NetNS *netns.NsHandle
	// StateDir keeps what natd changed outside its own objects (the uplink's original
	// rp_filter) so that cleanup can restore it, and the pod store it shares with its
	// CNI plugin (PodStore).
	StateDir string
	// Lease is how long a held egress IP keeps working in the kernel (SNAT, ARP
	// answers) unless RenewLeases is called again: a holder whose natd dies stops
	// serving its IPs by itself. 0: forever.
	Lease time.Duration
	// LeaseCommitSlack is how far past its deadline a lease may run because the
	// commit that set it came late (the voters' silence bound reserves two heartbeat
	// intervals for it; natd gives it one): a commit that took longer is corrected at
	// once. 0: 10 ms.
	LeaseCommitSlack time.Duration
	// VerifyEvery bounds how often Apply reads natd's tables back to repair drift
	// (0: every Apply).
	VerifyEvery time.Duration
	// GossipPort is natd's gossip port: only nodes may reach it (0: not guarded).
	GossipPort uint16
	// TunnelPort is the UDP port of natd's VXLAN tunnels (pinned traffic on its way to
	// the holder); only nodes may reach it.
	TunnelPort uint16
	// Announce is when gratuitous ARPs go out after a takeover, counted from it; the
	// repeats reach neighbours that ignored the first (Linux ignores an update within
	// neigh locktime, 1 s by default, of the last one) or lost it.
	Announce []time.Duration
}

// Result says what an Apply did. Taking and releasing are measured against the last
// Apply that completed: when an Apply fails half-way, the next one reports (and
// finishes) what it left owed — announcements, conntrack deletions.
type Result struct {
	Rebuilt   bool         // the nftables tables were replaced whole (first sync or repair)
	Announced []netip.Addr // egress IPs this node took: on the uplink and announced
	Released  []netip.Addr // egress IPs this node gave up: removed from the uplink
	Repinned  int          // pod addresses whose classification changed
}

// Dataplane programs one node's kernel. It is not safe for concurrent use: the agent
// calls it from its single sync loop.
type Dataplane struct {
	mu sync.Mutex // Apply, Verify and cleanup take turns
	// nftMu guards the nftables state (what was applied, the generation, counters):
	// Apply's nftables step, Verify's reads, lease renewal and counter reads take
	// turns on it. Lease renewal takes nothing else, so it never waits for the rest of
	// an Apply (routes, announcements, a conntrack sweep).
	nftMu  sync.Mutex
	frozen bool // leases were extended for a restart: renewing stops (under nftMu)
	cfg    Config
	nl     *netlink.Handle
	nft    nftApplier
	router router
	pods   podGuard
	// podGuardErr is the pod guard's last failure as logged (logged again when it
	// changes).
	podGuardErr string
	slots       map[netip.Addr]int
	// stale are egress IPs a previous run left on the uplink; removed by the first Apply
	// unless still held.
	stale     map[netip.Addr]bool
	firstDone bool
	store     PodStore
	genConn   *mdnetlink.Conn // reads the nftables generation
	ctConn    *mdnetlink.Conn // writes handed-over conntrack entries
	// loosened are the IPs being handed over whose connections were made liberal.
	loosened map[netip.Addr]bool
	// Bindings' loosening of held connections (loosenHeld): its lock, its ctnetlink
	// connection, and the connections it made liberal.
	looseMu   sync.Mutex
	looseConn *mdnetlink.Conn
	liberal   map[flowKey]bool
	// What the last completed Apply left in the kernel: the held IPs, and the state
	// (so that Verify can tell drift from it).
	heldApplied map[netip.Addr]bool
	lastState   *State
	// owedFlush are pod addresses whose connections must be NATed anew (their
	// classification changed) and that no completed Apply has flushed yet.
	owedFlush map[netip.Addr]bool
	// owedRelease are egress IPs this Apply or a failed earlier one took off the
	// uplink, which no completed Apply has reported released yet.
	owedRelease map[netip.Addr]bool
	// announcing cancels the gratuitous ARP repeats of an IP that is released.
	announcing map[netip.Addr]chan struct{}
	// leaseEnds is no later than the kernel's leases run out, as of the last Apply or
	// renewal that committed: an announcement after it would claim an IP this node no
	// longer serves (nil: nothing leased yet).
	leaseEnds atomic.Pointer[time.Time]
	// lateLeaseCommits counts corrections of late lease commits (boundLeases).
	lateLeaseCommits atomic.Uint64
}

// New opens netlink handles for cfg.NetNS (or the current namespace).
func New(cfg Config) (*Dataplane, error) {
	var nl *netlink.Handle
	var err error
	if cfg.NetNS != nil {
		nl, err = netlink.NewHandleAt(*cfg.NetNS)
	} else {
		nl, err = netlink.NewHandle()
	}
	if err != nil {
		return nil, fmt.Errorf("opening netlink handle: %w", err)
	}
	d := &Dataplane{cfg: cfg, nl: nl, slots: map[netip.Addr]int{}, stale: map[netip.Addr]bool{},
		announcing: map[netip.Addr]chan struct{}{}, store: PodStore{Dir: cfg.StateDir},
		heldApplied: map[netip.Addr]bool{}, owedFlush: map[netip.Addr]bool{}, owedRelease: map[netip.Addr]bool{}}
	d.nft.newConn = d.nftConn
	d.nft.gen = d.nftGen
	d.nft.verifyEvery = cfg.VerifyEvery
	_, err = nl.RuleList(unix.AF_INET6)
	d.router = router{nl: nl, marks: cfg.Marks, rulePriority: cfg.RulePriority, tableBase: cfg.TableBase,
		tunnelPort: cfg.TunnelPort, inNetns: d.inNetns, noIPv6: errors.Is(err, unix.EAFNOSUPPORT)}
	d.pods = podGuard{nl: nl, marks: cfg.Marks}
	return d, nil
}

// Close releases the netlink handles.
func (d *Dataplane) Close() {
	for ip, stop := range d.announcing { // no announcement from a closed handle
		close(stop)
		delete(d.announcing, ip)
	}
	d.pods.close()
	d.nl.Close()
	if d.genConn != nil {
		d.genConn.Close() //nolint:errcheck // a read-only socket
	}
	if d.ctConn != nil {
		d.ctConn.Close() //nolint:errcheck // nothing pending on it
	}
	d.looseMu.Lock()
	if d.looseConn != nil {
		d.looseConn.Close() //nolint:errcheck // nothing pending on it
	}
	d.looseMu.Unlock()
}

// dial opens a netlink socket of family in the node's namespace.
func (d *Dataplane) dial(family int) (*mdnetlink.Conn, error) {
	cfg := &mdnetlink.Config{}
	if d.cfg.NetNS != nil {
		cfg.NetNS = int(*d.cfg.NetNS)
	}
	c, err := mdnetlink.Dial(family, cfg)
	if err != nil {
		return nil, fmt.Errorf("opening netlink socket (family %d): %w", family, err)
	}
	return c, nil
}

// nftGen reads the kernel's nftables generation: every committed nftables transaction,
// natd's or anyone's, advances it.
func (d *Dataplane) nftGen() (uint32, error) {
	if d.genConn == nil {
		c, err := d.dial(unix.NETLINK_NETFILTER)
		if err != nil {
			return 0, err
		}
		d.genConn = c
	}
	req := mdnetlink.Message{
		Header: mdnetlink.Header{Type: mdnetlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN),
			Flags: mdnetlink.Request},
		Data: []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0}, // struct nfgenmsg
	}
	msgs, err := d.genConn.Execute(req)
	if err != nil {
		d.genConn.Close() //nolint:errcheck // broken already: the next read opens a new one
		d.genConn = nil
		return 0, fmt.Errorf("reading nftables generation: %w", err)
	}
	for _, m := range msgs {
		if len(m.Data) < 4 {
			continue
		}
		ad, err := mdnetlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return 0, fmt.Errorf("reading nftables generation: %w", err)
		}
		ad.ByteOrder = binary.BigEndian
		for ad.Next() {
			if ad.Type() == unix.NFTA_GEN_ID {
				return ad.Uint32(), nil
			}
		}
	}
	return 0, errors.New("reading nftables generation: no generation in the kernel's answer")
}

// nftConn opens an nftables connection whose socket can take a batch of sendBuf bytes.
// google/nftables sends a whole batch in one sendmsg, and the default socket buffer
// (net.core.wmem_default, ~200 KiB) holds only a few thousand set elements: beyond it
// sendmsg fails with EMSGSIZE. SO_SNDBUFFORCE (CAP_NET_ADMIN) lifts the wmem_max cap,
// as nft itself does for large batches.
func (d *Dataplane) nftConn(sendBuf int) (*nftables.Conn, error) {
	opts := []nftables.ConnOption{nftables.WithSockOptions(func(c *mdnetlink.Conn) error {
		if sendBuf <= 0 {
			return nil
		}
		raw, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := raw.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sendBuf)
			if serr == nil {
				// Every message of the batch is acknowledged, and the kernel charges
				// each ack's buffer (about 1 KiB) to the receive buffer: a batch of a
				// few hundred chains and rules overflows the default one (ENOBUFS).
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, max(sendBuf, 4<<20))
			}
		}); err != nil {
			return err
		}
		// An error ack carries the failed request back unless NETLINK_CAP_ACK is set;
		// for a message of thousands of elements that overflows the receive buffer and
		// hides the real error behind ENOBUFS.
		if err := c.SetOption(mdnetlink.CapAcknowledge, true); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting SO_SNDBUFFORCE to %d: %w", sendBuf, serr)
		}
		return nil
	})}
	if d.cfg.NetNS != nil {
		opts = append(opts, nftables.WithNetNSFd(int(*d.cfg.NetNS)))
	}
	return nftables.New(opts...)
}

// Apply converges the node's kernel to state. Its order keeps the promise that a pinned
// packet never leaves with another source address, even between steps: routes and
// addresses for the new state are put in place first, then nftables switches over in
// one transaction, and only then is what the old state needed removed.
//
// The nftables step holds the pod store's lock (applyTables), so the CNI plugin's
// records and the kernel's cni_pods elements change together or not at all.
func (d *Dataplane) Apply(state State) (Result, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.apply(state)
}

// applyTables puts natd's tables in place for state and the CNI plugin's records, and
// tells the plugin the pinning those tables implement, all under the pod store's lock:
// the plugin (whose pod creations wait for it) never sees one without the other.
func (d *Dataplane) applyTables(state State) (nftOutcome, error) {
	unlock, err := d.store.Lock()
	if err != nil {
		return nftOutcome{}, err
	}
	defer unlock()
	records := d.records()
	rss := d.rulesets(state, records)
	guards, planErr := d.podGuardPlan(state, records)
	var releaseErr error
	if planErr == nil {
		// Before the tables stop classifying a pod (its namespace unpinned), its
		// device loses the guard: the new tables would return its packets with the
		// origin mark, and the route guard would drop them. Until they are committed
		// the old tables still classify the pod, guard or no guard.
		releaseErr = d.pods.release(guards)
	}
	d.nftMu.Lock()
	start := time.Now() // the kernel's timeouts start later, at the commit
	d.nft.leaseTimeout = d.leaseLeft(state.LeaseUntil)
	leased := d.nft.leaseTimeout
	if leased == 0 {
		leased = d.cfg.Lease // the sets' own timeout
	}
	out, err := d.nft.apply(rss)
	d.nft.leaseTimeout = 0
	ended := false
	if err == nil && !state.LeaseUntil.IsZero() && d.nft.leased > 0 {
		// A deadline that passed while this Apply ran ends the leases; that is no
		// failure of the Apply: the caller's evidence is as old as it is, and its next
		// renewal finds the lease run out.
		err = d.boundLeases(state.LeaseUntil, start)
		if ended = errors.Is(err, ErrLeaseDeadlinePassed); ended {
			err = nil
		}
	}
	d.nftMu.Unlock()
	if err != nil {
		return out, err
	}
	if !ended {
		d.leasedUntil(start.Add(leased))
	}
	if err := d.store.WritePinning(state.PinnedNamespaces, d.cfg.Marks); err != nil {
		return out, err
	}
	guardErr := planErr
	if planErr == nil {
		guardErr = errors.Join(d.pods.attach(guards), releaseErr)
	}
	d.reportPodGuard(guardErr)
	return out, nil
}

// reportPodGuard logs the pod guard's state when it changes. A failure fails no Apply:
// the pods are pinned all the same, only the guard against natd's tables being
// deleted is missing, and Verify has it tried again.
func (d *Dataplane) reportPodGuard(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg == d.podGuardErr {
		return
	}
	d.podGuardErr = msg
	switch {
	case err == nil:
		klog.InfoS("Pod guard in place again")
	case errors.Is(err, ErrPodGuardUnsupported):
		klog.ErrorS(err, "Pinned pods have no guard against natd's tables being deleted: this kernel or natd's capabilities cannot load its BPF filter (cls_bpf, CAP_BPF)")
	default:
		klog.ErrorS(err, "Pod guard not in place on every pinned pod")
	}
}

// lockedRecords reads the pod store under its lock.
func (d *Dataplane) lockedRecords() ([]PodRecord, error) {
	unlock, err := d.store.Lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	return d.records(), nil
}

// records reads the pod store; a bad record is reported and skipped.
func (d *Dataplane) records() []PodRecord {
	recs, err := d.store.List()
	if err != nil {
		klog.ErrorS(err, "Some CNI pod records are unreadable; their pods are classified from the API only")
	}
	return recs
}

// rulesets are natd's tables for state: ip, ip6 and arp.
func (d *Dataplane) rulesets(state State, records []PodRecord) []*Ruleset {
	rs6 := BuildRuleset6(state, records, d.cfg.Marks, d.slots, d.cfg.Lease)
	if d.router.noIPv6 {
		// A kernel without IPv6 may refuse an ip6 NAT chain (and with it the whole
		// transaction); it has no IPv6 to SNAT. The rest of the table stays: a pod's
		// IPv6 cannot exist here, but the table's shape is the same everywhere else.
		rs6.Chains = slices.DeleteFunc(rs6.Chains, func(c *Chain) bool { return c.Type == nftables.ChainTypeNAT })
	}
	return []*Ruleset{
		BuildRuleset(state, records, d.cfg.Marks, d.slots, d.cfg.Lease, d.cfg.GossipPort, d.cfg.TunnelPort),
		rs6,
		BuildARPRuleset(state, d.cfg.Lease),
	}
}

func (d *Dataplane) apply(state State) (Result, error) {
	var res Result
	if err := d.loadStale(); err != nil {
		return res, err
	}
	uplink, err := uplinkOf(d.nl, state.NodeIP)
	if err != nil {
		return res, err
	}
	d.allocateSlots(state.Egress)
	slots, held := d.slotRoutes(state)

	if err := d.router.ensure(uplink, state.NodeIP, slots, state.Peers); err != nil {
		return res, err
	}
	guard := d.router.wantGuard(slots, state.ClusterDestinations)
	if err := d.router.ensureGuard(guard); err != nil {
		return res, err
	}
	guard6 := d.router.wantGuard6(slots, state.ClusterDestinations)
	if err := ipv6Absent(d.router.ensureGuard6(guard6)); err != nil {
		return res, err
	}
	present, preferred6, err := egressAddrs(d.nl, uplink, d.ownedAddr)
	if err != nil {
		return res, err
	}
	// Addresses this node gives up leave the uplink before the tables stop guarding
	// them. Removed after, a partner's segment that conntrack cannot un-NAT (an ack
	// for data the new holder sent, out of this node's window) would meet the node's
	// own stack in between and be answered with a reset from the egress IP, killing
	// the connection at the partner (seen once in a planned move). Until the tables
	// change, replies this node still un-NATs are forwarded as before.
	for _, ip := range present {
		if held[ip] {
			continue
		}
		if stop, ok := d.announcing[ip]; ok {
			close(stop)
			delete(d.announcing, ip)
		}
		if err := d.nl.AddrDel(uplink, hostAddr(ip)); err != nil {
			return res, fmt.Errorf("removing egress IP %s from %s: %w", ip, uplink.Attrs().Name, err)
		}
		d.owedRelease[ip] = true // reported (and its flows flushed) by the Apply that completes
	}
	// Bindings handed over for IPs this node takes go into conntrack before the
	// tables let the IPs' traffic through: its first packet here must find them.
	taken := map[netip.Addr]bool{}
	for ip := range held {
		if !d.heldApplied[ip] {
			taken[ip] = true
		}
	}
	d.installBindings(state, taken, false)
	out, err := d.applyTables(state)
	res.Rebuilt = out.rebuilt
	for _, p := range out.repinned {
		d.owedFlush[p] = true // owed until a completed Apply has flushed it
	}
	if err != nil {
		return res, err
	}
	d.loosenHandingOver(state)
	// Addresses this node takes go on the uplink only now that the tables guard them
	// (held_dsts): the other way round, a partner's segment arriving in between — the
	// router still sends the IP here when this node takes it back after a short
	// quorum break — met the node's own stack and was answered with a reset from the
	// egress IP (3 of 4 long-lived connections in a soak). SNAT needs no local address:
	// replies are un-NATed before routing.
	for ip := range held {
		if slices.Contains(present, ip) && !slices.Contains(preferred6, ip) {
			continue
		}
		// Replace: an IPv6 one there but not deprecated gets its lifetimes.
		if err := d.nl.AddrReplace(uplink, hostAddr(ip)); err != nil {
			return res, fmt.Errorf("adding egress IP %s to %s: %w", ip, uplink.Attrs().Name, err)
		}
	}
	// Taken: held now and not held when the last Apply completed. Announce once SNAT
	// is in place: the first replies may come at once.
	for ip := range held {
		if !d.heldApplied[ip] {
			res.Announced = append(res.Announced, ip)
		}
	}
	slices.SortFunc(res.Announced, netip.Addr.Compare)
	for _, e := range state.Egress {
		if e.Local && slices.Contains(res.Announced, e.IP) {
			d.announce(uplink, e.IP, e.AnnounceAfter)
		}
	}

	if err := d.router.prune(slots); err != nil {
		return res, err
	}
	if err := d.router.pruneGuard(guard); err != nil {
		return res, err
	}
	if err := ipv6Absent(d.router.pruneGuard6(guard6)); err != nil {
		return res, err
	}
	released := map[netip.Addr]bool{}
	for ip := range d.heldApplied {
		if !held[ip] {
			released[ip] = true
		}
	}
	for ip := range d.owedRelease {
		if !held[ip] {
			released[ip] = true
		}
	}
	for ip := range released {
		res.Released = append(res.Released, ip)
	}
	slices.SortFunc(res.Released, netip.Addr.Compare)
	if err := d.flushStaleFlows(state, res.Announced, res.Released, d.owedFlush); err != nil {
		return res, err
	}
	d.installBindings(state, taken, true) // this node's pods' ones, now that the sweep deleted their entries
	res.Repinned = len(d.owedFlush)
	d.heldApplied, d.owedFlush, d.owedRelease, d.lastState = held, map[netip.Addr]bool{}, map[netip.Addr]bool{}, &state
	d.stale = map[netip.Addr]bool{}
	for ip := range d.slots {
		if !inEgress(state.Egress, ip) {
			delete(d.slots, ip)
		}
	}
	return res, nil
}

// slotRoutes lists what each egress IP's route table must hold, and the IPs this node
// holds.
func (d *Dataplane) slotRoutes(state State) ([]slotRoute, map[netip.Addr]bool) {
	slots := make([]slotRoute, 0, len(state.Egress))
	held := map[netip.Addr]bool{}
	for _, e := range state.Egress {
		if d.slots[e.IP] == 0 {
			continue // no slot: its traffic is dropped (BuildRuleset), no rule, no table
		}
		s := slotRoute{idx: d.slots[e.IP], vni: TunnelVNI(e.IP), v6: e.IP.Is6()}
		if !e.Local && e.HolderIP.IsValid() {
			s.via = e.HolderIP
		}
		if e.Local {
			held[e.IP] = true
		}
		slots = append(slots, s)
	}
	return slots, held
}

// Verify reports whether anything natd owns in the kernel differs from what the last
// completed Apply left there (with the CNI plugin's records as they are now): a table,
// chain, rule or set element changed or removed, an ip rule or route gone or
// re-pointed, a held egress IP missing from the uplink. It changes nothing; a sync
// repairs. While nobody else has committed to nftables, the tables are not read back.
func (d *Dataplane) Verify() (drifted bool, retryIn time.Duration, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lastState == nil {
		return false, 0, nil
	}
	state := *d.lastState
	d.nftMu.Lock()
	untouched, err := d.nft.untouched()
	d.nftMu.Unlock()
	if err != nil {
		return false, 0, err
	}
	// The pod guard's check below needs the records whatever happened; the tables are
	// read back only when someone has committed to nftables (the CNI plugin never
	// changes its records without doing so).
	records, err := d.lockedRecords()
	if err != nil {
		return false, 0, err
	}
	if !untouched {
		rss := d.rulesets(state, records)
		d.nftMu.Lock()
		drifted, retryIn, err = d.nft.drifted(rss)
		d.nftMu.Unlock()
		if err != nil || drifted {
			return drifted, 0, err
		}
	}
	uplink, err := uplinkOf(d.nl, state.NodeIP)
	if err != nil {
		return false, 0, err
	}
	slots, held := d.slotRoutes(state)
	if ok, err := d.router.intact(uplink, state.NodeIP, slots, state.Peers); err != nil || !ok {
		return !ok, 0, err
	}
	if ok, err := d.router.guardIntact(d.router.wantGuard(slots, state.ClusterDestinations)); err != nil || !ok {
		return !ok, 0, err
	}
	if ok, err := d.router.guard6Intact(d.router.wantGuard6(slots, state.ClusterDestinations)); ipv6Absent(err) != nil || (err == nil && !ok) {
		return !ok, 0, err
	}
	present, preferred6, err := egressAddrs(d.nl, uplink, d.ownedAddr)
	if err != nil {
		return false, 0, err
	}
	if len(present) != len(held) || len(preferred6) > 0 || slices.ContainsFunc(present, func(ip netip.Addr) bool { return !held[ip] }) {
		return true, 0, nil
	}
	// Last: a pod guard that cannot be checked is no reason to leave anything else
	// unchecked, nor an error of the node's; an Apply reports why it cannot be put in
	// place.
	ok, err := d.podGuardIntact(state, records)
	if err != nil {
		klog.V(2).InfoS("Pod guard not checked", "err", err)
		return false, retryIn, nil
	}
	return !ok, retryIn, nil
}

// podGuardPlan is where the pod guard must be: on the devices natd-cni recorded for
// pods of pinned namespaces, and on those of this node's pinned pods natd-cni never
// saw (older than it), found by their addresses; recorded pods of other namespaces
// must not have it.
func (d *Dataplane) podGuardPlan(state State, records []PodRecord) (map[podDevice]bool, error) {
	want := recordedDevices(records, state.PinnedNamespaces)
	older, err := d.pods.discover(unrecorded(state, records))
	for dev := range older {
		if _, recorded := want[dev]; !recorded {
			want[dev] = true
		}
	}
	return want, err
}

// podGuardIntact reports whether the pod guard is where it should be. A kernel that
// cannot run it has nothing to repair.
func (d *Dataplane) podGuardIntact(state State, records []PodRecord) (bool, error) {
	want, err := d.podGuardPlan(state, records)
	if err != nil {
		return false, err
	}
	ok, err := d.pods.intact(want)
	if errors.Is(err, ErrPodGuardUnsupported) {
		return true, nil
	}
	return ok, err
}

// ipv6Absent turns the error of a node without IPv6 (the kernel's ipv6.disable=1) into
// none: it has no IPv6 to guard.
func ipv6Absent(err error) error {
	if errors.Is(err, unix.EAFNOSUPPORT) {
		return nil
	}
	return err
}

func inEgress(list []EgressIP, ip netip.Addr) bool { return egressIndex(list, ip) >= 0 }

// egressIndex finds ip in list (sorted by IP), or -1.
func egressIndex(list []EgressIP, ip netip.Addr) int {
	i := sort.Search(len(list), func(i int) bool { return !list[i].IP.Less(ip) })
	if i < len(list) && list[i].IP == ip {
		return i
	}
	return -1
}

// loadStale reads, once, which egress IPs a previous natd run held on this node.
func (d *Dataplane) loadStale() error {
	if d.firstDone {
		return nil
	}
	conn, err := d.nftConn(0)
	if err != nil {
		return fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	held, err := heldAddrsInKernel(conn)
	if err != nil {
		return err
	}
	for _, h := range held {
		d.stale[h.IP] = true
		d.heldApplied[h.IP] = true // held before this start: keeping it is no takeover
	}
	d.firstDone = true
	return nil
}

func (d *Dataplane) ownedAddr(ip netip.Addr) bool {
	if d.stale[ip] {
		return true
	}
	for _, p := range d.cfg.EgressCIDRs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// allocateSlots gives every egress IP a slot (mark and route table). A slot is kept for
// as long as its IP is in use, and a freed slot is not reused in the same Apply: the
// old nftables ruleset may still mark packets with it until the new one is in.
// New IPs start at a slot derived from the IP, so a restarted natd mostly picks the
// slots its previous run used.
func (d *Dataplane) allocateSlots(egress []EgressIP) {
	used := map[int]bool{}
	for _, idx := range d.slots {
		used[idx] = true
	}
	max := d.cfg.Marks.MaxIndex()
	for _, e := range egress {
		if _, ok := d.slots[e.IP]; ok {
			continue
		}
		h := fnv.New32a()
		h.Write(e.IP.AsSlice())
		start := int(h.Sum32()%uint32(max)) + 1
		for i := 0; i < max; i++ {
			idx := (start-1+i)%max + 1
			if !used[idx] {
				d.slots[e.IP] = idx
				used[idx] = true
				break
			}
		}
		if _, ok := d.slots[e.IP]; !ok {
			klog.ErrorS(errNoSlot, "Egress IP has no slot on this node; its traffic is dropped until one is free", "egressIP", e.IP, "slots", max)
		}
	}
}

var errNoSlot = errors.New("more egress IPs in use than --fwmark-mask has slots")

// Cleanup removes everything natd put into this node's kernel: its nftables tables, ip
// rules, route tables, tunnel devices, the egress IPs it held, and the uplink
// rp_filter setting natd versions before the tunnel changed.
func (d *Dataplane) Cleanup() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	conn, err := d.nftConn(0)
	if err != nil {
		return fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	held, err := heldAddrsInKernel(conn)
	if err != nil {
		errs = append(errs, err)
	}
	for _, h := range held {
		d.stale[h.IP] = true
	}
	links, err := d.nl.LinkList()
	if err != nil {
		errs = append(errs, fmt.Errorf("listing links: %w", err))
	}
	for _, l := range links {
		addrs, _, err := egressAddrs(d.nl, l, d.ownedAddr)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, ip := range addrs {
			if err := d.nl.AddrDel(l, hostAddr(ip)); err != nil {
				errs = append(errs, fmt.Errorf("removing %s from %s: %w", ip, l.Attrs().Name, err))
			}
		}
	}
	if err := deleteTables(conn); err != nil {
		errs = append(errs, err)
	}
	if err := d.router.prune(nil); err != nil {
		errs = append(errs, err)
	}
	if err := d.router.pruneGuard(guardPlan{}); err != nil {
		errs = append(errs, err)
	}
	if err := ipv6Absent(d.router.removeGuard6()); err != nil {
		errs = append(errs, err)
	}
	if err := d.pods.removeAll(); err != nil {
		errs = append(errs, err)
	}
	if err := d.restoreRPFilter(); err != nil {
		errs = append(errs, err)
	}
	if err := d.store.RemoveAll(); err != nil {
		errs = append(errs, fmt.Errorf("removing the pod store: %w", err))
	}
	d.nftMu.Lock()
	d.nft.applied, d.nft.leased, d.lastState = nil, 0, nil
	d.nftMu.Unlock()
	return errors.Join(errs...)
}

// KernelClaims returns the egress IPs the kernel says this node holds, with their claim
// generations: how a restarted natd learns what it had.
func (d *Dataplane) KernelClaims() ([]election.Claim, error) {
	conn, err := d.nftConn(0)
	if err != nil {
		return nil, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	return heldAddrsInKernel(conn)
}

// RenewLeases pushes the expiry of every held IP's lease to until (at most Lease from
// now): the moment the agent saw the evidence that lets it hold, plus Lease. natd calls
// it several times per lease; when natd dies, the leases lapse and the node stops
// SNATing and answering ARP for its egress IPs by itself.
func (d *Dataplane) RenewLeases(until time.Time) error {
	d.nftMu.Lock()
	defer d.nftMu.Unlock()
	if d.frozen || d.cfg.Lease == 0 || d.nft.leased == 0 {
		return nil // nothing to renew: no deadline to miss
	}
	start := time.Now()
	left := d.leaseLeft(until)
	if left <= time.Millisecond {
		return ErrLeaseDeadlinePassed
	}
	if err := d.renew(left); err != nil {
		return err
	}
	return d.boundLeases(until, start)
}

// boundLeases keeps a late commit from stretching the kernel's leases past until. A
// lease's timeout is the time left until its deadline as of start, but the kernel
// counts it from the moment it processes the commit, which a stalled process (a
// starved CPU, a long Apply, a pause just before the system call) makes later: the
// lease would then run past its deadline by the delay, and the voters' bound, which
// counts on the holder's lease ending in time, only reserves two heartbeat intervals
// for that. A commit that returned later than the slack after start is followed at
// once by another with the time left now, until one is in time; when the deadline
// has passed, the leases are ended instead (their elements deleted: a deletion can
// only shorten a lease, however late it comes). Called with nftMu held.
func (d *Dataplane) boundLeases(until, start time.Time) error {
	slack := d.cfg.LeaseCommitSlack
	if slack <= 0 {
		slack = 10 * time.Millisecond
	}
	for late := time.Since(start); late > slack; late = time.Since(start) {
		d.lateLeaseCommits.Add(1)
		// An Apply that rebuilds tables takes longer than the slack on a busy node;
		// a renewal that does, often, says the node is too starved for its
		// --heartbeat-interval and --lease.
		klog.V(2).InfoS("Lease commit came late; cutting the lease back to its deadline", "late", late, "slack", slack)
		start = time.Now()
		left := until.Sub(start)
		if left <= time.Millisecond {
			if err := d.renew(0); err != nil {
				return err
			}
			d.leasedUntil(start)
			return ErrLeaseDeadlinePassed
		}
		if err := d.renew(left); err != nil {
			return err
		}
	}
	return nil
}

// LateLeaseCommits counts the lease commits that came too late and were corrected.
func (d *Dataplane) LateLeaseCommits() uint64 { return d.lateLeaseCommits.Load() }

// ErrLeaseDeadlinePassed: a renewal came too late for the evidence it was granted on.
var ErrLeaseDeadlinePassed = errors.New("the lease's deadline passed before it could be renewed")

// leaseLeft is how long leased elements may live from now to end by until (at most
// --lease; zero until: --lease), and at least a millisecond (nftables' unit).
func (d *Dataplane) leaseLeft(until time.Time) time.Duration {
	if until.IsZero() {
		return 0
	}
	return min(max(time.Until(until), time.Millisecond), d.cfg.Lease)
}

// HoldLeases extends every lease to grace and stops renewing: natd is stopping for a
// restart, and the kernel keeps serving its IPs until the next natd takes over.
func (d *Dataplane) HoldLeases(grace time.Duration) error {
	d.nftMu.Lock()
	defer d.nftMu.Unlock()
	d.frozen = true
	if d.cfg.Lease == 0 {
		return nil
	}
	return d.renew(grace)
}

func (d *Dataplane) renew(timeout time.Duration) error {
	if d.nft.applied == nil {
		if d.nft.leased > 0 {
			// The last Apply failed half-way through a rebuild: the leases are not
			// being kept, whatever the caller hoped.
			return errors.New("renewing leases: natd's tables are not in place")
		}
		return nil
	}
	conn, err := d.nftConn(0)
	if err != nil {
		return fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	start := time.Now()
	if err := d.nft.renewLeases(conn, timeout); err != nil {
		return err
	}
	d.leasedUntil(start.Add(timeout))
	return nil
}

// leasedUntil records that the kernel's leases last until at least end.
func (d *Dataplane) leasedUntil(end time.Time) {
	d.leaseEnds.Store(&end)
}

// leaseCurrent reports whether the kernel's leases are still running (always, when
// natd runs without them). A natd frozen (SIGSTOP, a paused VM) past its lease and
// then resumed fires its announcements' overdue timers at once, before any sync has
// noticed that the lease lapsed: a gratuitous ARP then, sent on a packet socket where
// the arp table's lease does not reach, would point the router at a node that no
// longer serves the IP and take its traffic from the new holder.
func (d *Dataplane) leaseCurrent() bool {
	if d.cfg.Lease == 0 {
		return true
	}
	end := d.leaseEnds.Load()
	return end != nil && time.Now().Before(*end)
}

// announce sends gratuitous ARPs (IPv6: unsolicited neighbour advertisements) for ip
// after delay (a planned takeover) or now, and at the configured repeats after that,
// until ip is released.
func (d *Dataplane) announce(uplink netlink.Link, ip netip.Addr, delay time.Duration) {
	if old, ok := d.announcing[ip]; ok {
		close(old)
	}
	stop := make(chan struct{})
	d.announcing[ip] = stop
	ifindex, mac := uplink.Attrs().Index, uplink.Attrs().HardwareAddr
	send := func() {
		if !d.leaseCurrent() {
			klog.V(2).InfoS("Not announcing an egress IP whose lease ran out", "egressIP", ip)
			return
		}
		if err := d.inNetns(func() error { return sendAnnouncement(ifindex, mac, ip) }); err != nil {
			// The IP works without it; neighbours learn it on their next ARP or
			// neighbour solicitation.
			klog.ErrorS(err, "Gratuitous ARP or unsolicited neighbour advertisement failed", "egressIP", ip)
		}
	}
	offsets := d.cfg.Announce // from start
	if delay > 0 {
		offsets = append([]time.Duration{0}, offsets...)
	} else {
		send()
	}
	if len(offsets) == 0 {
		return
	}
	go func() {
		start := time.Now().Add(delay)
		for _, at := range offsets {
			select {
			case <-stop:
				return
			case <-time.After(time.Until(start.Add(at))):
				send()
			}
		}
	}()
}

// restoreRPFilter puts back the uplink rp_filter values that natd versions before the
// tunnel loosened (they kept the originals in the state dir).
func (d *Dataplane) restoreRPFilter() error {
	if d.cfg.StateDir == "" {
		return nil
	}
	saved, err := filepath.Glob(filepath.Join(d.cfg.StateDir, "rp_filter.*"))
	if err != nil {
		return err
	}
	return d.inNetns(func() error {
		for _, f := range saved {
			dev := strings.TrimPrefix(filepath.Base(f), "rp_filter.")
			b, err := os.ReadFile(f)
			if err != nil {
				return fmt.Errorf("reading saved rp_filter: %w", err)
			}
			err = os.WriteFile(filepath.Join("/proc/sys/net/ipv4/conf", dev, "rp_filter"), b, 0o644)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("restoring rp_filter of %s: %w", dev, err)
			}
			if err := os.Remove(f); err != nil {
				return err
			}
		}
		return nil
	})
}

// inNetns runs fn with the calling OS thread in cfg.NetNS (sockets and /proc/sys/net
// belong to the namespace of the thread that opens them).
func (d *Dataplane) inNetns(fn func() error) error { return inNetns(d.cfg.NetNS, fn) }

// inNetns runs fn with the calling OS thread in ns (nil: where it is).
func inNetns(ns *netns.NsHandle, fn func() error) error {
	if ns == nil {
		return fn()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("getting current netns: %w", err)
	}
	defer orig.Close() //nolint:errcheck // a handle only
	if err := netns.Set(*ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("entering netns: %w", err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime then ends it rather than reuse a thread
		// stuck in the wrong namespace.
		return errors.Join(ferr, fmt.Errorf("returning to original netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// WatchChanges calls changed whenever a transaction commits to nftables in this
// node's namespace (natd's own included), and whenever an ip rule, a route of a table
// other than main, local and default, or an address is deleted, until stop is closed:
// drift is found within milliseconds of someone touching what natd owns, not at the
// next periodic check (a second later: an ip rule flushed was repaired after up to
// 1.1 s). Committed transactions are announced with a NEWGEN message to the nftables
// multicast group, deletions to rtnetlink's; their content is not read here (Verify
// does that).
func (d *Dataplane) WatchChanges(stop <-chan struct{}, changed func()) error {
	c, err := d.dial(unix.NETLINK_NETFILTER)
	if err != nil {
		return err
	}
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		return errors.Join(fmt.Errorf("subscribing to nftables changes: %w", err), c.Close())
	}
	rt, err := d.dial(unix.NETLINK_ROUTE)
	if err != nil {
		return errors.Join(err, c.Close())
	}
	for _, g := range []uint32{unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV4_IFADDR,
		unix.RTNLGRP_IPV6_RULE, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV6_IFADDR} {
		if err := rt.JoinGroup(g); err != nil {
			return errors.Join(fmt.Errorf("subscribing to rtnetlink group %d: %w", g, err), c.Close(), rt.Close())
		}
	}
	d.watch(stop, rt, changed, deletedOwnable)
	d.watch(stop, c, changed, func(m mdnetlink.Message) bool {
		return m.Header.Type == mdnetlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWGEN) && !d.ownRenewal(m)
	})
	return nil
}

// watch calls changed for every message on c that matters says matters (and after an
// overrun, which lost some), until stop is closed.
func (d *Dataplane) watch(stop <-chan struct{}, c *mdnetlink.Conn, changed func(), matters func(mdnetlink.Message) bool) {
	go func() {
		<-stop
		c.Close() //nolint:errcheck // stopping
	}()
	go func() {
		for {
			msgs, err := c.Receive()
			if err != nil {
				select {
				case <-stop:
					return
				default:
				}
				changed()
				if !errors.Is(err, unix.ENOBUFS) {
					time.Sleep(time.Second) // a broken socket: the periodic check remains
				}
				continue
			}
			if slices.ContainsFunc(msgs, matters) {
				changed()
			}
		}
	}()
}

// ownRenewal reports whether a new-generation notification is natd's own lease
// renewal's: checking the kernel after each of those (every --lease/4) cost a holder
// more CPU than everything else it does, and on saturated CPUs that CPU is time its
// heartbeats wait.
func (d *Dataplane) ownRenewal(m mdnetlink.Message) bool {
	if len(m.Data) < 4 {
		return false
	}
	ad, err := mdnetlink.NewAttributeDecoder(m.Data[4:]) // after the nfgenmsg header
	if err != nil {
		return false
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_GEN_ID {
			return d.nft.renewals.has(ad.Uint32())
		}
	}
	return false
}

// deletedOwnable reports an rtnetlink message that deletes what natd could own: an ip
// rule, an address, or a route of a table other than main, local and default (natd's
// are numbered above 255, which rtmsg names RT_TABLE_COMPAT). Additions and the main
// table's routes, which pods' CNIs change all the time, are not natd's to check.
func deletedOwnable(m mdnetlink.Message) bool {
	switch m.Header.Type {
	case unix.RTM_DELRULE, unix.RTM_DELADDR:
		return true
	case unix.RTM_DELROUTE:
		return len(m.Data) > 4 && m.Data[4] != unix.RT_TABLE_MAIN && m.Data[4] != unix.RT_TABLE_LOCAL && m.Data[4] != unix.RT_TABLE_DEFAULT
	}
	return false
}
