#!/usr/bin/env bash
# Installs the system packages natd's tests and lab use, when they are missing:
# nft (debugging, kernel tests, kube-proxy's nftables mode), iptables (the lab's CNI
# masquerade, kube-proxy's iptables mode), iproute2, and the CNI plugins the lab's pods
# are wired with (bridge, host-local), containerd and runc (the real-node lab), and
# iperf3 (make bench), stress-ng (make bench-failover's soak).
set -euo pipefail
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
command -v curl >/dev/null 2>&1 || need+=(curl) # the demo reads metrics with it
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3) # make bench: the pinned path's cost
command -v stress-ng >/dev/null 2>&1 || need+=(stress-ng) # make bench-failover: the soak's CPU load
command -v python3 >/dev/null 2>&1 || need+=(python3) # scripts/check.sh reads govulncheck's findings
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
# The real-node lab (natd-lab up --kubelet): containerd (with ctr) and runc.
command -v containerd >/dev/null 2>&1 && command -v ctr >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
# The routed lab (natd-lab up --network routed): BIRD, the router's BGP daemon.
[ -x /usr/sbin/bird ] || need+=(bird2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
  exit 1
fi
echo "==> installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${need[@]}" >/dev/null
