package main

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel kill the child when the load tool dies,
// so no server outlives a crashed or interrupted run.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
