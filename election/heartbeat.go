package election

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// Voters are the nodes whose contact decides who may hold egress IPs: the egress-
// eligible nodes (with witnesses when there are fewer than three; the planner picks
// them). They send each other a heartbeat every HeartbeatTiming.Interval, directly
// (memberlist user messages: encrypted and authenticated with the gossip key, never
// relayed). A heartbeat echoes the last heartbeat received from its addressee, so each
// side learns of every completed round trip; that is the only evidence natd trusts:
// a recorded or replayed heartbeat echoes nothing recent and proves nothing.
//
// The rules, and why they keep two nodes from ever serving one IP, are in
// ARCHITECTURE.md ("Never two holders"). In short, with H the interval, W the freshness
// window and D the silence:
//   - a node hears a peer when a heartbeat of the peer echoes one it sent within W;
//   - it reports a peer silent only D after it last heard it (or began watching it);
//   - a peer is in touch when its heartbeat echoes one sent within W and says it heard
//     this node within W; a node has a quorum while a majority of voters (itself
//     included, if a voter) are in touch; the quorum is unbroken while no two
//     consecutive moments this node saw it are more than S apart (a stall of the node,
//     or a few lost heartbeats, shorter than that is bridged);
//   - a voter is down when a majority of voters report it silent (fresh reports);
//   - a holder renews its leases (--lease) only while its quorum has not broken since
//     the last renewal; after a break it takes IPs again only after D of quorum.
//
// Because D > max(L+2W, 3W+S), a quorum that reports a holder silent overlaps, in at
// least one voter, the quorum the holder last renewed with, and that voter's report
// comes after the holder's lease ran out. The bound does not depend on the cluster's
// size: only voters take part.

// HeartbeatTiming is the voters' heartbeat schedule.
type HeartbeatTiming struct {
	Interval time.Duration // H: how often each voter sends each other voter a heartbeat
	Fresh    time.Duration // W: how old a round trip may be and still count
	Stall    time.Duration // S: the longest gap in a quorum that does not break it
	Silence  time.Duration // D: how long a voter must go unheard to be reported silent
}

// NewHeartbeatTiming derives the windows from the heartbeat interval and the lease: W
// is three heartbeats (one lost heartbeat or echo changes nothing), S is the lease (a
// gap the lease would bridge anyway), and D is the bound max(L+2W, 3W+S) with 2H for
// a late lease commit, and 10 % for clocks that run at different rates.
func NewHeartbeatTiming(interval, lease time.Duration) HeartbeatTiming {
	w := 3 * interval
	d := max(lease+2*w, 3*w+lease) + 2*interval
	return HeartbeatTiming{Interval: interval, Fresh: w, Stall: lease, Silence: d + d/10}
}

// Evidence is what this node can prove about the voters now.
type Evidence struct {
	At     time.Time
	Voters []string // sorted
	// VotersSince is when this node began heartbeating with this set of voters.
	VotersSince time.Time
	// InTouch lists the voters that completed a round trip with this node within the
	// freshness window (this node itself, if a voter).
	InTouch map[string]bool
	// Down lists the voters a majority of voters report silent.
	Down map[string]bool
	// QuorumSince is when this node's quorum began, unbroken since (zero: broken).
	QuorumSince time.Time
	// QuorumNow: a majority of voters is in touch at this moment. Only such a moment
	// may take an IP.
	QuorumNow bool
	// QuorumSeen is the last moment a majority of voters was in touch (At, if
	// QuorumNow; zero while the quorum is broken). Leases are granted until QuorumSeen
	// + --lease: a moment the quorum was seen is all the bound needs, so a renewal that
	// falls between two such moments (a lost heartbeat, a short stall) still extends
	// the lease instead of waiting for the next one.
	QuorumSeen time.Time
	// QuorumBreaks counts the quorums this node lost since its process began; a holder
	// gives its IPs up at each (an outage if nothing else had failed).
	QuorumBreaks uint64
}

// Quorum reports whether this node's quorum of voters is unbroken.
func (e Evidence) Quorum() bool { return !e.QuorumSince.IsZero() }

// IsVoter reports whether name is one of the voters.
func (e Evidence) IsVoter(name string) bool {
	_, ok := slices.BinarySearch(e.Voters, name)
	return ok
}

// heartbeats is one node's side of the voters' heartbeats: pure state, fed by Gossip
// (tick on a timer, receive from memberlist) and read through evidence.
type heartbeats struct {
	self   string
	boot   uint64 // random per process: echoes of a former life prove nothing
	timing HeartbeatTiming
	now    func() time.Time

	mu          sync.Mutex
	seq         uint64
	sent        []sentHeartbeat // the last seqs, oldest first, within the freshness window
	voters      []string
	votersSince time.Time
	votersKick  chan struct{} // signalled when the voters change
	active      bool          // this node holds IPs: it heartbeats even if not a voter (a handover)
	peers       map[string]*peerState
	lastQuorum  time.Time // the last moment this node saw its quorum
	lastTick    time.Time // the last heartbeat round: a long gap means this node stalled
	quorumSince time.Time
	breaks      uint64 // quorums that broke since this process began
	// What the last tick told the planner, to tell when it changes.
	toldSince time.Time
	toldDown  map[string]bool
}

type sentHeartbeat struct {
	seq uint64
	at  time.Time
}

// bootSeq identifies a heartbeat: its sender's boot and sequence number.
type bootSeq struct{ boot, seq uint64 }

type peerState struct {
	boots      [4]bootSeq // recent boots of the peer, newest first, with their last seq
	echo       bootSeq    // the peer's last heartbeat, echoed back to it
	lastRecv   time.Time  // any new heartbeat
	watchSince time.Time  // when this node began watching it: silence counts from here
	heard      time.Time  // last round trip completed (this node's heartbeat echoed within W)
	// ackedAt is when this node sent the newest heartbeat the peer echoed; with it come
	// the peer's word on this node (heardAge) and its silence report.
	ackedAt  time.Time
	heardAge time.Duration
	silent   []string
}

// maxPeers bounds what a flood of authentic-looking senders can make this node keep.
const maxPeers = 4096

func newHeartbeats(self string, timing HeartbeatTiming, now func() time.Time) *heartbeats {
	var b [8]byte
	rand.Read(b[:])
	return &heartbeats{self: self, boot: binary.BigEndian.Uint64(b[:]) | 1, timing: timing, now: now,
		peers: map[string]*peerState{}, votersKick: make(chan struct{}, 1)}
}

// setVoters sets the voters and whether this node holds IPs.
func (h *heartbeats) setVoters(voters []string, active bool) {
	sorted := slices.Clone(voters)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.active = active
	if slices.Equal(sorted, h.voters) {
		return
	}
	now := h.now()
	for _, v := range sorted {
		if _, was := slices.BinarySearch(h.voters, v); !was && v != h.self {
			// A new voter has been watched from now on: nobody reports it silent before
			// D has passed.
			h.peer(v, now).watchSince = now
		}
	}
	// The quorum goes on if the new set of voters has one too (the next look decides):
	// an egress label added somewhere must not make every holder give its IPs up. A
	// node takes nothing new until D after the change (the planner's VotersSince).
	h.voters, h.votersSince = sorted, now
	select {
	case h.votersKick <- struct{}{}:
	default:
	}
}

// votersChanged is signalled (coalesced) when the voters change.
func (h *heartbeats) votersChanged() <-chan struct{} { return h.votersKick }

// votersNow lists the voters: they need this node's routes report.
func (h *heartbeats) votersNow() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.voters)
}

// keepsReports reports whether this node keeps others' routes reports: it writes the
// status, as a voter or as a holder.
func (h *heartbeats) keepsReports() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.active || h.isVoter(h.self)
}

// voter reports whether name is one of the voters.
func (h *heartbeats) voter(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.isVoter(name)
}

func (h *heartbeats) isVoter(name string) bool {
	_, ok := slices.BinarySearch(h.voters, name)
	return ok
}

func (h *heartbeats) peer(name string, now time.Time) *peerState {
	p, ok := h.peers[name]
	if !ok {
		if len(h.peers) >= maxPeers {
			return nil
		}
		p = &peerState{watchSince: now}
		h.peers[name] = p
	}
	return p
}

// outgoing is one heartbeat for one peer.
type outgoing struct {
	to  string
	msg []byte
}

// tick advances the heartbeat: it keeps the quorum's continuity and returns the
// heartbeats to send now, and whether the evidence changed (the quorum began or
// ended, a voter went down or came back): the planner must look again.
func (h *heartbeats) tick() (out []outgoing, changed bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	h.observe(now)
	h.lastTick = now
	down := h.downAt(now)
	changed = !h.toldSince.Equal(h.quorumSince) || !maps.Equal(down, h.toldDown)
	h.toldSince, h.toldDown = h.quorumSince, down
	h.seq++
	h.sent = append(h.sent, sentHeartbeat{seq: h.seq, at: now})
	for len(h.sent) > 1 && now.Sub(h.sent[0].at) > h.timing.Fresh {
		h.sent = h.sent[1:]
	}
	for name, p := range h.peers {
		if !h.isVoter(name) && now.Sub(p.lastRecv) > h.timing.Silence {
			delete(h.peers, name)
		}
	}
	if !h.isVoter(h.self) && !h.active {
		return nil, changed
	}
	var silent []string
	for _, v := range h.voters {
		if v != h.self && h.silentAt(v, now) {
			silent = append(silent, v)
		}
	}
	// Every other voter, and whoever heartbeats this node (a holder handing its IPs
	// over after it stopped being a voter needs the voters' echoes).
	send := func(name string) {
		p := h.peer(name, now)
		if p == nil {
			return
		}
		hb := heartbeat{From: h.self, Boot: h.boot, Seq: h.seq, Echo: p.echo, HeardAge: neverHeard, Silent: silent}
		if !p.heard.IsZero() {
			hb.HeardAge = now.Sub(p.heard)
		}
		if b, err := hb.encode(); err == nil {
			out = append(out, outgoing{to: name, msg: b})
		}
	}
	for _, v := range h.voters {
		if v != h.self {
			send(v)
		}
	}
	for name, p := range h.peers {
		if !h.isVoter(name) && !p.lastRecv.IsZero() {
			send(name)
		}
	}
	return out, changed
}

// observe looks at the quorum now and keeps its continuity: a quorum seen again within
// S of the last sighting goes on; after a longer gap (this node stalled, or lost touch)
// it begins anew; and once gone for longer than S it is over. The caller holds h.mu.
func (h *heartbeats) observe(now time.Time) (quorum bool) {
	gap := now.Sub(h.lastQuorum)
	if h.quorumAt(now) {
		if h.quorumSince.IsZero() || gap > h.timing.Stall {
			if !h.quorumSince.IsZero() {
				klog.InfoS("Quorum of voters broke and began anew", "gap", gap, "sinceLastTick", now.Sub(h.lastTick), "peers", h.touchReport(now))
				h.breaks++
			}
			h.quorumSince = now
		}
		h.lastQuorum = now
		return true
	}
	if gap > h.timing.Stall && !h.quorumSince.IsZero() {
		klog.InfoS("Quorum of voters broke", "gap", gap, "sinceLastTick", now.Sub(h.lastTick), "peers", h.touchReport(now))
		h.quorumSince = time.Time{}
		h.breaks++
	}
	return false
}

// touchReport says, for each other voter, how long ago this node received its last
// heartbeat, how old the newest heartbeat of this node it echoed is, and how long
// before that it had last heard this node: which way a broken quorum's heartbeats
// went missing (or whether this node itself stalled: see sinceLastTick). The caller
// holds h.mu.
func (h *heartbeats) touchReport(now time.Time) []string {
	var r []string
	for _, v := range h.voters {
		p := h.peers[v]
		if v == h.self || p == nil {
			continue
		}
		r = append(r, fmt.Sprintf("%s: received %s ago, echoed a heartbeat sent %s ago, heard us %s before", v,
			ago(now, p.lastRecv), ago(now, p.ackedAt), p.heardAge.Round(time.Millisecond)))
	}
	return r
}

func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return now.Sub(t).Round(time.Millisecond).String()
}

// silentAt reports whether this node has not heard v for D (counting from when it
// began watching v).
func (h *heartbeats) silentAt(v string, now time.Time) bool {
	p := h.peers[v]
	if p == nil {
		return false // never watched (the set of peers is full): no word on it
	}
	return now.Sub(later(p.heard, p.watchSince)) >= h.timing.Silence
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// sentAt is when this node sent heartbeat seq, if within the freshness window.
func (h *heartbeats) sentAt(seq uint64) (time.Time, bool) {
	if len(h.sent) == 0 || seq < h.sent[0].seq || seq > h.seq {
		return time.Time{}, false
	}
	return h.sent[seq-h.sent[0].seq].at, true
}

// Errors of receive: the heartbeat is dropped.
var (
	ErrReplayed   = errors.New("heartbeat replayed or duplicated")
	errTooManyHBs = errors.New("too many heartbeat senders")
)

// receive takes in a heartbeat.
func (h *heartbeats) receive(b []byte) error {
	hb, err := decodeHeartbeat(b)
	if err != nil {
		return err
	}
	if hb.From == h.self {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	p := h.peer(hb.From, now)
	if p == nil {
		return errTooManyHBs
	}
	if !p.accept(hb.Boot, hb.Seq) {
		return ErrReplayed
	}
	p.echo, p.lastRecv = bootSeq{hb.Boot, hb.Seq}, now
	if hb.Echo.boot != h.boot {
		return nil // echoes nothing of this life
	}
	at, ok := h.sentAt(hb.Echo.seq)
	if !ok || now.Sub(at) > h.timing.Fresh {
		return nil // echoes something too old: no round trip to count
	}
	p.heard = now
	if at.After(p.ackedAt) {
		slices.Sort(hb.Silent) // one report per voter, however often a sender names it
		p.ackedAt, p.heardAge, p.silent = at, hb.HeardAge, slices.Compact(hb.Silent)
	}
	return nil
}

// accept records (boot, seq) and reports whether it is new: a seq at or below the last
// one of its boot is a duplicate or a replay.
func (p *peerState) accept(boot, seq uint64) bool {
	for i, b := range p.boots {
		if b.boot == boot {
			if seq <= b.seq {
				return false
			}
			p.boots[i].seq = seq
			return true
		}
	}
	copy(p.boots[1:], p.boots[:len(p.boots)-1])
	p.boots[0] = bootSeq{boot, seq}
	return true
}

// quorumAt reports whether a majority of voters is in touch with this node at now. The
// caller holds h.mu.
func (h *heartbeats) quorumAt(now time.Time) bool {
	return 2*len(h.inTouchAt(now)) > len(h.voters)
}

func (h *heartbeats) inTouchAt(now time.Time) map[string]bool {
	in := map[string]bool{}
	for _, v := range h.voters {
		if v == h.self {
			in[v] = true
			continue
		}
		if p := h.peers[v]; p != nil && now.Sub(p.ackedAt) <= h.timing.Fresh && p.heardAge <= h.timing.Fresh {
			in[v] = true
		}
	}
	return in
}

// downAt lists the voters a majority of voters reports silent at now. The caller
// holds h.mu.
func (h *heartbeats) downAt(now time.Time) map[string]bool {
	// Count, for every voter, the voters reporting it silent: this node's own word (if
	// a voter) and every report that answers a recent heartbeat of this node.
	reports := map[string]int{}
	if h.isVoter(h.self) {
		for _, x := range h.voters {
			if x != h.self && h.silentAt(x, now) {
				reports[x]++
			}
		}
	}
	for _, v := range h.voters {
		p := h.peers[v]
		if v == h.self || p == nil || now.Sub(p.ackedAt) > h.timing.Fresh {
			continue
		}
		for _, x := range p.silent {
			if x != v && x != h.self && h.isVoter(x) {
				reports[x]++
			}
		}
	}
	down := map[string]bool{}
	for x, n := range reports {
		if 2*n > len(h.voters) {
			down[x] = true
		}
	}
	return down
}

// evidence is the snapshot Gossip's View carries.
func (h *heartbeats) evidence() Evidence {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	e := Evidence{At: now, Voters: slices.Clone(h.voters), VotersSince: h.votersSince,
		InTouch: h.inTouchAt(now), Down: map[string]bool{}}
	e.QuorumNow = h.observe(now) // every look is a sighting (or not) of the quorum
	e.QuorumSince = h.quorumSince
	if !h.quorumSince.IsZero() {
		e.QuorumSeen = h.lastQuorum
	}
	e.QuorumBreaks = h.breaks
	e.Down = h.downAt(now)
	return e
}

// heartbeat on the wire (a memberlist user message):
//
//	version(1) kind(1) boot(8) seq(8) echoBoot(8) echoSeq(8) heardAgeMs(2)
//	nameLen(1) name  silentCount(1) silentCount*(nameLen(1) name)
type heartbeat struct {
	From      string
	Boot, Seq uint64
	Echo      bootSeq
	HeardAge  time.Duration // how long ago the sender last heard the addressee
	Silent    []string      // voters the sender has not heard for D
}

const (
	kindHeartbeat    = 'H'
	heartbeatHeader  = 2 + 8 + 8 + 8 + 8 + 2
	neverHeard       = 0xffff * time.Millisecond
	maxSilentReports = 255
)

// ErrBadHeartbeat is returned for a heartbeat natd cannot read.
var ErrBadHeartbeat = errors.New("unreadable heartbeat")

func (hb heartbeat) encode() ([]byte, error) {
	if len(hb.From) == 0 || len(hb.From) > maxNameLen || len(hb.Silent) > maxSilentReports {
		return nil, fmt.Errorf("%w: name %q, %d silent", ErrBadHeartbeat, hb.From, len(hb.Silent))
	}
	b := make([]byte, 0, heartbeatHeader+1+len(hb.From)+1+16*len(hb.Silent))
	b = append(b, routesWireVersion, kindHeartbeat)
	for _, x := range []uint64{hb.Boot, hb.Seq, hb.Echo.boot, hb.Echo.seq} {
		b = binary.BigEndian.AppendUint64(b, x)
	}
	age := min(hb.HeardAge, neverHeard) / time.Millisecond
	b = binary.BigEndian.AppendUint16(b, uint16(age))
	b = append(b, byte(len(hb.From)))
	b = append(b, hb.From...)
	b = append(b, byte(len(hb.Silent)))
	for _, s := range hb.Silent {
		if len(s) == 0 || len(s) > maxNameLen {
			return nil, fmt.Errorf("%w: silent name %q", ErrBadHeartbeat, s)
		}
		b = append(b, byte(len(s)))
		b = append(b, s...)
	}
	return b, nil
}

func decodeHeartbeat(b []byte) (heartbeat, error) {
	bad := func(why string) (heartbeat, error) {
		return heartbeat{}, fmt.Errorf("%w: %s (%d bytes)", ErrBadHeartbeat, why, len(b))
	}
	if len(b) < heartbeatHeader+2 || b[0] != routesWireVersion || b[1] != kindHeartbeat {
		return bad("header")
	}
	var hb heartbeat
	u := func(i int) uint64 { return binary.BigEndian.Uint64(b[2+8*i:]) }
	hb.Boot, hb.Seq, hb.Echo = u(0), u(1), bootSeq{u(2), u(3)}
	hb.HeardAge = time.Duration(binary.BigEndian.Uint16(b[34:])) * time.Millisecond
	rest := b[heartbeatHeader:]
	name := func() (string, bool) {
		if len(rest) < 1 || rest[0] == 0 || len(rest) < 1+int(rest[0]) {
			return "", false
		}
		s := string(rest[1 : 1+int(rest[0])])
		rest = rest[1+int(rest[0]):]
		return s, true
	}
	var ok bool
	if hb.From, ok = name(); !ok {
		return bad("sender")
	}
	if len(rest) < 1 {
		return bad("silent count")
	}
	n := int(rest[0])
	rest = rest[1:]
	for range n {
		s, ok := name()
		if !ok {
			return bad("silent name")
		}
		hb.Silent = append(hb.Silent, s)
	}
	if len(rest) != 0 {
		return bad("trailing bytes")
	}
	return hb, nil
}
