//go:build !linux

package main

import "os/exec"

// setDeathSignal has no equivalent outside Linux; killAll still runs on
// every exit the load tool sees.
func setDeathSignal(*exec.Cmd) {}
