// Package lab builds and drives the natd lab: a real etcd and kube-apiserver and a set
// of network namespaces that play nodes, pods, a router and an external partner.
package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
)

// InNetns runs fn on an OS thread inside the named network namespace. Sockets opened
// by fn stay in that namespace after it returns.
func InNetns(name string, fn func() error) error {
	target, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("opening netns %s: %w", name, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	// A fresh goroutine whose thread is thrown away if it cannot return to the host
	// namespace: nothing else ever runs on a thread left in the wrong namespace.
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("entering netns %s: %w", name, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, err)
			return // thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DialIn opens a connection from inside a network namespace.
func DialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := InNetns(ns, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// DialFromPortIn is DialIn from a fixed local TCP port (0: any).
func DialFromPortIn(ctx context.Context, ns string, port int, addr string) (net.Conn, error) {
	var c net.Conn
	err := InNetns(ns, func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{Port: port}}
		if port != 0 {
			// As a client with a fixed source port sets it: the port's last
			// connection may linger (TIME_WAIT) in the namespace.
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				}); err != nil {
					return err
				}
				return serr
			}
		}
		var err error
		c, err = d.DialContext(ctx, "tcp", addr)
		return err
	})
	return c, err
}

// ListenIn opens a TCP listener inside a network namespace.
func ListenIn(ns, network, addr string) (net.Listener, error) {
	var l net.Listener
	err := InNetns(ns, func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacketIn opens a UDP socket inside a network namespace.
func ListenPacketIn(ns, network, addr string) (net.PacketConn, error) {
	var l net.PacketConn
	err := InNetns(ns, func() error {
		var err error
		l, err = net.ListenPacket(network, addr)
		return err
	})
	return l, err
}

// Run runs a command and returns its combined output, with the command in the error.
func Run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// NsRun runs a command inside a network namespace.
func NsRun(ns string, args ...string) (string, error) {
	return Run("ip", append([]string{"netns", "exec", ns}, args...)...)
}
