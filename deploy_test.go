package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestSystemdUnit checks the shipped unit with systemd's own verifier. The
// unit names /usr/local/bin/frp-port-keeper; the test points that one path
// at a freshly built binary, since verify insists the binary exists.
func TestSystemdUnit(t *testing.T) {
	unit, err := os.ReadFile("deploy/frp-port-keeper.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"DynamicUser=yes", "StateDirectory=frp-port-keeper", "NoNewPrivileges=yes", "ProtectSystem=strict",
		"ExecStart=/usr/local/bin/frp-port-keeper -data-dir ${STATE_DIRECTORY}"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found; install it with: apt-get install systemd")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "frp-port-keeper.service")
	local := strings.ReplaceAll(string(unit), "/usr/local/bin/frp-port-keeper", binary(t))
	if err := os.WriteFile(path, []byte(local), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
