// Package bgp announces the egress IPs a node holds to its BGP peers (the routers of a
// routed fabric, where no gratuitous ARP reaches the router that matters): each held IP
// as a /32 with the node's own address as next hop, withdrawn when natd gives it up or
// its lease runs out. It embeds GoBGP; natd never listens on port 179.
package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/osrg/gobgp/v4/api"
	"github.com/osrg/gobgp/v4/pkg/apiutil"
	"github.com/osrg/gobgp/v4/pkg/packet/bgp"
	"github.com/osrg/gobgp/v4/pkg/server"
	"k8s.io/klog/v2"
)

// Peer is a router natd peers with.
type Peer struct {
	Addr netip.Addr
	ASN  uint32
}

// Config of a Speaker.
type Config struct {
	// ASN is the nodes' own AS number; NodeIP the node's address (router ID, session
	// address and next hop of IPv4 announcements).
	ASN    uint32
	NodeIP netip.Addr
	// NodeIP6 is the node's IPv6 address, the next hop of its IPv6 egress IPs'
	// announcements (multiprotocol BGP over the same sessions); invalid when the node
	// has none, and then it cannot announce an IPv6 egress IP.
	NodeIP6 netip.Addr
	Peers   []Peer
	// HoldTime of the sessions (keepalives at a third of it): how long a router keeps
	// the routes of a node that vanished without closing its session (a power loss).
	HoldTime time.Duration
	// RestartTime is announced as the graceful-restart time: a router keeps the routes
	// of a natd whose session closed (a restart) that long, until it is back.
	RestartTime time.Duration
}

// Speaker announces exactly the IPs it is told to serve, until their lease ends.
type Speaker struct {
	srv     *server.BgpServer
	nodeIP  netip.Addr
	nodeIP6 netip.Addr
	now     func() time.Time

	mu        sync.Mutex
	announced map[netip.Addr]uint32 // IP -> the generation of this node's claim
	until     time.Time
	timer     *time.Timer
}

// Start runs the BGP speaker and configures its peers; sessions come up by themselves
// (and again after every failure).
func Start(ctx context.Context, cfg Config) (*Speaker, error) {
	if !cfg.NodeIP.Is4() || cfg.ASN == 0 || len(cfg.Peers) == 0 {
		return nil, errors.New("bgp: a node IPv4 address, an AS number and at least one peer are needed")
	}
	level := &slog.LevelVar{}
	level.Set(slog.LevelWarn)
	srv := server.NewBgpServer(server.LoggerOption(slog.Default(), level))
	go srv.Serve()
	if err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn: cfg.ASN, RouterId: cfg.NodeIP.String(),
		ListenPort: -1, // natd only connects; it never listens on 179
	}}); err != nil {
		return nil, fmt.Errorf("starting BGP: %w", err)
	}
	hold := uint64(cfg.HoldTime / time.Second)
	if hold < 3 {
		hold = 3
	}
	restart := uint32(cfg.RestartTime / time.Second)
	if restart > 4095 {
		restart = 4095
	}
	families := []*api.Family{{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}}
	if cfg.NodeIP6.Is6() {
		families = append(families, &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST})
	}
	for _, p := range cfg.Peers {
		var afiSafis []*api.AfiSafi
		for _, f := range families {
			afiSafis = append(afiSafis, &api.AfiSafi{
				Config:            &api.AfiSafiConfig{Family: f, Enabled: true},
				MpGracefulRestart: &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}},
			})
		}
		err := srv.AddPeer(ctx, &api.AddPeerRequest{Peer: &api.Peer{
			Conf: &api.PeerConf{NeighborAddress: p.Addr.String(), PeerAsn: p.ASN},
			Timers: &api.Timers{Config: &api.TimersConfig{
				ConnectRetry: 1, HoldTime: hold, KeepaliveInterval: max(1, hold/3),
				MinimumAdvertisementInterval: 0,
			}},
			Transport: &api.Transport{LocalAddress: cfg.NodeIP.String()},
			// A restart of natd (SIGTERM, an upgrade) closes the session: the router
			// keeps the routes, as the kernel keeps serving, until natd is back.
			GracefulRestart: &api.GracefulRestart{Enabled: true, RestartTime: restart},
			AfiSafis:        afiSafis,
		}})
		if err != nil {
			srv.Stop()
			return nil, fmt.Errorf("adding BGP peer %s: %w", p.Addr, err)
		}
	}
	s := &Speaker{srv: srv, nodeIP: cfg.NodeIP, now: time.Now, announced: map[netip.Addr]uint32{}}
	if cfg.NodeIP6.Is6() {
		s.nodeIP6 = cfg.NodeIP6
	}
	return s, nil
}

// Serve announces exactly held (IP -> generation of this node's claim) until until,
// withdrawing every other IP it announced. An IP taken over later has a higher
// generation: its MED is lower, so a router prefers the new holder's route even while
// it still has the old holder's (a node powered off keeps its routes for the hold
// time).
func (s *Speaker) Serve(held map[netip.Addr]uint32, until time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.serveLocked(held, until)
}

// ErrNoIPv6NextHop: the node has no IPv6 address to announce an IPv6 egress IP with.
var ErrNoIPv6NextHop = errors.New("bgp: this node has no IPv6 address (InternalIP) to announce IPv6 egress IPs with")

func (s *Speaker) serveLocked(held map[netip.Addr]uint32, until time.Time) error {
	var add, del []*apiutil.Path
	var gone, cannot []netip.Addr
	announce := make(map[netip.Addr]uint32, len(held))
	for ip, gen := range held {
		if ip.Is6() && !s.nodeIP6.IsValid() {
			cannot = append(cannot, ip)
			continue
		}
		announce[ip] = gen
	}
	for ip, gen := range announce {
		if old, ok := s.announced[ip]; ok && old == gen {
			continue
		}
		p, err := s.path(ip, gen)
		if err != nil {
			return err
		}
		add = append(add, p)
	}
	for ip, gen := range s.announced {
		if _, ok := announce[ip]; !ok {
			p, err := s.path(ip, gen)
			if err != nil {
				return err
			}
			del, gone = append(del, p), append(gone, ip)
		}
	}
	if len(del) > 0 {
		if err := s.srv.DeletePath(apiutil.DeletePathRequest{Paths: del}); err != nil {
			return fmt.Errorf("withdrawing egress IPs: %w", err)
		}
		for _, ip := range gone {
			delete(s.announced, ip)
		}
	}
	if len(add) > 0 {
		if _, err := s.srv.AddPath(apiutil.AddPathRequest{Paths: add}); err != nil {
			return fmt.Errorf("announcing egress IPs: %w", err)
		}
		for ip, gen := range announce {
			s.announced[ip] = gen
		}
	}
	s.extendLocked(until)
	if len(cannot) > 0 {
		return fmt.Errorf("%w: %v not announced", ErrNoIPv6NextHop, cannot)
	}
	return nil
}

// Extend keeps the announcements until until (a lease renewal).
func (s *Speaker) Extend(until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.extendLocked(until)
}

func (s *Speaker) extendLocked(until time.Time) {
	s.until = until
	if s.timer != nil {
		s.timer.Stop()
	}
	if len(s.announced) == 0 {
		return
	}
	s.timer = time.AfterFunc(until.Sub(s.now()), s.expire)
}

// expire withdraws everything when the lease ran out without a renewal: a node that
// may no longer serve must not draw the traffic.
func (s *Speaker) expire() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.now().Before(s.until) {
		return // extended meanwhile
	}
	if err := s.serveLocked(nil, time.Time{}); err != nil {
		klog.ErrorS(err, "Withdrawing egress IPs whose lease ran out failed")
		return
	}
	klog.InfoS("Lease ran out: egress IPs withdrawn from BGP")
}

// Announced lists what the speaker announces now.
func (s *Speaker) Announced() map[netip.Addr]uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[netip.Addr]uint32, len(s.announced))
	for ip, gen := range s.announced {
		out[ip] = gen
	}
	return out
}

// Close stops the speaker without withdrawing: the sessions close, and the routers keep
// the routes for the graceful-restart time (natd restarts; the kernel keeps serving).
func (s *Speaker) Close() {
	s.mu.Lock()
	if s.timer != nil {
		s.timer.Stop()
	}
	s.mu.Unlock()
	s.srv.Stop()
}

// path is the announcement of ip: a /32 with the node's address as next hop, or a /128
// whose multiprotocol reach attribute carries the node's IPv6 address.
func (s *Speaker) path(ip netip.Addr, gen uint32) (*apiutil.Path, error) {
	nlri, err := bgp.NewIPAddrPrefix(netip.PrefixFrom(ip, ip.BitLen()))
	if err != nil {
		return nil, err
	}
	family := bgp.RF_IPv4_UC
	var nh bgp.PathAttributeInterface
	if ip.Is6() {
		family = bgp.RF_IPv6_UC
		nh, err = bgp.NewPathAttributeMpReachNLRI(family, []bgp.PathNLRI{{NLRI: nlri}}, s.nodeIP6)
	} else {
		nh, err = bgp.NewPathAttributeNextHop(s.nodeIP)
	}
	if err != nil {
		return nil, err
	}
	return &apiutil.Path{Family: family, Nlri: nlri, Attrs: []bgp.PathAttributeInterface{
		bgp.NewPathAttributeOrigin(bgp.BGP_ORIGIN_ATTR_TYPE_IGP), nh,
		bgp.NewPathAttributeMultiExitDisc(math.MaxUint32 - gen),
	}}, nil
}
