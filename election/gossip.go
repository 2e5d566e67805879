package election

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
	"k8s.io/klog/v2"
)

// GossipConfig configures a node's membership in the natd cluster.
type GossipConfig struct {
	NodeName string
	BindIP   netip.Addr
	Port     int
	// Key encrypts and authenticates all gossip (16, 24 or 32 bytes); nil means
	// plain text, which only --insecure-gossip allows. OtherKeys are accepted too (a
	// rotation in progress); SetKeys changes them all while running.
	Key       []byte
	OtherKeys [][]byte
	// Failure detection: a member is probed every ProbeInterval, must answer within
	// ProbeTimeout, and is declared dead after SuspicionMult probe intervals of
	// suspicion (scaled by log10 of the cluster size, as memberlist does).
	ProbeInterval time.Duration
	ProbeTimeout  time.Duration
	SuspicionMult int
	// PushPullInterval is how often a full state exchange runs with one random peer
	// (0: 10 s).
	PushPullInterval time.Duration
	// Heartbeat is the voters' heartbeat schedule (zero: NewHeartbeatTiming(15ms, 150ms)).
	Heartbeat HeartbeatTiming
	// Boot orders this natd's metadata after its previous lives' (see Meta.Boot); zero:
	// the clock now.
	Boot uint64
	// ForgetDeadAfter is how long memberlist keeps a dead member's state (zero: its
	// default, 30 s); tests shorten it.
	ForgetDeadAfter time.Duration
	// Transport replaces the UDP/TCP transport (the scale harness's in-memory network).
	Transport memberlist.Transport
	// Clock, for tests; time.Now when nil.
	Now func() time.Time
}

// Member is one member as this node sees it.
type Member struct {
	Name  string
	Addr  netip.Addr
	Port  uint16
	Alive bool // alive or suspected; false once declared dead
	Meta  Meta
	// DownSince is when this node learned the member was dead.
	DownSince time.Time
	// Routes is what the member last reported to have programmed (nil: nothing heard).
	Routes *Routes
	// ClaimsPending: the member's metadata names a claims record this node does not
	// have yet (claims.go); Meta.Claims are the claims it knew before.
	ClaimsPending bool
}

// Claims reports whether the member's last gossip claims ip.
func (m Member) Claims(ip netip.Addr) bool {
	return slices.ContainsFunc(m.Meta.Claims, func(c Claim) bool { return c.IP == ip })
}

// View is a snapshot of the membership.
type View struct {
	Self    string
	Members map[string]Member // every member ever seen and not gone (left or forgotten)
	At      time.Time
	// Evidence is what this node can prove about the voters (see heartbeat.go).
	Evidence Evidence
}

// Alive reports whether name is a live member.
func (v View) Alive(name string) bool { return v.Members[name].Alive }

// InGrace reports whether name is down for a planned restart and its claims still stand.
func (v View) InGrace(name string) bool {
	m, ok := v.Members[name]
	return ok && !m.Alive && m.Meta.RestartGrace > 0 && v.At.Before(m.DownSince.Add(m.Meta.RestartGrace))
}

// Gossip is this node's membership in the natd cluster, on hashicorp/memberlist.
type Gossip struct {
	cfg  GossipConfig
	list *memberlist.Memberlist

	mu      sync.Mutex
	local   Meta
	members map[string]*Member
	changed chan struct{}
	// membersChanged: a change the planner needs only lazily (see MembersChanged).
	membersChanged chan struct{}

	// routes holds the latest Routes report of every node, this node's included, on
	// the nodes that write the status (voters, holders); the others keep their own.
	// Each node sends its report straight to the voters (see sendRoutes), and
	// memberlist's full state exchange carries them to a voter that was away.
	routes        map[string]Routes
	routesKick    chan struct{} // wakes sendRoutes
	routesChanged chan struct{}

	// records are the claims records seen of each member, localRecord this node's own
	// (empty while its claims fit in the metadata); claimsKick wakes fetchClaims.
	records     map[string]recentRecords
	localRecord claimsRecord
	claimsKick  chan struct{}

	// handovers are the latest handover of each egress IP (see SendHandover).
	handovers map[netip.Addr]Handover

	keyring *memberlist.Keyring // nil: plain text
	metaSeq uint32
	// metaConfirmWithin is how long a metadata broadcast may take before SetLocal
	// sends it again.
	metaConfirmWithin time.Duration
	// staleMetas counts metadata refused as older than what was seen (replays).
	staleMetas atomic.Int64
	hb         *heartbeats
	stop       chan struct{}
	once       sync.Once
}

// NewGossip starts gossiping on cfg.BindIP:cfg.Port. Join adds it to the cluster.
func NewGossip(cfg GossipConfig) (*Gossip, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Boot == 0 {
		cfg.Boot = uint64(time.Now().UnixNano())
	}
	if cfg.Heartbeat.Interval <= 0 {
		cfg.Heartbeat = NewHeartbeatTiming(15*time.Millisecond, 150*time.Millisecond)
	}
	g := &Gossip{cfg: cfg, members: map[string]*Member{}, changed: make(chan struct{}, 1), membersChanged: make(chan struct{}, 1),
		routes: map[string]Routes{}, routesChanged: make(chan struct{}, 1), routesKick: make(chan struct{}, 1),
		records: map[string]recentRecords{}, claimsKick: make(chan struct{}, 1), handovers: map[netip.Addr]Handover{},
		hb: newHeartbeats(cfg.NodeName, cfg.Heartbeat, cfg.Now), stop: make(chan struct{})}
	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.NodeName
	mc.BindAddr = cfg.BindIP.String()
	mc.BindPort = cfg.Port
	mc.AdvertiseAddr = cfg.BindIP.String()
	mc.AdvertisePort = cfg.Port
	mc.ProbeInterval = cfg.ProbeInterval
	mc.ProbeTimeout = cfg.ProbeTimeout
	mc.SuspicionMult = cfg.SuspicionMult
	// Spread updates (claims above all) quickly: a takeover is announced in tens of ms.
	mc.GossipInterval = 50 * time.Millisecond
	mc.PushPullInterval = 10 * time.Second
	if cfg.PushPullInterval > 0 {
		mc.PushPullInterval = cfg.PushPullInterval
	}
	mc.TCPTimeout = 2 * time.Second
	// memberlist compresses every packet with LZW by default, allocating a fresh
	// dictionary each time: natd's messages are small and sealed (ciphertext does not
	// compress), so it costs CPU for nothing — the largest cost in the scale harness.
	mc.EnableCompression = false
	if cfg.ForgetDeadAfter > 0 {
		mc.GossipToTheDeadTime = cfg.ForgetDeadAfter
	}
	mc.Delegate = (*delegate)(g)
	mc.Events = (*events)(g)
	mc.Logger = log.New(klogWriter{}, "", 0)
	transport := cfg.Transport
	if transport == nil {
		guarded, err := newGuardedTransport(cfg.BindIP, cfg.Port, g.isMemberAddr)
		if err != nil {
			return nil, fmt.Errorf("starting gossip on %s:%d: %w", cfg.BindIP, cfg.Port, err)
		}
		transport = guarded
	}
	if p, ok := transport.(interface{ GetAutoBindPort() int }); ok && cfg.Port == 0 {
		mc.BindPort = p.GetAutoBindPort() // tests: the port the transport found
		mc.AdvertisePort = mc.BindPort
	}
	mc.Transport = transport
	if cfg.Key != nil {
		kr, err := memberlist.NewKeyring(cfg.OtherKeys, cfg.Key)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("gossip key: %w", err), transport.Shutdown())
		}
		mc.Keyring = kr
		g.keyring = kr
		mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	}
	// A broadcast goes out with 3 members a gossip round until it has been sent
	// RetransmitMult·⌈log10(n+1)⌉ times: at 1,000 members 6 rounds.
	g.metaConfirmWithin = 10 * mc.GossipInterval
	list, err := memberlist.Create(mc)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("starting gossip on %s:%d: %w", cfg.BindIP, cfg.Port, err), transport.Shutdown())
	}
	g.list = list
	go g.heartbeat()
	go g.sendRoutes()
	go g.fetchClaims()
	return g, nil
}

// heartbeat sends the voters' heartbeats every interval until gossip stops.
func (g *Gossip) heartbeat() {
	t := time.NewTicker(g.cfg.Heartbeat.Interval)
	defer t.Stop()
	for {
		select {
		case <-g.stop:
			return
		case <-t.C:
		}
		out, changed := g.hb.tick()
		if changed {
			g.logEvidence()
			g.signal()
		}
		for _, o := range out {
			g.mu.Lock()
			m, ok := g.members[o.to]
			g.mu.Unlock()
			if !ok || !m.Addr.IsValid() {
				continue // not met yet: memberlist tells of it first
			}
			a := memberlist.Address{Addr: PeerAddr(m.Addr, int(m.Port)), Name: o.to}
			if err := g.list.SendToAddress(a, o.msg); err != nil {
				klog.V(4).InfoS("Heartbeat not sent", "to", o.to, "err", err)
			}
		}
	}
}

// logEvidence says when this node's quorum begins or ends, and who is down.
func (g *Gossip) logEvidence() {
	e := g.hb.evidence()
	down := slices.Sorted(maps.Keys(e.Down))
	inTouch := slices.Sorted(maps.Keys(e.InTouch))
	klog.InfoS("Voters' evidence changed", "quorum", e.Quorum(), "inTouch", inTouch, "down", down, "voters", e.Voters)
}

// ErrNoKeyring is returned by SetKeys when gossip runs in plain text.
var ErrNoKeyring = errors.New("gossip runs without a key (--insecure-gossip)")

// SetKeys makes keys the gossip keys, the first one primary (it seals what this node
// sends; all of them open what it receives), and reports whether anything changed. A
// rotation adds the new key everywhere first, then makes it primary everywhere, then
// removes the old one: at every step every node can read every other.
func (g *Gossip) SetKeys(keys [][]byte) (changed bool, err error) {
	if g.keyring == nil {
		return false, ErrNoKeyring
	}
	if len(keys) == 0 {
		return false, errors.New("no gossip key")
	}
	cur := g.keyring.GetKeys() // primary first
	if len(cur) == len(keys) && slices.EqualFunc(cur, keys, bytes.Equal) {
		return false, nil
	}
	for _, k := range keys {
		if err := g.keyring.AddKey(k); err != nil {
			return true, fmt.Errorf("installing a gossip key: %w", err)
		}
	}
	if err := g.keyring.UseKey(keys[0]); err != nil {
		return true, fmt.Errorf("switching the primary gossip key: %w", err)
	}
	for _, k := range cur {
		if !slices.ContainsFunc(keys, func(x []byte) bool { return bytes.Equal(x, k) }) {
			if err := g.keyring.RemoveKey(k); err != nil {
				return true, fmt.Errorf("removing a gossip key: %w", err)
			}
		}
	}
	return true, nil
}

// SetVoters sets who the voters are, and whether this node holds IPs (it then
// heartbeats the voters even if it is not one: it is handing its IPs over).
func (g *Gossip) SetVoters(voters []string, holding bool) { g.hb.setVoters(voters, holding) }

func (g *Gossip) stopHeartbeats() { g.once.Do(func() { close(g.stop) }) }

// isMemberAddr reports whether ip is a member's address (alive or not): streams from
// there get the members' budget.
func (g *Gossip) isMemberAddr(ip netip.Addr) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, m := range g.members {
		if m.Addr == ip {
			return true
		}
	}
	return false
}

// Join contacts peers (host or host:port) and merges their view. It returns how many
// answered.
func (g *Gossip) Join(peers []string) (int, error) {
	if len(peers) == 0 {
		return 0, nil
	}
	return g.list.Join(peers)
}

// Port is the port gossip listens on (useful when the config asked for port 0).
func (g *Gossip) Port() int { return int(g.list.LocalNode().Port) }

// Changed is signalled (coalesced) whenever the membership or a member's metadata
// changes.
func (g *Gossip) Changed() <-chan struct{} { return g.changed }

func (g *Gossip) signal() {
	select {
	case g.changed <- struct{}{}:
	default:
	}
}

// SetLocal changes what this node gossips about itself and spreads it. It returns once
// the broadcast of the update has gone out, or with an error once timeout has passed
// (zero: no limit).
//
// memberlist can lose an update in two ways, each seen in the scale harness (a
// holder's claims unknown to every voter for seconds, and a second node taking one of
// its IPs): UpdateNode picks its incarnation number before it takes the node lock, and
// a refutation that runs in between takes a higher one with the old metadata, after
// which memberlist discards the update as older; and its broadcast queue resets its
// id counter whenever it runs empty, so that a new broadcast can take the key of a
// queued one and silently replace it (hashicorp/memberlist#263, not fixed in v0.7.0).
// Either way the broadcast never finishes, so SetLocal makes the update again until one
// does.
func (g *Gossip) SetLocal(m Meta, timeout time.Duration) error {
	enc, err := m.Encode()
	if err != nil {
		return err
	}
	var record claimsRecord
	if enc[1]&flagApart != 0 {
		if record, err = newClaimsRecord(g.cfg.NodeName, m.Claims); err != nil {
			return err
		}
	}
	g.mu.Lock()
	g.metaSeq++
	m.Boot, m.Seq = g.cfg.Boot, g.metaSeq
	g.local, g.localRecord = m, record
	g.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for {
		wait := g.metaConfirmWithin
		if timeout > 0 {
			wait = min(wait, time.Until(deadline))
		}
		err := g.list.UpdateNode(max(wait, time.Millisecond))
		if err == nil {
			return nil
		}
		if timeout > 0 && !time.Now().Before(deadline) {
			return fmt.Errorf("gossip metadata update not confirmed sent within %s: %w", timeout, err)
		}
		klog.V(2).InfoS("Gossip metadata update not confirmed sent; sending it again", "err", err)
	}
}

// View returns a snapshot of the membership.
func (g *Gossip) View() View {
	g.mu.Lock()
	defer g.mu.Unlock()
	v := View{Self: g.cfg.NodeName, Members: make(map[string]Member, len(g.members)), At: g.cfg.Now(),
		Evidence: g.hb.evidence()}
	for name, m := range g.members {
		mm := *m
		if r, ok := g.routes[name]; ok {
			mm.Routes = &r
		}
		v.Members[name] = mm
	}
	if self, ok := v.Members[g.cfg.NodeName]; ok {
		self.Meta = g.local // our own claims, even before memberlist echoes them
		v.Members[g.cfg.NodeName] = self
	}
	return v
}

// Evidence is what this node can prove about the voters now (View's Evidence, without
// copying the membership).
func (g *Gossip) Evidence() Evidence { return g.hb.evidence() }

// Forget drops members that are down and no longer Nodes in the API.
func (g *Gossip) Forget(keep func(name string) bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for name, m := range g.members {
		if !m.Alive && !keep(name) {
			delete(g.members, name)
		}
	}
	for name := range g.routes {
		if _, ok := g.members[name]; !ok && name != g.cfg.NodeName {
			delete(g.routes, name)
		}
	}
	for name := range g.records {
		if _, ok := g.members[name]; !ok {
			delete(g.records, name)
		}
	}
}

// SetRoutes reports what this node has programmed now: it goes to the voters.
func (g *Gossip) SetRoutes(claims []Claim) error {
	sorted := sortedClaims(claims)
	g.mu.Lock()
	old, ok := g.routes[g.cfg.NodeName]
	if ok && slices.Equal(old.Claims, sorted) {
		g.mu.Unlock()
		return nil
	}
	r := Routes{Node: g.cfg.NodeName, Version: max(uint64(g.cfg.Now().UnixNano()), old.Version+1), Claims: sorted}
	if _, err := r.encode(); err != nil {
		g.mu.Unlock()
		return err
	}
	g.routes[r.Node] = r
	g.mu.Unlock()
	g.kickRoutes()
	g.signalRoutes()
	return nil
}

func (g *Gossip) kickRoutes() {
	select {
	case g.routesKick <- struct{}{}:
	default:
	}
}

// routesRefresh is how often a node sends its report again, unchanged: a datagram
// lost on its way is made up for within this long.
const routesRefresh = 5 * time.Second

// sendRoutes sends this node's report to every voter straight away whenever it or the
// voters change, twice more soon after a change, and again every routesRefresh. Only voters write the status, so only
// they need the reports; relaying them from node to node (as gossip broadcasts did)
// costs every node every other node's report, n² messages a change (READY took 20–60 s
// at 50 nodes with 200 egress IPs in the scale harness). A report that fits a datagram goes as one; a larger one (more
// than ~140 egress IPs) over a stream, off the sync path.
func (g *Gossip) sendRoutes() {
	refresh := time.NewTicker(routesRefresh)
	defer refresh.Stop()
	// A changed report goes out again routesRepeat and three times that later: one
	// lost datagram then delays READY by half a second, not by a refresh period.
	repeat := time.NewTimer(time.Hour)
	repeat.Stop()
	repeats := 0
	var version uint64
	var sentTo []string // voters that have this version
	for {
		select {
		case <-g.stop:
			return
		case <-g.routesKick:
		case <-refresh.C:
			sentTo = nil
		case <-repeat.C:
			sentTo = nil
			if repeats--; repeats > 0 {
				repeat.Reset(2 * routesRepeat)
			}
		case <-g.hb.votersChanged():
		}
		g.mu.Lock()
		r, ok := g.routes[g.cfg.NodeName]
		g.mu.Unlock()
		if !ok {
			continue
		}
		msg, err := r.encode()
		if err != nil {
			continue
		}
		if r.Version != version {
			version, sentTo, repeats = r.Version, nil, 2
			repeat.Reset(routesRepeat)
		}
		for _, v := range g.hb.votersNow() {
			if v == g.cfg.NodeName || slices.Contains(sentTo, v) {
				continue
			}
			if g.sendTo(v, msg) {
				sentTo = append(sentTo, v)
			}
		}
	}
}

// routesRepeat is how soon a changed report is sent again (see sendRoutes).
const routesRepeat = 500 * time.Millisecond

// sendTo sends a message (a routes report, a claims record or request) to a member:
// a datagram, or a stream when it is too large for one (in the background: a stream
// to a node that is cut off waits for its timeout). It reports false when the
// member's address is not known yet.
func (g *Gossip) sendTo(name string, msg []byte) bool {
	g.mu.Lock()
	m, ok := g.members[name]
	g.mu.Unlock()
	if !ok || !m.Addr.IsValid() {
		return false
	}
	a := memberlist.Address{Addr: PeerAddr(m.Addr, int(m.Port)), Name: name}
	if len(msg) <= maxDatagram {
		if err := g.list.SendToAddress(a, msg); err != nil {
			klog.V(4).InfoS("Gossip message not sent", "to", name, "err", err)
		}
		return true
	}
	node := &memberlist.Node{Name: name, Addr: m.Addr.AsSlice(), Port: m.Port}
	go func() {
		if err := g.list.SendReliable(node, msg); err != nil {
			klog.V(4).InfoS("Gossip message not sent", "to", name, "err", err)
		}
	}()
	return true
}

// RoutesChanged is signalled (coalesced) when a node's Routes report changes.
func (g *Gossip) RoutesChanged() <-chan struct{} { return g.routesChanged }

func (g *Gossip) signalRoutes() {
	select {
	case g.routesChanged <- struct{}{}:
	default:
	}
}

// mergeRoutes keeps r if it is newer than what this node knows of r.Node, and this
// node keeps reports. The caller holds g.mu. It reports whether this node's own report
// had to be outdated (see below): the caller sends it again.
func (g *Gossip) mergeRoutes(r Routes, keeps bool) (fresh, outdated bool) {
	if r.Node == g.cfg.NodeName {
		// Our own report from before a restart. If its version is not below ours (our
		// clock went back), ours would be ignored everywhere: outdate it.
		if mine, ok := g.routes[r.Node]; ok && r.Version >= mine.Version {
			mine.Version = r.Version + 1
			g.routes[r.Node] = mine
			return false, true
		}
		return false, false
	}
	if !keeps {
		return false, false
	}
	if _, member := g.members[r.Node]; !member {
		// A node that left or was forgotten: an old copy of its last report must not
		// bring it back (memberlist tells of a new member before it passes on any of
		// its messages or state).
		return false, false
	}
	if old, ok := g.routes[r.Node]; ok && old.Version >= r.Version {
		return false, false
	}
	g.routes[r.Node] = r
	return true, false
}

// Leave announces that this node leaves the cluster for good.
func (g *Gossip) Leave(timeout time.Duration) error {
	g.stopHeartbeats()
	return g.list.Leave(timeout)
}

// Shutdown stops gossiping without a goodbye: the others will see this node fail.
func (g *Gossip) Shutdown() error {
	g.stopHeartbeats()
	return g.list.Shutdown()
}

func (g *Gossip) update(n *memberlist.Node, alive bool) {
	meta, err := DecodeMeta(n.Meta)
	if err != nil {
		klog.InfoS("Ignoring unreadable gossip metadata", "member", n.Name, "err", err)
		meta = Meta{}
	}
	addr, _ := netip.AddrFromSlice(n.Addr.To4())
	port := n.Port
	g.mu.Lock()
	m, ok := g.members[n.Name]
	if !ok {
		m = &Member{Name: n.Name}
		g.members[n.Name] = m
	}
	if ok && len(n.Meta) > 0 && err == nil && !meta.Newer(m.Meta) {
		// Older than what this node has seen of the member: a replay (or a reordered
		// update). Liveness is memberlist's to say; the record stays.
		klog.V(2).InfoS("Ignoring stale gossip metadata", "member", n.Name, "boot", meta.Boot, "seq", meta.Seq)
		g.staleMetas.Add(1)
		meta = m.Meta
	}
	if m.Alive != alive || !ok {
		klog.V(2).InfoS("Member state", "member", n.Name, "alive", alive)
		defer g.kickRoutes() // a voter met (again): it may not have this node's report
	}
	if m.Alive && !alive {
		m.DownSince = g.cfg.Now()
	}
	pending := false
	if meta.apart && n.Name != g.cfg.NodeName { // this node's own claims are g.local
		// The claims went apart: the record the metadata names, if this node has it;
		// until then the claims known before, pending.
		if r, found := g.records[n.Name].find(meta.digest); found {
			meta.Claims = r.Claims
		} else {
			meta.Claims, pending = m.Meta.Claims, true
		}
	}
	// A member's claims becoming pending changes nothing the planner has not read
	// yet: its next plan sees the flag (and takes nothing new); their arrival wakes it.
	urgent := !sameStatement(m.Meta, meta) || ((m.Alive != alive || !ok) && (speaks(meta) || g.hb.voter(n.Name)))
	m.Alive, m.Addr, m.Port = alive, addr, port
	if alive || len(n.Meta) > 0 {
		m.Meta = meta // a dead member keeps its last words (claims, restart grace)
		m.ClaimsPending = pending
	}
	g.mu.Unlock()
	if pending {
		g.kickClaims()
	}
	if urgent {
		g.signal()
	} else {
		g.signalMembers()
	}
}

// sameStatement reports whether two records of a member say the same to the planner.
func sameStatement(a, b Meta) bool {
	return a.Draining == b.Draining && a.RestartGrace == b.RestartGrace && slices.Equal(a.Claims, b.Claims)
}

// speaks reports whether a member's record says anything the planner acts on.
func speaks(m Meta) bool { return len(m.Claims) > 0 || m.apart || m.Draining || m.RestartGrace > 0 }

// MembersChanged is signalled (coalesced) when a member that is neither a voter nor
// claims anything comes, goes, or dies: the planner needs it only for READY's
// denominator and, below three egress nodes, the choice of witnesses, so the agent
// syncs for it lazily. A thousand nodes starting must not make every natd sync a
// thousand times (syncs were a quarter of the scale harness's CPU at 200 members).
func (g *Gossip) MembersChanged() <-chan struct{} { return g.membersChanged }

func (g *Gossip) signalMembers() {
	select {
	case g.membersChanged <- struct{}{}:
	default:
	}
}

type delegate Gossip

func (d *delegate) NodeMeta(limit int) []byte {
	g := (*Gossip)(d)
	g.mu.Lock()
	defer g.mu.Unlock()
	b, err := g.local.Encode()
	if err != nil || len(b) > limit {
		return nil
	}
	return b
}

// NotifyMsg receives a heartbeat, a Routes report, a claims record or request, or a
// handover.
// Anything unreadable is dropped with a log line: it comes from the network.
func (d *delegate) NotifyMsg(b []byte) {
	g := (*Gossip)(d)
	if len(b) < 2 {
		klog.V(2).InfoS("Ignoring unreadable gossip message", "bytes", len(b))
		return
	}
	switch b[1] {
	case kindHeartbeat:
		if err := g.hb.receive(b); err != nil {
			klog.V(4).InfoS("Ignoring heartbeat", "err", err)
		}
	case kindClaims:
		r, err := decodeClaimsRecord(b)
		if err != nil {
			klog.V(2).InfoS("Ignoring unreadable gossip message", "err", err)
			return
		}
		g.mu.Lock()
		changed := g.mergeRecord(r)
		g.mu.Unlock()
		if changed {
			g.signal()
		}
	case kindClaimsRequest:
		q, err := decodeClaimsRequest(b)
		if err != nil {
			klog.V(2).InfoS("Ignoring unreadable gossip message", "err", err)
			return
		}
		g.answerClaimsRequest(q)
	case kindHandover:
		g.receiveHandover(b)
	default:
		g.receiveRoutes(b)
	}
}

func (g *Gossip) receiveRoutes(b []byte) {
	r, err := decodeRoutes(b)
	if err != nil {
		klog.V(2).InfoS("Ignoring unreadable gossip message", "err", err)
		return
	}
	keeps := g.hb.keepsReports()
	g.mu.Lock()
	fresh, outdated := g.mergeRoutes(r, keeps)
	g.mu.Unlock()
	if outdated {
		g.kickRoutes()
	}
	if fresh {
		g.signalRoutes()
	}
}

// GetBroadcasts: natd broadcasts nothing of its own through gossip (reports go straight
// to the voters).
func (d *delegate) GetBroadcasts(int, int) [][]byte { return nil }

// LocalState is this node's side of a full state exchange: every Routes report it
// keeps and the claims records the members' metadata names, so a node that just
// joined or came back learns them all at once.
func (d *delegate) LocalState(bool) []byte {
	g := (*Gossip)(d)
	g.mu.Lock()
	defer g.mu.Unlock()
	return encodeState(g.routes, g.currentRecords())
}

func (d *delegate) MergeRemoteState(b []byte, _ bool) {
	g := (*Gossip)(d)
	all, records, err := decodeState(b)
	if err != nil {
		klog.V(2).InfoS("Ignoring unreadable gossip state", "err", err)
		return
	}
	keeps := g.hb.keepsReports()
	fresh, outdated, changed := false, false, false
	g.mu.Lock()
	for _, r := range all {
		f, o := g.mergeRoutes(r, keeps)
		fresh, outdated = fresh || f, outdated || o
	}
	for _, r := range records {
		changed = g.mergeRecord(r) || changed
	}
	g.mu.Unlock()
	if outdated {
		g.kickRoutes()
	}
	if fresh {
		g.signalRoutes()
	}
	if changed {
		g.signal()
	}
}

type events Gossip

func (e *events) NotifyJoin(n *memberlist.Node)   { (*Gossip)(e).update(n, true) }
func (e *events) NotifyUpdate(n *memberlist.Node) { (*Gossip)(e).update(n, true) }
func (e *events) NotifyLeave(n *memberlist.Node) {
	g := (*Gossip)(e)
	if n.State == memberlist.StateLeft {
		g.mu.Lock()
		delete(g.members, n.Name)
		delete(g.routes, n.Name)
		delete(g.records, n.Name)
		g.mu.Unlock()
		g.signal() // rare: a node that left for good
		return
	}
	g.update(n, false)
}

// klogWriter turns memberlist's log lines into structured logs: errors and warnings
// (a garbage packet, a peer with the wrong key) at the default level, the rest at 4.
// memberlist logs every packet it cannot decrypt, so a flood of garbage would become a
// flood of log lines (and their CPU): past a few a second they are only counted, and
// the count is logged.
type klogWriter struct{}

var gossipLogBudget = struct {
	sync.Mutex
	window     time.Time
	n          int
	suppressed int
}{}

const gossipLogPerSecond = 10

func (klogWriter) Write(p []byte) (int, error) {
	line := strings.TrimSpace(string(bytes.TrimRight(p, "\n")))
	if !strings.Contains(line, "[ERR]") && !strings.Contains(line, "[WARN]") {
		klog.V(4).InfoS("Gossip", "msg", line)
		return len(p), nil
	}
	b := &gossipLogBudget
	b.Lock()
	now := time.Now()
	if now.Sub(b.window) >= time.Second {
		if b.suppressed > 0 {
			klog.InfoS("Gossip messages not logged (too many)", "count", b.suppressed)
		}
		b.window, b.n, b.suppressed = now, 0, 0
	}
	b.n++
	if b.n > gossipLogPerSecond {
		b.suppressed++
		b.Unlock()
		return len(p), nil
	}
	b.Unlock()
	klog.InfoS("Gossip", "msg", line)
	return len(p), nil
}

var _ io.Writer = klogWriter{}

// PeerAddr is a peer's gossip address.
func PeerAddr(ip netip.Addr, port int) string {
	return net.JoinHostPort(ip.String(), strconv.Itoa(port))
}
