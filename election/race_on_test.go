//go:build race

package election

// underRace: the race detector slows every memory access several times over, so
// tests whose claims are about timing run slower heartbeats, or assert the timing
// only in the plain run (make test runs this package both ways).
const underRace = true
