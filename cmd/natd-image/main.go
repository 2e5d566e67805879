// Command natd-image packs a static natd binary into an OCI image archive without a
// container engine: `natd-image --binary bin/natd-static` writes bin/natd-image.tar,
// which `podman load -i` and `skopeo copy oci-archive:...` read. The same binary and
// architecture always give the same image digest, whatever the tag.
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// binaryPath is where the binary lives in the image and its entrypoint: natd's by
// default (the DaemonSet relies on the entrypoint, not on this path); --path changes it
// for the lab's pause image.
var binaryPath = "/usr/local/bin/natd"

const (
	// refNameAnnotation names the image inside the archive: podman load and skopeo's
	// oci-archive:PATH:REF look the image up by it.
	refNameAnnotation = "org.opencontainers.image.ref.name"
	// containerdNameAnnotation is what containerd (ctr import) and docker load use to
	// name an image from an OCI archive.
	containerdNameAnnotation = "io.containerd.image.name"
)

// buildTime is the mtime of every file and the creation time of the image. It is fixed
// so the digest depends only on the binary and the architecture.
var buildTime = time.Unix(0, 0).UTC()

var (
	errNotStatic       = errors.New("binary is dynamically linked (it has a PT_INTERP program header): build it with CGO_ENABLED=0")
	errArchMismatch    = errors.New("binary's ELF machine does not match --arch")
	errUnsupportedArch = errors.New("unsupported --arch")
)

// elfMachines maps the GOARCH values natd can be built for to their ELF machine, so an
// image never claims an architecture its binary cannot run on.
var elfMachines = map[string]elf.Machine{
	"amd64":   elf.EM_X86_64,
	"arm64":   elf.EM_AARCH64,
	"386":     elf.EM_386,
	"arm":     elf.EM_ARM,
	"ppc64le": elf.EM_PPC64,
	"s390x":   elf.EM_S390,
	"riscv64": elf.EM_RISCV,
}

func main() {
	binary := flag.String("binary", "", "the static natd binary to pack (required)")
	out := flag.String("out", "bin/natd-image.tar", "where to write the OCI image archive")
	tag := flag.String("tag", "natd.dev/natd:dev", "the image reference recorded in the archive")
	arch := flag.String("arch", runtime.GOARCH, "the image architecture (GOARCH), which the binary must match")
	version := flag.String("version", "dev", "natd's version, for the image's labels")
	revision := flag.String("revision", "", "the source revision, for the image's labels")
	flag.StringVar(&binaryPath, "path", binaryPath, "where the binary lives in the image (its entrypoint)")
	flag.StringVar(&imageTitle, "title", imageTitle, "the image's title label")
	cni := flag.String("cni-plugin", "", "the static natd-cni binary, installed beside natd (natd copies it into the node's CNI bin directory)")
	flag.Parse()
	if *binary == "" || flag.NArg() != 0 {
		flag.Usage()
		os.Exit(2)
	}
	buildLabels["org.opencontainers.image.version"] = *version
	buildLabels["org.opencontainers.image.source"] = "https://natd.dev/natd"
	if *revision != "" {
		buildLabels["org.opencontainers.image.revision"] = *revision
	}
	var extras []string
	if *cni != "" {
		extras = append(extras, *cni)
	}
	if err := run(*binary, *out, *tag, *arch, extras...); err != nil {
		fmt.Fprintln(os.Stderr, "natd-image:", err)
		os.Exit(1)
	}
}

// buildLabels are the version labels the image carries beside its title.
var buildLabels = map[string]string{}

func run(binary, out, tag, arch string, extras ...string) error {
	img, err := build(binary, arch, extras...)
	if err != nil {
		return err
	}
	if err := writeArchive(img, tag, out); err != nil {
		return err
	}
	digest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("computing the image digest: %w", err)
	}
	info, err := os.Stat(out)
	if err != nil {
		return fmt.Errorf("checking the archive: %w", err)
	}
	fmt.Printf("%s: %s@%s (linux/%s, %d bytes)\n", out, tag, digest, arch, info.Size())
	return nil
}

// imageTitle is the image's title; only natd's own image carries natd's description.
var imageTitle = "natd"

func imageLabels() map[string]string {
	l := map[string]string{
		"org.opencontainers.image.title":    imageTitle,
		"org.opencontainers.image.licenses": "Apache-2.0",
	}
	if imageTitle == "natd" {
		l["org.opencontainers.image.description"] = "natd node agent: pins Kubernetes namespaces to egress IPs"
	}
	for k, v := range buildLabels {
		l[k] = v
	}
	return l
}

// build returns the image: the binary as /usr/local/bin/natd on an empty base, and
// each extra binary (natd-cni) beside it under its own name, with OCI media types
// throughout. The tag is not part of it: it names the image only in the archive, so
// retagging never changes the digest.
func build(binary, arch string, extras ...string) (v1.Image, error) {
	files := []layerFile{}
	for i, b := range append([]string{binary}, extras...) {
		if err := checkStaticELF(b, arch); err != nil {
			return nil, err
		}
		content, err := os.ReadFile(b)
		if err != nil {
			return nil, fmt.Errorf("reading the binary: %w", err)
		}
		path := binaryPath
		if i > 0 {
			path = filepath.Join(filepath.Dir(binaryPath), filepath.Base(b))
		}
		files = append(files, layerFile{path: path, content: content})
	}
	layerTar, err := binaryLayerTar(files...)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(
		func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar)), nil },
		tarball.WithMediaType(types.OCILayer),
		// Level 9 saves under 1% over the default at three times the time.
		tarball.WithCompressionLevel(gzip.DefaultCompression),
	)
	if err != nil {
		return nil, fmt.Errorf("making the layer: %w", err)
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Created:      v1.Time{Time: buildTime},
		OS:           "linux",
		Architecture: arch,
		// The OCI image spec requires "layers"; mutate.Append fills in the diffIDs.
		RootFS: v1.RootFS{Type: "layers"},
		Config: v1.Config{
			Entrypoint: []string{binaryPath},
			// natd programs nftables, routes and addresses: it runs as root and
			// gets NET_ADMIN/NET_RAW from the DaemonSet, not from the image.
			User:   "0",
			Labels: imageLabels(),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("setting the image config: %w", err)
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: buildTime},
			CreatedBy: "natd-image: " + imageTitle + " as " + binaryPath,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("adding the layer: %w", err)
	}
	return img, nil
}

// checkStaticELF refuses binaries the image could not run: a dynamically linked one
// needs a loader and libc that the empty base does not have, and one for another
// architecture fails with "exec format error" only once deployed.
func checkStaticELF(binary, arch string) error {
	want, ok := elfMachines[arch]
	if !ok {
		return fmt.Errorf("%w %q", errUnsupportedArch, arch)
	}
	f, err := elf.Open(binary)
	if err != nil {
		return fmt.Errorf("reading %s as ELF: %w", binary, err)
	}
	defer f.Close() //nolint:errcheck // read only
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s: %w", binary, errNotStatic)
		}
	}
	if f.Machine != want {
		return fmt.Errorf("%s is %s, --arch %s needs %s: %w", binary, f.Machine, arch, want, errArchMismatch)
	}
	return nil
}

// layerFile is one binary of the layer.
type layerFile struct {
	path    string // absolute, under /usr/local/bin
	content []byte
}

// binaryLayerTar returns the uncompressed layer: the parent directories and the
// binaries, all owned by root and dated buildTime, so equal binaries give equal layers.
func binaryLayerTar(files ...layerFile) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, dir := range []string{"usr/", "usr/local/", "usr/local/bin/"} {
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: buildTime,
		}); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
	}
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeReg, Name: f.path[1:], Mode: 0o755, Size: int64(len(f.content)), ModTime: buildTime,
		}); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
		if _, err := tw.Write(f.content); err != nil {
			return nil, fmt.Errorf("writing the layer: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("writing the layer: %w", err)
	}
	return buf.Bytes(), nil
}

// writeArchive writes img as an OCI image layout named tag and tars that layout into
// out (an oci-archive: oci-layout, index.json and blobs/ at the root). Entries are in
// lexical order with fixed owners, modes and mtimes, so equal images give equal files.
func writeArchive(img v1.Image, tag, out string) error {
	dir, err := os.MkdirTemp("", "natd-image-")
	if err != nil {
		return fmt.Errorf("making the layout directory: %w", err)
	}
	defer os.RemoveAll(dir) //nolint:errcheck // a temporary directory; the archive is what counts

	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("reading the image config: %w", err)
	}
	path, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("writing the OCI layout: %w", err)
	}
	if err := path.AppendImage(img,
		layout.WithAnnotations(map[string]string{
			refNameAnnotation:        tag,
			containerdNameAnnotation: tag,
		}),
		layout.WithPlatform(v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture}),
	); err != nil {
		return fmt.Errorf("writing the image into the OCI layout: %w", err)
	}

	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return fmt.Errorf("making the archive's directory: %w", err)
	}
	// Written beside out and renamed, so a failed run never leaves a truncated archive
	// where podman load would find it.
	tmp, err := os.CreateTemp(filepath.Dir(out), filepath.Base(out)+".tmp-")
	if err != nil {
		return fmt.Errorf("creating the archive: %w", err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone already after the rename
	if err := tarDir(dir, tmp); err != nil {
		return errors.Join(fmt.Errorf("writing %s: %w", out, err), tmp.Close())
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	return nil
}

// tarDir writes the tree under root to w with paths relative to root. WalkDir visits in
// lexical order; owners, modes and mtimes are normalised because the layout's files
// carry the umask and the time of this run.
func tarDir(root string, w io.Writer) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(root, func(path string, entry fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == root {
			return nil
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		name := filepath.ToSlash(rel)
		if entry.IsDir() {
			return tw.WriteHeader(&tar.Header{
				Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755, ModTime: buildTime,
			})
		}
		if !entry.Type().IsRegular() {
			return fmt.Errorf("%s: not a regular file", name)
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close() //nolint:errcheck // read only
		info, err := f.Stat()
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: info.Size(), ModTime: buildTime,
		}); err != nil {
			return err
		}
		_, err = io.Copy(tw, f)
		return err
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
