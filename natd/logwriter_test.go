package natd

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// blockedWriter takes nothing until released, as a log pipe nobody reads.
type blockedWriter struct {
	release chan struct{}
	buf     bytes.Buffer
}

func (w *blockedWriter) Write(p []byte) (int, error) {
	<-w.release
	return w.buf.Write(p)
}

// A log output that stops taking lines never holds a caller up; what fit in the buffer
// comes out in order once it flows again, with the number of lines dropped.
func TestLogWritesNeverWaitForTheOutput(t *testing.T) {
	w := &blockedWriter{release: make(chan struct{})}
	l := newNonBlockingLog(w)
	start := time.Now()
	total := logBufferLines + 500
	for i := range total {
		fmt.Fprintf(l, "line %d\n", i)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("%d writes to a blocked output took %s", total, took)
	}
	close(w.release)
	l.drain(5 * time.Second)
	lines := strings.Split(strings.TrimSpace(w.buf.String()), "\n")
	var kept []string
	dropNotice := ""
	for _, s := range lines {
		if strings.Contains(s, "dropped") {
			dropNotice = s
			continue
		}
		kept = append(kept, s)
	}
	for i, s := range kept {
		if s != fmt.Sprintf("line %d", i) {
			t.Fatalf("line %d came out as %q", i, s)
		}
	}
	if len(kept) < logBufferLines || len(kept) >= total {
		t.Errorf("%d of %d lines came out; want the buffer's %d (or one more) and the rest dropped", len(kept), total, logBufferLines)
	}
	if want := fmt.Sprintf("natd: %d log lines dropped", total-len(kept)); !strings.HasPrefix(dropNotice, want) {
		t.Errorf("drop notice %q; want it to begin %q", dropNotice, want)
	}
	var _ io.Writer = l
}
