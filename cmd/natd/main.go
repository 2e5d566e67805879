// Command natd is the node agent. `natd cleanup` removes everything it put in the
// kernel on this node.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"
	"natd.dev/natd/natd"
)

func main() {
	cmd := "run"
	args := os.Args[1:]
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version" || args[0] == "version") {
		fmt.Println(natd.VersionString())
		return
	}
	if len(args) > 0 && (args[0] == "cleanup" || args[0] == "run" || args[0] == "gen-key") {
		cmd, args = args[0], args[1:]
	}
	if cmd == "gen-key" {
		key, err := natd.GenerateKey()
		if err != nil {
			fmt.Fprintln(os.Stderr, "natd:", err)
			os.Exit(1)
		}
		fmt.Println(key)
		return
	}
	fs := flag.NewFlagSet("natd "+cmd, flag.ExitOnError)
	klog.InitFlags(fs)
	var cfg natd.Config
	cfg.RegisterFlags(fs)
	_ = fs.Parse(args)
	drainLog := natd.LogWithoutBlocking(fs)

	// SIGTERM and SIGINT stop natd for a restart: its egress IPs stay where they are.
	// SIGUSR1 drains: the IPs are handed to other nodes first, then natd exits.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	drain := make(chan struct{})
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		<-usr1
		close(drain)
	}()
	var err error
	switch cmd {
	case "cleanup":
		err = natd.Cleanup(&cfg)
	default:
		err = run(ctx, &cfg, drain)
		if errors.Is(err, natd.ErrUninstalled) {
			err = natd.Cleanup(&cfg)
		}
	}
	klog.Flush()
	drainLog()
	if err != nil {
		fmt.Fprintln(os.Stderr, "natd:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg *natd.Config, drain <-chan struct{}) error {
	a, err := natd.Setup(ctx, cfg)
	if err != nil {
		return err
	}
	addrs := cfg.MetricsAddrs()
	if len(addrs) == 1 && addrs[0] == ":9793" {
		klog.InfoS("Serving metrics on every address: set --metrics-addr, --node-ip or $NODE_IP to keep them to the node IP")
	}
	for _, addr := range addrs {
		srv := &http.Server{Addr: addr, Handler: a.Handler()}
		go func() {
			if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				klog.ErrorS(err, "Metrics server failed", "addr", addr)
			}
		}()
		defer srv.Close() //nolint:errcheck // on the way out
	}
	return a.Run(ctx, drain)
}
