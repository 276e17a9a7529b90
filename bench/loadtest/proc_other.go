//go:build !linux

package main

import (
	"errors"
	"os/exec"
)

// setDeathSignal has no equivalent outside Linux; killAll still runs on
// every exit the load tool sees.
func setDeathSignal(*exec.Cmd) {}

// resetPeak needs Linux's /proc/PID/clear_refs.
func resetPeak(int) error { return errors.New("cannot reset the peak memory outside Linux") }
