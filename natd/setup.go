package natd

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"

	"natd.dev/natd/election"
	"natd.dev/natd/natd/dataplane"
)

func dataplaneConfig(cfg *Config) (dataplane.Config, error) {
	marks, err := dataplane.NewMarks(cfg.FwmarkMask)
	if err != nil {
		return dataplane.Config{}, err
	}
	return dataplane.Config{Marks: marks, RulePriority: cfg.RulePriority, TableBase: cfg.TableBase,
		EgressCIDRs: cfg.EgressCIDRs, StateDir: cfg.StateDir}, nil
}

// Setup builds the agent from its configuration: API client, kernel programmer,
// holder election, Event recorder and metrics.
func Setup(ctx context.Context, cfg *Config) (*Agent, *Metrics, error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	dcfg, err := dataplaneConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	var rc *rest.Config
	if cfg.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("loading API client config: %w", err)
	}
	rc.UserAgent = "natd/" + cfg.NodeName
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, nil, fmt.Errorf("creating API client: %w", err)
	}
	dp, err := dataplane.New(dcfg)
	if err != nil {
		return nil, nil, err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartStructuredLogging(2)
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "natd", Host: cfg.NodeName})
	metrics := NewMetrics()
	klog.InfoS("Starting natd", "node", cfg.NodeName, "egressCIDRs", cfg.EgressCIDRs, "failOpen", cfg.FailOpen)
	return NewAgent(cfg, client, dp, election.Rendezvous{}, recorder, metrics), metrics, nil
}

// Cleanup removes everything natd put into this node's kernel.
func Cleanup(cfg *Config) error {
	dcfg, err := dataplaneConfig(cfg)
	if err != nil {
		return err
	}
	dp, err := dataplane.New(dcfg)
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := dp.Cleanup(); err != nil {
		return err
	}
	klog.InfoS("Removed natd's kernel state")
	return nil
}
