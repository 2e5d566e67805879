// Command natd-lab-pause is the lab's pause container: the sandbox image of the
// real-node lab's containerd (no registry is reachable, so registry.k8s.io/pause cannot
// be pulled) and the only process of the lab's pods, whose network namespace is all a
// test uses. It waits for SIGTERM or SIGINT and reaps the children it inherits as a
// sandbox's PID 1.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
