package natd

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/dataplane"
)

// Kernel applies a node state to the kernel; dataplane.Dataplane implements it.
type Kernel interface {
	Apply(dataplane.State) (dataplane.Result, error)
}

// podNodeIndex indexes pods by spec.nodeName, to find this node's pods without a scan.
const podNodeIndex = "nodeName"

// syncKey is the only key in the queue: every event leads to one sync of the whole node.
const syncKey = "node"

// Agent is natd on one node: informers feed a queue, one worker converges the kernel.
type Agent struct {
	cfg      *Config
	planner  *Planner
	kernel   Kernel
	recorder record.EventRecorder
	metrics  *Metrics

	factory    informers.SharedInformerFactory
	namespaces corelisters.NamespaceLister
	pods       cache.Indexer // of *podRecord, by namespace and by node
	nodes      corelisters.NodeLister
	queue      workqueue.TypedRateLimitingInterface[string]

	mu       sync.Mutex
	reported map[string]string // namespace -> last rejection reported, so events are not repeated
	held     map[netip.Addr]bool
}

// NewAgent wires an agent. The recorder may be nil (no Events).
func NewAgent(cfg *Config, client kubernetes.Interface, kernel Kernel, holders HolderChooser,
	recorder record.EventRecorder, metrics *Metrics) *Agent {
	// Only the fields the planner reads are kept: at 50k pods, full Pod objects would
	// cost the agent hundreds of megabytes. Pods become podRecords, so the pod informer
	// is read through its indexer, never through a typed Pod lister.
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(slimObject))
	a := &Agent{
		cfg:        cfg,
		planner:    &Planner{Config: cfg, Holders: holders},
		kernel:     kernel,
		recorder:   recorder,
		metrics:    metrics,
		factory:    factory,
		namespaces: factory.Core().V1().Namespaces().Lister(),
		nodes:      factory.Core().V1().Nodes().Lister(),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "natd"}),
		reported: map[string]string{},
		held:     map[netip.Addr]bool{},
	}
	podInformer := factory.Core().V1().Pods().Informer()
	if err := podInformer.AddIndexers(cache.Indexers{podNodeIndex: func(obj any) ([]string, error) {
		if p, ok := obj.(*podRecord); ok && p.nodeName != "" {
			return []string{p.nodeName}, nil
		}
		return nil, nil
	}}); err != nil {
		panic(err) // only fails once the informer has started
	}
	a.pods = podInformer.GetIndexer()
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

// Run syncs until ctx ends. It waits for the caches first: a sync from a partial view
// would unpin namespaces it has not seen yet.
func (a *Agent) Run(ctx context.Context) error {
	defer a.queue.ShutDown()
	a.factory.Start(ctx.Done())
	defer a.factory.Shutdown()
	klog.InfoS("Waiting for informer caches")
	for typ, ok := range a.factory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("cache for %v did not sync", typ)
		}
	}
	klog.InfoS("Informer caches synced")
	a.queue.Add(syncKey)
	go func() {
		t := time.NewTicker(a.cfg.ResyncPeriod)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				a.queue.Add(syncKey)
			}
		}
	}()
	go func() {
		<-ctx.Done()
		a.queue.ShutDown()
	}()
	for a.processNext(ctx) {
	}
	return nil
}

func (a *Agent) processNext(ctx context.Context) bool {
	key, quit := a.queue.Get()
	if quit {
		return false
	}
	defer a.queue.Done(key)
	if err := a.Sync(ctx); err != nil {
		klog.ErrorS(err, "Sync failed; retrying", "retries", a.queue.NumRequeues(key))
		a.queue.AddRateLimited(key)
		return true
	}
	a.queue.Forget(key)
	return true
}

// Sync converges the whole node to the listers' current view.
func (a *Agent) Sync(ctx context.Context) error {
	start := time.Now()
	err := a.sync()
	a.metrics.observeSync(time.Since(start), err)
	return err
}

func (a *Agent) sync() error {
	var c Cluster
	var err error
	if c.Namespaces, err = a.namespaces.List(labels.Everything()); err != nil {
		return err
	}
	c.PodsIn = func(ns string) []*podRecord {
		objs, _ := a.pods.ByIndex(cache.NamespaceIndex, ns) // the index exists: never fails
		return records(objs)
	}
	local, err := a.pods.ByIndex(podNodeIndex, a.cfg.NodeName)
	if err != nil {
		return err
	}
	c.LocalPods = records(local)
	if c.Nodes, err = a.nodes.List(labels.Everything()); err != nil {
		return err
	}
	plan, err := a.planner.Plan(c)
	if err != nil {
		return err
	}
	res, err := a.kernel.Apply(plan.State)
	if err != nil {
		return fmt.Errorf("programming the kernel: %w", err)
	}
	held := 0
	for _, e := range plan.State.Egress {
		if e.Local {
			held++
		}
	}
	a.metrics.EgressIPsHeld.Set(float64(held))
	for _, ip := range res.Announced {
		klog.InfoS("Took over egress IP", "egressIP", ip, "namespaces", plan.Namespaces[ip])
	}
	for _, ip := range res.Released {
		klog.InfoS("Released egress IP", "egressIP", ip)
	}
	if res.Rebuilt {
		klog.InfoS("Replaced nftables table", "egressIPs", len(plan.State.Egress))
	}
	klog.V(2).InfoS("Synced node", "egressIPs", len(plan.State.Egress), "held", held)
	a.report(c.Namespaces, plan)
	return nil
}

// report emits a Warning Event for every newly rejected annotation. One node, chosen by
// hashing the namespace over the Ready nodes, speaks for all, so users see one Event
// rather than one per node.
func (a *Agent) report(namespaces []*corev1.Namespace, plan *Plan) {
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
		if a.recorder != nil && election.Pick(ns.Name, plan.ReadyNodes) == a.cfg.NodeName {
			a.recorder.Event(namespaceRef(ns), corev1.EventTypeWarning, aerr.Reason, aerr.Message)
		}
	}
	a.reported = current
}

// namespaceRef places a Namespace's Events inside that namespace, where
// `kubectl get events -n NS` finds them.
// relevantChange reports whether an update changes anything the planner reads.
func relevantChange(old, cur any) bool {
	switch c := cur.(type) {
	case *podRecord:
		o, ok := old.(*podRecord)
		return !ok || o.ipv4 != c.ipv4 || o.nIPv4 != c.nIPv4 || o.inert != c.inert || o.nodeName != c.nodeName
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

func namespaceRef(ns *corev1.Namespace) *corev1.ObjectReference {
	return &corev1.ObjectReference{Kind: "Namespace", APIVersion: "v1", Name: ns.Name, Namespace: ns.Name, UID: ns.UID}
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
