# natd — see README.md. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
# Go 1.27.3, which the go command fetches from the Go module proxy (76 MB, once): the
# machine's Go 1.26.8 has known vulnerabilities in net/http, crypto/tls and
# crypto/x509 that govulncheck (scripts/check.sh) finds reachable from natd.
export GOTOOLCHAIN ?= go1.27.3
GO    ?= go
CACHE ?= $(or $(NATD_CACHE),$(HOME)/.cache/natd)
export NATD_CACHE := $(CACHE)
LAB_DIR ?= /tmp/natd-lab

.PHONY: all build image deps kube-bins generate check-generated check test test-e2e test-e2e-dual test-e2e-overlay test-e2e-routed test-e2e-kubelet bench bench-failover bench-scale demo lab-up lab-down vet clean

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
LDFLAGS  := -X natd.dev/natd/natd.Version=$(VERSION) -X natd.dev/natd/natd.revision=$(REVISION)

all: build

build:
	$(GO) build -ldflags='$(LDFLAGS)' -o bin/ ./cmd/...

# The DaemonSet's image natd.dev/natd:dev as an OCI archive, bin/natd-image.tar, built
# without a container engine: a static natd on an empty base. Load it with
# `podman load -i bin/natd-image.tar` or push it with
# `skopeo copy oci-archive:bin/natd-image.tar docker://REGISTRY/natd:TAG`.
# Also the real-node lab's pause image, bin/lab-pause-image.tar.
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w $(LDFLAGS)' -o bin/natd-static ./cmd/natd
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o bin/image/natd-cni ./cmd/natd-cni
	$(GO) run ./cmd/natd-image --binary bin/natd-static --cni-plugin bin/image/natd-cni --version $(VERSION) --revision '$(REVISION)' --out bin/natd-image.tar
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o bin/image/natd-lab-pause ./cmd/natd-lab-pause
	$(GO) run ./cmd/natd-image --binary bin/image/natd-lab-pause --path /pause --title "natd lab pause" --tag natd.dev/lab-pause:1 --out bin/lab-pause-image.tar

deps:
	@scripts/install-deps.sh

# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kube-proxy and
# the kubelet, built from source once and cached in $(CACHE)/bin.
kube-bins:
	@scripts/build-kube.sh >/dev/null

vet:
	$(GO) vet ./...

# golangci-lint and govulncheck (against a pinned, locally indexed vulnerability
# database), as a user's security team would run them.
check:
	@scripts/check.sh

# The EgressIP CRD, deepcopy functions and typed client, from natd/apis with the
# Kubernetes generators.
generate:
	scripts/generate.sh

# Fails when the generated files differ from what the generators make now.
check-generated: generate
	@if [ -n "$$(git status --porcelain -- manifests/crd natd/apis natd/client)" ]; then \
		git status --short -- manifests/crd natd/apis natd/client; \
		echo "generated files are stale: run make generate and commit the result" >&2; exit 1; fi

# Unit tests, kernel tests (each in a fresh network namespace) and end-to-end tests in
# the lab. NATD_E2E=required (CI) turns a test that cannot run into a failure. One
# package at a time (-p 1): the failover tests time gossip on a 2-core machine. The
# gossip and agent logic run under the race detector first (memberlist calls natd's
# delegates from its own goroutines). The unplanned failovers run again in a 10-node
# lab (nine voters): every node's leases are watched for a second holder. Ten nodes,
# their kube-proxies and the control plane share two cores there: natd runs with
# heartbeats and leases twice as long, which the bound scales with.
test: deps kube-bins check-generated vet check
	$(GO) test -count=1 -race -short ./election/ ./natd/ ./natd/cniplugin/
	$(GO) test -count=1 -p 1 -timeout 20m ./...
	NATD_E2E_PROXY_MODE=iptables $(GO) test -count=1 -timeout 5m -run 'Service' ./tests/e2e/
	NATD_E2E_NODES=10 NATD_E2E_NATD_ARGS='--heartbeat-interval=80ms --lease=600ms' $(GO) test -count=1 -timeout 5m -run '^(TestFailoverPartition|TestFailoverNatdKilled)$$' ./tests/e2e/
	$(MAKE) test-e2e-dual
	$(MAKE) test-e2e-overlay
	$(MAKE) test-e2e-routed
	$(MAKE) test-e2e-kubelet

# The core pinning, fail-closed and failover scenarios in the routed lab (natd-lab up
# --network routed): every node in a subnet of its own, egress IPs announced over BGP
# to the router's BIRD.
ROUTED_TESTS := ^(TestPinnedPodsLeaveWithEgressIPFromEveryNode|TestClusterTrafficKeepsPodIP|TestPinnedThroughServiceToTheOutside|TestNoEligibleNodeFailsClosed|TestNewPodsFirstPacketsOnAnotherNode|TestPodsCannotUseTheTunnel|TestLargeTransfersThroughTheTunnel|TestConnectionsLostOnThePodsNode|TestFailoverUplinkCut|TestFailoverNatdKilled|TestFailoverPartition|TestFailoverWithAPIServerDown|TestPlannedMoveLabelRemoved|TestDrainHandsOver|TestRestartDoesNotMove|TestRouted.*)$$
test-e2e-routed: deps kube-bins
	NATD_E2E_NETWORK=routed $(GO) test -count=1 -timeout 10m -run '$(ROUTED_TESTS)' ./tests/e2e/

# The core pinning, fail-closed and failover scenarios on real nodes (natd-lab up
# --kubelet): containerd and a kubelet per node, natd as the manifests' DaemonSet in
# the image make image builds, pods made by the kubelets; and what only real nodes
# show: a rolling restart (kubectl rollout restart) and the README's uninstall. The
# control plane, containerd and three kubelets share CI's two cores with the natds:
# natd runs there with the heartbeats and lease of the flat lab's earlier defaults
# (40 ms, 300 ms); with 15/150 ms, quorum breaks under that load flapped an IP back
# to its old holder in two of three runs (the flat lab keeps natd's defaults).
KUBELET_TESTS := ^(TestPinnedPodsLeaveWithEgressIPFromEveryNode|TestClusterTrafficKeepsPodIP|TestPinnedThroughServiceToTheOutside|TestNoEligibleNodeFailsClosed|TestNewPodsFirstConnection|TestFailoverUplinkCut|TestFailoverNatdKilled|TestFailoverPartition|TestFailoverWithAPIServerDown|TestPlannedMoveLabelRemoved|TestDrainHandsOver|TestRestartDoesNotMove|TestRollingRestartMovesNothing|TestUninstallFromRealNodesLeavesNothing|TestTamperingIsRepaired)$$
test-e2e-kubelet: deps kube-bins
	NATD_E2E_KUBELET=1 NATD_E2E_NATD_ARGS='--heartbeat-interval=40ms --lease=300ms' $(GO) test -count=1 -timeout 15m -run '$(KUBELET_TESTS)' ./tests/e2e/

# The core pinning, fail-closed and failover scenarios in the overlay lab (natd-lab up
# --network overlay): a VXLAN CNI on an underlay that drops foreign sources.
OVERLAY_TESTS := ^(TestPinnedPodsLeaveWithEgressIPFromEveryNode|TestClusterTrafficKeepsPodIP|TestPinnedThroughServiceToTheOutside|TestNoEligibleNodeFailsClosed|TestNewPodsFirstPacketsOnAnotherNode|TestPodsCannotUseTheTunnel|TestLargeTransfersThroughTheTunnel|TestConnectionsLostOnThePodsNode|TestFailoverNatdKilled|TestFailoverPartition)$$
test-e2e-overlay: deps kube-bins
	NATD_E2E_NETWORK=overlay $(GO) test -count=1 -timeout 10m -run '$(OVERLAY_TESTS)' ./tests/e2e/

# The end-to-end tests of the dual-stack lab (natd-lab up --network dual): natd's IPv6
# promise, with the core pinning test and kube-proxy's Services in the same lab.
DUAL_TESTS := ^(TestDualStack.*|TestPinnedPodsLeaveWithEgressIPFromEveryNode|TestServiceClusterIPToPartner)$$
test-e2e-dual: deps kube-bins
	NATD_E2E_NETWORK=dual $(GO) test -count=1 -timeout 10m -run '$(DUAL_TESTS)' ./tests/e2e/

test-e2e: deps kube-bins
	$(GO) test -count=1 -v ./tests/e2e/

# Sync cost at 1k/10k/50k pinned pods, one pod added at 50k, agent memory at 50k pods,
# the cost of one metrics scrape (reading nftables counters, 60 egress IPs), and in the
# lab a new pod's first connection (NATD_FIRSTCONN_ROUNDS pods per case, default 20):
# without natd, unpinned beside natd, pinned on another node, pinned on the holder;
# and the pinned path's cost per packet in kernel namespaces (iperf3 TCP and UDP, a UDP
# ping-pong) with 0/1k/10k/50k pinned pod IPs, next to plain forwarding and one iptables
# SNAT rule (NATD_PATH_SECONDS per iperf3 run, default 3); and the same three pods' paths
# through the lab in each network mode, flat, overlay, routed and dual (BenchmarkLabPath).
bench: deps kube-bins
	$(GO) test -run '^$$' -bench 'Sync|Memory|Assign|Counters|Bindings' -benchtime 20x ./natd/ ./natd/dataplane/ ./election/
	$(GO) test -run '^$$' -bench FirstConnection -benchtime 1x -timeout 20m ./tests/e2e/
	$(GO) test -run '^$$' -bench PinnedPath -benchtime 1x -timeout 20m ./natd/dataplane/
	for n in flat overlay routed dual; do NATD_E2E_NETWORK=$$n $(GO) test -run '^$$' -bench LabPath -benchtime 1x -timeout 20m ./tests/e2e/ || exit 1; done

# Failover times over NATD_FAILOVER_ROUNDS (20) faults of each kind, seen at the partner,
# with long-lived TCP connections; then the soak: an egress IP held for NATD_SOAK (30m)
# with every node's CPUs saturated and 5 % loss on every node link, where nothing may move.
bench-failover: deps kube-bins
	$(GO) test -run '^$$' -bench 'Failover|Soak' -benchtime 1x -timeout 90m ./tests/e2e/

# The scale harness (natd/scale_test.go): natd's real agents in one process over an
# in-memory network, 5 egress nodes and NATD_SCALE_IPS (500) egress IPs; per size the
# busiest holder is cut off, powered off and unlabelled: failure detection, takeover,
# routes, READY, two-holder time. First in real time (SIZES, default 10,50,100: every
# member on this machine's cores), then in virtual time (VIRTUAL_SIZES, default
# 10,50,200,1000: the protocol's latencies, as if each member had a CPU of its own).
bench-scale: deps
	NATD_SCALE_SIZES=$(or $(SIZES),10,50,100) $(GO) test -run '^$$' -bench Scale -benchtime 1x -timeout 90m ./natd/
	NATD_SCALE_VIRTUAL=$(or $(VIRTUAL_SIZES),10,50,200,1000) $(GO) test -count=1 -run '^TestScaleInVirtualTime$$' -v -timeout 90m ./natd/

# KUBELET=1: on real nodes (containerd, kubelets, natd as the DaemonSet).
demo: deps kube-bins build $(if $(KUBELET),image)
	@KEEP=$(KEEP) KUBELET=$(KUBELET) LAB_DIR=$(LAB_DIR) scripts/demo.sh

# NETWORK=dual: the dual-stack lab.
lab-up: deps kube-bins build $(if $(KUBELET),image)
	bin/natd-lab up --dir $(LAB_DIR) --network $(or $(NETWORK),flat) $(if $(KUBELET),--kubelet)

lab-down:
	bin/natd-lab down --dir $(LAB_DIR)

clean:
	rm -rf bin/
