package natd

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// health is what the agent can prove about itself: its worker is not stuck on one
// item, its syncs succeed, and its leases are being renewed. A holder renews its leases
// only while it is healthy, so a wedged agent stops serving by itself within
// wedgeBound + --lease; liveness fails on a worker stuck for livenessBound, so that the
// kubelet restarts it.
type health struct {
	mu  sync.Mutex
	now func() time.Time

	busySince    time.Time // zero while the worker waits for work
	synced       bool      // a sync has succeeded once
	failingSince time.Time // zero while the last sync succeeded
	renewedAt    time.Time // the renewal loop last ran to its end (renewed or decided not to)
	renewErr     error     // the last lease renewal's error
}

// Bounds of health. wedgeBound is far above a sync's duration (≈150 ms at 50k pinned
// pods) and short next to failure detection: a planned move's new holder may already
// serve while a wedged old one has not let go.
const (
	wedgeBound      = time.Second
	syncFailBound   = 2 * time.Second
	livenessBound   = 10 * time.Second
	renewStallBound = 10 * time.Second
)

var (
	errWedged        = errors.New("the sync loop is stuck")
	errSyncsFailing  = errors.New("syncs have been failing")
	errNoMajority    = errors.New("no majority of the voters in touch")
	errLeaseLapsed   = errors.New("the leases ran out or the quorum broke since they were renewed")
	errRenewalStuck  = errors.New("the lease renewal loop is stuck")
	errRenewalFailed = errors.New("renewing leases failed")
)

func newHealth(now func() time.Time) *health {
	return &health{now: now, renewedAt: now()}
}

// begin and end bracket one work item of the worker.
func (h *health) begin() {
	h.mu.Lock()
	h.busySince = h.now()
	h.mu.Unlock()
}

func (h *health) end() {
	h.mu.Lock()
	h.busySince = time.Time{}
	h.mu.Unlock()
}

// syncDone records a sync's outcome.
func (h *health) syncDone(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case err == nil:
		h.synced, h.failingSince = true, time.Time{}
	case h.failingSince.IsZero():
		h.failingSince = h.now()
	}
}

// renewDone records the end of one turn of the renewal loop.
func (h *health) renewDone(err error) {
	h.mu.Lock()
	h.renewedAt, h.renewErr = h.now(), err
	h.mu.Unlock()
}

// mayServe says why this node must not renew its leases now (nil: it may).
func (h *health) mayServe() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	if !h.busySince.IsZero() && now.Sub(h.busySince) > wedgeBound {
		return fmt.Errorf("%w for %s", errWedged, now.Sub(h.busySince).Round(time.Millisecond))
	}
	if !h.failingSince.IsZero() && now.Sub(h.failingSince) > syncFailBound {
		return fmt.Errorf("%w for %s", errSyncsFailing, now.Sub(h.failingSince).Round(time.Millisecond))
	}
	return nil
}

// live is the liveness probe: nil unless the worker or the renewal loop is stuck.
func (h *health) live() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	if !h.busySince.IsZero() && now.Sub(h.busySince) > livenessBound {
		return fmt.Errorf("%w for %s", errWedged, now.Sub(h.busySince).Round(time.Second))
	}
	if now.Sub(h.renewedAt) > renewStallBound {
		return fmt.Errorf("%w for %s", errRenewalStuck, now.Sub(h.renewedAt).Round(time.Second))
	}
	return nil
}

// ready is the readiness probe: the node has synced, is not wedged or failing, and
// its leases are renewed.
func (h *health) ready() error {
	if err := h.mayServe(); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.synced {
		return errNotReady
	}
	if h.renewErr != nil {
		return fmt.Errorf("%w: %w", errRenewalFailed, h.renewErr)
	}
	return nil
}
