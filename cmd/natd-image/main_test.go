package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

const testTag = "natd.dev/natd:test"

// staticNatd is natd built the way `make image` builds it, once for all tests: linking
// it takes seconds even with a warm cache.
var staticNatd, staticCNI string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "natd-image-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	staticNatd, staticCNI = filepath.Join(dir, "natd"), filepath.Join(dir, "natd-cni")
	for out, pkg := range map[string]string{staticNatd: "natd.dev/natd/cmd/natd", staticCNI: "natd.dev/natd/cmd/natd-cni"} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building static %s: %v\n%s", pkg, err, b)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// TestArchiveReadBack writes the archive and then reads it the way a consumer would:
// untar, open the OCI layout, find the image by its ref name, and run what is inside.
func TestArchiveReadBack(t *testing.T) {
	out := filepath.Join(t.TempDir(), "natd-image.tar")
	if err := run(staticNatd, out, testTag, runtime.GOARCH, staticCNI); err != nil {
		t.Fatal(err)
	}

	layoutDir := t.TempDir()
	names := untar(t, out, layoutDir)
	for _, want := range []string{"oci-layout", "index.json", "blobs/sha256/"} {
		if !names[want] {
			t.Errorf("archive has no %s at its root; it has %v", want, names)
		}
	}

	index, err := layout.ImageIndexFromPath(layoutDir)
	if err != nil {
		t.Fatal(err)
	}
	img := imageByRefName(t, index, testTag)
	// validate checks every blob against its digest and every layer against its diffID.
	if err := validate.Image(img); err != nil {
		t.Fatalf("image does not validate: %v", err)
	}

	manifest, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if manifest.MediaType != types.OCIManifestSchema1 {
		t.Errorf("manifest media type = %s, want %s", manifest.MediaType, types.OCIManifestSchema1)
	}
	if manifest.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("config media type = %s, want %s", manifest.Config.MediaType, types.OCIConfigJSON)
	}
	if len(manifest.Layers) != 1 || manifest.Layers[0].MediaType != types.OCILayer {
		t.Fatalf("layers = %+v, want one of type %s", manifest.Layers, types.OCILayer)
	}

	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("platform = %s/%s, want linux/%s", cfg.OS, cfg.Architecture, runtime.GOARCH)
	}
	if strings.Join(cfg.Config.Entrypoint, " ") != "/usr/local/bin/natd" || len(cfg.Config.Cmd) != 0 {
		t.Errorf("entrypoint %q cmd %q, want [/usr/local/bin/natd] and none", cfg.Config.Entrypoint, cfg.Config.Cmd)
	}

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	extracted := filepath.Join(t.TempDir(), "natd")
	extractBinary(t, layers[0], "usr/local/bin/natd", extracted)

	want, err := os.ReadFile(staticNatd)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(extracted)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("binary in the image (%d bytes) differs from the input (%d bytes)", len(got), len(want))
	}
	assertStatic(t, extracted)
	// natd-cni beside it: natd installs it into the node's CNI bin directory.
	extractedCNI := filepath.Join(t.TempDir(), "natd-cni")
	extractBinary(t, layers[0], "usr/local/bin/natd-cni", extractedCNI)
	if wantCNI, _ := os.ReadFile(staticCNI); !bytes.Equal(mustRead(t, extractedCNI), wantCNI) {
		t.Fatal("natd-cni in the image differs from the input")
	}
	assertStatic(t, extractedCNI)

	// natd gen-key needs no privileges and prints a base64 gossip key of 32 bytes.
	keyOut, err := exec.Command(extracted, "gen-key").Output()
	if err != nil {
		t.Fatalf("natd gen-key from the image: %v", err)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(keyOut)))
	if err != nil || len(key) != 32 {
		t.Fatalf("natd gen-key printed %q: %d bytes, err %v; want 32 bytes of base64", keyOut, len(key), err)
	}
}

// TestReproducible: the same binary, tag and architecture give the same digest and the
// same archive bytes, so a rebuild from the same commit is recognisably the same image.
func TestReproducible(t *testing.T) {
	var digests []v1.Hash
	var sums [][sha256.Size]byte
	for range 2 {
		img, err := build(staticNatd, runtime.GOARCH)
		if err != nil {
			t.Fatal(err)
		}
		digest, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(t.TempDir(), "natd-image.tar")
		if err := writeArchive(img, testTag, out); err != nil {
			t.Fatal(err)
		}
		archive, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		digests = append(digests, digest)
		sums = append(sums, sha256.Sum256(archive))
	}
	if digests[0] != digests[1] {
		t.Errorf("two builds gave digests %s and %s", digests[0], digests[1])
	}
	if sums[0] != sums[1] {
		t.Errorf("two archives differ: sha256 %x and %x", sums[0], sums[1])
	}
}

func TestRejectsBinariesTheImageCannotRun(t *testing.T) {
	script := filepath.Join(t.TempDir(), "natd")
	if err := os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	otherArch := "arm64"
	if runtime.GOARCH == "arm64" {
		otherArch = "amd64"
	}
	for _, tc := range []struct {
		name, binary, arch string
		want               error // nil: any error will do
	}{
		{"dynamically linked", "/bin/true", runtime.GOARCH, errNotStatic},
		{"other architecture", staticNatd, otherArch, errArchMismatch},
		{"unknown architecture", staticNatd, "pdp11", errUnsupportedArch},
		{"not ELF", script, runtime.GOARCH, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := os.Stat(tc.binary); err != nil {
				t.Skipf("no %s here: %v", tc.binary, err)
			}
			_, err := build(tc.binary, tc.arch)
			if err == nil {
				t.Fatalf("build(%s, %s) succeeded", tc.binary, tc.arch)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("build(%s, %s) = %v, want %v", tc.binary, tc.arch, err, tc.want)
			}
		})
	}
}

// untar extracts the archive into dir and returns the names of its entries at the
// root and one level down ("blobs/sha256/").
func untar(t *testing.T, archive, dir string) map[string]bool {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	names := map[string]bool{}
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		if !filepath.IsLocal(hdr.Name) {
			t.Fatalf("archive entry %q escapes the archive", hdr.Name)
		}
		names[hdr.Name] = true
		target := filepath.Join(dir, hdr.Name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(target, 0o755); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				t.Fatal(err)
			}
			writeFile(t, target, tr, 0o644)
		default:
			t.Fatalf("archive entry %q has type %c, want only files and directories", hdr.Name, hdr.Typeflag)
		}
	}
}

func imageByRefName(t *testing.T, index v1.ImageIndex, ref string) v1.Image {
	t.Helper()
	manifest, err := index.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	for _, desc := range manifest.Manifests {
		if desc.Annotations[refNameAnnotation] != ref {
			continue
		}
		if desc.MediaType != types.OCIManifestSchema1 {
			t.Errorf("index entry for %s has media type %s, want %s", ref, desc.MediaType, types.OCIManifestSchema1)
		}
		img, err := index.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	t.Fatalf("index.json has no image named %s: %+v", ref, manifest.Manifests)
	return nil
}

// extractBinary writes the layer's entry at name to dst, failing unless it is a regular
// file owned by root with mode 0755.
func extractBinary(t *testing.T, layer v1.Layer, name, dst string) {
	t.Helper()
	rc, err := layer.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			t.Fatalf("layer has no %s", name)
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Name != name {
			continue
		}
		if hdr.Typeflag != tar.TypeReg || hdr.Mode != 0o755 || hdr.Uid != 0 || hdr.Gid != 0 {
			t.Fatalf("%s: type %c mode %o uid %d gid %d, want a regular file, 0755, root", name, hdr.Typeflag, hdr.Mode, hdr.Uid, hdr.Gid)
		}
		writeFile(t, dst, tr, 0o755)
		return
	}
}

func writeFile(t *testing.T, path string, r io.Reader, mode os.FileMode) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func assertStatic(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Fatalf("%s has a PT_INTERP header: not static", path)
		}
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
