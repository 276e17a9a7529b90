package main

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

// setDeathSignal makes the kernel kill the child when the load tool dies,
// so no server outlives a crashed or interrupted run.
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// resetPeak sets the process's VmHWM back to its VmRSS (clear_refs 5), so
// that a later VmHWM is the peak since now, not since the start.
func resetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}
