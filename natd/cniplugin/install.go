package cniplugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PluginType is the plugin's type in a conflist, and its binary's name in the CNI
// bin directory.
const PluginType = "natd-cni"

// ErrNoConflist means the CNI configuration directory has no .conflist to chain onto
// (the node's CNI has not written its configuration yet, or uses a single-plugin .conf).
var ErrNoConflist = errors.New("no .conflist in the CNI configuration directory")

// Installer chains natd-cni onto the node's CNI configuration, the way service-mesh
// CNI plugins do: the binary goes into the CNI bin directory and an entry is appended
// to the conflist the runtime uses (the first by name). Ensure is idempotent, so the
// agent calls it again and again: a CNI that rewrites its conflist (on its own
// restart, say) gets natd's entry back.
type Installer struct {
	BinDir   string // e.g. /opt/cni/bin (as the agent sees it: a hostPath mount)
	ConfDir  string // e.g. /etc/cni/net.d
	Source   string // the natd-cni binary to copy
	StateDir string // natd's --state-dir, passed to the plugin
}

// Ensure installs the binary when it differs and the conflist entry when it is
// missing or stale. changed says whether it wrote anything.
func (in Installer) Ensure() (changed bool, err error) {
	bin, err := in.ensureBinary()
	if err != nil {
		return false, err
	}
	conf, err := in.editConflist(func(plugins []any) []any {
		entry := map[string]any{"type": PluginType, "stateDir": in.StateDir}
		if i := pluginIndex(plugins); i >= 0 {
			plugins[i] = entry
			return plugins
		}
		return append(plugins, entry)
	})
	return bin || conf, err
}

// Remove takes natd's entry out of the conflist and deletes the binary: what an
// uninstall leaves is the node's CNI as it was.
func (in Installer) Remove() error {
	_, err := in.editConflist(func(plugins []any) []any {
		if i := pluginIndex(plugins); i >= 0 {
			return slices.Delete(plugins, i, i+1)
		}
		return plugins
	})
	if err != nil && !errors.Is(err, ErrNoConflist) {
		return err
	}
	if err := os.Remove(filepath.Join(in.BinDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", PluginType, err)
	}
	return nil
}

func pluginIndex(plugins []any) int {
	return slices.IndexFunc(plugins, func(p any) bool {
		m, ok := p.(map[string]any)
		return ok && m["type"] == PluginType
	})
}

// ensureBinary copies Source into BinDir unless an identical copy is there; the copy is
// renamed into place, so the runtime never executes a half-written file.
func (in Installer) ensureBinary() (bool, error) {
	want, err := os.ReadFile(in.Source)
	if err != nil {
		return false, fmt.Errorf("reading the CNI plugin binary: %w", err)
	}
	dst := filepath.Join(in.BinDir, PluginType)
	if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	tmp, err := os.CreateTemp(in.BinDir, "."+PluginType+"-*")
	if err != nil {
		return false, fmt.Errorf("installing %s: %w", PluginType, err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone already after the rename
	_, werr := io.Copy(tmp, bytes.NewReader(want))
	if err := errors.Join(werr, tmp.Chmod(0o755), tmp.Close()); err != nil {
		return false, fmt.Errorf("installing %s: %w", PluginType, err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return false, fmt.Errorf("installing %s: %w", PluginType, err)
	}
	return true, nil
}

// editConflist applies edit to the plugin list of the first conflist and writes it
// back (atomically) when it changed.
func (in Installer) editConflist(edit func([]any) []any) (bool, error) {
	path, err := in.conflist()
	if err != nil {
		return false, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("reading %s: %w", path, err)
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return false, fmt.Errorf("parsing %s: %w", path, err)
	}
	plugins, ok := conf["plugins"].([]any)
	if !ok {
		return false, fmt.Errorf("%s has no plugins list", path)
	}
	before, _ := json.Marshal(plugins)
	plugins = edit(plugins)
	after, _ := json.Marshal(plugins)
	if bytes.Equal(before, after) {
		return false, nil
	}
	conf["plugins"] = plugins
	out, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(in.ConfDir, ".natd-*") // a dot file: the runtime ignores it
	if err != nil {
		return false, fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone already after the rename
	_, werr := tmp.Write(append(out, '\n'))
	if err := errors.Join(werr, tmp.Chmod(0o644), tmp.Close()); err != nil {
		return false, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("writing %s: %w", path, err)
	}
	return true, nil
}

// conflist is the configuration the runtime loads: the first by name of the
// configuration files (runtimes read .conf, .conflist and .json and take the first).
func (in Installer) conflist() (string, error) {
	entries, err := os.ReadDir(in.ConfDir)
	if err != nil {
		return "", fmt.Errorf("reading %s: %w", in.ConfDir, err)
	}
	for _, e := range entries { // ReadDir sorts by name
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") {
			continue
		}
		switch filepath.Ext(name) {
		case ".conflist":
			return filepath.Join(in.ConfDir, name), nil
		case ".conf", ".json":
			return "", fmt.Errorf("%w: the runtime uses %s, a single-plugin configuration natd cannot chain onto", ErrNoConflist, name)
		}
	}
	return "", fmt.Errorf("%w (%s)", ErrNoConflist, in.ConfDir)
}
