package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"frp-port-keeper/internal/store"

	frpconfig "github.com/fatedier/frp/pkg/config"
)

// TestSystemdUnit checks the shipped unit with systemd's own verifier. The
// unit names /usr/local/bin/frp-port-keeper; the test points that one path
// at a freshly built binary, since verify insists the binary exists.
func TestSystemdUnit(t *testing.T) {
	fullTier(t, "systemd-analyze")
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

// TestDockerComposeFiles: deploy/docker-compose.yml runs both services on
// the host network with the data volume and frps's config mounted
// read-only, and deploy/frps.toml calls the plugin where compose makes it
// listen and leaves it a pool. (TestDockerImage runs the image itself.)
func TestDockerComposeFiles(t *testing.T) {
	compose, err := os.ReadFile("deploy/docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"image: frp-port-keeper:latest", "image: fatedier/frps:v0.65.0",
		`command: ["-frps-config", "/etc/frp/frps.toml"]`, `FRP_PORT_KEEPER_LISTEN: "127.0.0.1:8080"`,
		"- port-keeper-data:/data", "/etc/frp/frps.toml:/etc/frp/frps.toml:ro",
		// docs/docker.md's backup and restore name the volume as is
		"  port-keeper-data:\n    # Named as is, not <project>_port-keeper-data, so the backup and\n    # restore commands of docs/docker.md work as written.\n    name: port-keeper-data\n",
	} {
		if !strings.Contains(string(compose), want) {
			t.Errorf("docker-compose.yml lacks %q", want)
		}
	}
	if n := strings.Count(string(compose), "network_mode: host"); n != 2 {
		t.Errorf("docker-compose.yml has network_mode: host %d times; want 2 (frps and the plugin)", n)
	}
	if n := strings.Count(string(compose), "/etc/frp/frps.toml:ro"); n != 2 {
		t.Errorf("docker-compose.yml mounts frps.toml read-only %d times; want 2", n)
	}

	cfg, _, err := frpconfig.LoadServerConfig("deploy/frps.toml", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.HTTPPlugins) != 1 || cfg.HTTPPlugins[0].Addr != "127.0.0.1:8080" || cfg.HTTPPlugins[0].Path != pluginPath ||
		!slices.Equal(cfg.HTTPPlugins[0].Ops, []string{"NewProxy", "CloseProxy"}) {
		t.Errorf("deploy/frps.toml httpPlugins = %+v; want one at 127.0.0.1:8080%s for NewProxy and CloseProxy (as README.md says)", cfg.HTTPPlugins, pluginPath)
	}
	// README.md's frps.toml stanzas ask frps for the same ops.
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	stanzas := 0
	for _, block := range strings.Split(string(readme), "```toml\n")[1:] {
		block, _, _ = strings.Cut(block, "```")
		if !strings.Contains(block, "[[httpPlugins]]") {
			continue
		}
		stanzas++
		path := filepath.Join(t.TempDir(), "frps.toml")
		if err := os.WriteFile(path, []byte(block), 0o644); err != nil {
			t.Fatal(err)
		}
		rc, _, err := frpconfig.LoadServerConfig(path, false)
		if err != nil {
			t.Fatalf("README.md's stanza %q: %v", block, err)
		}
		if len(rc.HTTPPlugins) != 1 || !slices.Equal(rc.HTTPPlugins[0].Ops, cfg.HTTPPlugins[0].Ops) {
			t.Errorf("README.md's stanza %q asks for %+v; deploy/frps.toml for ops %v", block, rc.HTTPPlugins, cfg.HTTPPlugins[0].Ops)
		}
	}
	if stanzas == 0 {
		t.Error("README.md has no frps.toml stanza with [[httpPlugins]]")
	}
	plan, err := planPool(config{frpsConfig: "deploy/frps.toml"}, 8080)
	if err != nil || plan.pool.len() == 0 || plan.excluded[store.TCPPort(cfg.BindPort)] == "" {
		t.Errorf("pool from deploy/frps.toml = %v, %v; want a pool without frps's bindPort", plan.pool, err)
	}
}
