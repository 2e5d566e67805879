// Package manifests holds the Kubernetes manifests that deploy natd, embedded so that the
// lab runs its agents with exactly the permissions the manifests grant.
package manifests

import _ "embed"

// ClusterRole is natd's ClusterRole (rbac.yaml).
//
//go:embed rbac.yaml
var ClusterRole []byte

// EgressIPCRD is the EgressIP CustomResourceDefinition (generated into crd/).
//
//go:embed crd/egress.natd.dev_egressips.yaml
var EgressIPCRD []byte
