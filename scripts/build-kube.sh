#!/usr/bin/env bash
# Builds the lab's control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd) and the nodes' kube-proxy and kubelet from source
# through the Go module proxy and caches the binaries outside the repository. Idempotent: a binary that is already cached is not rebuilt.
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.37.2}
KUBELET_VERSION=${KUBELET_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
CACHE=${NATD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/natd}
BIN=$CACHE/bin
mkdir -p "$BIN"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# build_kube VERSION BINARY...
build_kube() {
  local KUBE_VERSION=$1; shift
  local want=("$@") missing=()
  for b in "${want[@]}"; do [ -x "$BIN/$b-$KUBE_VERSION" ] || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local mod=$CACHE/src/kube-$KUBE_VERSION
  mkdir -p "$mod"
  say "building ${missing[*]} $KUBE_VERSION from source (first time only: about 5 minutes on 2 cores)"
  (
    cd "$mod"
    [ -f go.mod ] || go mod init natd.dev/kube-build >/dev/null 2>&1
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
    # ./staging paths that do not exist in the module zip; point each at its
    # published v0.x release instead.
    local gomod staging minor
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
    minor=v0.${KUBE_VERSION#v1.}
    for m in $staging; do go mod edit -replace "$m=$m@$minor"; done
    go mod edit -require "k8s.io/kubernetes@$KUBE_VERSION"
    for b in "${missing[@]}"; do
      go get "k8s.io/kubernetes/cmd/$b@$KUBE_VERSION" >/dev/null
    done
    # Stamp the version the binaries report (kubectl version, the API's /version,
    # kube-proxy --version); unstamped they say v0.0.0-master.
    local v=k8s.io/component-base/version major minor_n ldflags
    IFS=. read -r major minor_n _ <<<"${KUBE_VERSION#v}"
    ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=$major -X $v.gitMinor=$minor_n -X $v.gitTreeState=clean"
    for b in "${missing[@]}"; do
      say "  go build k8s.io/kubernetes/cmd/$b"
      CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$BIN/$b-$KUBE_VERSION.tmp" "k8s.io/kubernetes/cmd/$b"
      mv "$BIN/$b-$KUBE_VERSION.tmp" "$BIN/$b-$KUBE_VERSION"
    done
  )
}

build_etcd() {
  [ -x "$BIN/etcd-$ETCD_VERSION" ] && return 0
  say "building etcd $ETCD_VERSION from source (first time only: about 1 minute)"
  local mod=$CACHE/src/etcd-$ETCD_VERSION
  mkdir -p "$mod"
  (
    cd "$mod"
    [ -f go.mod ] || go mod init natd.dev/etcd-build >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$BIN/etcd-$ETCD_VERSION.tmp" go.etcd.io/etcd/server/v3
    mv "$BIN/etcd-$ETCD_VERSION.tmp" "$BIN/etcd-$ETCD_VERSION"
  )
}

build_etcd
CONTROL_PLANE=(kube-apiserver kubectl kube-proxy kube-controller-manager kube-scheduler)
build_kube "$KUBE_VERSION" "${CONTROL_PLANE[@]}"
for b in "${CONTROL_PLANE[@]}"; do ln -sf "$b-$KUBE_VERSION" "$BIN/$b"; done
# The real-node lab's kubelet: v1.34, the newest minor that still works with Debian's
# containerd 1.6 (later kubelets call CRI methods it lacks) and runs on cgroup v1
# hosts by default; three minors behind the API server, inside the supported skew.
build_kube "$KUBELET_VERSION" kubelet
ln -sf "kubelet-$KUBELET_VERSION" "$BIN/kubelet"
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"
echo "$BIN"
