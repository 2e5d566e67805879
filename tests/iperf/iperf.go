// Package iperf runs iperf3 (from Debian) between two network namespaces a test made:
// a one-shot server in one, the client in the other. Benchmarks only; it needs root.
package iperf

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

const port = "5201"

// Run runs one iperf3 client in clientNetns against a one-shot server it starts on
// serverIP in serverNetns, and decodes the client's JSON report into out.
func Run(clientNetns, serverNetns, serverIP string, out any, args ...string) error {
	srv := exec.Command("ip", "netns", "exec", serverNetns, "iperf3", "-s", "-1", "-B", serverIP, "-p", port)
	if err := srv.Start(); err != nil {
		return fmt.Errorf("starting the iperf3 server: %w", err)
	}
	defer func() {
		srv.Process.Kill() //nolint:errcheck // a one-shot server, maybe gone already
		srv.Wait()         //nolint:errcheck // killed
	}()
	var raw []byte
	var failed struct {
		Error string `json:"error"`
	}
	for range 100 { // until the server listens (iperf3 -J may exit 0 on errors)
		raw, _ = exec.Command("ip", append([]string{"netns", "exec", clientNetns, "iperf3", "-J", "-c", serverIP, "-p", port}, args...)...).Output()
		failed.Error = ""
		if err := json.Unmarshal(raw, &failed); err != nil {
			return fmt.Errorf("iperf3 %v: %w\n%s", args, err, raw)
		}
		if !strings.Contains(failed.Error, "Connection refused") && !strings.Contains(failed.Error, "unable to connect") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if failed.Error != "" {
		return fmt.Errorf("iperf3 %v: %s", args, failed.Error)
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("iperf3 output: %w\n%s", err, raw)
	}
	return nil
}

// TCP is one stream for secs seconds: Gbit/s received.
func TCP(clientNetns, serverNetns, serverIP string, secs int) (float64, error) {
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	err := Run(clientNetns, serverNetns, serverIP, &r, "-t", fmt.Sprint(secs))
	return r.End.SumReceived.BitsPerSecond / 1e9, err
}

// UDP is 64-byte datagrams as fast as the client can send for secs seconds: thousands
// received per second.
func UDP(clientNetns, serverNetns, serverIP string, secs int) (float64, error) {
	var r struct {
		End struct {
			Sum struct {
				Packets     float64 `json:"packets"`
				LostPackets float64 `json:"lost_packets"`
				Seconds     float64 `json:"seconds"`
			} `json:"sum"`
		} `json:"end"`
	}
	if err := Run(clientNetns, serverNetns, serverIP, &r, "-u", "-b", "0", "-l", "64", "-t", fmt.Sprint(secs)); err != nil {
		return 0, err
	}
	if r.End.Sum.Seconds == 0 {
		return 0, nil
	}
	return (r.End.Sum.Packets - r.End.Sum.LostPackets) / r.End.Sum.Seconds / 1000, nil
}
