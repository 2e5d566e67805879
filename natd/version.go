package natd

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is natd's release, stamped at build time (`make build` and `make image`:
// -ldflags "-X natd.dev/natd/natd.Version=..."); "dev" otherwise.
var Version = "dev"

// revision is the source revision, stamped at build time like Version (Go's own VCS
// stamp is off where GOFLAGS has -buildvcs=false).
var revision = ""

// Revision is the source revision the binary was built from, with "-dirty" for
// uncommitted changes; "unknown" when neither the build nor Go stamped it.
func Revision() string {
	if revision != "" {
		return revision
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	rev, dirty := "unknown", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty {
		rev += "-dirty"
	}
	return rev
}

// VersionString is what `natd --version` prints.
func VersionString() string {
	return fmt.Sprintf("natd %s (revision %s, %s)", Version, Revision(), runtime.Version())
}
