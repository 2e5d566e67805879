package cniplugin

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func installer(t *testing.T) (Installer, string) {
	t.Helper()
	dir := t.TempDir()
	in := Installer{BinDir: filepath.Join(dir, "bin"), ConfDir: filepath.Join(dir, "net.d"),
		Source: filepath.Join(dir, "natd-cni-src"), StateDir: "/run/natd"}
	for _, d := range []string{in.BinDir, in.ConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(in.Source, []byte("plugin v1"), 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(in.ConfDir, "10-flannel.conflist")
	if err := os.WriteFile(conf, []byte(`{"cniVersion":"1.0.0","name":"cbr0","plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	// A later file the runtime does not use.
	if err := os.WriteFile(filepath.Join(in.ConfDir, "99-other.conflist"), []byte(`{"plugins":[]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	return in, conf
}

func plugins(t *testing.T, path string) []string {
	t.Helper()
	var conf struct {
		Plugins []map[string]any `json:"plugins"`
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &conf); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range conf.Plugins {
		out = append(out, p["type"].(string))
	}
	return out
}

// natd-cni goes last into the conflist the runtime uses, once; a CNI that rewrites its
// conflist gets it back; Remove leaves the node's CNI as it was.
func TestInstallerChainsOntoTheRuntimesConflist(t *testing.T) {
	in, conf := installer(t)
	orig, _ := os.ReadFile(conf)
	changed, err := in.Ensure()
	if err != nil || !changed {
		t.Fatalf("Ensure = %v, %v", changed, err)
	}
	if got := strings.Join(plugins(t, conf), " "); got != "flannel portmap natd-cni" {
		t.Fatalf("plugins = %s", got)
	}
	if b, err := os.ReadFile(filepath.Join(in.BinDir, PluginType)); err != nil || string(b) != "plugin v1" {
		t.Fatalf("binary = %q, %v", b, err)
	}
	if changed, err := in.Ensure(); err != nil || changed {
		t.Fatalf("second Ensure = %v, %v; want nothing to do", changed, err)
	}
	if got := plugins(t, filepath.Join(in.ConfDir, "99-other.conflist")); len(got) != 0 {
		t.Errorf("a conflist the runtime does not use was changed: %v", got)
	}
	// The CNI rewrites its configuration; natd's entry comes back.
	if err := os.WriteFile(conf, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := in.Ensure(); err != nil || !changed || strings.Join(plugins(t, conf), " ") != "flannel portmap natd-cni" {
		t.Fatalf("after a rewrite: %v, %v, %v", changed, err, plugins(t, conf))
	}
	if err := in.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(plugins(t, conf), " "); got != "flannel portmap" {
		t.Fatalf("after Remove: %s", got)
	}
	if _, err := os.Stat(filepath.Join(in.BinDir, PluginType)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("binary left after Remove: %v", err)
	}
}

// A node whose CNI has not written its configuration yet, or uses a single-plugin
// .conf, is reported, not guessed at.
func TestInstallerWithoutAConflist(t *testing.T) {
	in, conf := installer(t)
	os.Remove(conf)
	os.Remove(filepath.Join(in.ConfDir, "99-other.conflist"))
	if _, err := in.Ensure(); !errors.Is(err, ErrNoConflist) {
		t.Fatalf("Ensure without conflist = %v", err)
	}
	os.WriteFile(filepath.Join(in.ConfDir, "10-bridge.conf"), []byte(`{"type":"bridge"}`), 0o644)
	if _, err := in.Ensure(); !errors.Is(err, ErrNoConflist) {
		t.Fatalf("Ensure with a .conf = %v", err)
	}
	if err := in.Remove(); err != nil {
		t.Fatalf("Remove without conflist = %v", err)
	}
}
