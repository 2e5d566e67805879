// Package v1alpha1 is the egress.natd.dev/v1alpha1 API: EgressIP, the status object
// natd keeps for every egress IP in use, for operators to read.
//
// +k8s:deepcopy-gen=package
// +groupName=egress.natd.dev
package v1alpha1
