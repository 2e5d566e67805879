// Package manifests holds the Kubernetes manifests that deploy natd, embedded so that the
// lab runs its agents with exactly the permissions the manifests grant.
package manifests

import _ "embed"

// Namespace is natd's namespace (namespace.yaml).
//
//go:embed namespace.yaml
var Namespace []byte

// ServiceAccount is natd's ServiceAccount and its ClusterRoleBinding (serviceaccount.yaml).
//
//go:embed serviceaccount.yaml
var ServiceAccount []byte

// ClusterRole is natd's ClusterRole (rbac.yaml).
//
//go:embed rbac.yaml
var ClusterRole []byte

// DaemonSet is natd's DaemonSet (daemonset.yaml).
//
//go:embed daemonset.yaml
var DaemonSet []byte

// EgressIPCRD is the EgressIP CustomResourceDefinition (generated into crd/).
//
//go:embed crd/egress.natd.dev_egressips.yaml
var EgressIPCRD []byte
