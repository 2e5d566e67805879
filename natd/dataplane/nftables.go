package dataplane

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mdnetlink "github.com/mdlayher/netlink"

	"golang.org/x/sys/unix"
	"natd.dev/natd/election"
)

// elementsPerMessage bounds one netlink message. The elements of a message sit in one
// nested attribute, whose length field is 16 bits: past 64 KiB it wraps and the kernel
// reads garbage (seen as ENOENT). 512 elements of the largest kind (a verdict naming a
// chain) stay near 50 KiB. All messages still go in one batch, so the kernel applies
// them as one transaction.
const elementsPerMessage = 512

// nftApplier keeps natd's tables (ip, ip6 and arp) in line with their Rulesets. It
// remembers what it applied last so that a change of a few pods costs a few set
// elements, not whole tables.
type nftApplier struct {
	newConn func(sendBuf int) (*nftables.Conn, error)
	// gen reads the kernel's nftables generation, which every committed transaction
	// (anyone's) advances.
	gen     func() (uint32, error)
	applied []*Ruleset // nil: unknown, next apply reads the kernel or rebuilds
	// appliedGen is the generation right after natd's last transaction, when nothing
	// else committed in between (genKnown): while the kernel is still at it, nobody
	// has touched natd's tables and there is nothing to read back.
	appliedGen uint32
	genKnown   bool
	// renewals are the generations natd's last lease renewals expected their commits
	// to make: the change notifications carrying them are natd's own (a renewal every
	// --lease/4), not someone else's changes to check for.
	renewals ownGenerations
	// leaseTimeout, when set, replaces the sets' own timeout for the leased elements
	// this apply adds (the time left until State.LeaseUntil).
	leaseTimeout time.Duration
	// verifyEvery bounds how often apply reads the tables back when someone else
	// committed (kube-proxy, the CNI plugin, an operator), so that a busy node pays for
	// it at most once per period. Drift that breaks an element update (a deleted
	// table) is repaired at once regardless.
	verifyEvery time.Duration
	verified    time.Time
	totals      counterTotals
	// leased is how many leased elements the last applied rulesets had: kept when a
	// failed rebuild leaves nothing applied, so that renewal can say it is not renewing.
	leased int
}

// nftOutcome says what one apply did.
type nftOutcome struct {
	rebuilt bool
	// repinned are pod addresses whose classification changed (pinned, unpinned or
	// pinned elsewhere): connections they opened under the old one must be NATed anew.
	repinned []netip.Addr
}

func tableOf(rs *Ruleset) *nftables.Table {
	return &nftables.Table{Name: TableName, Family: rs.Family}
}

// apply converges the tables to rss, in one transaction: element updates when only set
// contents changed and the kernel's tables have the shape natd gave them, whole-table
// replacements otherwise. The elements are diffed against the kernel's own content
// whenever someone else may have changed it, so removed, flushed or foreign elements
// are repaired too.
func (a *nftApplier) apply(rss []*Ruleset) (nftOutcome, error) {
	var out nftOutcome
	conn, err := a.newConn(batchBytes(rss))
	if err != nil {
		return out, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	gen0, err := a.gen()
	if err != nil {
		return out, err
	}
	base := a.applied
	// What the base says is the kernel's content only if nobody committed since natd
	// did, or it was read from the kernel just now; only then may the generation after
	// this transaction be trusted as "natd's tables untouched".
	trusted := a.genKnown && gen0 == a.appliedGen
	if base == nil || (!trusted && time.Since(a.verified) >= a.verifyEvery) {
		kernel, err := a.readKernel(conn, rss)
		if err != nil {
			return out, err
		}
		a.verified, trusted = time.Now(), true
		if base == nil || !sameRulesets(kernel, base) {
			// The kernel is the truth; what it lacks or has too much is repaired below.
			base = kernel
		}
	}
	if base != nil && sameShapes(base, rss) {
		diffs := diffRulesets(base, rss)
		out.repinned = repinned(rss, diffs)
		changed, err := a.updateElements(conn, rss, diffs)
		if err != nil && !trusted {
			// natd's memory was behind the kernel (someone removed an element natd
			// meant to delete, a CNI DEL say): diff against the kernel before
			// resorting to a rebuild, which would reset the counters.
			if kernel, kerr := a.readKernel(conn, rss); kerr == nil && kernel != nil {
				a.verified, trusted = time.Now(), true
				diffs = diffRulesets(kernel, rss)
				out.repinned = repinned(rss, diffs)
				changed, err = a.updateElements(conn, rss, diffs)
			}
		}
		if err == nil {
			a.committed(gen0, rss, trusted, changed)
			return out, nil
		}
		// Fall through: a rebuild repairs whatever made the update fail.
	} else if base != nil {
		out.repinned = repinned(rss, diffRulesets(base, rss))
	}
	if a.applied != nil {
		// The counters restart with the new table: keep what they have counted so far.
		if raw, err := a.readCounters(conn); err == nil {
			a.totals.observe(raw)
		}
	}
	a.applied, a.genKnown = nil, false
	out.rebuilt = true
	if err := a.rebuild(conn, rss); err != nil {
		return out, err
	}
	a.totals.reset()
	a.verified = time.Now()
	a.committed(gen0, rss, true, true)
	return out, nil
}

// committed records rss as applied. The generation is known only when the base was
// trusted and natd's transaction (if it made one) was the only commit since gen0.
func (a *nftApplier) committed(gen0 uint32, rss []*Ruleset, trusted, didCommit bool) {
	a.applied, a.leased = rss, 0
	for _, rs := range rss {
		for _, s := range rs.Sets {
			if s.Timeout > 0 {
				a.leased += len(s.Elements)
			}
		}
	}
	gen1, err := a.gen()
	want := gen0
	if didCommit {
		want = gen0 + 1
	}
	a.appliedGen, a.genKnown = gen1, trusted && err == nil && gen1 == want
}

// minReadBack spaces Verify's read-backs of natd's tables.
const minReadBack = 200 * time.Millisecond

// untouched reports whether nobody has committed to nftables since natd's last
// transaction (its lease renewals included).
func (a *nftApplier) untouched() (bool, error) {
	if a.applied == nil || !a.genKnown {
		return false, nil
	}
	gen, err := a.gen()
	return err == nil && gen == a.appliedGen, err
}

// drifted reports whether the kernel's tables differ from rss (the rulesets natd
// applied last, rebuilt with the pod records as they are now). Cheap while nobody else
// has committed since natd's last transaction.
func (a *nftApplier) drifted(rss []*Ruleset) (drifted bool, retryIn time.Duration, err error) {
	if a.applied == nil {
		return true, 0, nil
	}
	gen0, err := a.gen()
	if err != nil {
		return false, 0, err
	}
	if a.genKnown && gen0 == a.appliedGen && sameRulesets(a.applied, rss) {
		return false, 0, nil
	}
	if wait := minReadBack - time.Since(a.verified); wait > 0 {
		// Other software commits all the time (kube-proxy, every pod's CNI ADD and
		// DEL): reading every element back each time would cost a busy node dearly.
		// The caller checks again when the spacing allows.
		return false, wait, nil
	}
	conn, err := a.newConn(0)
	if err != nil {
		return false, 0, fmt.Errorf("opening nftables netlink socket: %w", err)
	}
	kernel, err := a.readKernel(conn, rss)
	if err != nil {
		return false, 0, err
	}
	a.verified = time.Now()
	if kernel == nil || !sameRulesets(kernel, rss) {
		// The next apply must diff against the kernel, not against its memory.
		a.genKnown, a.verified = false, time.Time{}
		return true, 0, nil
	}
	// The kernel matches (someone else's commit did not touch natd): remember the
	// generation so that the next check is cheap again.
	a.applied, a.appliedGen, a.genKnown = rss, gen0, true
	return false, 0, nil
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
		if err := addElements(conn, sets[s.Name], s, s.Elements, a.timeoutOf(s)); err != nil {
			return err
		}
	}
	return nil
}

// readKernel reads natd's tables back in the shape of rss: their chains (by name, with
// their rule counts) and the elements of every set. It returns nil when a table or a
// chain is missing or has another number of rules: only a rebuild repairs that.
// Leased sets are read as the rulesets have them (lease renewal rewrites them every
// lease/4 anyway), and interval sets as natd encodes them.
func (a *nftApplier) readKernel(conn *nftables.Conn, rss []*Ruleset) ([]*Ruleset, error) {
	out := make([]*Ruleset, 0, len(rss))
	for _, rs := range rss {
		k, err := readTable(conn, rs)
		if err != nil || k == nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, nil
}

func readTable(conn *nftables.Conn, rs *Ruleset) (*Ruleset, error) {
	chains, err := conn.ListChainsOfTableFamily(rs.Family)
	if err != nil {
		return nil, fmt.Errorf("listing nftables chains: %w", err)
	}
	have := map[string]*nftables.Chain{}
	for _, c := range chains {
		if c.Table.Name == TableName {
			have[c.Name] = c
		}
	}
	if len(have) != len(rs.Chains) {
		return nil, nil
	}
	for _, c := range rs.Chains {
		kc, ok := have[c.Name]
		if !ok {
			return nil, nil
		}
		rules, err := conn.GetRules(tableOf(rs), kc)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil, nil
			}
			return nil, fmt.Errorf("listing rules of chain %s: %w", c.Name, err)
		}
		if len(rules) != len(c.Rules) {
			return nil, nil
		}
	}
	k := &Ruleset{Family: rs.Family, Chains: rs.Chains}
	for _, s := range rs.Sets {
		ks, err := conn.GetSetByName(tableOf(rs), s.Name)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil, nil
			}
			return nil, fmt.Errorf("reading set %s: %w", s.Name, err)
		}
		cp := *s
		cp.Elements = nil // leased sets: unknown, so that an update rewrites them whole
		if s.Timeout == 0 {
			els, err := conn.GetSetElements(ks)
			if err != nil {
				return nil, fmt.Errorf("reading elements of %s: %w", s.Name, err)
			}
			if s.Interval {
				if !sameIntervals(s, els) {
					return nil, nil
				}
				cp.Elements = s.Elements // as natd encodes them: checked just now
			} else {
				cp.Elements = fromKernel(s, els)
			}
		}
		k.Sets = append(k.Sets, &cp)
	}
	return k, nil
}

// fromKernel turns kernel elements back into natd's form.
func fromKernel(s *Set, els []nftables.SetElement) []Element {
	out := make([]Element, 0, len(els))
	n := s.keyLen()
	for _, ke := range els {
		var e Element
		copy(e.Key[:], ke.Key[:min(len(ke.Key), n)])
		if s.Concat && len(ke.Key) >= n+4 {
			copy(e.Key2[:], ke.Key[n:n+4])
		}
		if s.IsMap && s.DataType.Name == nftables.TypeVerdict.Name {
			e.Chain, e.Return = decodeVerdict(ke.Val)
		} else {
			copy(e.Val[:], ke.Val)
		}
		e.Comment = ke.Comment
		out = append(out, e)
	}
	return out
}

// decodeVerdict reads a verdict map element's data as the kernel returns it (and
// google/nftables passes it on undecoded): NFTA_VERDICT_CODE and NFTA_VERDICT_CHAIN. A
// verdict natd never writes comes back as an impossible chain name, so it differs.
func decodeVerdict(b []byte) (chain string, ret bool) {
	ad, err := mdnetlink.NewAttributeDecoder(b)
	if err != nil {
		return "\x00undecodable", false
	}
	ad.ByteOrder = binary.BigEndian
	code := int32(0)
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_VERDICT_CODE:
			code = int32(ad.Uint32())
		case unix.NFTA_VERDICT_CHAIN:
			chain = ad.String()
		}
	}
	switch {
	case code == int32(expr.VerdictReturn):
		return "", true
	case code == int32(expr.VerdictGoto) && chain != "":
		return chain, false
	}
	return fmt.Sprintf("\x00verdict %d %s", code, chain), false
}

// sameIntervals compares an interval set's kernel elements with what natd would send.
func sameIntervals(s *Set, els []nftables.SetElement) bool {
	type key struct {
		k   [16]byte
		end bool
	}
	want := map[key]int{}
	for _, e := range kernelElements(s, s.Elements, true, 0) {
		var k key
		copy(k.k[:], e.Key)
		k.end = e.IntervalEnd
		want[k]++
	}
	got := 0
	for _, e := range els {
		var k key
		copy(k.k[:], e.Key)
		k.end = e.IntervalEnd
		if want[k] == 0 {
			// The kernel adds an end element at address zero for an interval that
			// starts there; natd's encoding leaves it implicit.
			if k.end && k.k == ([16]byte{}) {
				continue
			}
			return false
		}
		want[k]--
		got++
	}
	for _, n := range want {
		if n != 0 {
			return false
		}
	}
	return true
}

// setDiff is what changes in one set: elements to delete and to add.
type setDiff struct{ del, add []Element }

// diffRulesets diffs every set of cur against the set of the same name in old (none:
// all of cur's elements are new); diffs[r][i] belongs to cur[r].Sets[i].
func diffRulesets(old, cur []*Ruleset) [][]setDiff {
	out := make([][]setDiff, len(cur))
	for r, rs := range cur {
		out[r] = make([]setDiff, len(rs.Sets))
		for i, s := range rs.Sets {
			var before []Element
			if r < len(old) && old[r].Family == rs.Family {
				for _, o := range old[r].Sets {
					if o.Name == s.Name {
						before = o.Elements
						break
					}
				}
			}
			out[r][i].del, out[r][i].add = diffElements(before, s.Elements)
		}
	}
	return out
}

// updateElements applies diffs (of cur against the kernel's or natd's last content) in
// one transaction.
func (a *nftApplier) updateElements(conn *nftables.Conn, cur []*Ruleset, diffs [][]setDiff) (changed bool, err error) {
	for r, rs := range cur {
		t := tableOf(rs)
		for i, s := range rs.Sets {
			del, add := diffs[r][i].del, diffs[r][i].add
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
					return changed, err
				}
			}
			if err := addElements(conn, ns, s, add, a.timeoutOf(s)); err != nil {
				return changed, err
			}
		}
	}
	if !changed {
		return false, nil
	}
	if err := conn.Flush(); err != nil {
		return true, fmt.Errorf("updating nftables set elements: %w", err)
	}
	return true, nil
}

// sameShapes reports whether two lists of rulesets differ at most in the elements of
// non-interval sets (interval sets change rarely, and replacing ranges element-wise is
// fiddly).
func sameShapes(a, b []*Ruleset) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !sameShape(a[i], b[i]) {
			return false
		}
	}
	return true
}

func sameShape(a, b *Ruleset) bool {
	if a.Family != b.Family || len(a.Sets) != len(b.Sets) || len(a.Chains) != len(b.Chains) {
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

// sameRulesets reports whether a and b have the same shape and the same elements in
// every set that is not leased (leases are rewritten every lease/4 anyway).
func sameRulesets(a, b []*Ruleset) bool {
	if !sameShapes(a, b) {
		return false
	}
	for i := range a {
		for j, s := range a[i].Sets {
			if s.Timeout > 0 || s.Interval {
				continue
			}
			if del, add := diffElements(s.Elements, b[i].Sets[j].Elements); len(del) > 0 || len(add) > 0 {
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

// repinned lists the pod addresses whose connections must be NATed anew after the
// diffs of the pod-classification maps (cni_pods, pod_egress and their IPv6 twins).
func repinned(cur []*Ruleset, diffs [][]setDiff) []netip.Addr {
	var out []netip.Addr
	seen := map[[16]byte]bool{}
	for r, rs := range cur {
		for i, s := range rs.Sets {
			if !s.IsMap || s.DataType.Name != nftables.TypeVerdict.Name {
				continue
			}
			// Deleting conntrack entries means reading the whole table, on every node
			// for every pinned pod of the cluster that goes: only a pod whose
			// classification changed (an element replaced), or one of this node's
			// pods that the CNI plugin no longer classifies, can have connections
			// NATed under an old classification that still matter. A pod simply
			// deleted has none; one whose namespace was unpinned while natd's API
			// view alone classified it keeps its connections' old bindings, which the
			// leak guard then drops (the pinned-connection bit).
			added := map[[16]byte]bool{}
			for _, e := range diffs[r][i].add {
				added[e.Key] = true
			}
			cni := s.Name == MapCNIPods || s.Name == MapCNIPods6
			for _, e := range diffs[r][i].del {
				if (added[e.Key] || cni) && !seen[e.Key] {
					seen[e.Key] = true
					out = append(out, keyAddr(s, e.Key))
				}
			}
		}
	}
	return out
}

// diffElements returns the elements to delete from old and to add to reach cur. An
// element whose value changed is deleted and added again. A key listed twice counts
// once (the first wins): the kernel holds one element per key, and a malformed state
// must not make the diff fail.
//
// Both lists come from the same deterministic builder (the planner keeps addresses
// sorted), so a change of a few pods leaves long runs equal at both ends: those are
// skipped, and only the middle is compared by key.
func diffElements(old, cur []Element) (del, add []Element) {
	pre := 0
	for pre < len(old) && pre < len(cur) && old[pre] == cur[pre] {
		pre++
	}
	suf := 0
	for suf < len(old)-pre && suf < len(cur)-pre && old[len(old)-1-suf] == cur[len(cur)-1-suf] {
		suf++
	}
	if pre == len(old) && pre == len(cur) {
		return nil, nil
	}
	if pre > 0 || suf > 0 {
		// A key in the equal runs may still be listed again in the middle (a
		// duplicate): only a full comparison can tell, and duplicates are rare.
		if !hasKeyOutside(old, cur, pre, suf) {
			old, cur = old[pre:len(old)-suf], cur[pre:len(cur)-suf]
		}
	}
	const consumed = -1
	idx := make(map[[16]byte]int32, len(old))
	for i, e := range old {
		if _, dup := idx[e.Key]; !dup {
			idx[e.Key] = int32(i)
		}
	}
	for _, e := range cur {
		i, ok := idx[e.Key]
		switch {
		case ok && i == consumed:
			continue // listed twice in cur, or kept from old already
		case !ok:
			add = append(add, e)
		case old[i] != e:
			del = append(del, old[i])
			add = append(add, e)
		}
		idx[e.Key] = consumed
	}
	for _, e := range old {
		if i := idx[e.Key]; i != consumed {
			del = append(del, e)
			idx[e.Key] = consumed
		}
	}
	return del, add
}

// hasKeyOutside reports whether a key of the equal runs (old[:pre], old[len-suf:]) also
// appears in the middles: then the runs cannot be skipped.
func hasKeyOutside(old, cur []Element, pre, suf int) bool {
	mid := make(map[[16]byte]bool, len(old)+len(cur)-2*(pre+suf))
	for _, list := range [][]Element{old[pre : len(old)-suf], cur[pre : len(cur)-suf]} {
		for _, e := range list {
			mid[e.Key] = true
		}
	}
	for _, run := range [][]Element{old[:pre], old[len(old)-suf:]} {
		for _, e := range run {
			if mid[e.Key] {
				return true
			}
		}
	}
	return false
}

// renewLeases re-adds every leased element of the applied tables with the given
// timeout, in one transaction; with 0 it only removes them: the leases end now.
func (a *nftApplier) renewLeases(conn *nftables.Conn, timeout time.Duration) error {
	if a.leased == 0 {
		// Nothing held: no transaction (every node would otherwise commit ten times
		// a second, and wake every nftables listener on it).
		return nil
	}
	n := 0
	for _, rs := range a.applied {
		t := tableOf(rs)
		for _, s := range rs.Sets {
			if s.Timeout == 0 {
				continue
			}
			ns := toNftSet(t, s)
			conn.FlushSet(ns)
			if timeout > 0 { // 0: the leases end now
				if err := addElements(conn, ns, s, s.Elements, timeout); err != nil {
					return err
				}
			}
			n++
		}
	}
	if n == 0 {
		return nil
	}
	gen0, gerr := a.gen()
	if gerr == nil {
		// Should someone else commit first, theirs takes this generation and goes
		// unchecked, but this renewal's own notification then carries another one:
		// the check still follows.
		a.renewals.expect(gen0 + 1)
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("renewing leases: %w", err)
	}
	// A renewal changes nothing Verify compares: the tables are as untouched as before
	// it if nobody else committed in between.
	gen1, err := a.gen()
	if gerr != nil || err != nil || !a.genKnown || gen0 != a.appliedGen || gen1 != gen0+1 {
		a.genKnown = false
		return nil
	}
	a.appliedGen = gen1
	return nil
}

// ownGenerations remembers the last few generations natd's own commits expected to
// make, for the change watcher, which may read their notifications late.
type ownGenerations struct {
	mu   sync.Mutex
	gens [8]uint32
	next int
}

func (o *ownGenerations) expect(gen uint32) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.gens[o.next] = gen
	o.next = (o.next + 1) % len(o.gens)
}

func (o *ownGenerations) has(gen uint32) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return gen != 0 && slices.Contains(o.gens[:], gen)
}

// timeoutOf is the timeout of elements added to s: none for a set without one, the
// time left in the lease for a leased set.
func (a *nftApplier) timeoutOf(s *Set) time.Duration {
	if s.Timeout > 0 && a.leaseTimeout > 0 {
		return a.leaseTimeout
	}
	return s.Timeout
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
	n := s.keyLen()
	for _, e := range els {
		key := append(make([]byte, 0, 20), e.Key[:n]...)
		if s.Concat {
			key = append(key, e.Key2[:]...)
		}
		ke := nftables.SetElement{Key: key}
		if !deleting {
			ke.Timeout, ke.Comment = timeout, e.Comment
		}
		if !deleting && s.IsMap {
			switch {
			case e.Return:
				ke.VerdictData = &expr.Verdict{Kind: expr.VerdictReturn}
			case e.Chain != "":
				v, ok := verdicts[e.Chain]
				if !ok {
					// goto, not jump: a chain that only sets the mark must not return
					// to prerouting, where a later map (natd's API view) would classify
					// the packet again.
					v = &expr.Verdict{Kind: expr.VerdictGoto, Chain: e.Chain}
					verdicts[e.Chain] = v
				}
				ke.VerdictData = v
			default:
				ke.Val = append([]byte(nil), e.Val[:s.valLen()]...)
			}
		}
		out = append(out, ke)
		// An interval is a start element and an end element (the first address after
		// it); a range that runs to the end of the address space has no end element.
		if s.Interval && e.KeyEnd != ([16]byte{}) {
			out = append(out, nftables.SetElement{Key: append([]byte(nil), e.KeyEnd[:n]...), IntervalEnd: true})
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

// heldAddrsInKernel reads the egress IPs natd's tables say this node holds, with the
// generations of its claims: what a previous run (or a crashed one) left on the uplink.
func heldAddrsInKernel(conn *nftables.Conn) ([]election.Claim, error) {
	var out []election.Claim
	for _, f := range []family{familyIPv4, familyIPv6} {
		claims, err := heldInTable(conn, f)
		if err != nil {
			return nil, err
		}
		out = append(out, claims...)
	}
	return out, nil
}

// heldInTable reads the held egress IPs of family f's table.
func heldInTable(conn *nftables.Conn, f family) ([]election.Claim, error) {
	t := &nftables.Table{Name: TableName, Family: f.table}
	elements := func(name string) ([]nftables.SetElement, error) {
		s, err := conn.GetSetByName(t, name)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil, nil
			}
			return nil, fmt.Errorf("reading set %s: %w", name, err)
		}
		els, err := conn.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("reading elements of %s: %w", name, err)
		}
		return els, nil
	}
	addrs, err := elements(f.set(setHeldAddrs))
	if err != nil {
		return nil, err
	}
	// Only IPs whose lease is current: a lapsed lease (natd was killed) is served no
	// more, and the kernel no longer lists it in held_marks.
	marks, err := elements(f.set(setHeldMarks))
	if err != nil {
		return nil, err
	}
	n := int(f.addrLen)
	leased := map[netip.Addr]bool{}
	for _, e := range marks {
		if len(e.Key) >= n {
			a, _ := netip.AddrFromSlice(e.Key[:n])
			leased[a] = true
		}
	}
	var out []election.Claim
	for _, e := range addrs {
		a, ok := netip.AddrFromSlice(e.Key)
		if !ok || !f.of(a) || a.Is4In6() || !leased[a] {
			continue
		}
		c := election.Claim{IP: a}
		_, _ = fmt.Sscanf(e.Comment, "gen=%d", &c.Gen) // no comment: generation 0
		out = append(out, c)
	}
	return out, nil
}

// deleteTables removes natd's tables; missing tables are not an error.
func deleteTables(conn *nftables.Conn) error {
	for _, f := range []nftables.TableFamily{nftables.TableFamilyIPv4, nftables.TableFamilyIPv6, nftables.TableFamilyARP} {
		t := &nftables.Table{Name: TableName, Family: f}
		conn.AddTable(t)
		conn.DelTable(t)
	}
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("deleting nftables tables %s: %w", TableName, err)
	}
	return nil
}
