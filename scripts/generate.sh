#!/usr/bin/env bash
# Regenerates the EgressIP CRD, deepcopy functions and typed client with the Kubernetes
# generators (controller-gen, client-gen, lister-gen, informer-gen), fetched through the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTROLLER_TOOLS=${CONTROLLER_TOOLS:-v0.23.0}
CODE_GENERATOR=${CODE_GENERATOR:-v0.37.2}
export GOFLAGS=-mod=mod
module=$(go list -m)
api=natd/apis/egress/v1alpha1

go run "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS" \
  object:headerFile=scripts/boilerplate.go.txt paths="./$api/..." \
  crd:crdVersions=v1 output:crd:artifacts:config=manifests/crd

rm -rf natd/client
go run "k8s.io/code-generator/cmd/client-gen@$CODE_GENERATOR" \
  --clientset-name versioned --input-base "" --input "$module/$api" \
  --output-pkg "$module/natd/client/clientset" --output-dir natd/client/clientset \
  --go-header-file scripts/boilerplate.go.txt >/dev/null
go run "k8s.io/code-generator/cmd/lister-gen@$CODE_GENERATOR" \
  --output-pkg "$module/natd/client/listers" --output-dir natd/client/listers \
  --go-header-file scripts/boilerplate.go.txt "$module/$api" >/dev/null
go run "k8s.io/code-generator/cmd/informer-gen@$CODE_GENERATOR" \
  --versioned-clientset-package "$module/natd/client/clientset/versioned" \
  --listers-package "$module/natd/client/listers" \
  --output-pkg "$module/natd/client/informers" --output-dir natd/client/informers \
  --go-header-file scripts/boilerplate.go.txt "$module/$api" >/dev/null
gofmt -w natd/client "$api"
