//go:build race

package election

// underRace: the race detector slows every memory access several times over, so
// a test whose claim is about timing against a CPU-bound flood asserts it only in
// the plain run (make test runs this package both ways).
const underRace = true
