//go:build !race

package election

const underRace = false
