package natd

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	egressv1alpha1 "natd.dev/natd/natd/apis/egress/v1alpha1"
	"natd.dev/natd/natd/client/clientset/versioned"
	"natd.dev/natd/natd/client/informers/externalversions"
	egresslisters "natd.dev/natd/natd/client/listers/egress/v1alpha1"
)

// Condition types and reasons of an EgressIP's status.
const (
	ConditionAssigned = "Assigned"
	ConditionReady    = "Ready"

	ReasonHeld           = "Held"
	ReasonNoEligibleNode = "NoEligibleNode"
	ReasonProgrammed     = "Programmed"
	ReasonProgramming    = "Programming"
	ReasonNotHeld        = "NotHeld"
)

// Reasons of the Events natd records about holders.
const (
	EventAssigned   = "EgressIPAssigned"
	EventFailover   = "EgressIPFailover"
	EventUnassigned = "EgressIPUnassigned"
)

// ObjectName is the name of the EgressIP object of ip (IPv6: ':' becomes '-').
func ObjectName(ip netip.Addr) string { return strings.ReplaceAll(ip.String(), ":", "-") }

// ipFacts is what one sync found about an egress IP in use.
type ipFacts struct {
	IP         netip.Addr
	Namespaces []string
	// Holder is the node assigned to hold the IP ("" when none may); HeldHere and Gen
	// say whether this node holds it now, and with which claim.
	Holder   string
	HeldHere bool
	Gen      uint32
	// Rejected: every namespace naming the IP was refused (outside the egress CIDRs,
	// a node's IP, ...); nobody holds it.
	Rejected *AnnotationError
	FailOpen bool
}

// statusSnapshot is what the latest sync with a majority in sight knew about the
// cluster: the status writer works from it, never from half-computed state.
type statusSnapshot struct {
	IPs map[string]ipFacts // by object name
	// Speakers are the live natd agents (sorted): one of them, picked by hashing the
	// object's name, writes for IPs that nobody holds.
	Speakers []string
	// Nodes are the API's nodes: READY counts over them.
	Nodes         map[string]bool
	NamespaceUIDs map[string]types.UID
}

// statusWriter keeps the EgressIP objects in line with the cluster: one object per IP
// in use, written by the IP's holder (or, for an IP nobody holds, by one agent chosen by
// hashing), deleted when no namespace names the IP any more. It runs beside the sync
// loop, so a slow or absent API server never delays programming the kernel; whatever
// it could not write it retries, and Events of holder changes are recorded with the
// write that shows them, so both catch up after an API outage.
type statusWriter struct {
	node     string
	client   versioned.Interface
	factory  externalversions.SharedInformerFactory
	lister   egresslisters.EgressIPLister
	synced   cache.InformerSynced
	view     func() election.View
	recorder record.EventRecorder
	queue    workqueue.TypedRateLimitingInterface[string]
	now      func() time.Time

	mu   sync.Mutex
	snap *statusSnapshot

	// unusedSince is when the worker first found an object's IP unused; it deletes the
	// object only after deleteGrace of that, so a speaker whose informers lag behind
	// the holder's does not delete an object the holder has just created.
	unusedSince map[string]time.Time
}

// deleteGrace is how long an IP must stay unused before its object is deleted.
const deleteGrace = 5 * time.Second

func newStatusWriter(node string, client versioned.Interface, recorder record.EventRecorder) *statusWriter {
	factory := externalversions.NewSharedInformerFactory(client, 0)
	inf := factory.Egress().V1alpha1().EgressIPs()
	w := &statusWriter{
		node: node, client: client, factory: factory, lister: inf.Lister(), synced: inf.Informer().HasSynced,
		recorder: recorder, now: time.Now, unusedSince: map[string]time.Time{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "natd-status"}),
	}
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			w.queue.Add(key)
		}
	}
	// Someone else's edit or delete is repaired like drift.
	if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, cur any) { enqueue(cur) }, DeleteFunc: enqueue,
	}); err != nil {
		panic(err) // only fails on a stopped informer, impossible before Start
	}
	return w
}

// run writes until ctx ends. It waits for its own cache only: without the CRD
// installed natd still programs the kernel, and says so in its log.
func (w *statusWriter) run(ctx context.Context, view func() election.View, routesChanged <-chan struct{}, resync time.Duration) {
	defer w.queue.ShutDown()
	w.view = view
	w.factory.Start(ctx.Done())
	defer w.factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), w.synced) {
		return
	}
	klog.InfoS("EgressIP cache synced")
	go func() {
		for w.processNext(ctx) {
		}
	}()
	w.enqueueAll()
	go every(ctx, resync, w.enqueueAll)
	for {
		select {
		case <-ctx.Done():
			return
		case <-routesChanged:
			// READY of the IPs this node holds may have changed. A short delay folds
			// the reports of a whole failover into one write.
			w.mu.Lock()
			if w.snap != nil {
				for name, f := range w.snap.IPs {
					if f.HeldHere {
						w.queue.AddAfter(name, 200*time.Millisecond)
					}
				}
			}
			w.mu.Unlock()
		}
	}
}

// observe takes the facts of a sync; objects whose facts changed are written again.
// nil (the node lost sight of the majority) stops all writing until the next facts: a
// node cut off from the others must not rewrite what they now know better.
func (w *statusWriter) observe(s *statusSnapshot) {
	w.mu.Lock()
	old := w.snap
	w.snap = s
	w.mu.Unlock()
	if s == nil {
		return
	}
	if old == nil || !slices.Equal(old.Speakers, s.Speakers) || len(old.Nodes) != len(s.Nodes) {
		w.enqueueAll()
		return
	}
	for name, f := range s.IPs {
		// reflect, not equality.Semantic: that one refuses netip.Addr's unexported fields.
		if o, ok := old.IPs[name]; !ok || !reflect.DeepEqual(o, f) {
			w.queue.Add(name)
		}
	}
	for name := range old.IPs {
		if _, ok := s.IPs[name]; !ok {
			w.queue.Add(name)
		}
	}
}

func (w *statusWriter) enqueueAll() {
	w.mu.Lock()
	if w.snap != nil {
		for name := range w.snap.IPs {
			w.queue.Add(name)
		}
	}
	w.mu.Unlock()
	objs, _ := w.lister.List(labels.Everything())
	for _, o := range objs {
		w.queue.Add(o.Name)
	}
}

func (w *statusWriter) processNext(ctx context.Context) bool {
	name, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(name)
	if err := w.write(ctx, name); err != nil {
		klog.V(2).InfoS("Writing EgressIP failed; retrying", "egressIP", name, "err", err, "retries", w.queue.NumRequeues(name))
		w.queue.AddRateLimited(name)
		return true
	}
	w.queue.Forget(name)
	return true
}

// recordedGens returns the claim generation each EgressIP's status records: a new claim
// must beat it even when every node that knew the old claim has restarted since, or
// the status (which keeps the newest generation) would refuse the new holder.
func (w *statusWriter) recordedGens() map[netip.Addr]uint32 {
	out := map[netip.Addr]uint32{}
	objs, _ := w.lister.List(labels.Everything())
	for _, o := range objs {
		ip, err := netip.ParseAddr(o.Spec.IP)
		if err == nil && o.Status.ClaimGeneration > 0 && o.Status.ClaimGeneration <= math.MaxUint32 {
			out[ip] = uint32(o.Status.ClaimGeneration)
		}
	}
	return out
}

// write brings one object in line, if this node is its writer.
func (w *statusWriter) write(ctx context.Context, name string) error {
	w.mu.Lock()
	s := w.snap
	w.mu.Unlock()
	if s == nil {
		return nil // no sync with a majority yet: nothing known worth writing
	}
	f, inUse := s.IPs[name]
	if inUse {
		delete(w.unusedSince, name)
	}
	switch {
	case inUse && f.HeldHere && f.Holder == w.node:
	case inUse && f.Holder == "" && election.Pick(name, s.Speakers) == w.node:
		if claimed(w.view(), f.IP) {
			// This node's facts lag: a live node already claims the IP and will
			// write; saying "no holder" now would only flap the status.
			return nil
		}
	case !inUse && election.Pick(name, s.Speakers) == w.node:
	default:
		return nil // another node's to write
	}
	api := w.client.EgressV1alpha1().EgressIPs()
	cur, err := w.lister.Get(name)
	if apierrors.IsNotFound(err) {
		cur = nil
	} else if err != nil {
		return err
	}
	if !inUse {
		if cur == nil {
			delete(w.unusedSince, name)
			return nil
		}
		since, ok := w.unusedSince[name]
		if !ok {
			since = w.now()
			w.unusedSince[name] = since
		}
		if wait := deleteGrace - w.now().Sub(since); wait > 0 {
			w.queue.AddAfter(name, wait)
			return nil
		}
		klog.InfoS("Deleting EgressIP no namespace uses", "egressIP", name)
		err := api.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{
			UID: &cur.UID, ResourceVersion: &cur.ResourceVersion}})
		if apierrors.IsNotFound(err) {
			err = nil
		}
		if err == nil {
			delete(w.unusedSince, name)
		}
		return err
	}
	if cur == nil {
		obj := &egressv1alpha1.EgressIP{ObjectMeta: metav1.ObjectMeta{Name: name,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "natd"}},
			Spec: egressv1alpha1.EgressIPSpec{IP: f.IP.String()}}
		if cur, err = api.Create(ctx, obj, metav1.CreateOptions{}); err != nil {
			return err
		}
		klog.InfoS("Created EgressIP", "egressIP", name)
	}
	if f.HeldHere && cur.Status.ClaimGeneration > 0 && cur.Status.ClaimGeneration <= math.MaxUint32 &&
		election.NewerGen(f.Gen, uint32(cur.Status.ClaimGeneration)) {
		return nil // a newer holder has written: this node's facts are behind
	}
	ready := 0
	if f.HeldHere {
		ready = readyNodes(w.view(), f.IP, f.Gen, s.Nodes)
	}
	status := desiredStatus(cur.Status, f, w.node, ready, len(s.Nodes), metav1.NewTime(w.now()))
	if equality.Semantic.DeepEqual(status, cur.Status) {
		return nil
	}
	next := cur.DeepCopy()
	next.Status = status
	if _, err := api.UpdateStatus(ctx, next, metav1.UpdateOptions{}); err != nil {
		return err // a conflict means another writer was first: the retry reads again
	}
	w.recordHolderChange(next, cur.Status, status, f, s.NamespaceUIDs)
	return nil
}

// claimed reports whether a live member gossips a claim on ip.
func claimed(v election.View, ip netip.Addr) bool {
	for _, m := range v.Members {
		if m.Alive && m.Claims(ip) {
			return true
		}
	}
	return false
}

// readyNodes counts the API's nodes whose natd is alive and routes ip to the claim gen.
func readyNodes(v election.View, ip netip.Addr, gen uint32, nodes map[string]bool) int {
	n := 0
	for name, m := range v.Members {
		if nodes[name] && (m.Alive || name == v.Self) && m.Routes != nil && m.Routes.Has(ip, gen) {
			n++
		}
	}
	return n
}

// desiredStatus is the status the writer wants, from the object's current status and
// what it knows now. Condition transition times move only when a condition changes.
func desiredStatus(old egressv1alpha1.EgressIPStatus, f ipFacts, self string, ready, total int, now metav1.Time) egressv1alpha1.EgressIPStatus {
	s := *old.DeepCopy()
	s.Namespaces = slices.Clone(f.Namespaces)
	s.NamespaceList = strings.Join(f.Namespaces, ",")
	s.Ready = fmt.Sprintf("%d/%d", ready, total)
	holder := ""
	s.ClaimGeneration = 0
	if f.HeldHere {
		holder = self
		s.ClaimGeneration = int64(f.Gen)
	}
	if holder != old.Node {
		last := old.Node
		if last == "" {
			last = old.PreviousNode
		}
		if holder != "" && last != "" && last != holder {
			s.Failovers++
			s.LastFailoverTime = &now
		}
		if old.Node != "" {
			s.PreviousNode = old.Node
		}
		s.Node = holder
	}
	assigned := metav1.Condition{Type: ConditionAssigned, Status: metav1.ConditionTrue, Reason: ReasonHeld,
		Message: fmt.Sprintf("held by node %s (claim generation %d)", holder, f.Gen)}
	readyCond := metav1.Condition{Type: ConditionReady, Status: metav1.ConditionFalse, Reason: ReasonProgramming,
		Message: fmt.Sprintf("%d of %d nodes route the IP's traffic to %s", ready, total, holder)}
	fate := "dropped (fail closed)"
	if f.FailOpen {
		fate = "sent with the nodes' own IPs (fail open)"
	}
	switch {
	case f.Rejected != nil:
		assigned = metav1.Condition{Type: ConditionAssigned, Status: metav1.ConditionFalse, Reason: f.Rejected.Reason,
			Message: f.Rejected.Message + "; the namespaces naming it are not pinned: their traffic leaves the normal way"}
	case holder == "":
		assigned = metav1.Condition{Type: ConditionAssigned, Status: metav1.ConditionFalse, Reason: ReasonNoEligibleNode,
			Message: fmt.Sprintf("no live node labelled %s=true can hold it; the pinned namespaces' outside traffic is %s", LabelEgressNode, fate)}
	case ready == total:
		readyCond = metav1.Condition{Type: ConditionReady, Status: metav1.ConditionTrue, Reason: ReasonProgrammed,
			Message: fmt.Sprintf("all %d nodes route the IP's traffic to %s", total, holder)}
	}
	if holder == "" {
		readyCond = metav1.Condition{Type: ConditionReady, Status: metav1.ConditionFalse, Reason: ReasonNotHeld,
			Message: "no node holds the IP"}
	}
	for _, c := range []metav1.Condition{assigned, readyCond} {
		c.LastTransitionTime = now
		meta.SetStatusCondition(&s.Conditions, c)
	}
	return s
}

// recordHolderChange records Events for a holder change that a status write made
// visible: on the EgressIP, and on each namespace pinned to it.
func (w *statusWriter) recordHolderChange(obj *egressv1alpha1.EgressIP, old, cur egressv1alpha1.EgressIPStatus, f ipFacts, uids map[string]types.UID) {
	if w.recorder == nil || old.Node == cur.Node {
		return
	}
	eventType, reason := corev1.EventTypeNormal, EventAssigned
	var msg string
	switch {
	case cur.Node == "" && f.Rejected == nil:
		eventType, reason = corev1.EventTypeWarning, EventUnassigned
		msg = fmt.Sprintf("egress IP %s: no node can hold it any more (last held by %s)", f.IP, old.Node)
	case cur.Node == "":
		return // a rejected annotation: its own Warning says why
	case cur.Failovers != old.Failovers:
		reason = EventFailover
		msg = fmt.Sprintf("egress IP %s moved from node %s to node %s", f.IP, cur.PreviousNode, cur.Node)
	default:
		msg = fmt.Sprintf("egress IP %s is held by node %s", f.IP, cur.Node)
	}
	ref := &corev1.ObjectReference{Kind: "EgressIP", APIVersion: egressv1alpha1.SchemeGroupVersion.String(),
		Name: obj.Name, UID: obj.UID}
	w.recorder.Event(ref, eventType, reason, msg)
	for _, ns := range f.Namespaces {
		w.recorder.Event(&corev1.ObjectReference{Kind: "Namespace", APIVersion: "v1", Name: ns, Namespace: ns, UID: uids[ns]},
			eventType, reason, msg)
	}
}

// statusFacts gathers what the status writer needs from one sync's plan; apiNodes are
// the names of the API's nodes.
func statusFacts(c Cluster, plan *Plan, speakers []string, apiNodes map[string]bool, failOpen bool) *statusSnapshot {
	s := &statusSnapshot{IPs: map[string]ipFacts{}, Speakers: speakers, Nodes: apiNodes,
		NamespaceUIDs: map[string]types.UID{}}
	for _, ns := range c.Namespaces {
		if _, ok := ns.Annotations[AnnotationEgressIP]; ok {
			s.NamespaceUIDs[ns.Name] = ns.UID
		}
	}
	for ip, namespaces := range plan.Namespaces {
		f := ipFacts{IP: ip, Namespaces: namespaces, Holder: plan.Holders[ip], FailOpen: failOpen}
		if h, ok := plan.Held[ip]; ok {
			f.HeldHere, f.Gen = true, h.Gen
		}
		s.IPs[ObjectName(ip)] = f
	}
	for ns, aerr := range plan.Rejected {
		if !aerr.IP.IsValid() {
			continue // not an address: no object can be named after it; the Event says it all
		}
		name := ObjectName(aerr.IP)
		f := s.IPs[name]
		f.IP, f.Rejected, f.FailOpen = aerr.IP, aerr, failOpen
		f.Namespaces = append(f.Namespaces, ns)
		slices.Sort(f.Namespaces)
		s.IPs[name] = f
	}
	return s
}
