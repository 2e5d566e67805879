package natd

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/dataplane"
)

// Holding is an egress IP this node holds.
type Holding struct {
	Gen uint32 // generation of this node's claim
	// HandoverSince is set while this node keeps an IP that another node is to take
	// (make-before-break): it lets go handoverLinger after the new holder claims the
	// IP (ClaimedSince), once the other nodes have had time to route to it.
	HandoverSince, ClaimedSince time.Time
}

// handoverLinger is how long an old holder keeps serving an IP after the new holder
// claimed it in a planned move: the claim reaches the other nodes and they re-route
// within tens of milliseconds (gossip, then a sync); what they send meanwhile still
// leaves through the old holder instead of being dropped there. Only a handover
// lingers: an IP another node claims while this node never handed it over is let go
// at once.
const handoverLinger = 500 * time.Millisecond

// handoverAnnounceDelay is how long the new holder of a planned move waits before its
// gratuitous ARP: the other nodes start sending the IP's traffic to it once its claim
// reaches them, and until they do the partners' replies belong at the old holder,
// which has those connections' bindings (replies at a holder without them are dropped,
// and TCP stalls until a retransmission: 465 ms). Shorter than handoverLinger, so the
// old holder still serves when the announcement moves the replies.
const handoverAnnounceDelay = 250 * time.Millisecond

// claimsOf is what a node holding held claims, sorted by IP: the form gossip carries.
func claimsOf(held map[netip.Addr]Holding) []election.Claim {
	out := make([]election.Claim, 0, len(held))
	for ip, h := range held {
		out = append(out, election.Claim{IP: ip, Gen: h.Gen})
	}
	slices.SortFunc(out, func(a, b election.Claim) int { return a.IP.Compare(b.IP) })
	return out
}

// Election is the planner's view of who may hold what.
type Election struct {
	View election.View
	// Held is what this node holds now.
	Held map[netip.Addr]Holding
	// StateSyncedAt is when this node last completed a full state exchange (memberlist
	// push/pull) with its peers: claims gossiped while it was cut off reach it only so.
	StateSyncedAt time.Time
	// SeenGen is the highest claim generation this node has ever seen for each IP: a
	// new claim must beat every old one, even of members long gone.
	SeenGen map[netip.Addr]uint32
	Now     time.Time
}

// Cluster is what the planner reads from the API: the listers' current content. Pods
// are read through indexes, so that the cost of a sync grows with the pinned pods and
// this node's pods, not with every pod of the cluster.
type Cluster struct {
	Namespaces []*corev1.Namespace
	Nodes      []*corev1.Node
	// PodsIn lists the pods of a namespace.
	PodsIn func(namespace string) []*podRecord
}

// Plan is the outcome of one planning pass: the node's kernel state and what the
// agent should tell users.
type Plan struct {
	State dataplane.State
	// Holders maps each egress IP in use to its holder ("" when none).
	Holders map[netip.Addr]string
	// Namespaces maps each egress IP in use to the namespaces pinned to it.
	Namespaces map[netip.Addr][]string
	// Rejected maps namespaces with an invalid annotation to the reason.
	Rejected map[string]*AnnotationError
	// HostNetworkPods lists, per pinned namespace, its pods that share their node's
	// network: natd cannot tell their packets from the node's, so it cannot pin them.
	HostNetworkPods map[string][]string
	// Held is what this node holds once the plan is applied; Claims is the same as the
	// node gossips it.
	Held   map[netip.Addr]Holding
	Claims []election.Claim
	// Quorum: a majority of the voters is in touch with this node (the voters'
	// evidence, election.Evidence), unbroken since QuorumSince. Without it, it holds
	// nothing.
	Quorum      bool
	QuorumSince time.Time
	// EvidenceAt is when the quorum was last seen, as of this plan.
	EvidenceAt time.Time
	// Voters are the nodes whose contact decides who may hold (see votersOf).
	Voters []string
	// SeenGen carries the Election's forward.
	SeenGen map[netip.Addr]uint32
	// RetryAfter, when set, asks for another sync that soon: a handover or a takeover
	// is waiting on time.
	RetryAfter time.Duration
	// Routes says, for each egress IP this node sends to a holder, that holder's claim
	// (generation): gossiped once applied, it is what READY counts.
	Routes []election.Claim
}

// Planner computes Plans. It is a pure function of its inputs.
type Planner struct {
	Config *Config
}

// Plan computes what this node must do. It fails only when this node's own Node object
// or IP is unknown: without them nothing sensible can be programmed.
func (p *Planner) Plan(c Cluster, el Election) (*Plan, error) {
	cfg := p.Config
	// Sized up front: with hundreds of egress IPs, growing these maps was a fifth of a
	// plan's cost (the scale harness plans thousands of times a second).
	plan := &Plan{
		Holders:    make(map[netip.Addr]string, len(c.Namespaces)),
		Namespaces: make(map[netip.Addr][]string, len(c.Namespaces)),
		Rejected:   map[string]*AnnotationError{},

		HostNetworkPods: map[string][]string{},
	}

	nodeIPs := map[netip.Addr]string{}
	nodeAddrs := map[netip.Addr]string{} // both families: no egress IP may be one
	var nodeIPs6 []netip.Prefix
	nodeIPOf := map[string]netip.Addr{}
	// has6 names the nodes with an IPv6 InternalIP: only they may take an IPv6 egress IP.
	has6 := make(map[string]bool, len(c.Nodes))
	var self *corev1.Node
	for _, n := range c.Nodes {
		ip := internalIP(n)
		has6[n.Name] = internalIP6(n).IsValid()
		for _, a := range n.Status.Addresses {
			if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
				continue
			}
			addr, err := netip.ParseAddr(a.Address)
			addr = addr.Unmap()
			switch {
			case err != nil:
			case addr.Is4():
				nodeIPs[addr], nodeAddrs[addr] = n.Name, n.Name
			default:
				nodeIPs6 = append(nodeIPs6, netip.PrefixFrom(addr, 128))
				nodeAddrs[addr] = n.Name
			}
		}
		if ip.IsValid() {
			nodeIPOf[n.Name] = ip
		}
		if n.Name == cfg.NodeName {
			self = n
		} else if cidrs := podCIDRs(n); ip.Is4() && len(cidrs) > 0 {
			plan.State.Peers = append(plan.State.Peers, dataplane.Peer{IP: ip, PodCIDRs: cidrs})
		}
	}
	slices.SortFunc(plan.State.Peers, func(a, b dataplane.Peer) int { return a.IP.Compare(b.IP) })
	if self == nil {
		return nil, fmt.Errorf("node %s is not in the API (yet)", cfg.NodeName)
	}
	eligible := eligibleNodes(c.Nodes)
	st := &plan.State
	st.NodeIP = cfg.NodeIP
	if !st.NodeIP.IsValid() {
		st.NodeIP = nodeIPOf[cfg.NodeName]
	}
	if !st.NodeIP.IsValid() {
		return nil, fmt.Errorf("node %s has no IPv4 InternalIP; set --node-ip", cfg.NodeName)
	}
	nodeIPs[st.NodeIP], nodeAddrs[st.NodeIP] = cfg.NodeName, cfg.NodeName
	st.NodeIP6 = internalIP6(self)

	for ip := range nodeIPs {
		st.NodeIPs = append(st.NodeIPs, ip)
		st.ClusterDestinations = append(st.ClusterDestinations, netip.PrefixFrom(ip, 32))
	}
	slices.SortFunc(st.NodeIPs, netip.Addr.Compare)
	for _, list := range [][]netip.Prefix{cfg.ClusterCIDRs, cfg.ServiceCIDRs, cfg.ExcludeCIDRs, nodeIPs6} {
		st.ClusterDestinations = append(st.ClusterDestinations, list...)
	}
	slices.SortFunc(st.ClusterDestinations, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	st.PodCIDRs = slices.Clone(cfg.ClusterCIDRs)
	st.LocalPodCIDRs = podCIDRs(self)

	// Namespaces in name order, so that every node resolves a pod IP claimed by two
	// namespaces alike.
	namespaces := slices.Clone(c.Namespaces)
	slices.SortFunc(namespaces, func(a, b *corev1.Namespace) int { return strings.Compare(a.Name, b.Name) })
	st.PinnedNamespaces = make(map[string]dataplane.NamespaceEgress, len(namespaces))
	var pins podPins
	for _, ns := range namespaces {
		v, ok := ns.Annotations[AnnotationEgressIP]
		if !ok {
			continue
		}
		eips, aerr := ParseEgressIPs(v, cfg.EgressCIDRs, nodeAddrs)
		if aerr != nil {
			plan.Rejected[ns.Name] = aerr
			continue
		}
		for _, ip := range eips.IPs() {
			plan.Namespaces[ip] = append(plan.Namespaces[ip], ns.Name)
		}
		st.PinnedNamespaces[ns.Name] = eips
		rank := pins.namespace(eips)
		for _, pod := range c.PodsIn(ns.Name) {
			switch {
			case pod.node != cfg.NodeName:
				// Another node's pod: its node classifies it and sends its pinned
				// traffic through the tunnel, which tells the holder its egress IP.
			case pod.hostNet:
				plan.HostNetworkPods[ns.Name] = append(plan.HostNetworkPods[ns.Name], pod.Name)
			case !pod.inert:
				pins.add(pod, rank)
			}
		}
	}
	pods, noEgress := pins.resolve()
	st.NoEgress = noEgress

	ips := make([]netip.Addr, 0, len(plan.Namespaces))
	for ip := range plan.Namespaces {
		ips = append(ips, ip)
	}
	slices.SortFunc(ips, netip.Addr.Compare)
	assigned := p.elect(ips, eligible, has6, votersOf(eligible, c.Nodes, el.View), el, plan)
	if len(plan.Held) > 0 {
		// However long the Apply takes, the leases end --lease after the moment the
		// quorum that lets this node hold was seen.
		st.LeaseUntil = plan.EvidenceAt.Add(cfg.Lease)
	}
	st.Egress = make([]dataplane.EgressIP, 0, len(ips))
	plan.Routes = make([]election.Claim, 0, len(ips))
	serving := servingClaims(el.View, cfg.NodeName)
	for _, ip := range ips {
		sort.Strings(plan.Namespaces[ip])
		e := dataplane.EgressIP{IP: ip, FailOpen: cfg.FailOpen, Pods: pods[ip]}
		holder := assigned[ip].Holder
		plan.Holders[ip] = holder
		// Traffic goes to who serves the IP: its holder, or — while the new holder
		// has not claimed it yet in a planned move — the old one, which keeps serving
		// until then (it is no keeper any more, so Assign no longer names it).
		routeTo, gen := holder, assigned[ip].Gen
		if c, ok := serving[ip]; ok && !assigned[ip].Claimed {
			routeTo, gen = c.node, c.gen
		}
		if h, ok := plan.Held[ip]; ok {
			e.Local, e.Gen, e.HolderIP = true, h.Gen, st.NodeIP
			e.HandingOver = !h.HandoverSince.IsZero()
			if _, had := el.Held[ip]; !had && routeTo != holder {
				// Taking over from a node that still serves it (a planned move): the
				// partners' replies stay with it until the others route here.
				e.AnnounceAfter = handoverAnnounceDelay
			}
			plan.Routes = append(plan.Routes, election.Claim{IP: ip, Gen: h.Gen})
		} else if routeTo != "" && routeTo != cfg.NodeName {
			e.HolderIP = nodeIPOf[routeTo]
			if e.HolderIP.IsValid() {
				plan.Routes = append(plan.Routes, election.Claim{IP: ip, Gen: gen})
			}
		}
		st.Egress = append(st.Egress, e)
	}
	return plan, nil
}

// servingClaim is a live member's claim on an IP.
type servingClaim struct {
	node string
	gen  uint32
}

// servingClaims is, per IP, the newest claim of a live member other than self (one the
// voters report down serves nothing). For an IP no keeper claims, that is a node
// handing it over (unlabelled, cordoned, draining), which serves it until the new
// holder claims it.
func servingClaims(v election.View, self string) map[netip.Addr]servingClaim {
	out := map[netip.Addr]servingClaim{}
	for name, m := range v.Members {
		if name == self || !m.Alive || v.Evidence.Down[name] {
			continue
		}
		for _, c := range m.Meta.Claims {
			best, found := out[c.IP]
			if !found || election.NewerGen(best.gen, c.Gen) || (c.Gen == best.gen && name < best.node) {
				out[c.IP] = servingClaim{name, c.Gen}
			}
		}
	}
	return out
}

// elect decides who holds each IP (election.Assign over the gossip view) and what this
// node holds: it takes what is assigned to it, and lets go of an IP only when the new
// holder has claimed it, when nobody may hold it, when the handover times out, or when
// this node has lost its quorum of voters (the minority side of a partition must not
// keep answering for its IPs).
// has6 names the nodes with an IPv6 InternalIP: only they may take an IPv6 egress IP
// (a node without IPv6 could not put it on its uplink, nor announce it over BGP).
func (p *Planner) elect(ips []netip.Addr, eligible []string, has6 map[string]bool, voters []string, el Election, plan *Plan) map[netip.Addr]election.Assignment {
	cfg, v, self := p.Config, el.View, p.Config.NodeName
	ev := v.Evidence
	// How long a node waits, once in touch with a quorum, before it takes anything new:
	// the voters' silence bound. By then it has heard the claims made while it was away,
	// and every voter that took its IPs has seen it in touch again.
	window := cfg.Heartbeat().Silence
	plan.Voters = voters
	plan.Quorum, plan.QuorumSince, plan.EvidenceAt = ev.Quorum(), ev.QuorumSince, ev.QuorumSeen
	selfVoter := slices.Contains(voters, self)
	// A node that has just come to see a quorum (it started, or a partition healed)
	// may not have heard the newest claims yet: it keeps what it holds but takes
	// nothing new until it has been in touch for the window, with the voters the
	// planner names (they change as labels do), and has exchanged full state with its
	// peers since: claims broadcast while it was away reach it only so.
	settled := plan.Quorum && ev.QuorumNow && el.Now.Sub(plan.QuorumSince) >= window && !el.StateSyncedAt.Before(plan.QuorumSince) &&
		slices.Equal(ev.Voters, voters) && el.Now.Sub(ev.VotersSince) >= window
	// A voter the voters report down has no lease left, whatever it claimed.
	reportedDown := func(name string) bool { return selfVoter && ev.Down[name] }
	// settleAgain is when to look again if something other than the windows keeps
	// this node from settling (zero: the windows' end).
	var settleAgain time.Duration
	// Members this node saw die while it had no quorum (it was the one cut off) may
	// be alive and holding IPs it has not heard of: it takes nothing new until gossip
	// brings them back or a while has passed (if they really died, the majority has
	// dealt with their IPs). One the voters report down is not unsure: its leases have
	// run out.
	if settled && el.Now.Sub(plan.QuorumSince) < unsureFor {
		for _, n := range eligible {
			if m, ok := v.Members[n]; ok && !m.Alive && !m.DownSince.After(plan.QuorumSince) && n != self && !reportedDown(n) {
				// Gossip bringing it back wakes the planner; else the wait ends.
				settled, settleAgain = false, unsureFor-el.Now.Sub(plan.QuorumSince)
				break
			}
		}
	}
	// A member whose claims this node has not received yet (when they are many they
	// travel apart from its metadata) may claim any IP: take nothing new until they
	// arrive. A voter the voters report down is left out: its leases have run out.
	if settled {
		for name, m := range v.Members {
			if name != self && m.ClaimsPending && (v.InGrace(name) || (m.Alive && !reportedDown(name))) {
				// The record's arrival wakes the planner; this is in case it never
				// comes (the member is then reported down).
				settled, settleAgain = false, pendingClaimsRecheck
				break
			}
		}
	}
	retry := func(d time.Duration) {
		if plan.RetryAfter == 0 || d < plan.RetryAfter {
			plan.RetryAfter = max(d, 10*time.Millisecond)
		}
	}
	in := election.Input{IPs: ips, Claims: make(map[string][]election.Claim, len(v.Members)), MaxGen: make(map[netip.Addr]uint32, len(ips)),
		MaxPerNode: cfg.MaxEgressIPs, MayHold: func(n string, ip netip.Addr) bool { return ip.Is4() || has6[n] }}
	for _, n := range eligible {
		m, known := v.Members[n]
		// A voter goes by the voters' evidence: an eligible node is down only when a
		// majority of voters report it silent, and that comes only after its leases
		// ran out. Any other node only follows: gossip's failure detector says who is
		// alive, and the newest claim wins whatever it thinks.
		alive := known && m.Alive
		if selfVoter {
			alive = known && !ev.Down[n]
		}
		restarting := known && m.Meta.RestartGrace > 0 && (m.Alive || v.InGrace(n))
		switch {
		case alive && !m.Meta.Draining:
			in.Candidates = append(in.Candidates, n)
			in.Keepers = append(in.Keepers, n)
		case restarting:
			in.Keepers = append(in.Keepers, n)
		}
	}
	for name, m := range v.Members {
		in.Claims[name] = m.Meta.Claims
		for _, c := range m.Meta.Claims {
			in.MaxGen[c.IP] = election.LaterGen(in.MaxGen[c.IP], c.Gen)
		}
	}
	// This node's claims are what it holds, not what it last managed to gossip.
	in.Claims[self] = claimsOf(el.Held)
	for _, c := range in.Claims[self] {
		in.MaxGen[c.IP] = election.LaterGen(in.MaxGen[c.IP], c.Gen)
	}
	for ip, g := range el.SeenGen {
		in.MaxGen[ip] = election.LaterGen(in.MaxGen[ip], g)
	}
	plan.SeenGen = in.MaxGen
	assigned := election.Assign(in)

	// leaving: this node may hold no IP for a reason of its own choosing — it lost its
	// label, was cordoned or drains — so whatever it holds moves as a planned move.
	leaving := !slices.Contains(eligible, self) || v.Members[self].Meta.Draining
	plan.Held = map[netip.Addr]Holding{}
	for _, ip := range ips {
		a := assigned[ip]
		h, holding := el.Held[ip]
		switch {
		case !plan.Quorum:
			// Lost the quorum: hold nothing.
		case a.Holder == self && holding:
			gen := a.Gen
			if !a.Claimed {
				gen = h.Gen
			}
			plan.Held[ip] = Holding{Gen: gen}
		case a.Holder == self && !settled && settleAgain > 0:
			retry(settleAgain)
		case a.Holder == self && !settled:
			retry(max(window-el.Now.Sub(plan.QuorumSince), window-el.Now.Sub(ev.VotersSince)))
		case a.Holder == self:
			plan.Held[ip] = Holding{Gen: a.Gen}
		case holding && a.Claimed && !h.HandoverSince.IsZero() && (h.ClaimedSince.IsZero() || el.Now.Sub(h.ClaimedSince) < handoverLinger):
			// Handed over: the new holder has it; keep serving a moment.
			if h.ClaimedSince.IsZero() {
				h.ClaimedSince = el.Now
			}
			plan.Held[ip] = h
			retry(handoverLinger - el.Now.Sub(h.ClaimedSince))
		case holding && a.Claimed && a.Holder != "" && h.HandoverSince.IsZero() && leaving:
			// The new holder claimed it before this node saw that it must hand it over:
			// both acted on one API change (a label, a cordon) and the other was
			// quicker. A planned move all the same: serve on for the linger. Letting go
			// at once left the partners' replies, which the new holder does not ask for
			// until its late announcement, nowhere to go (a TCP retransmission in about
			// one planned move of 20).
			plan.Held[ip] = Holding{Gen: h.Gen, HandoverSince: el.Now, ClaimedSince: el.Now}
			retry(handoverLinger)
		case !holding, a.Holder == "", a.Claimed:
			// Not ours; or nobody may hold it (fail closed); or the new holder has it.
		case h.HandoverSince.IsZero():
			plan.Held[ip] = Holding{Gen: h.Gen, HandoverSince: el.Now}
			retry(cfg.HandoverTimeout / 4)
		case el.Now.Sub(h.HandoverSince) < cfg.HandoverTimeout:
			plan.Held[ip] = h
			retry(cfg.HandoverTimeout / 4)
		}
	}
	plan.Claims = claimsOf(plan.Held)
	return assigned
}

// minVoters is the fewest voters natd runs with: with two egress nodes, one survivor
// alone is no majority of two, but it and a witness are one of three.
const minVoters = 3

// votersOf names the voters: the egress-eligible nodes and, while they are fewer than
// minVoters, witnesses: other nodes where natd runs (gossip knows them), highest
// rendezvous score first, so that every node picks the same ones. Nodes where natd does
// not run are never witnesses and never count against a majority.
func votersOf(eligible []string, nodes []*corev1.Node, v election.View) []string {
	voters := slices.Clone(eligible)
	if len(voters) < minVoters {
		var others []string
		for _, n := range nodes {
			if _, known := v.Members[n.Name]; known && !slices.Contains(eligible, n.Name) {
				others = append(others, n.Name)
			}
		}
		others = election.Rank("natd.dev/witness", others)
		voters = append(voters, others[:min(len(others), minVoters-len(voters))]...)
	}
	slices.Sort(voters)
	return voters
}

// unsureFor bounds how long a node that regained a majority waits for members it saw die
// while cut off.
const unsureFor = 10 * time.Second

// pendingClaimsRecheck is how often a node that waits for a member's claims looks
// again without being woken.
const pendingClaimsRecheck = 200 * time.Millisecond

// podPins resolves which egress IP each pinned pod address belongs to. The API can
// show two pods with one IP — the old one terminating while the new one runs, or stale
// state — and the kernel holds one element per address: one address, one egress IP. A
// pod that is not terminating wins over one that is; otherwise the first namespace in
// name order does, on every node alike. The lists come out sorted, so that the same pods
// give the same lists sync after sync whatever order the informer returns them in (the
// dataplane's diff then only looks at what changed).
//
// At 50k pinned pods this runs every sync, so it uses no map: each IPv4 address and its
// rank (terminating, namespace order) are packed into one uint64, sorted, and the first
// of each address wins.
type podPins struct {
	egress []dataplane.NamespaceEgress // by namespace rank
	v4     []uint64                    // address<<32 | terminating<<31 | namespace rank
	v6     []pin6
}

type pin6 struct {
	addr [16]byte
	rank uint32
}

const terminatingRank = 1 << 31

// namespace registers the next pinned namespace (in name order) and returns its rank.
func (p *podPins) namespace(egress dataplane.NamespaceEgress) uint32 {
	p.egress = append(p.egress, egress)
	return uint32(len(p.egress) - 1)
}

func (p *podPins) add(pod *podRecord, rank uint32) {
	if pod.terminating() {
		rank |= terminatingRank
	}
	for i := uint8(0); i < pod.nIPv4; i++ {
		p.v4 = append(p.v4, uint64(binary.BigEndian.Uint32(pod.ipv4[i][:]))<<32|uint64(rank))
	}
	if pod.hasIPv6 {
		p.v6 = append(p.v6, pin6{addr: pod.ipv6, rank: rank})
	}
}

// resolve returns each egress IP's addresses, and the addresses whose namespace has no
// egress IP of their family; one owner per address, sorted.
func (p *podPins) resolve() (byEgress map[netip.Addr][]netip.Addr, noEgress []netip.Addr) {
	byEgress = map[netip.Addr][]netip.Addr{}
	add := func(e, a netip.Addr) {
		if e.IsValid() {
			byEgress[e] = append(byEgress[e], a)
		} else {
			noEgress = append(noEgress, a)
		}
	}
	egressOf := func(rank uint32) dataplane.NamespaceEgress { return p.egress[rank&^terminatingRank] }
	slices.Sort(p.v4)
	for i, x := range p.v4 {
		if i > 0 && x>>32 == p.v4[i-1]>>32 {
			continue // the same address: the lower rank (sorted first) owns it
		}
		var a [4]byte
		binary.BigEndian.PutUint32(a[:], uint32(x>>32))
		add(egressOf(uint32(x)).V4, netip.AddrFrom4(a))
	}
	slices.SortFunc(p.v6, func(a, b pin6) int {
		if c := bytes.Compare(a.addr[:], b.addr[:]); c != 0 {
			return c
		}
		return cmp.Compare(a.rank, b.rank)
	})
	for i, x := range p.v6 {
		if i > 0 && x.addr == p.v6[i-1].addr {
			continue
		}
		add(egressOf(x.rank).V6, netip.AddrFrom16(x.addr))
	}
	return byEgress, noEgress
}

// isEligible reports whether n may hold egress IPs. Readiness is not asked: whether a
// node's natd is alive is for the voters' heartbeats to say, faster than the node
// lifecycle controller, and without the API. A cordoned node is being emptied for
// maintenance: its IPs move away, planned.
func isEligible(n *corev1.Node) bool {
	return n.Labels[LabelEgressNode] == "true" && !n.Spec.Unschedulable && n.DeletionTimestamp == nil && internalIP(n).IsValid()
}

// eligibleNodes names the nodes that may hold egress IPs.
func eligibleNodes(nodes []*corev1.Node) []string {
	var out []string
	for _, n := range nodes {
		if isEligible(n) {
			out = append(out, n.Name)
		}
	}
	return out
}

// internalIP is a node's IPv4 InternalIP (invalid: none).
func internalIP(n *corev1.Node) netip.Addr { return internalIPOf(n, netip.Addr.Is4) }

// internalIP6 is a node's IPv6 InternalIP (invalid: none).
func internalIP6(n *corev1.Node) netip.Addr {
	return internalIPOf(n, func(ip netip.Addr) bool { return ip.Is6() && !ip.Is4In6() && ip.Zone() == "" })
}

// internalIPOf is a node's first InternalIP that family accepts.
func internalIPOf(n *corev1.Node, family func(netip.Addr) bool) netip.Addr {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			if ip, err := netip.ParseAddr(a.Address); err == nil && family(ip) {
				return ip
			}
		}
	}
	return netip.Addr{}
}

func isReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podCIDRs are a node's pod CIDRs of both families (spec.podCIDRs, or the older
// spec.podCIDR).
func podCIDRs(n *corev1.Node) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range n.Spec.PodCIDRs {
		if pr, err := netip.ParsePrefix(s); err == nil && !pr.Addr().Is4In6() {
			out = append(out, pr.Masked())
		}
	}
	if len(out) == 0 && n.Spec.PodCIDR != "" {
		if pr, err := netip.ParsePrefix(n.Spec.PodCIDR); err == nil && !pr.Addr().Is4In6() {
			out = append(out, pr.Masked())
		}
	}
	return out
}
