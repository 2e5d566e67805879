package natd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/client/clientset/versioned"
	"natd.dev/natd/natd/cniplugin"
	"natd.dev/natd/natd/dataplane"
)

// Kernel programs the node; dataplane.Dataplane implements it.
type Kernel interface {
	Apply(dataplane.State) (dataplane.Result, error)
	// Verify reports whether anything natd owns in the kernel drifted from the last
	// Apply; a sync repairs it.
	// retryIn, when set, asks for another check that soon (read-backs are spaced).
	Verify() (drifted bool, retryIn time.Duration, err error)
	// WatchChanges calls changed after every nftables commit on the node.
	WatchChanges(stop <-chan struct{}, changed func()) error
	// RenewLeases extends the held IPs' leases to until (the evidence's time + --lease).
	RenewLeases(until time.Time) error
	HoldLeases(grace time.Duration) error
	KernelClaims() ([]election.Claim, error)
	// Bindings are the NAT bindings of the held IPs a successor must be handed (see
	// dataplane.Binding).
	Bindings(held []netip.Addr) ([]dataplane.Binding, error)
}

// Membership is this node's place in the gossip cluster; election.Gossip implements it.
type Membership interface {
	View() election.View
	// Evidence is View().Evidence without copying the membership (the lease renewal
	// reads it four times a lease).
	Evidence() election.Evidence
	SetLocal(m election.Meta, timeout time.Duration) error
	Join(peers []string) (int, error)
	Changed() <-chan struct{}
	// MembersChanged is signalled when members come or go that matter only lazily.
	MembersChanged() <-chan struct{}
	Forget(keep func(name string) bool)
	SetRoutes(routes []election.Claim) error
	// SetVoters names the voters and says whether this node holds IPs (see
	// election.Evidence).
	SetVoters(voters []string, holding bool)
	// SetKeys makes keys the gossip keys, the first primary.
	SetKeys(keys [][]byte) (changed bool, err error)
	RoutesChanged() <-chan struct{}
	// SendHandover sends this node's handover of ip to the named members; Handover is
	// the latest one of ip received from another node, if fresh.
	SendHandover(to []string, ip netip.Addr, payload []byte) error
	Handover(ip netip.Addr) (election.Handover, bool)
	Leave(timeout time.Duration) error
	Shutdown() error
}

// Keys of the work queue. Every event leads to one sync of the whole node (syncKey);
// verifyKey asks the worker to check the kernel for drift (and sync if it drifted).
// One worker takes them in turn, so the kernel has one writer.
const (
	syncKey   = "node"
	verifyKey = "verify"
)

// lazySync is how soon a sync follows a membership change that matters only for the
// status and the choice of witnesses: a burst of nodes joining costs one sync.
const lazySync = time.Second

// verifyEvery is how often the kernel is checked for drift: anything natd owns that
// someone changed is repaired within about this long.
const verifyEvery = time.Second

// Agent is natd on one node: informers and gossip feed a queue, one worker converges
// the kernel.
type Agent struct {
	cfg           *Config
	planner       *Planner
	kernel        Kernel
	newMembership func(nodeIP netip.Addr) (Membership, error)
	recorder      record.EventRecorder
	metrics       *Metrics
	status        *statusWriter // nil: no EgressIP objects are written
	now           func() time.Time
	health        *health
	client        kubernetes.Interface
	withheld      string // why leases are not renewed now ("": they are); the renewal loop's own
	keyErr        string // the last error reading the gossip keys; the key loop's own

	factory    informers.SharedInformerFactory
	podFactory informers.SharedInformerFactory // this node's pods
	// dsFactory watches natd's own DaemonSet (--daemonset; nil without): at SIGTERM
	// what the watch last saw tells an uninstall even when the API no longer answers
	// natd (its ServiceAccount or RBAC deleted with it).
	dsFactory  informers.SharedInformerFactory
	daemonSets cache.SharedIndexInformer
	namespaces corelisters.NamespaceLister
	pods       cache.Indexer // of *podRecord, by namespace and by node
	nodes      corelisters.NodeLister
	queue      workqueue.TypedRateLimitingInterface[string]
	members    Membership

	mu            sync.Mutex
	reported      map[string]string // namespace -> last rejection reported, so events are not repeated
	hostNetWarned map[string]bool   // "namespace/pod" of host-network pods already warned about
	held          map[netip.Addr]Holding
	// leasedAt is when this node last decided, with a quorum, to keep serving what it
	// holds (a renewal or an Apply): its leases run out --lease after it.
	leasedAt time.Time
	// resuming: this natd found IPs its predecessor left served for a restart, and has
	// not yet planned with a quorum; it keeps them as they are until then.
	resuming      bool
	quorumSince   time.Time
	stateSyncedAt time.Time
	// stopped is closed when the agent stops (its start's context ends).
	stopped   <-chan struct{}
	seenGen   map[netip.Addr]uint32
	draining  bool
	publish   chan struct{} // wakes the claim publisher
	hadQuorum bool          // a quorum was seen before (the next new one is a rejoin)
	// reconnectAPI drops the API client's connections (nil: none to drop). A node that
	// was cut off finds its old connection stalled in TCP's retransmission backoff for
	// seconds after it is back: its first status write as a new holder waited 4-12 s.
	reconnectAPI func()
	// handedOver is the last handover sent of each held IP; the handover loop's own.
	handedOver map[netip.Addr]sentHandover
}

// sentHandover is a handover as sent, and when.
type sentHandover struct {
	msg []byte
	at  time.Time
}

// NewAgent wires an agent. The recorder may be nil (no Events), and so may egress (no
// EgressIP objects).
func NewAgent(cfg *Config, client kubernetes.Interface, egress versioned.Interface, kernel Kernel,
	newMembership func(nodeIP netip.Addr) (Membership, error), recorder record.EventRecorder, metrics *Metrics) *Agent {
	// Only the fields the planner reads are kept: at 50k pods, full Pod objects would
	// cost the agent hundreds of megabytes. Pods become podRecords, so the pod informer
	// is read through its indexer, never through a typed Pod lister.
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(slimObject))
	// A node classifies its own pods only (other nodes' pinned traffic reaches it
	// through the tunnel, which names its egress IP), so it watches only those, as the
	// kubelet does: the API server's cost does not grow with nodes × pods.
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(slimObject),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	a := &Agent{
		client:        client,
		cfg:           cfg,
		planner:       &Planner{Config: cfg},
		kernel:        kernel,
		newMembership: newMembership,
		recorder:      recorder,
		metrics:       metrics,
		factory:       factory,
		podFactory:    podFactory,
		namespaces:    factory.Core().V1().Namespaces().Lister(),
		nodes:         factory.Core().V1().Nodes().Lister(),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 5*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "natd"}),
		reported:      map[string]string{},
		hostNetWarned: map[string]bool{},
		held:          map[netip.Addr]Holding{},
		publish:       make(chan struct{}, 1),
		now:           time.Now,
	}
	a.health = newHealth(a.now)
	if ns, name, ok := strings.Cut(cfg.DaemonSet, "/"); ok {
		a.dsFactory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
			}))
		a.daemonSets = a.dsFactory.Apps().V1().DaemonSets().Informer()
	}
	podInformer := podFactory.Core().V1().Pods().Informer()
	a.pods = podInformer.GetIndexer()
	if egress != nil {
		a.status = newStatusWriter(cfg.NodeName, egress, recorder)
	}
	for _, inf := range []cache.SharedIndexInformer{
		factory.Core().V1().Namespaces().Informer(),
		podInformer,
		factory.Core().V1().Nodes().Informer(),
	} {
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { a.queue.Add(syncKey) },
			// Kubelets update Pods and Nodes all the time (container states,
			// heartbeats); only changes to what the planner reads cause a sync.
			UpdateFunc: func(old, cur any) {
				if relevantChange(old, cur) {
					a.queue.Add(syncKey)
				}
			},
			DeleteFunc: func(any) { a.queue.Add(syncKey) },
		}); err != nil {
			panic(err) // only fails on a stopped informer, impossible before Start
		}
	}
	return a
}

// Run syncs until ctx ends or, after drain is closed, until this node's egress IPs
// have been handed over.
//
// A stop through ctx is a restart: the kernel keeps serving this node's IPs for
// --restart-grace and the other nodes wait that long before taking them over, so a
// rolling restart moves nothing. A drain hands every IP over (make-before-break) and
// leaves the cluster.
func (a *Agent) Run(ctx context.Context, drain <-chan struct{}) error {
	defer a.queue.ShutDown()
	defer a.factory.Shutdown()
	defer a.podFactory.Shutdown()
	if a.dsFactory != nil {
		defer a.dsFactory.Shutdown()
	}
	if err := a.start(ctx); err != nil {
		return err
	}
	workerDone := make(chan struct{})
	go func() {
		defer close(workerDone)
		for a.processNext() {
		}
	}()
	a.queue.Add(syncKey)
	go every(ctx, a.cfg.ResyncPeriod, func() { a.queue.Add(syncKey) })
	if in, ok := a.cfg.CNIInstaller(); ok {
		go a.keepCNIChained(ctx, in)
	}
	// Someone else's nftables commit, or a deletion of a rule, route or address, is
	// checked at once; whatever the watch misses once a second.
	if err := a.kernel.WatchChanges(ctx.Done(), func() { a.queue.Add(verifyKey) }); err != nil {
		klog.InfoS("Not watching kernel changes; checking for drift once a second only", "err", err)
	}
	go every(ctx, verifyEvery, func() { a.queue.Add(verifyKey) })
	go every(ctx, a.cfg.Lease/4, a.renewLeases)
	go every(ctx, 10*time.Second, a.rejoin)
	if a.cfg.HandoverInterval > 0 {
		go a.handOverEvery(ctx)
	}
	if a.cfg.GossipKeyFile != "" {
		a.reloadKeys()
		go every(ctx, keyReloadEvery, a.reloadKeys)
	}
	go a.publishClaims(ctx)
	if a.status != nil {
		go a.status.run(ctx, a.members.View, a.members.RoutesChanged(), a.cfg.ResyncPeriod)
	}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-a.members.Changed():
				a.queue.Add(syncKey)
			case <-a.members.MembersChanged():
				a.queue.AddAfter(syncKey, lazySync)
			}
		}
	}()

	stopWorker := func() {
		a.queue.ShutDown()
		<-workerDone
	}
	select {
	case <-ctx.Done():
		if a.uninstalling() {
			// Not a restart: the IPs go to the nodes that stay (if any), and the caller
			// removes everything natd put on this node.
			stopWorker()
			klog.InfoS("natd's DaemonSet is being deleted: leaving the cluster and cleaning the node up", "daemonSet", a.cfg.DaemonSet)
			// Renewals stopped with ctx: the leases run out within --lease. Only then
			// may the others (who take a departed member's IPs at once) take them.
			time.Sleep(a.cfg.Lease)
			a.leave()
			return ErrUninstalled
		}
		// No sync may run after the leases are extended: it would shorten them again.
		stopWorker()
		a.stopForRestart()
	case <-drain:
		a.drain(ctx) // the worker keeps syncing while the IPs are handed over
		stopWorker()
	}
	return nil
}

// start fills the informer caches and joins the gossip cluster: what must be done
// before the first sync.
func (a *Agent) start(ctx context.Context) error {
	a.stopped = ctx.Done()
	a.factory.Start(ctx.Done())
	a.podFactory.Start(ctx.Done())
	if a.dsFactory != nil {
		// Not waited for: natd serves without it (an older Role may not grant the
		// watch), and falls back on asking the API at SIGTERM.
		a.dsFactory.Start(ctx.Done())
	}
	klog.InfoS("Waiting for informer caches")
	for _, f := range []informers.SharedInformerFactory{a.factory, a.podFactory} {
		for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return fmt.Errorf("cache for %v did not sync", typ)
			}
		}
	}
	klog.InfoS("Informer caches synced")
	if err := a.joinCluster(ctx); err != nil {
		return err
	}
	a.awaitQuorum(ctx)
	return nil
}

// awaitQuorum gives the voters' heartbeats a moment to come back before the first sync:
// a natd restarted on a holder keeps its IPs only if its first plan is made with a
// quorum. Without one (it is cut off, or alone) it goes on and holds nothing.
func (a *Agent) awaitQuorum(ctx context.Context) {
	a.mu.Lock()
	resuming := a.resuming
	a.mu.Unlock()
	if !resuming {
		return // nothing to keep: the first sync takes nothing new without a quorum anyway
	}
	deadline := time.Now().Add(2 * a.cfg.Heartbeat().Silence)
	for !a.members.Evidence().Quorum() && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(a.cfg.HeartbeatInterval)
	}
}

// startVoting names the voters as the API and gossip know them now, so that this
// node's heartbeats begin before its first sync (the sync names them from then on).
func (a *Agent) startVoting() {
	nodes, _ := a.nodes.List(labels.Everything())
	a.mu.Lock()
	holding := len(a.held) > 0
	a.mu.Unlock()
	a.members.SetVoters(votersOf(eligibleNodes(nodes), nodes, a.members.View()), holding)
}

// renewLeases keeps this node's egress IPs served by the kernel for another --lease,
// but only while the agent can show it may: its worker is not stuck, its syncs
// succeed, and its quorum of voters has held without a break since the last renewal.
// Reading the gossip view blocks while gossip is wedged, and then nothing is renewed
// either. So a node that cannot prove it may hold stops serving by itself within a
// bounded time (wedgeBound or syncFailBound, plus --lease), whatever part of it hangs.
func (a *Agent) renewLeases() {
	err := a.health.mayServe()
	var ev election.Evidence
	if err == nil {
		ev = a.members.Evidence()
		a.metrics.countQuorumBreaks(ev.QuorumBreaks)
		err = a.mayRenew(ev)
	}
	reason := ""
	if err != nil {
		reason = err.Error()
	}
	if reason != a.withheld { // said once per change, not every lease/4
		if reason != "" {
			klog.InfoS("Not renewing leases: this node stops serving its egress IPs", "reason", reason)
		} else if a.withheld != "" {
			klog.InfoS("Renewing leases again")
		}
		a.withheld = reason
	}
	if errors.Is(err, errNoMajority) || errors.Is(err, errLeaseLapsed) {
		// The kernel stops serving by itself; the sync gives the IPs up for good
		// (and tells gossip), so that this node does not resume serving them when
		// it is back in touch, before it has heard who took them meanwhile.
		a.queue.Add(syncKey)
	}
	if err != nil {
		// Not renewing is the point: the leases lapse and the node stops serving.
		a.metrics.LeaseRenewalsWithheld.Inc()
		a.health.renewDone(nil)
		return
	}
	// The lease counts from the last moment the quorum was seen, not from the commit.
	// Without a quorum nothing is held (mayRenew) and the renewal is a no-op.
	seen := ev.QuorumSeen
	if seen.IsZero() {
		seen = ev.At
	}
	err = a.kernel.RenewLeases(seen.Add(a.cfg.Lease))
	if errors.Is(err, dataplane.ErrLeaseDeadlinePassed) {
		// This node stalled past its lease's deadline while renewing it: the kernel
		// no longer serves the IPs, and the sync gives them up for good, as after a
		// quorum break.
		klog.InfoS("Lease renewal came too late: this node stops serving its egress IPs")
		a.metrics.LeaseRenewalsWithheld.Inc()
		a.health.renewDone(nil)
		a.queue.Add(syncKey)
		return
	}
	if err != nil {
		// Most likely someone removed natd's tables: a sync puts them back.
		a.metrics.LeaseRenewalFailures.Inc()
		klog.ErrorS(err, "Renewing leases failed; repairing the node")
		a.health.renewDone(err)
		a.queue.Add(syncKey)
		return
	}
	a.mu.Lock()
	a.leasedAt = later(a.leasedAt, seen)
	a.mu.Unlock()
	a.health.renewDone(nil)
}

// mayRenew says whether the voters' evidence lets this node extend its leases now (nil
// also when it holds nothing: the renewal is then a no-op).
// The lease may be extended only if it has not run out and the quorum has not broken
// since it was last extended: a node that was cut off, even briefly, may have been
// reported silent, and its IPs taken, meanwhile.
func (a *Agent) mayRenew(ev election.Evidence) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case len(a.held) == 0:
		return nil
	case !ev.Quorum():
		return errNoMajority
	case a.lapsed(ev):
		return errLeaseLapsed
	}
	return nil
}

// lapsed reports whether this node's leases ran out, or its quorum broke, since it last
// extended them. The caller holds a.mu.
func (a *Agent) lapsed(ev election.Evidence) bool {
	if a.resuming {
		return false // the kernel serves them under the grace its predecessor set
	}
	return ev.At.Sub(a.leasedAt) >= a.cfg.Lease || ev.At.Sub(ev.QuorumSeen) >= a.cfg.Lease || ev.QuorumSince.After(a.leasedAt)
}

// ErrUninstalled is returned by Run when natd stopped because it is being uninstalled:
// the node is to be cleaned up (Cleanup), not kept serving for a restart.
var ErrUninstalled = errors.New("natd is being uninstalled")

// uninstalling reports whether the DaemonSet natd runs from (--daemonset) is gone or
// being deleted, or its namespace is: `kubectl delete -k manifests/` deletes the
// namespace with everything in it, in no set order, so natd may be stopped while its
// DaemonSet still exists, and by then its ServiceAccount and Role may be gone too. What
// the watches last saw decides first; then the API is asked. When neither can say (the
// API is down), natd assumes a restart: keeping the node programmed for
// --restart-grace is the safe side.
func (a *Agent) uninstalling() bool {
	ns, name, ok := strings.Cut(a.cfg.DaemonSet, "/")
	if !ok || a.client == nil {
		return false
	}
	if obj, err := a.namespaces.Get(ns); err == nil && obj.DeletionTimestamp != nil {
		return true
	}
	if a.daemonSets != nil && a.daemonSets.HasSynced() {
		obj, exists, err := a.daemonSets.GetStore().GetByKey(ns + "/" + name)
		if err == nil && !exists {
			return true
		}
		if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.DeletionTimestamp != nil {
			return true
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ds, err := a.client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return true
	case err != nil:
		klog.InfoS("Cannot tell a restart from an uninstall; keeping the node programmed", "daemonSet", a.cfg.DaemonSet, "err", err)
		return false
	}
	return ds.DeletionTimestamp != nil
}

// keyReloadEvery is how often --gossip-key-file is read again: a Secret's new content
// reaches the pod's volume within about a minute, and natd follows within this.
const keyReloadEvery = 2 * time.Second

// reloadKeys applies the keys in --gossip-key-file: a key rotation needs no restart.
// A file natd cannot read changes nothing: the keys in use stay.
func (a *Agent) reloadKeys() {
	keys, err := gossipKeys(a.cfg)
	if err != nil {
		if err.Error() != a.keyErr {
			klog.ErrorS(err, "Cannot read the gossip keys; keeping the keys in use")
		}
		a.keyErr = err.Error()
		return
	}
	a.keyErr = ""
	changed, err := a.members.SetKeys(keys)
	if err != nil {
		klog.ErrorS(err, "Changing the gossip keys failed")
		return
	}
	a.metrics.GossipKeys.Set(float64(len(keys)))
	a.metrics.GossipPrimaryKey.Reset()
	a.metrics.GossipPrimaryKey.WithLabelValues(keyFingerprint(keys[0])).Set(1)
	if changed {
		fps := make([]string, len(keys))
		for i, k := range keys {
			fps[i] = keyFingerprint(k)
		}
		klog.InfoS("Gossip keys changed", "primary", fps[0], "keys", fps)
	}
}

// keepCNIChained installs natd-cni into the node's CNI chain now and again every
// resync period: a CNI that rewrites its configuration gets natd's entry back.
func (a *Agent) keepCNIChained(ctx context.Context, in cniplugin.Installer) {
	var lastErr string
	ensure := func() {
		changed, err := in.Ensure()
		if err != nil {
			if err.Error() != lastErr {
				// Without the plugin, a new pinned pod's first packets are classified
				// only once natd has seen the pod in the API.
				klog.ErrorS(err, "Cannot chain natd-cni onto the node's CNI configuration", "confDir", in.ConfDir)
			}
			lastErr = err.Error()
			return
		}
		lastErr = ""
		if changed {
			klog.InfoS("Chained natd-cni onto the node's CNI configuration", "confDir", in.ConfDir, "binDir", in.BinDir)
		}
	}
	ensure()
	every(ctx, a.cfg.ResyncPeriod, ensure)
}

// joinCluster starts gossip with what the kernel says this node holds, and joins the
// other nodes before the first sync: a natd that synced before it heard the others
// would think itself alone and claim every IP.
func (a *Agent) joinCluster(ctx context.Context) error {
	var nodeIP netip.Addr
	for !nodeIP.IsValid() {
		nodeIP = a.cfg.NodeIP
		if n, err := a.nodes.Get(a.cfg.NodeName); err == nil && !nodeIP.IsValid() {
			nodeIP = internalIP(n)
		}
		if nodeIP.IsValid() {
			break
		}
		klog.InfoS("Waiting for this node's IP in the API", "node", a.cfg.NodeName)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	claims, err := a.kernel.KernelClaims()
	if err != nil {
		return err
	}
	for _, c := range claims {
		a.held[c.IP] = Holding{Gen: c.Gen}
	}
	meta := election.Meta{Claims: claims}
	if len(claims) > 0 {
		// The natd before this one stopped for a restart and the kernel kept serving
		// these (their leases are current). This natd still says it is restarting, so
		// that the voters keep its claims, until its first plan with a quorum.
		a.resuming = true
		meta.RestartGrace = a.cfg.RestartGrace
		klog.InfoS("Found egress IPs held before this start", "claims", meta.Claims)
	}
	if a.members, err = a.newMembership(nodeIP); err != nil {
		return err
	}
	if err := a.members.SetLocal(meta, 0); err != nil {
		return err
	}
	defer a.startVoting()
	peers := a.peers(func(string) bool { return true })
	if len(peers) == 0 {
		return nil
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		// A few peers at a time, egress nodes first: memberlist exchanges full state
		// with every address it is given, and a thousand natds each joining through
		// all the others would make a million exchanges of the whole cluster's state.
		n, err := 0, error(nil)
		for i := 0; i < len(peers) && n == 0; i += joinFanout {
			n, err = a.members.Join(peers[i:min(i+joinFanout, len(peers))])
		}
		if n > 0 {
			klog.InfoS("Joined the natd cluster", "contacted", n, "peers", len(peers))
			return nil
		}
		if time.Now().After(deadline) {
			// The first natd of a cluster, or one cut off: it goes on alone, and
			// without a majority it holds nothing.
			klog.InfoS("No peer answered; going on alone", "peers", len(peers), "err", err)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// joinFanout is how many peers a join contacts at once.
const joinFanout = 3

// peers lists the gossip addresses of the other nodes (from the API) that want says:
// egress nodes first, each group in random order, so that joins and rejoins spread
// over the cluster and reach a node that is up whenever anything is held.
func (a *Agent) peers(want func(name string) bool) []string {
	nodes, _ := a.nodes.List(labels.Everything())
	var egress, others []string
	for _, n := range nodes {
		if ip := internalIP(n); n.Name != a.cfg.NodeName && ip.IsValid() && want(n.Name) {
			if isEligible(n) {
				egress = append(egress, election.PeerAddr(ip, a.cfg.GossipPort))
			} else {
				others = append(others, election.PeerAddr(ip, a.cfg.GossipPort))
			}
		}
	}
	rand.Shuffle(len(egress), func(i, j int) { egress[i], egress[j] = egress[j], egress[i] })
	rand.Shuffle(len(others), func(i, j int) { others[i], others[j] = others[j], others[i] })
	return append(egress, others...)
}

// rejoin contacts a few nodes that gossip does not see alive, so that a node that was
// away longer than memberlist keeps talking to the dead comes back, and partitions
// heal. A few a round: each one that is really gone (or runs no natd) costs a
// connection timeout.
func (a *Agent) rejoin() {
	// Members that are down and no longer Nodes in the API would count against the
	// majority for ever.
	nodes := map[string]bool{}
	if list, err := a.nodes.List(labels.Everything()); err == nil {
		for _, n := range list {
			nodes[n.Name] = true
		}
		a.members.Forget(func(name string) bool { return nodes[name] })
	}
	v := a.members.View()
	if peers := a.peers(func(name string) bool { return !v.Alive(name) }); len(peers) > 0 {
		if n, _ := a.members.Join(peers[:min(len(peers), joinFanout)]); n > 0 {
			klog.V(2).InfoS("Rejoined members", "contacted", n)
		}
	}
}

// exchangeState does a full state exchange (memberlist push/pull) with every voter in
// touch, so that a node that was cut off learns the claims it missed before it takes
// anything: only voters take IPs, and each tells its own claims first hand; a voter
// not in touch would only make the exchange wait for a connection timeout.
//
// The node counts as synced (stateSyncedAt) only once one round reached every voter in
// touch and, with itself, a majority of the voters. A round that reached fewer proves
// nothing: seen after a heal, a push/pull that failed (or a round begun in a moment no
// peer was in touch, which exchanged with nobody) let a node take back an IP whose new
// holder's claim it had not heard, and both served it. Rounds repeat, spaced out,
// until one is complete or this quorum ends (the next one starts its own).
func (a *Agent) exchangeState(quorumSince time.Time) {
	for wait := exchangeRetryFirst; ; wait = min(2*wait, exchangeRetryMax) {
		start := a.now()
		if a.exchangeRound() {
			a.mu.Lock()
			a.stateSyncedAt = later(a.stateSyncedAt, start)
			a.mu.Unlock()
			a.queue.Add(syncKey)
			return
		}
		select {
		case <-a.stopped:
			return
		case <-time.After(wait):
		}
		a.mu.Lock()
		same := a.quorumSince.Equal(quorumSince)
		a.mu.Unlock()
		if !same {
			return
		}
	}
}

// Spacing of state exchange rounds that fell short: the first retry comes soon (a
// flapping contact), later ones back off towards memberlist's stream timeout.
const (
	exchangeRetryFirst = 50 * time.Millisecond
	exchangeRetryMax   = 2 * time.Second
)

// exchangeRound runs one push/pull with each voter in touch, side by side, and reports
// whether it was complete (see exchangeState).
func (a *Agent) exchangeRound() bool {
	ev := a.members.Evidence()
	peers := a.peers(func(name string) bool { return ev.InTouch[name] })
	var wg sync.WaitGroup
	var contacted atomic.Int64
	for _, p := range peers {
		wg.Go(func() {
			if n, err := a.members.Join([]string{p}); n > 0 {
				contacted.Add(1)
			} else {
				klog.V(2).InfoS("State exchange failed", "peer", p, "err", err)
			}
		})
	}
	wg.Wait()
	reached := int(contacted.Load())
	if ev.IsVoter(a.cfg.NodeName) {
		reached++
	}
	// A node that is no voter takes nothing; its exchange is a courtesy.
	complete := int(contacted.Load()) == len(peers) && (!ev.IsVoter(a.cfg.NodeName) || 2*reached > len(ev.Voters))
	klog.V(2).InfoS("Exchanged state with voters", "contacted", contacted.Load(), "peers", len(peers), "complete", complete)
	return complete
}

// every calls fn every d until ctx ends.
func every(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// publishClaims gossips this node's claims whenever they change, until a broadcast of
// them is confirmed sent. It runs apart from the sync loop: a broadcast takes a few
// gossip rounds.
func (a *Agent) publishClaims(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.publish:
		}
		for ctx.Err() == nil {
			err := a.members.SetLocal(a.localMeta(0), time.Second)
			if err == nil {
				break
			}
			klog.V(2).InfoS("Claims not confirmed sent yet; sending them again", "err", err)
		}
	}
}

func (a *Agent) localMeta(grace time.Duration) election.Meta {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.resuming {
		grace = a.cfg.RestartGrace
	}
	return election.Meta{Draining: a.draining, RestartGrace: grace, Claims: claimsOf(a.held)}
}

// stopForRestart keeps this node's IPs served by the kernel for --restart-grace and
// tells the others to wait that long, then stops gossiping without leaving.
func (a *Agent) stopForRestart() {
	klog.InfoS("Stopping for a restart; the kernel keeps serving this node's egress IPs", "grace", a.cfg.RestartGrace)
	if err := a.kernel.HoldLeases(a.cfg.RestartGrace); err != nil {
		klog.ErrorS(err, "Extending leases failed")
	}
	if err := a.members.SetLocal(a.localMeta(a.cfg.RestartGrace), time.Second); err != nil {
		klog.ErrorS(err, "Announcing the restart failed")
	}
	if err := a.members.Shutdown(); err != nil {
		klog.InfoS("Stopping gossip failed", "err", err)
	}
}

// drain hands this node's IPs over: it stops being a candidate, the others take its IPs
// and claim them, and this node lets go of each once it is claimed. Then it leaves.
func (a *Agent) drain(ctx context.Context) {
	klog.InfoS("Draining: handing egress IPs over")
	a.mu.Lock()
	a.draining = true
	a.mu.Unlock()
	a.signalPublish()
	deadline := time.Now().Add(a.cfg.DrainTimeout)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		a.mu.Lock()
		n := len(a.held)
		a.mu.Unlock()
		if n == 0 {
			break
		}
		a.queue.Add(syncKey)
		time.Sleep(50 * time.Millisecond)
	}
	a.mu.Lock()
	left := len(a.held)
	a.mu.Unlock()
	klog.InfoS("Drained; leaving the cluster", "stillHeld", left)
	a.leave()
}

// leave tells the other members this node is gone and stops gossip. A leave that is
// not heard is only slower: the others find the node dead.
func (a *Agent) leave() {
	if err := a.members.Leave(time.Second); err != nil {
		klog.InfoS("Leaving the gossip cluster failed; the others will find this node dead", "err", err)
	}
	if err := a.members.Shutdown(); err != nil {
		klog.InfoS("Stopping gossip failed", "err", err)
	}
}

func (a *Agent) signalPublish() {
	select {
	case a.publish <- struct{}{}:
	default:
	}
}

func (a *Agent) processNext() bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	a.health.begin()
	defer a.health.end()
	err := a.process(key)
	if err != nil {
		klog.ErrorS(err, "Sync failed; retrying", "retries", a.queue.NumRequeues(key))
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

func (a *Agent) process(key string) error {
	if key != verifyKey {
		return a.Sync()
	}
	drifted, retryIn, err := a.kernel.Verify()
	if err != nil {
		return fmt.Errorf("verifying the kernel: %w", err)
	}
	if retryIn > 0 {
		a.queue.AddAfter(verifyKey, retryIn)
	}
	if !drifted {
		return nil
	}
	a.metrics.DriftRepairs.Inc()
	klog.InfoS("Repairing kernel state that someone else changed")
	return a.Sync()
}

// Sync converges the whole node to the listers' current view and the gossip view:
// plan, apply, publish.
func (a *Agent) Sync() error {
	start := a.now()
	err := a.sync()
	a.health.syncDone(err)
	a.metrics.observeSync(a.now().Sub(start), err)
	if err != nil && a.status != nil {
		a.status.observe(nil) // facts of a sync that failed are not facts
	}
	return err
}

func (a *Agent) sync() error {
	c, el, err := a.inputs()
	if err != nil {
		return err
	}
	plan, err := a.planner.Plan(c, el)
	if err != nil {
		return err
	}
	res, err := a.apply(plan)
	if err != nil {
		return err
	}
	a.publishPlan(c, el, plan, res)
	return nil
}

// inputs reads what a plan is made of: the listers and the gossip view.
func (a *Agent) inputs() (Cluster, Election, error) {
	var c Cluster
	var err error
	if c.Namespaces, err = a.namespaces.List(labels.Everything()); err != nil {
		return c, Election{}, err
	}
	c.PodsIn = func(ns string) []*podRecord {
		objs, _ := a.pods.ByIndex(cache.NamespaceIndex, ns) // the index exists: never fails
		return records(objs)
	}
	if c.Nodes, err = a.nodes.List(labels.Everything()); err != nil {
		return c, Election{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	el := Election{View: a.members.View(), Held: a.held, StateSyncedAt: a.stateSyncedAt, SeenGen: a.seenGen, Now: a.now()}
	if a.status != nil {
		el.SeenGen = maps.Clone(el.SeenGen)
		if el.SeenGen == nil {
			el.SeenGen = map[netip.Addr]uint32{}
		}
		for ip, g := range a.status.recordedGens() {
			el.SeenGen[ip] = election.LaterGen(el.SeenGen[ip], g)
		}
	}
	if len(a.held) > 0 && a.lapsed(el.View.Evidence) {
		// What this node held is no longer served (or may have been taken while its
		// quorum was broken): it is taken again only as a new takeover would be.
		el.Held = nil
	}
	if a.draining {
		self := el.View.Members[a.cfg.NodeName]
		self.Meta.Draining = true
		el.View.Members[a.cfg.NodeName] = self
	}
	return c, el, nil
}

// handoverRefresh is how often an unchanged handover is sent again: a successor that
// restarted, or missed a datagram, has it again within this long (and receivers drop
// one older than election.HandoverMaxAge).
const handoverRefresh = 10 * time.Second

// handoverShare caps what the handover's conntrack reads cost: the next read waits at
// least this many times as long as the last one took (5 % of a core). Reading costs
// about 4 µs an entry (47 ms at 10,000 entries, 376 ms at 100,000: BenchmarkBindings),
// so beyond ~12,000 entries the handover comes less often than --handover-interval.
const handoverShare = 20

// handOverEvery hands over every --handover-interval, or less often when conntrack is
// large (handoverShare).
func (a *Agent) handOverEvery(ctx context.Context) {
	for {
		wait := max(a.cfg.HandoverInterval, handoverShare*a.handOver())
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// handOver sends the NAT bindings of each held IP that a successor must continue (see
// dataplane.Binding) to every other node that may take the IP: when they changed, and
// every handoverRefresh. An IP whose connections all kept their ports has nothing to
// hand over and sends nothing (an empty handover once, if it had some before). It
// returns how long reading conntrack took.
func (a *Agent) handOver() time.Duration {
	a.mu.Lock()
	held := slices.Collect(maps.Keys(a.held))
	a.mu.Unlock()
	if a.handedOver == nil {
		a.handedOver = map[netip.Addr]sentHandover{}
	}
	for ip := range a.handedOver {
		if !slices.Contains(held, ip) {
			delete(a.handedOver, ip)
		}
	}
	if len(held) == 0 {
		return 0
	}
	start := time.Now()
	bindings, err := a.kernel.Bindings(held)
	took := time.Since(start)
	if err != nil {
		klog.V(2).InfoS("NAT bindings not read for the handover", "err", err)
		return took
	}
	now := a.now()
	byIP := map[netip.Addr][]dataplane.Binding{}
	for _, b := range bindings {
		byIP[b.Egress.Addr()] = append(byIP[b.Egress.Addr()], b)
	}
	var to []string
	for _, ip := range held {
		msg := dataplane.EncodeBindings(ip, byIP[ip])
		last, sent := a.handedOver[ip]
		empty := len(byIP[ip]) == 0
		switch {
		case !sent && empty:
			continue
		case sent && bytes.Equal(last.msg, msg) && (empty || now.Sub(last.at) < handoverRefresh):
			continue
		}
		if to == nil {
			to = a.successors()
		}
		if err := a.members.SendHandover(to, ip, msg); err != nil {
			klog.V(2).InfoS("Handover not sent", "ip", ip, "err", err)
			continue
		}
		a.handedOver[ip] = sentHandover{msg: msg, at: now}
	}
	return took
}

// successors are the other nodes that may hold egress IPs.
func (a *Agent) successors() []string {
	nodes, _ := a.nodes.List(labels.Everything())
	var out []string
	for _, n := range nodes {
		if n.Name != a.cfg.NodeName && isEligible(n) {
			out = append(out, n.Name)
		}
	}
	return out
}

// handedOverTo is what the previous holders handed over of the IPs plan takes.
func (a *Agent) handedOverTo(plan *Plan) []dataplane.Binding {
	a.mu.Lock()
	had := maps.Clone(a.held)
	a.mu.Unlock()
	var out []dataplane.Binding
	for ip := range plan.Held {
		if _, ok := had[ip]; ok {
			continue
		}
		h, ok := a.members.Handover(ip)
		if !ok {
			continue
		}
		got, bs, err := dataplane.DecodeBindings(h.Payload)
		if err != nil || got != ip {
			klog.InfoS("Ignoring a handover that cannot be read", "ip", ip, "from", h.From, "err", err)
			continue
		}
		out = append(out, bs...)
	}
	return out
}

// apply programs the kernel with the plan and, once that succeeded, makes the plan's
// holdings this node's own: what it claims, since when it sees a majority, the
// generations it has seen.
func (a *Agent) apply(plan *Plan) (dataplane.Result, error) {
	plan.State.Handover = a.handedOverTo(plan)
	res, err := a.kernel.Apply(plan.State)
	if err != nil {
		return res, fmt.Errorf("programming the kernel: %w", err)
	}
	a.mu.Lock()
	changed := !sameClaims(a.held, plan.Held)
	newQuorum := plan.Quorum && !plan.QuorumSince.Equal(a.quorumSince)
	rejoined := newQuorum && a.hadQuorum
	a.hadQuorum = a.hadQuorum || plan.Quorum
	a.held, a.quorumSince, a.seenGen = plan.Held, plan.QuorumSince, plan.SeenGen
	resumed := a.resuming && plan.Quorum
	if resumed {
		a.resuming = false
		changed = true // the claims stand: no longer restarting
	}
	if len(plan.Held) > 0 {
		// The plan was made with a quorum unbroken since the last renewal (else inputs
		// would have dropped what was held), and Apply leased its IPs.
		a.leasedAt = later(a.leasedAt, plan.EvidenceAt)
	}
	a.mu.Unlock()
	a.members.SetVoters(plan.Voters, len(plan.Held) > 0)
	if newQuorum {
		go a.exchangeState(plan.QuorumSince)
	}
	if rejoined && a.reconnectAPI != nil {
		// Back in touch after the quorum broke (cut off, stalled): new connections, not
		// ones TCP is still backing off on; the informers re-list as they reconnect.
		a.reconnectAPI()
	}
	if changed {
		a.signalPublish()
	}
	if plan.RetryAfter > 0 {
		a.queue.AddAfter(syncKey, plan.RetryAfter)
	}
	return res, nil
}

// publishPlan tells the others what this node did: its routes to gossip, metrics,
// logs, Events and the EgressIP status.
func (a *Agent) publishPlan(c Cluster, el Election, plan *Plan, res dataplane.Result) {
	if err := a.members.SetRoutes(plan.Routes); err != nil {
		klog.ErrorS(err, "Reporting routes to gossip failed")
	}
	// READY counts over the API's nodes where natd runs (gossip has met it there):
	// Windows nodes, or nodes a nodeSelector leaves out, are not waited for.
	apiNodes := map[string]bool{}
	for _, n := range c.Nodes {
		if _, ok := el.View.Members[n.Name]; ok {
			apiNodes[n.Name] = true
		}
	}
	// Speakers are the live voters: one of them, picked by hashing, speaks for what no
	// holder speaks for (rejected annotations, IPs nobody holds). Only voters can have
	// the quorum without which nothing is written.
	var alive, speakers []string
	for _, m := range el.View.Members {
		if m.Alive {
			alive = append(alive, m.Name)
			if apiNodes[m.Name] && slices.Contains(plan.Voters, m.Name) {
				speakers = append(speakers, m.Name)
			}
		}
	}
	sort.Strings(speakers)
	if !plan.Quorum {
		klog.V(2).InfoS("No quorum of voters in touch; holding no egress IPs", "alive", alive, "apiNodes", len(c.Nodes))
	}
	a.metrics.EgressIPsHeld.Set(float64(len(plan.Held)))
	a.metrics.MembersAlive.Set(float64(len(alive)))
	for _, ip := range res.Announced {
		if claimedByOther(el.View, ip) {
			a.metrics.Failovers.Inc()
		}
		klog.InfoS("Took over egress IP", "egressIP", ip, "generation", plan.Held[ip].Gen, "namespaces", plan.Namespaces[ip])
	}
	for _, ip := range res.Released {
		klog.InfoS("Released egress IP", "egressIP", ip, "newHolder", plan.Holders[ip])
	}
	if res.Rebuilt {
		klog.InfoS("Replaced nftables tables", "egressIPs", len(plan.State.Egress))
	}
	if res.Repinned > 0 {
		klog.InfoS("Deleted connections of pods whose pinning changed", "pods", res.Repinned)
	}
	klog.V(2).InfoS("Synced node", "egressIPs", len(plan.State.Egress), "held", len(plan.Held), "quorum", plan.Quorum)
	a.report(c.Namespaces, plan, speakers)
	// Without a majority this node's view may be wrong (it may be the one cut off): it
	// writes nothing then.
	if a.status != nil {
		if plan.Quorum {
			a.status.observe(statusFacts(c, plan, speakers, apiNodes, a.cfg.FailOpen))
		} else {
			a.status.observe(nil)
		}
	}
}

// claimedByOther reports whether another member's last gossip (alive or not) claims ip:
// taking it is then a failover, not a first assignment or a reclaim.
func claimedByOther(v election.View, ip netip.Addr) bool {
	for name, m := range v.Members {
		if name != v.Self && m.Claims(ip) {
			return true
		}
	}
	return false
}

func sameClaims(a, b map[netip.Addr]Holding) bool {
	if len(a) != len(b) {
		return false
	}
	for ip, h := range a {
		if g, ok := b[ip]; !ok || g.Gen != h.Gen {
			return false
		}
	}
	return true
}

// report emits a Warning Event for every newly rejected annotation. One node, chosen by
// hashing the namespace over the speakers, speaks for all, so users see one Event
// rather than one per node.
func (a *Agent) report(namespaces []*corev1.Namespace, plan *Plan, speakers []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	current := map[string]string{}
	for _, ns := range namespaces {
		aerr, rejected := plan.Rejected[ns.Name]
		if !rejected {
			continue
		}
		msg := aerr.Reason + ": " + aerr.Message
		current[ns.Name] = msg
		if a.reported[ns.Name] == msg {
			continue
		}
		klog.InfoS("Rejected egress annotation", "namespace", ns.Name, "reason", aerr.Reason, "message", aerr.Message)
		if a.recorder != nil && election.Pick(ns.Name, speakers) == a.cfg.NodeName {
			a.recorder.Event(namespaceRef(ns), corev1.EventTypeWarning, aerr.Reason, aerr.Message)
		}
	}
	a.reported = current
	warned := map[string]bool{}
	defer func() { a.hostNetWarned = warned }()
	for _, ns := range namespaces {
		for _, pod := range plan.HostNetworkPods[ns.Name] {
			key := ns.Name + "/" + pod
			warned[key] = true
			if a.hostNetWarned[key] {
				continue
			}
			klog.InfoS("Pod of a pinned namespace uses the host network and cannot be pinned", "namespace", ns.Name, "pod", pod)
			if a.recorder != nil { // the pod's own node: the only one that watches it
				a.recorder.Eventf(namespaceRef(ns), corev1.EventTypeWarning, "HostNetworkPodNotPinned",
					"pod %s uses the host network: its traffic leaves with its node's address, not the egress IP", pod)
			}
		}
	}
}

// namespaceRef places a Namespace's Events inside that namespace, where
// `kubectl get events -n NS` finds them.
func namespaceRef(ns *corev1.Namespace) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Namespace", APIVersion: "v1", Name: ns.Name, Namespace: ns.Name, UID: ns.UID}
}

// relevantChange reports whether an update changes anything the planner reads.
func relevantChange(old, cur any) bool {
	switch c := cur.(type) {
	case *podRecord:
		o, ok := old.(*podRecord)
		return !ok || o.ipv4 != c.ipv4 || o.nIPv4 != c.nIPv4 || o.ipv6 != c.ipv6 || o.hasIPv6 != c.hasIPv6 ||
			o.inert != c.inert || o.hostNet != c.hostNet ||
			o.terminating() != c.terminating()
	case *corev1.Namespace:
		o, ok := old.(*corev1.Namespace)
		return !ok || o.Annotations[AnnotationEgressIP] != c.Annotations[AnnotationEgressIP]
	case *corev1.Node:
		o, ok := old.(*corev1.Node)
		return !ok || o.Labels[LabelEgressNode] != c.Labels[LabelEgressNode] ||
			isReady(o) != isReady(c) || o.Spec.Unschedulable != c.Spec.Unschedulable ||
			!equality.Semantic.DeepEqual(o.Status.Addresses, c.Status.Addresses) ||
			!equality.Semantic.DeepEqual(o.Spec.PodCIDRs, c.Spec.PodCIDRs) ||
			(o.DeletionTimestamp == nil) != (c.DeletionTimestamp == nil)
	}
	return true
}

func records(objs []any) []*podRecord {
	out := make([]*podRecord, 0, len(objs))
	for _, o := range objs {
		if r, ok := o.(*podRecord); ok {
			out = append(out, r)
		}
	}
	return out
}

// slimObject drops what natd never reads from cached objects.
func slimObject(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return recordOf(o)
	case *corev1.Node:
		o.ManagedFields = nil
		o.Status.Images = nil
		return o, nil
	case *corev1.Namespace:
		o.ManagedFields = nil
		return o, nil
	}
	return obj, nil
}

var errNotReady = errors.New("first sync has not completed")

// Handler serves /metrics, /healthz (liveness: the worker and the lease renewal are
// not stuck) and /readyz (synced, healthy, leases renewed).
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(a.metrics.Registry, promhttp.HandlerOpts{}))
	probe := func(check func() error) http.HandlerFunc {
		return func(w http.ResponseWriter, _ *http.Request) {
			if err := check(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ok\n"))
		}
	}
	mux.HandleFunc("/healthz", probe(a.health.live))
	mux.HandleFunc("/readyz", probe(a.health.ready))
	if a.cfg.Profiling {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
