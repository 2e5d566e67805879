package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// EgressIP is one egress IP in use: where it lives and whether every node is ready for
// it. natd creates it when a namespace first names the IP, writes its status, and
// deletes it when no namespace uses the IP any more. Its name is the IP (IPv6: ':'
// becomes '-').
//
// +genclient
// +genclient:nonNamespaced
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,shortName=eip
// +kubebuilder:subresource:status
// +kubebuilder:printcolumn:name="IP",type=string,JSONPath=`.spec.ip`
// +kubebuilder:printcolumn:name="NODE",type=string,JSONPath=`.status.node`
// +kubebuilder:printcolumn:name="NAMESPACES",type=string,JSONPath=`.status.namespaceList`
// +kubebuilder:printcolumn:name="READY",type=string,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="PREVIOUS",type=string,JSONPath=`.status.previousNode`,priority=1
// +kubebuilder:printcolumn:name="FAILOVERS",type=integer,JSONPath=`.status.failovers`,priority=1
// +kubebuilder:printcolumn:name="LAST FAILOVER",type=date,JSONPath=`.status.lastFailoverTime`,priority=1
// +kubebuilder:printcolumn:name="AGE",type=date,JSONPath=`.metadata.creationTimestamp`
type EgressIP struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   EgressIPSpec   `json:"spec"`
	Status EgressIPStatus `json:"status,omitempty"`
}

// EgressIPSpec says which IP the object is about.
type EgressIPSpec struct {
	// IP is the egress IP.
	IP string `json:"ip"`
}

// EgressIPStatus is where the IP lives and how ready the cluster is for it.
type EgressIPStatus struct {
	// Node holds the IP; empty when no node can.
	// +optional
	Node string `json:"node,omitempty"`
	// Namespaces pinned to the IP.
	// +optional
	Namespaces []string `json:"namespaces,omitempty"`
	// NamespaceList is Namespaces as one comma-separated string, for kubectl's columns.
	// +optional
	NamespaceList string `json:"namespaceList,omitempty"`
	// Ready is "programmed/total": how many nodes route the IP's traffic to its
	// current holder, over all nodes.
	// +optional
	Ready string `json:"ready,omitempty"`
	// ClaimGeneration is the generation of Node's claim on the IP. Claims only grow, so
	// a writer with an older claim (a holder that has just let go) never overwrites a
	// newer one.
	// +optional
	ClaimGeneration int64 `json:"claimGeneration,omitempty"`
	// PreviousNode held the IP before Node did; while no node holds it, the last node
	// that did.
	// +optional
	PreviousNode string `json:"previousNode,omitempty"`
	// Failovers counts the times the IP moved to another node.
	// +optional
	Failovers int32 `json:"failovers,omitempty"`
	// LastFailoverTime is when it last moved.
	// +optional
	LastFailoverTime *metav1.Time `json:"lastFailoverTime,omitempty"`
	// Conditions: Assigned (a node holds the IP; reasons such as NoEligibleNode) and
	// Ready (every node is programmed for the current holder; reason Programmed).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// EgressIPList is a list of EgressIPs.
//
// +k8s:deepcopy-gen:interfaces=k8s.io/apimachinery/pkg/runtime.Object
// +kubebuilder:object:root=true
type EgressIPList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []EgressIP `json:"items"`
}
