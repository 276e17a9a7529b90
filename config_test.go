package main

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"frp-port-keeper/internal/store"
)

func TestParseConfigEnvFallback(t *testing.T) {
	env := map[string]string{
		"FRP_PORT_KEEPER_LISTEN":      "127.0.0.1:9999",
		"FRP_PORT_KEEPER_DATA_DIR":    "/from/env",
		"FRP_PORT_KEEPER_PROBE":       "false",
		"FRP_PORT_KEEPER_ALLOW_PORTS": "20000-20010",
	}
	cfg, err := parseConfig([]string{"-data-dir", "/from/flag"}, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.listen != "127.0.0.1:9999" || cfg.dataDir != "/from/flag" || cfg.probe || cfg.allowPorts != "20000-20010" {
		t.Fatalf("config = %+v; want listen and probe from env, data dir from the flag", cfg)
	}
	defaults, _ := parseConfig(nil, func(string) string { return "" })
	if defaults.listen != "127.0.0.1:8080" || defaults.dataDir != "gokv" || !defaults.probe || defaults.store != "file" {
		t.Fatalf("defaults = %+v", defaults)
	}
}

// TestStartErrors: every bad setting stops the start with one line naming it.
func TestStartErrors(t *testing.T) {
	frpsBad := filepath.Join(t.TempDir(), "frps.toml")
	os.WriteFile(frpsBad, []byte("bindPort = \"nope\"\n"), 0o600)
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"unknown flag", []string{"-nope"}, nil, "flag provided but not defined: -nope"},
		{"bad range", []string{"-allow-ports", "7000-6000"}, nil, "-allow-ports: port list item \"7000-6000\": range end is below its start"},
		{"not a port", []string{"-allow-ports", "http"}, nil, "-allow-ports: port list item \"http\""},
		{"missing frps config", []string{"-frps-config", "/nonexistent/frps.toml"}, nil, "-frps-config /nonexistent/frps.toml"},
		{"broken frps config", []string{"-frps-config", frpsBad}, nil, "-frps-config " + frpsBad},
		{"bad env", nil, map[string]string{"FRP_PORT_KEEPER_PROBE": "maybe"}, `FRP_PORT_KEEPER_PROBE="maybe"`},
		{"bad store", []string{"-store", "mysql"}, nil, `-store "mysql": want file, bbolt or etcd`},
		{"lonely etcd cert", []string{"-etcd-cert", "x.pem"}, nil, "-etcd-cert and -etcd-key go together"},
		{"lonely cert", []string{"-tls-cert", "x.pem"}, nil, "-tls-cert and -tls-key go together"},
		{"bad listen", []string{"-listen", "256.0.0.1:1"}, nil, "-listen:"},
		{"unknown command", []string{"frobnicate"}, nil, `unknown command "frobnicate"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"-data-dir", t.TempDir(), "-listen", "127.0.0.1:0"}, tt.args...)
			if tt.name == "unknown command" {
				args = tt.args
			}
			err := run(context.Background(), args, func(k string) string { return tt.env[k] }, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("run(%q) = %v; want one line containing %q", args, err, tt.want)
			}
		})
	}
}

// TestPlanPoolFromFrpsConfig reads frps's own config, in each format frps
// reads, with frp's loader.
func TestPlanPoolFromFrpsConfig(t *testing.T) {
	tests := []struct {
		name, file, body string
		allow            string // -allow-ports
		wantPool         string // the allowed ports, alike in both spaces
		wantExcluded     []int  // kept out of the tcp space
		wantUDPExcluded  []int  // kept out of the udp space
		wantBind         string
	}{
		{name: "toml", file: "frps.toml", body: `
bindPort = 7000
vhostHTTPPort = 7080
proxyBindAddr = "127.0.0.1"
webServer.port = 7500
allowPorts = [{ start = 7000, end = 7010 }, { single = 7500 }, { start = 20000, end = 20002 }]
`, wantPool: "7000-7010,7500,20000-20002", wantExcluded: []int{7000, 7080, 7500}, wantBind: "127.0.0.1"},
		{name: "legacy ini", file: "frps.ini", body: `[common]
bind_port = 7000
kcp_bind_port = 7000
dashboard_port = 7500
allow_ports = 7000-7005,7500
`, wantPool: "7000-7005,7500", wantExcluded: []int{7000, 7500}, wantUDPExcluded: []int{7000}, wantBind: "0.0.0.0"},
		{name: "yaml", file: "frps.yaml", body: "bindPort: 7100\nallowPorts:\n  - start: 7100\n    end: 7103\n", wantPool: "7100-7103", wantExcluded: []int{7100}, wantBind: "0.0.0.0"},
		{name: "json", file: "frps.json", body: `{"bindPort": 7200, "allowPorts": [{"start": 7200, "end": 7202}]}`, wantPool: "7200-7202", wantExcluded: []int{7200}, wantBind: "0.0.0.0"},
		{name: "narrowed by -allow-ports", file: "frps.toml", body: "bindPort = 7000\nallowPorts = [{ start = 7000, end = 7100 }]\n",
			allow: "7050-7200", wantPool: "7050-7100", wantExcluded: []int{7000}, wantBind: "0.0.0.0"},
		{name: "no allowPorts: the default pool minus frps's ports", file: "frps.toml", body: "bindPort = 10001\n",
			wantPool: "10000-32767", wantExcluded: []int{10001}, wantBind: "0.0.0.0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), tt.file)
			if err := os.WriteFile(path, []byte(tt.body), 0o600); err != nil {
				t.Fatal(err)
			}
			plan, err := planPool(config{frpsConfig: path, allowPorts: tt.allow}, 0)
			if err != nil {
				t.Fatal(err)
			}
			if got := plan.pool.String(); got != tt.wantPool {
				t.Errorf("pool = %s; want %s", got, tt.wantPool)
			}
			var wantExcluded []store.Slot
			for _, p := range tt.wantExcluded {
				wantExcluded = append(wantExcluded, store.TCPPort(p))
			}
			for _, p := range tt.wantUDPExcluded {
				wantExcluded = append(wantExcluded, store.UDPPort(p))
			}
			if len(plan.excluded) != len(wantExcluded) {
				t.Errorf("excluded %v; want %v", plan.excluded, wantExcluded)
			}
			for _, slot := range wantExcluded {
				if plan.excluded[slot] == "" {
					t.Errorf("port %v not excluded (%v)", slot, plan.excluded)
				}
			}
			if plan.probeAddr != tt.wantBind {
				t.Errorf("probe address = %q; want %q", plan.probeAddr, tt.wantBind)
			}
		})
	}
	// The plugin's own port is never a tcp proxy's; a udp proxy may have it.
	plan, err := planPool(config{allowPorts: "8000-8002"}, 8001)
	if err != nil || plan.pool.String() != "8000-8002" || plan.excluded[store.TCPPort(8001)] == "" || plan.excluded[store.UDPPort(8001)] != "" {
		t.Fatalf("own port: %v %v", plan.pool, err)
	}
	if _, err := planPool(config{allowPorts: "8001"}, 8001); err == nil || !strings.Contains(err.Error(), "pool is empty") {
		t.Fatalf("empty pool: %v", err)
	}
}

// TestPoolEmptySaysWhy: frps's own ports leave the pool only when
// -frps-config says what they are, and an empty pool names the ports that
// were taken out and why.
func TestPoolEmptySaysWhy(t *testing.T) {
	dir := t.TempDir()
	frps := func(body string) string {
		path := filepath.Join(dir, fmt.Sprintf("frps-%d.toml", len(body)))
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	bind7000 := frps("bindPort = 7000\n")
	bindAndDash := frps("bindPort = 7000\nwebServer.port = 7500\nallowPorts = [{ start = 7000, end = 7000 }, { single = 7500 }]\n")
	narrow := frps("bindPort = 7100\nallowPorts = [{ start = 7000, end = 7001 }]\n")
	tests := []struct {
		name       string
		cfg        config
		listenPort int
		wantPool   string // when the pool is not empty
		wantErr    string
	}{
		{name: "-allow-ports alone keeps frps's bindPort", cfg: config{allowPorts: "7000"}, wantPool: "7000"},
		{name: "-frps-config takes it out", cfg: config{allowPorts: "7000", frpsConfig: bind7000},
			wantErr: "the port pool is empty for tcp: -allow-ports 7000 minus 7000 (frps bindPort)"},
		{name: "and the plugin's own port", cfg: config{allowPorts: "7000-7001", frpsConfig: bind7000}, listenPort: 7001,
			wantErr: "the port pool is empty for tcp: -allow-ports 7000-7001 minus 7000 (frps bindPort), 7001 (the plugin's own port)"},
		{name: "frps's allowPorts alone", cfg: config{frpsConfig: bindAndDash},
			wantErr: "the port pool is empty for tcp: frps's allowPorts 7000,7500 minus 7000 (frps bindPort), 7500 (frps webServer.port)"},
		{name: "no port in common", cfg: config{allowPorts: "6000", frpsConfig: narrow},
			wantErr: "the port pool is empty: -allow-ports 6000 and frps's allowPorts 7000-7001 have no port in common"},
		{name: "both, minus frps's ports", cfg: config{allowPorts: "7000-7100", frpsConfig: narrow}, wantPool: "7000-7001"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan, err := planPool(tt.cfg, tt.listenPort)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("planPool(-allow-ports %q) = %v; want %q", tt.cfg.allowPorts, err, tt.wantErr)
				}
				return
			}
			if err != nil || plan.pool.String() != tt.wantPool {
				t.Fatalf("planPool(-allow-ports %q) = %v, %v; want pool %s", tt.cfg.allowPorts, plan.pool, err, tt.wantPool)
			}
		})
	}
	// The same line stops a real start.
	err := run(context.Background(), []string{"-listen", "127.0.0.1:0", "-data-dir", t.TempDir(), "-allow-ports", "7000", "-frps-config", bind7000},
		func(string) string { return "" }, io.Discard, io.Discard)
	if want := "the port pool is empty for tcp: -allow-ports 7000 minus 7000 (frps bindPort)"; err == nil || err.Error() != want {
		t.Fatalf("run = %v; want %q", err, want)
	}
}

// TestFrpsConfigUnreadable: a frps config this process may not read is
// an error that says which user it runs as and how to let it read the
// file (tests run as root, who reads everything, so the error is made).
func TestFrpsConfigUnreadable(t *testing.T) {
	err := frpsConfigError("/etc/frp/frps.toml", &fs.PathError{Op: "open", Path: "/etc/frp/frps.toml", Err: fs.ErrPermission})
	for _, want := range []string{"-frps-config /etc/frp/frps.toml", "permission denied", fmt.Sprintf("uid %d", os.Getuid()),
		"chmod 0640 /etc/frp/frps.toml", `user: "0:0"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if err := frpsConfigError("/x.toml", fs.ErrNotExist); strings.Contains(err.Error(), "chmod") {
		t.Errorf("a missing file: %q; want no advice on permissions", err)
	}
}
