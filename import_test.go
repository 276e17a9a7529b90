package main

// The offline import (import -data-dir, with no server running) records
// through the same allocator.importAll as POST /api/import: the same
// checks, all or nothing.

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/store/local"
)

// runImportOffline runs `import FILE` with args (a data directory and flags).
func runImportOffline(t testing.TB, file string, args ...string) (string, error) {
	t.Helper()
	name := filepath.Join(t.TempDir(), "in.json")
	if err := os.WriteFile(name, []byte(file), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(nil, append(append([]string{"import"}, args...), name)...)
	return stdout + stderr, err
}

// storedKeys lists the keys a data directory holds, as a server would load them.
func storedKeys(t testing.TB, dir string) []string {
	t.Helper()
	a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	var keys []string
	for _, v := range a.snapshot() {
		keys = append(keys, v.Key)
	}
	return keys
}

// TestOfflineImportAllOrNothing: when the second allocation cannot be
// written (a directory stands where its key record goes: a real rename
// failure), the first one is undone and the store holds what it held.
func TestOfflineImportAllOrNothing(t *testing.T) {
	dir := t.TempDir()
	if out, err := runImportOffline(t, `{"allocations":[{"key":"u.held","port":30000,"user":"u","proxy_name":"u.held","proxy_type":"tcp"}]}`, "-data-dir", dir); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	blocker := filepath.Join(dir, file.RecordFile(local.KeyName("u.b")))
	if err := os.MkdirAll(filepath.Join(blocker, "in-the-way"), 0o700); err != nil {
		t.Fatal(err)
	}
	file := `{"allocations":[
		{"key":"u.a","port":30001,"user":"u","proxy_name":"u.a","proxy_type":"tcp"},
		{"key":"u.b","port":30002,"user":"u","proxy_name":"u.b","proxy_type":"tcp"}]}`
	out, err := runImportOffline(t, file, "-data-dir", dir)
	if err == nil || !strings.Contains(err.Error(), `"u.b"`) || !strings.Contains(err.Error(), "nothing imported") {
		t.Fatalf("import whose second write fails: %v\n%s; want it refused naming u.b", err, out)
	}
	if err := os.RemoveAll(blocker); err != nil {
		t.Fatal(err)
	}
	if keys := storedKeys(t, dir); len(keys) != 1 || keys[0] != "u.held" {
		t.Fatalf("after a failed import the store holds %q; want only u.held", keys)
	}
}

// TestOfflineImportRefusesFrpsPorts: frps's own ports (from -frps-config,
// or FRP_PORT_KEEPER_FRPS_CONFIG) are refused offline as the server
// refuses them, and nothing is written.
func TestOfflineImportRefusesFrpsPorts(t *testing.T) {
	dir := t.TempDir()
	frps := filepath.Join(t.TempDir(), "frps.toml")
	if err := os.WriteFile(frps, []byte("bindPort = 7000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	file := `{"allocations":[
		{"key":"u.a","port":30001,"user":"u","proxy_name":"u.a","proxy_type":"tcp"},
		{"key":"u.frps","port":7000,"user":"u","proxy_name":"u.frps","proxy_type":"tcp"}]}`
	out, err := runImportOffline(t, file, "-data-dir", dir, "-frps-config", frps)
	if err == nil || !strings.Contains(err.Error(), "port 7000 is used by frps itself (frps bindPort)") {
		t.Fatalf("import onto frps's bindPort: %v\n%s; want it refused", err, out)
	}
	if keys := storedKeys(t, dir); len(keys) != 0 {
		t.Fatalf("a refused import wrote %q", keys)
	}
	// A port outside the pool is kept, and said so, as through the server.
	out, err = runImportOffline(t, `{"allocations":[{"key":"u.y","port":6000,"user":"u","proxy_name":"u.y","proxy_type":"tcp"}]}`,
		"-data-dir", dir, "-frps-config", frps)
	if err != nil || !strings.Contains(out, "u.y:6000 is outside the pool") || !strings.Contains(out, "imported 1") {
		t.Fatalf("import outside the pool: %v\n%s", err, out)
	}
}
