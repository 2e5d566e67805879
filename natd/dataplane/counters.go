package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Count is a packet and byte count.
type Count struct{ Packets, Bytes uint64 }

func (c Count) plus(o Count) Count { return Count{c.Packets + o.Packets, c.Bytes + o.Bytes} }

// counterKey names one kernel counter: an egress IP's element of held_addrs (SNAT), or
// one drop rule (Reason, with its chain and position).
type counterKey struct {
	SNAT   netip.Addr
	Reason string
	Family nftables.TableFamily
	Chain  string
	Rule   int
}

// Counters is what natd's nftables counters say, made monotonic for the life of the
// process (see counterTotals).
type Counters struct {
	// SNAT counts the packets that left this node with each egress IP it holds. An IP
	// the node no longer holds is absent.
	SNAT map[netip.Addr]Count
	// Drops counts pinned packets dropped, by reason (DropFailClosed, ...).
	Drops map[string]Count
}

// counterTotals turns kernel counters, which start again at zero whenever natd replaces
// its table (or an element is added again), into totals that only grow. Each read adds
// what a counter gained since the last read; a counter below its last value was reset,
// so all of it is new. The applier reads the counters just before it replaces the
// table, so only packets counted between that read and the replacement are lost.
type counterTotals struct {
	last, total map[counterKey]Count
}

func (c *counterTotals) observe(raw map[counterKey]Count) {
	if c.total == nil {
		c.last, c.total = map[counterKey]Count{}, map[counterKey]Count{}
	}
	for k, v := range raw {
		prev := c.last[k]
		if v.Packets < prev.Packets || v.Bytes < prev.Bytes {
			prev = Count{}
		}
		c.total[k] = c.total[k].plus(Count{v.Packets - prev.Packets, v.Bytes - prev.Bytes})
		c.last[k] = v
	}
}

// reset records that the kernel's counters restart at zero (a replaced table).
func (c *counterTotals) reset() { clear(c.last) }

// forget drops a counter whose object is gone for good (an egress IP no longer held).
func (c *counterTotals) forget(key counterKey) {
	delete(c.last, key)
	delete(c.total, key)
}

// readCounters reads the counters of the tables as applied: the per-element counters
// of held_addrs and the counters of the rules that drop pinned packets.
func (a *nftApplier) readCounters(conn *nftables.Conn) (map[counterKey]Count, error) {
	raw := map[counterKey]Count{}
	for _, rs := range a.applied {
		if err := readTableCounters(conn, rs, raw); err != nil {
			return nil, err
		}
	}
	return raw, nil
}

func readTableCounters(conn *nftables.Conn, rs *Ruleset, raw map[counterKey]Count) error {
	t := tableOf(rs)
	for _, s := range rs.Sets {
		if !s.Counter {
			continue
		}
		ks, err := conn.GetSetByName(t, s.Name)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // the table is gone: the next apply rebuilds it
			}
			return fmt.Errorf("reading set %s: %w", s.Name, err)
		}
		els, err := conn.GetSetElements(ks)
		if err != nil {
			return fmt.Errorf("reading elements of %s: %w", s.Name, err)
		}
		for _, e := range els {
			if ip, ok := netip.AddrFromSlice(e.Key); ok && e.Counter != nil {
				raw[counterKey{SNAT: ip}] = Count{Packets: e.Counter.Packets, Bytes: e.Counter.Bytes}
			}
		}
	}
	for _, c := range rs.Chains {
		if !slices.ContainsFunc(c.Rules, func(r *Rule) bool { return r.Drops != "" }) {
			continue
		}
		rules, err := conn.GetRules(t, &nftables.Chain{Name: c.Name, Table: t})
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // the table is gone: the next apply rebuilds it
			}
			return fmt.Errorf("listing rules of chain %s: %w", c.Name, err)
		}
		if len(rules) != len(c.Rules) {
			continue // not as natd left it: the next apply repairs it
		}
		for i, r := range c.Rules {
			if r.Drops == "" {
				continue
			}
			// One total per rule, summed by reason only when reported: a rule that is
			// missing from one read (a table someone changed) must not look like a
			// reset of the others.
			for _, e := range rules[i].Exprs {
				if ctr, ok := e.(*expr.Counter); ok {
					raw[counterKey{Reason: r.Drops, Family: rs.Family, Chain: c.Name, Rule: i}] = Count{Packets: ctr.Packets, Bytes: ctr.Bytes}
				}
			}
		}
	}
	return nil
}

// Counters reads natd's counters now.
func (d *Dataplane) Counters() (Counters, error) {
	d.nftMu.Lock()
	defer d.nftMu.Unlock()
	conn, err := d.nft.newConn(0)
	if err != nil {
		return Counters{}, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	raw, err := d.nft.readCounters(conn)
	if err != nil {
		return Counters{}, err
	}
	tot := &d.nft.totals
	tot.observe(raw)
	out := Counters{SNAT: map[netip.Addr]Count{}, Drops: map[string]Count{}}
	for k, v := range tot.total {
		if !k.SNAT.IsValid() {
			out.Drops[k.Reason] = out.Drops[k.Reason].plus(v)
			continue
		}
		if _, held := raw[k]; !held && d.nft.applied != nil {
			tot.forget(k) // released: its series goes away
			continue
		}
		out.SNAT[k.SNAT] = v
	}
	return out, nil
}
