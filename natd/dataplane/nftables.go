package dataplane

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// elementsPerMessage bounds one netlink message. The elements of a message sit in one
// nested attribute, whose length field is 16 bits: past 64 KiB it wraps and the kernel
// reads garbage (seen as ENOENT). 512 elements of the largest kind (a verdict naming a
// chain) stay near 50 KiB. All messages still go in one batch, so the kernel applies
// them as one transaction.
const elementsPerMessage = 512

// nftApplier keeps natd's tables (ip and arp) in line with their Rulesets. It remembers
// what it applied last so that a change of a few pods costs a few set elements, not
// whole tables.
type nftApplier struct {
	newConn func(sendBuf int) (*nftables.Conn, error)
	applied []*Ruleset // nil: unknown, next apply rebuilds the tables
	// verifyEvery bounds how often apply reads the tables back to find drift
	// (someone flushed or deleted them): a burst of syncs pays for it once. Drift that
	// breaks an element update (a deleted table) is repaired at once regardless.
	verifyEvery time.Duration
	verified    time.Time
	totals      counterTotals
}

func tableOf(rs *Ruleset) *nftables.Table {
	return &nftables.Table{Name: TableName, Family: rs.Family}
}

// apply converges the tables to rss, in one transaction: element updates when only set
// contents changed and the kernel still has the tables as natd left them, whole-table
// replacements otherwise. It returns whether the tables were rebuilt.
func (a *nftApplier) apply(rss []*Ruleset) (rebuilt bool, err error) {
	conn, err := a.newConn(batchBytes(rss))
	if err != nil {
		return false, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	if a.applied != nil && len(a.applied) == len(rss) {
		ok := true
		verify := time.Since(a.verified) >= a.verifyEvery
		for i, rs := range rss {
			if !sameShape(a.applied[i], rs) {
				ok = false
				break
			}
			if !verify {
				continue
			}
			intact, err := a.intact(conn, rs)
			if err != nil {
				return false, err
			}
			ok = ok && intact
		}
		if verify {
			a.verified = time.Now()
		}
		if ok {
			if err := a.updateElements(conn, a.applied, rss); err == nil {
				a.applied = rss
				return false, nil
			}
			// Fall through: a rebuild repairs whatever made the update fail.
		}
	}
	if a.applied != nil {
		// The counters restart with the new table: keep what they have counted so far.
		if raw, err := a.readCounters(conn); err == nil {
			a.totals.observe(raw)
		}
	}
	a.applied = nil
	if err := a.rebuild(conn, rss); err != nil {
		return true, err
	}
	a.totals.reset()
	a.applied, a.verified = rss, time.Now()
	return true, nil
}

// batchBytes estimates the netlink batch that replaces whole tables, with room to
// spare: an element takes well under 128 bytes on the wire.
func batchBytes(rss []*Ruleset) int {
	n := 0
	for _, rs := range rss {
		for _, s := range rs.Sets {
			n += len(s.Elements)
		}
	}
	return 1<<20 + 2*n*128
}

// rebuild replaces whole tables in one transaction: packets see either the old
// rulesets or the new ones, never a mix.
func (a *nftApplier) rebuild(conn *nftables.Conn, rss []*Ruleset) error {
	for _, rs := range rss {
		if err := a.rebuildTable(conn, rs); err != nil {
			return err
		}
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("replacing nftables table %s: %w", TableName, err)
	}
	return nil
}

func (a *nftApplier) rebuildTable(conn *nftables.Conn, rs *Ruleset) error {
	t := tableOf(rs)
	// Adding before deleting makes the delete succeed whether or not the table exists.
	conn.AddTable(t)
	conn.DelTable(t)
	conn.AddTable(t)
	chains := map[string]*nftables.Chain{}
	for _, c := range rs.Chains {
		nc := &nftables.Chain{Name: c.Name, Table: t}
		if c.Hook != nil {
			prio := nftables.ChainPriority(c.Priority)
			policy := nftables.ChainPolicyAccept
			nc.Type, nc.Hooknum, nc.Priority, nc.Policy = c.Type, c.Hook, &prio, &policy
		}
		chains[c.Name] = conn.AddChain(nc)
	}
	sets := map[string]*nftables.Set{}
	for _, s := range rs.Sets {
		ns := toNftSet(t, s)
		if err := conn.AddSet(ns, nil); err != nil {
			return fmt.Errorf("adding set %s: %w", s.Name, err)
		}
		sets[s.Name] = ns
	}
	for _, c := range rs.Chains {
		for _, r := range c.Rules {
			conn.AddRule(&nftables.Rule{Table: t, Chain: chains[c.Name], Exprs: withSetIDs(r.Exprs, sets)})
		}
	}
	for _, s := range rs.Sets {
		if err := addElements(conn, sets[s.Name], s, s.Elements, s.Timeout); err != nil {
			return err
		}
	}
	return nil
}

// intact reports whether the kernel's table still has every chain with the rules natd
// put there: someone may have deleted or flushed it since.
func (a *nftApplier) intact(conn *nftables.Conn, rs *Ruleset) (bool, error) {
	chains, err := conn.ListChainsOfTableFamily(rs.Family)
	if err != nil {
		return false, fmt.Errorf("listing nftables chains: %w", err)
	}
	have := map[string]*nftables.Chain{}
	for _, c := range chains {
		if c.Table.Name == TableName {
			have[c.Name] = c
		}
	}
	if len(have) != len(rs.Chains) {
		return false, nil
	}
	for _, c := range rs.Chains {
		kc, ok := have[c.Name]
		if !ok {
			return false, nil
		}
		rules, err := conn.GetRules(tableOf(rs), kc)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return false, nil
			}
			return false, fmt.Errorf("listing rules of chain %s: %w", c.Name, err)
		}
		if len(rules) != len(c.Rules) {
			return false, nil
		}
	}
	return true, nil
}

// updateElements changes only the set elements that differ, in one transaction.
func (a *nftApplier) updateElements(conn *nftables.Conn, old, cur []*Ruleset) error {
	changed := false
	for r, rs := range cur {
		t := tableOf(rs)
		for i, s := range rs.Sets {
			del, add := diffElements(old[r].Sets[i].Elements, s.Elements)
			if len(del) == 0 && len(add) == 0 {
				continue
			}
			changed = true
			ns := toNftSet(t, s)
			if s.Timeout > 0 {
				// Leased elements may have lapsed in the kernel already, and deleting
				// an element that is gone fails the whole transaction: replace them all
				// (there are only as many as IPs this node holds).
				conn.FlushSet(ns)
				add = s.Elements
			} else if len(del) > 0 {
				if err := deleteElements(conn, ns, s, del); err != nil {
					return err
				}
			}
			if err := addElements(conn, ns, s, add, s.Timeout); err != nil {
				return err
			}
		}
	}
	if !changed {
		return nil
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("updating nftables set elements: %w", err)
	}
	return nil
}

// sameShape reports whether two rulesets differ at most in the elements of non-interval
// sets (interval sets change rarely, and replacing ranges element-wise is fiddly).
func sameShape(a, b *Ruleset) bool {
	if len(a.Sets) != len(b.Sets) || len(a.Chains) != len(b.Chains) {
		return false
	}
	for i := range a.Sets {
		if a.Sets[i].Name != b.Sets[i].Name || a.Sets[i].Decl != b.Sets[i].Decl {
			return false
		}
		if a.Sets[i].Interval && !sameElements(a.Sets[i].Elements, b.Sets[i].Elements) {
			return false
		}
	}
	for i := range a.Chains {
		ca, cb := a.Chains[i], b.Chains[i]
		if ca.Name != cb.Name || ca.Header != cb.Header || len(ca.Rules) != len(cb.Rules) {
			return false
		}
		for j := range ca.Rules {
			if ca.Rules[j].Text() != cb.Rules[j].Text() {
				return false
			}
		}
	}
	return true
}

func sameElements(a, b []Element) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// diffElements returns the elements to delete from old and to add to reach cur. An
// element whose value changed is deleted and added again.
func diffElements(old, cur []Element) (del, add []Element) {
	// Both lists come from the same deterministic builder, so an unchanged set is
	// usually identical element by element: check that first, it is far cheaper
	// than hashing every key.
	if sameElements(old, cur) {
		return nil, nil
	}
	idx := make(map[[4]byte]int, len(old))
	for i, e := range old {
		idx[e.Key] = i
	}
	for _, e := range cur {
		i, ok := idx[e.Key]
		switch {
		case !ok:
			add = append(add, e)
		case old[i] != e:
			del = append(del, e)
			add = append(add, e)
		}
		if ok {
			idx[e.Key] = -1
		}
	}
	for _, e := range old {
		if idx[e.Key] >= 0 {
			del = append(del, e)
		}
	}
	return del, add
}

// renewLeases re-adds every leased element of the applied tables with the given
// timeout, in one transaction.
func (a *nftApplier) renewLeases(conn *nftables.Conn, timeout time.Duration) error {
	n := 0
	for _, rs := range a.applied {
		t := tableOf(rs)
		for _, s := range rs.Sets {
			if s.Timeout == 0 {
				continue
			}
			ns := toNftSet(t, s)
			conn.FlushSet(ns)
			if err := addElements(conn, ns, s, s.Elements, timeout); err != nil {
				return err
			}
			n++
		}
	}
	if n == 0 {
		return nil
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("renewing leases: %w", err)
	}
	return nil
}

func toNftSet(t *nftables.Table, s *Set) *nftables.Set {
	ns := &nftables.Set{Table: t, Name: s.Name, KeyType: s.KeyType, IsMap: s.IsMap, Interval: s.Interval,
		HasTimeout: s.Timeout > 0, Counter: s.Counter}
	if s.IsMap {
		ns.DataType = s.DataType
	}
	if s.KeyOrder != nil {
		ns.KeyByteOrder = s.KeyOrder
	}
	return ns
}

func kernelElements(s *Set, els []Element, deleting bool, timeout time.Duration) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(els))
	verdicts := map[string]*expr.Verdict{}
	for _, e := range els {
		ke := nftables.SetElement{Key: append([]byte(nil), e.Key[:]...)}
		if !deleting {
			ke.Timeout, ke.Comment = timeout, e.Comment
		}
		if !deleting && s.IsMap {
			if e.Chain != "" {
				v, ok := verdicts[e.Chain]
				if !ok {
					v = &expr.Verdict{Kind: expr.VerdictJump, Chain: e.Chain}
					verdicts[e.Chain] = v
				}
				ke.VerdictData = v
			} else {
				ke.Val = append([]byte(nil), e.Val[:]...)
			}
		}
		out = append(out, ke)
		// An interval is a start element and an end element (the first address after
		// it); a range that runs to the end of the address space has no end element.
		if s.Interval && e.KeyEnd != [4]byte{} {
			out = append(out, nftables.SetElement{Key: append([]byte(nil), e.KeyEnd[:]...), IntervalEnd: true})
		}
	}
	return out
}

func addElements(conn *nftables.Conn, ns *nftables.Set, s *Set, els []Element, timeout time.Duration) error {
	kel := kernelElements(s, els, false, timeout)
	for start := 0; start < len(kel); start += elementsPerMessage {
		end := min(start+elementsPerMessage, len(kel))
		if err := conn.SetAddElements(ns, kel[start:end]); err != nil {
			return fmt.Errorf("adding elements to %s: %w", s.Name, err)
		}
	}
	return nil
}

func deleteElements(conn *nftables.Conn, ns *nftables.Set, s *Set, els []Element) error {
	kel := kernelElements(s, els, true, 0)
	for start := 0; start < len(kel); start += elementsPerMessage {
		end := min(start+elementsPerMessage, len(kel))
		if err := conn.SetDeleteElements(ns, kel[start:end]); err != nil {
			return fmt.Errorf("deleting elements from %s: %w", s.Name, err)
		}
	}
	return nil
}

// withSetIDs fills in the batch-local IDs of the sets a rule looks up, which the kernel
// uses to find sets created in the same transaction.
func withSetIDs(exprs []expr.Any, sets map[string]*nftables.Set) []expr.Any {
	for _, e := range exprs {
		if l, ok := e.(*expr.Lookup); ok {
			if s, ok := sets[l.SetName]; ok {
				l.SetID = s.ID
			}
		}
	}
	return exprs
}

// HeldAddr is an egress IP natd's table says this node holds, with the generation of
// its claim: what a previous run (or a crashed one) left on the uplink.
type HeldAddr struct {
	IP  netip.Addr
	Gen uint32
}

func heldAddrsInKernel(conn *nftables.Conn) ([]HeldAddr, error) {
	t := &nftables.Table{Name: TableName, Family: nftables.TableFamilyIPv4}
	s, err := conn.GetSetByName(t, setHeldAddrs)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, nil
		}
		return nil, fmt.Errorf("reading set %s: %w", setHeldAddrs, err)
	}
	els, err := conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("reading elements of %s: %w", setHeldAddrs, err)
	}
	var out []HeldAddr
	for _, e := range els {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok {
			continue
		}
		h := HeldAddr{IP: a}
		fmt.Sscanf(e.Comment, "gen=%d", &h.Gen) // no comment: generation 0
		out = append(out, h)
	}
	return out, nil
}

// deleteTables removes natd's tables; missing tables are not an error.
func deleteTables(conn *nftables.Conn) error {
	for _, f := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyARP} {
		t := &nftables.Table{Name: TableName, Family: f}
		conn.AddTable(t)
		conn.DelTable(t)
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("deleting nftables tables %s: %w", TableName, err)
	}
	return nil
}
