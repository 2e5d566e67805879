#!/usr/bin/env bash
# The checks a user's security team runs, offline and deterministic: golangci-lint
# (errcheck, staticcheck, govet, ...) and govulncheck against the Go vulnerability
# database of a pinned golang.org/x/vulndb module version, indexed locally (no call to
# vuln.go.dev). Tools come through the Go module proxy at pinned versions and are
# cached in $NATD_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.27.3} # as the Makefile: the Go the checks run on
CACHE=${NATD_CACHE:-$HOME/.cache/natd}
GOLANGCI_LINT_VERSION=v2.15.0
GOVULNCHECK_VERSION=v1.9.0
VULNDB_VERSION=v0.0.0-20261105234957-e22db6528018

mkdir -p "$CACHE/bin"
tool() { # tool NAME PACKAGE@VERSION: builds once into $CACHE/bin/NAME-VERSION-GOVERSION
	local name=$1 pkg=$2 bin="$CACHE/bin/$1-${2##*@}-$($GO env GOVERSION)"
	if [[ ! -x $bin ]]; then
		GOBIN="$CACHE/bin/.tmp-$name" $GO install "$pkg" >&2
		mv "$CACHE/bin/.tmp-$name/$name" "$bin"
		rmdir "$CACHE/bin/.tmp-$name"
	fi
	echo "$bin"
}

lint=$(tool golangci-lint github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$GOLANGCI_LINT_VERSION)
echo "golangci-lint $GOLANGCI_LINT_VERSION"
"$lint" run ./...

db="$CACHE/vulndb-$VULNDB_VERSION"
if [[ ! -f $db/index/db.json ]]; then
	src=$($GO mod download -json "golang.org/x/vulndb@$VULNDB_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
	indexdb=$(tool indexdb "golang.org/x/vulndb/cmd/indexdb@$VULNDB_VERSION")
	rm -rf "$db.tmp" && mkdir -p "$db.tmp"
	"$indexdb" -vulns "$src/data/osv" -out "$db.tmp"
	mv "$db.tmp" "$db"
fi
govulncheck=$(tool govulncheck golang.org/x/vuln/cmd/govulncheck@$GOVULNCHECK_VERSION)
echo "govulncheck $GOVULNCHECK_VERSION, database golang.org/x/vulndb@$VULNDB_VERSION"
"$govulncheck" -db "file://$db" ./...
