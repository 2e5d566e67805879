package natd

import (
	"flag"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// nonBlockingLog hands natd's log lines to a goroutine that writes them out, so that no
// caller ever waits for the output. klog writes each line while holding its lock, and
// a write to stderr waits when the reader (a container runtime's log pipe, a file on a
// disk busy committing its journal) is slow: every goroutine that logs then waits
// behind it, the heartbeat loop and the lease renewal among them. In the lab's soak
// the three agents' heartbeat loops, at real-time priority, all stopped for ~170 ms
// at once while a build wrote to the disk their logs were on, and the holder gave its
// IP up. Lines beyond the buffer are dropped, and how many is said once output flows.
type nonBlockingLog struct {
	out     io.Writer
	lines   chan []byte
	dropped atomic.Uint64
	pending atomic.Int64 // lines queued and not yet written
}

// logBufferLines is how many lines may wait for output: a few seconds of natd's most
// talkative level.
const logBufferLines = 8192

func newNonBlockingLog(out io.Writer) *nonBlockingLog {
	l := &nonBlockingLog{out: out, lines: make(chan []byte, logBufferLines)}
	go l.run()
	return l
}

// Write queues a copy of p (klog reuses its buffer) and never waits.
func (l *nonBlockingLog) Write(p []byte) (int, error) {
	l.pending.Add(1)
	select {
	case l.lines <- append([]byte(nil), p...):
	default:
		l.pending.Add(-1)
		l.dropped.Add(1)
	}
	return len(p), nil
}

func (l *nonBlockingLog) run() {
	for b := range l.lines {
		if n := l.dropped.Swap(0); n > 0 {
			fmt.Fprintf(l.out, "natd: %d log lines dropped: the log output was too slow\n", n) //nolint:errcheck // nowhere else to say it
		}
		l.out.Write(b) //nolint:errcheck // nowhere else to say it
		l.pending.Add(-1)
	}
}

// drain waits up to d for the queued lines to be written.
func (l *nonBlockingLog) drain(d time.Duration) {
	for deadline := time.Now().Add(d); l.pending.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
}

// LogWithoutBlocking makes klog's output to stderr (its default) non-blocking; fs holds
// klog's flags, parsed. It returns what to call before exiting, so that the last lines
// are written. With --log_file, --log_dir or --logtostderr=false, klog is left as set.
func LogWithoutBlocking(fs *flag.FlagSet) (drain func()) {
	flagIs := func(name, value string) bool {
		f := fs.Lookup(name)
		return f != nil && f.Value.String() == value
	}
	if !flagIs("logtostderr", "true") || !flagIs("log_file", "") || !flagIs("log_dir", "") {
		return func() {}
	}
	l := newNonBlockingLog(os.Stderr)
	// Every line to l once: not to stderr directly (only fatal ones, which end natd),
	// not once per lower severity.
	for name, value := range map[string]string{"one_output": "true", "stderrthreshold": "FATAL"} {
		if err := fs.Set(name, value); err != nil {
			return func() {}
		}
	}
	klog.SetOutput(l)
	klog.LogToStderr(false)
	return func() { l.drain(time.Second) }
}
