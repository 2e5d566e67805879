package natd

import (
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// --realtime-priority reaches every thread natd has, and the threads the Go runtime
// starts afterwards (needs root, as natd does).
func TestSetRealtimeReachesEveryThread(t *testing.T) {
	t.Cleanup(func() {
		eachThread(func(tid int) error { //nolint:errcheck // back to the normal class, best effort
			return unix.SchedSetAttr(tid, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_NORMAL}, 0)
		})
	})
	if err := setRealtime(3); err != nil {
		t.Fatal(err)
	}
	// Goroutines blocked in system calls make the runtime start threads of its own.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { unix.Nanosleep(&unix.Timespec{Nsec: int64(50 * time.Millisecond)}, nil) }) //nolint:errcheck // a pause
	}
	wg.Wait()
	n := 0
	if err := eachThread(func(tid int) error {
		n++
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			return err
		}
		if a.Policy != unix.SCHED_RR || a.Priority != 3 {
			t.Errorf("thread %d: policy %d priority %d; want round robin (%d), priority 3", tid, a.Policy, a.Priority, unix.SCHED_RR)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n < 3 {
		t.Errorf("only %d threads checked", n)
	}
	if err := setRealtime(0); err != nil {
		t.Errorf("setRealtime(0) = %v; want nothing done", err)
	}
}
