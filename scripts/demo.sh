#!/usr/bin/env bash
# The natd demo: a three-node lab, four pods, and the source address the partner sees
# from each of them before and after one namespace is pinned to an egress IP.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${LAB_DIR:-/tmp/natd-lab}
LAB="bin/natd-lab"
KUBECTL="${NATD_CACHE:-$HOME/.cache/natd}/bin/kubectl --kubeconfig $DIR/kubeconfig"
EGRESS_IP=198.18.0.200

bold() { printf '\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n\033[1;34m▸ %s\033[0m\n' "$*"; }

if [ -e "$DIR/lab-ledger.json" ]; then
  echo "A lab is already up in $DIR; take it down first: bin/natd-lab down --dir $DIR" >&2
  exit 1
fi
if [ "${KEEP:-}" != 1 ]; then
  trap 'step "Taking the lab down"; $LAB down --dir "$DIR" && echo "  done: nothing of the lab is left"' EXIT
fi

# KUBELET=1: real nodes (containerd and a kubelet each, natd as the DaemonSet from make
# image, pods made by the kubelets).
up_args=() pods_how="the lab plays kubelet and runtime; each node's CNI chain wires them"
if [ "${KUBELET:-}" = 1 ]; then
  up_args=(--kubelet) pods_how="Pods made by each node's kubelet and containerd through the CNI"
fi
step "Bringing up the lab: etcd, kube-apiserver, 3 nodes (node2 and node3 may hold egress IPs), a router, a partner"
$LAB up --dir "$DIR" --nodes 3 "${up_args[@]}"

step "Starting pods ($pods_how)"
pods=("team-a app-1 node1" "team-a app-2 node2" "team-a app-3 node3" "team-b web-1 node1")
for p in "${pods[@]}"; do
  set -- $p
  $LAB pod create "$1" "$2" --node "$3" --dir "$DIR" | sed 's/^/  /'
done

table() {
  printf '  %-10s %-7s %-6s %-12s %-16s %-16s\n' NAMESPACE POD NODE POD-IP "PARTNER SAW/TCP" "PARTNER SAW/UDP"
  for p in "${pods[@]}"; do
    set -- $p
    ip=$(python3 -c "import json,sys;t=json.load(open('$DIR/topology.json'));print([x['ip'] for x in t['pods'] if x['namespace']=='$1' and x['name']=='$2'][0])")
    tcp=$($LAB probe "$1" "$2" --dir "$DIR" 2>/dev/null || echo "(no answer)")
    udp=$($LAB probe "$1" "$2" --udp --dir "$DIR" 2>/dev/null || echo "(no answer)")
    printf '  %-10s %-7s %-6s %-12s %-16s %-16s\n' "$1" "$2" "$3" "$ip" "$tcp" "$udp"
  done
}

step "Before: every pod reaches the partner (203.0.113.10) with its node's IP"
table

step "Pinning namespace team-a: kubectl annotate namespace team-a egress.natd.dev/ip=$EGRESS_IP"
$KUBECTL annotate namespace team-a egress.natd.dev/ip=$EGRESS_IP >/dev/null
for i in $(seq 50); do
  [ "$($LAB probe team-a app-1 --dir "$DIR" 2>/dev/null)" = "$EGRESS_IP" ] && break
  sleep 0.1
done

step "After: team-a leaves with $EGRESS_IP from every node; team-b is untouched"
table
holder=$(for n in 1 2 3; do ip netns exec natd-node$n ip -o addr show dev eth0 | grep -q " $EGRESS_IP/" && echo node$n; done; true)
echo
bold "  $EGRESS_IP is held by $holder; the other nodes route team-a's traffic to it."
eip() {  # wait (up to 10 s) for the EgressIP status to show holder $1 and READY $2
  for i in $(seq 50); do
    [ "$($KUBECTL get eip $EGRESS_IP -o jsonpath='{.status.node} {.status.ready}' 2>/dev/null)" = "$1 $2" ] && break
    sleep 0.2
  done
  shift 2
  $KUBECTL get eip "$@" | sed 's/^/  /'
}
step "What operators see: kubectl get eip"
eip "$holder" 3/3

step "Failover: unplugging $holder from the network (its port on the router goes down)"
port="n${holder#node}"
ip netns exec natd-router ip link set "$port" down
start=$(date +%s.%N)
for i in $(seq 100); do
  [ "$($LAB probe team-a app-1 --udp --dir "$DIR" 2>/dev/null)" = "$EGRESS_IP" ] && break
  sleep 0.05
done
took=$(python3 -c "import time;print(f'{time.time()-$start:.1f}')")
servers() { for n in 1 2 3; do ip netns exec natd-node$n nft list set ip natd held_marks 2>/dev/null | grep -q "$EGRESS_IP " && echo node$n; done; true; }
for i in $(seq 50); do  # the cut-off node gives the IP up once it sees it lost the majority
  newholder=$(servers)
  [ "$newholder" != "" ] && [ "$(echo "$newholder" | wc -l)" = 1 ] && [ "$newholder" != "$holder" ] && break
  sleep 0.1
done
bold "  $EGRESS_IP moved to $newholder; team-a's pod on node1 reached the partner with it again after ${took}s."
printf '  %-10s %-7s %-16s\n' NAMESPACE POD "PARTNER SAW/TCP"
for p in "team-a app-1" "team-b web-1"; do
  set -- $p
  printf '  %-10s %-7s %-16s\n' "$1" "$2" "$($LAB probe "$1" "$2" --dir "$DIR" 2>/dev/null || echo '(no answer)')"
done
step "kubectl get eip -o wide, and the Events of the move (READY 2/3: $holder is cut off and cannot say it has re-pointed)"
eip "$newholder" 2/3 -o wide
$KUBECTL get events -n team-a --field-selector reason=EgressIPFailover -o custom-columns=REASON:.reason,MESSAGE:.message,FROM:.source.host | sed 's/^/  /'
echo
metric=$(ip netns exec natd-$newholder curl -s localhost:9793/metrics 2>/dev/null | grep "^natd_snat_packets_total{egress_ip=\"$EGRESS_IP\"}" || true)
[ -n "$metric" ] && echo "  $newholder's metrics: $metric"
ip netns exec natd-router ip link set "$port" up
sleep 3
echo "  $holder plugged back in; 3 s later $EGRESS_IP is served by: $(servers | tr '\n' ' ')(no move back)."
eip "$newholder" 3/3

if [ "${KEEP:-}" = 1 ]; then
  cat <<EOT

The lab stays up (KEEP=1). Explore it:
  export KUBECONFIG=$DIR/kubeconfig; alias kubectl=${KUBECTL%% *}
  kubectl get nodes,pods -A -o wide
  bin/natd-lab probe team-b web-1 --dir $DIR          # source IP the partner sees
  ip netns exec natd-$newholder nft list table ip natd  # natd's ruleset on the holder
  less $DIR/natd-node1.log                           # an agent's log
  bin/natd-lab down --dir $DIR                       # remove everything
EOT
fi
exit 0
