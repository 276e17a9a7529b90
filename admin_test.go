package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/store/local"
	"frp-port-keeper/internal/testenv"
)

// TestAdminAPI walks every status of the admin API, with and without a
// token, from loopback and from elsewhere.
func TestAdminAPI(t *testing.T) {
	type step struct {
		name       string
		method     string
		path       string
		body       string
		token      string // Authorization: Bearer token
		remote     string // peer address; loopback when empty
		wantStatus int
		wantBody   string // substring
	}
	run := func(t *testing.T, serverToken string, steps []step) {
		a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
		h := newServer(a, testLogger(t), serverOptions{adminToken: serverToken})
		post(t, h, "NewProxy", newProxyBody("alice", "alice.ssh", "tcp", ""))
		post(t, h, "NewProxy", newProxyBody("bob", "bob.wg", "udp", ""))
		for _, s := range steps {
			req := httptest.NewRequest(s.method, s.path, strings.NewReader(s.body))
			req.RemoteAddr = "127.0.0.1:5555"
			if s.remote != "" {
				req.RemoteAddr = s.remote
			}
			if s.token != "" {
				req.Header.Set("Authorization", "Bearer "+s.token)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != s.wantStatus || !strings.Contains(rec.Body.String(), s.wantBody) {
				t.Errorf("%s: %s %s = %d %s; want %d containing %q", s.name, s.method, s.path, rec.Code, rec.Body, s.wantStatus, s.wantBody)
			}
		}
	}
	t.Run("no token", func(t *testing.T) {
		run(t, "", []step{
			{name: "list", method: "GET", path: "/api/allocations", wantStatus: 200,
				wantBody: `"key":"alice.ssh","proxy_name":"alice.ssh","user":"alice","proxy_type":"tcp","group":"","port":30000`},
			{name: "list has pool", method: "GET", path: "/api/allocations", wantStatus: 200, wantBody: `"pool":{"size":20,"used":2,"free":18,"tcp":{"size":10,"used":1,"free":9},"udp":{"size":10,"used":1,"free":9}}`},
			{name: "list by user", method: "GET", path: "/api/allocations?user=bob", wantStatus: 200, wantBody: `"allocations":[{"key":"bob.wg"`},
			{name: "list unknown user", method: "GET", path: "/api/allocations?user=zed", wantStatus: 200, wantBody: `"allocations":[]`},
			{name: "show", method: "GET", path: "/api/allocations/alice.ssh", wantStatus: 200, wantBody: `"port":30000`},
			{name: "show missing", method: "GET", path: "/api/allocations/nobody", wantStatus: 404, wantBody: "no allocation"},
			{name: "pin new key", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"port":30005}`, wantStatus: 200, wantBody: `"port":30005`},
			{name: "move key", method: "PUT", path: "/api/allocations/alice.ssh", body: `{"port":30006}`, wantStatus: 200, wantBody: `"user":"alice","proxy_type":"tcp","group":"","port":30006`},
			{name: "old port free", method: "PUT", path: "/api/allocations/dave.ssh", body: `{"port":30000}`, wantStatus: 200, wantBody: `"port":30000`},
			{name: "port of another key", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"port":30006}`, wantStatus: 409, wantBody: "reserved"},
			{name: "outside pool", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"port":40000}`, wantStatus: 200, wantBody: `"pinned":true,"outside_pool":true,"outside_policy":false`},
			{name: "invalid port", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"port":70000}`, wantStatus: 422, wantBody: "not a valid port"},
			{name: "invalid port", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"port":70000}`, wantStatus: 422, wantBody: "not a valid port"},
			{name: "bad body", method: "PUT", path: "/api/allocations/carol.ssh", body: `{"prt":1}`, wantStatus: 400, wantBody: "port"},
			{name: "escaped key", method: "PUT", path: "/api/allocations/group:a%2Fb", body: `{"port":30007}`, wantStatus: 200, wantBody: `"key":"group:a/b","proxy_name":"","user":"","proxy_type":"","group":"a/b"`},
			{name: "release", method: "DELETE", path: "/api/allocations/carol.ssh", wantStatus: 204},
			{name: "release again", method: "DELETE", path: "/api/allocations/carol.ssh", wantStatus: 404, wantBody: "no allocation"},
			{name: "show released", method: "GET", path: "/api/allocations/carol.ssh", wantStatus: 404},
			{name: "not loopback", method: "GET", path: "/api/allocations", remote: "192.0.2.7:4000", wantStatus: 403},
			{name: "not loopback page", method: "GET", path: "/", remote: "192.0.2.7:4000", wantStatus: 403},
			{name: "not loopback metrics", method: "GET", path: "/metrics", remote: "192.0.2.7:4000", wantStatus: 403},
			{name: "ipv6 loopback", method: "GET", path: "/api/allocations", remote: "[::1]:4000", wantStatus: 200},
			{name: "plugin path open to all", method: "GET", path: "/ping", remote: "192.0.2.7:4000", wantStatus: 200, wantBody: "pong"},
			{name: "page", method: "GET", path: "/", wantStatus: 200, wantBody: "<td>alice.ssh</td>"},
		})
	})
	t.Run("token", func(t *testing.T) {
		run(t, "s3cret", []step{
			{name: "no token", method: "GET", path: "/api/allocations", wantStatus: 401},
			{name: "wrong token", method: "GET", path: "/api/allocations", token: "s3cre", wantStatus: 401},
			{name: "right token", method: "GET", path: "/api/allocations", token: "s3cret", wantStatus: 200, wantBody: "alice.ssh"},
			{name: "right token from elsewhere", method: "GET", path: "/api/allocations", token: "s3cret", remote: "192.0.2.7:4000", wantStatus: 200},
			{name: "no token from loopback", method: "DELETE", path: "/api/allocations/alice.ssh", wantStatus: 401},
			{name: "put with token", method: "PUT", path: "/api/allocations/x", body: `{"port":30009}`, token: "s3cret", wantStatus: 200},
			{name: "delete with token", method: "DELETE", path: "/api/allocations/x", token: "s3cret", wantStatus: 204},
			{name: "page needs token", method: "GET", path: "/", wantStatus: 401},
			{name: "metrics need token", method: "GET", path: "/metrics", wantStatus: 401},
		})
	})
}

// TestAdminChangesPersist: API changes go through the store like the plugin's.
func TestAdminChangesPersist(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{})
	post(t, h, "NewProxy", newProxyBody("alice", "alice.ssh", "tcp", ""))
	for _, r := range []struct{ method, path, body string }{
		{"PUT", "/api/allocations/alice.ssh", `{"port":30004}`},
		{"PUT", "/api/allocations/bob.ssh", `{"port":30002}`},
	} {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(r.method, r.path, strings.NewReader(r.body))
		req.RemoteAddr = "127.0.0.1:5555"
		h.ServeHTTP(rec, req)
		if rec.Code != 200 {
			t.Fatalf("%s %s = %d", r.method, r.path, rec.Code)
		}
	}
	b := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	hb := newServer(b, testLogger(t), serverOptions{})
	if _, body := post(t, hb, "NewProxy", newProxyBody("alice", "alice.ssh", "tcp", "")); portOf(t, body) != 30004 {
		t.Fatalf("moved key after restart: %s; want 30004", body)
	}
	if _, body := post(t, hb, "NewProxy", newProxyBody("bob", "bob.ssh", "tcp", "")); portOf(t, body) != 30002 {
		t.Fatalf("pinned key after restart: %s; want 30002", body)
	}
}

// TestLastSeen: hits update last_seen in memory only; it reaches the store
// at the hourly flush and at shutdown.
func TestLastSeen(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	a := newTestAllocator(t, dir, "30000-30009", allocatorOptions{now: now})
	mustAllocate(t, a, req("a", "a.p", "tcp"))
	advance(10 * time.Minute)
	mustAllocate(t, a, req("a", "a.p", "tcp"))
	if _, seen, _ := a.lookup("a.p"); !seen.Equal(clock) {
		t.Fatalf("last_seen in memory = %v; want %v", seen, clock)
	}
	if _, err := os.Stat(filepath.Join(dir, local.SeenName("a.p")+".json")); !os.IsNotExist(err) {
		t.Fatalf("a hit wrote to disk: %v", err)
	}
	if n, err := a.flushSeen(seenInterval); err != nil || n != 1 {
		t.Fatalf("first flush wrote %d (%v); want 1", n, err)
	}
	advance(10 * time.Minute)
	mustAllocate(t, a, req("a", "a.p", "tcp"))
	if n, _ := a.flushSeen(seenInterval); n != 0 {
		t.Fatalf("second flush within the hour wrote %d; want 0", n)
	}
	if n, _ := a.flushSeen(0); n != 1 {
		t.Fatalf("shutdown flush wrote %d; want 1", n)
	}
	b := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	if _, seen, _ := b.lookup("a.p"); !seen.Equal(clock) {
		t.Fatalf("last_seen after restart = %v; want %v", seen, clock)
	}
}

// TestMetricsMove scrapes /metrics before and after some decisions.
func TestMetricsMove(t *testing.T) {
	dir := t.TempDir()
	st, kv := newFaultyStore(t, dir)
	var a *allocator
	m := newMetrics(func() poolStats { return a.stats() })
	a = newAllocatorOn(t, st, "30000-30001", allocatorOptions{storeFailed: func(error) { m.storeErrors.Inc() }})
	h := newServer(a, testLogger(t), serverOptions{metrics: m})
	scrape := func() string {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/metrics", nil)
		req.RemoteAddr = "127.0.0.1:1"
		h.ServeHTTP(rec, req)
		return rec.Body.String()
	}
	before := scrape()
	for _, want := range []string{`frp_port_keeper_decisions_total{outcome="hit"} 0`, `frp_port_keeper_pool_ports{proto="tcp",state="free"} 2`, `frp_port_keeper_pool_ports{proto="udp",state="free"} 2`} {
		if !strings.Contains(before, want) {
			t.Fatalf("metrics lack %q:\n%s", want, before)
		}
	}
	post(t, h, "NewProxy", newProxyBody("a", "a.1", "tcp", ""))
	post(t, h, "NewProxy", newProxyBody("a", "a.1", "tcp", ""))
	post(t, h, "NewProxy", newProxyBody("a", "a.2", "tcp", `"remote_port":30001`))
	post(t, h, "NewProxy", newProxyBody("a", "a.3", "tcp", ""))
	post(t, h, "NewProxy", newProxyBody("a", "a.h", "http", ""))
	post(t, h, "NewProxy", `nope`)
	kv.set(errDiskFull, nil)
	a.release("a.1", "test")
	after := scrape()
	for _, want := range []string{
		`frp_port_keeper_decisions_total{outcome="hit"} 1`,
		`frp_port_keeper_decisions_total{outcome="new"} 1`,
		`frp_port_keeper_decisions_total{outcome="requested"} 1`,
		`frp_port_keeper_decisions_total{outcome="rejected"} 1`,
		`frp_port_keeper_decisions_total{outcome="invalid"} 1`,
		`frp_port_keeper_decisions_total{outcome="passthrough"} 1`,
		`frp_port_keeper_pool_ports{proto="tcp",state="used"} 2`,
		`frp_port_keeper_pool_ports{proto="tcp",state="free"} 0`,
		`frp_port_keeper_pool_ports{proto="udp",state="free"} 2`,
		`frp_port_keeper_store_errors_total 1`,
		`frp_port_keeper_request_duration_seconds_count 6`,
	} {
		if !strings.Contains(after, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// startServer runs the real program (run) on a free port and returns its
// base URL and a stop function that waits for it to exit; the server's
// log is shown when the test fails.
func startServer(t testing.TB, args ...string) (string, func()) {
	t.Helper()
	s := startInProc(t, append([]string{"-probe=false"}, args...)...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("server log:\n%s", s.log)
		}
	})
	return s.url, func() { s.stop(t) }
}

func register(t testing.TB, base, user, name, typ string) int {
	t.Helper()
	resp, err := http.Post(base+pluginPath+"?op=NewProxy", "application/json", strings.NewReader(newProxyBody(user, name, typ, "")))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return portOf(t, string(b))
}

// buildBinary builds the real program once per test binary.
var buildBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "frp-port-keeper-bin")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "frp-port-keeper")
	cmd := exec.Command("go", "build", "-ldflags", "-X main.version=v-test", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

func binary(t testing.TB) string {
	t.Helper()
	bin, err := buildBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// cli runs the real binary and returns stdout, failing on a non-zero exit
// unless wantErr.
func cli(t testing.TB, wantErr bool, stdin string, args ...string) (string, string) {
	t.Helper()
	bin := binary(t) // built on first use: not within the run's deadline
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if (err != nil) != wantErr {
		t.Fatalf("frp-port-keeper %v: err = %v; want error %v\nstdout: %s\nstderr: %s", args, err, wantErr, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String()
}

func TestCLIAgainstServer(t *testing.T) {
	base, _ := startServer(t, "-data-dir", t.TempDir(), "-allow-ports", "31000-31009", "-admin-token", "tok")
	register(t, base, "alice", "alice.ssh", "tcp")
	register(t, base, "bob", "bob.wg", "udp")
	srv := []string{"-server", base, "-admin-token", "tok"}

	out, _ := cli(t, false, "", append([]string{"list"}, srv...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 3 || !strings.HasPrefix(lines[0], "PORT") || strings.Join(strings.Fields(lines[1])[:5], " ") != "31000 tcp alice.ssh alice tcp" ||
		strings.Join(strings.Fields(lines[2])[:5], " ") != "31000 udp bob.wg bob udp" {
		t.Fatalf("list:\n%s", out)
	}
	out, _ = cli(t, false, "", append(append([]string{"list"}, srv...), "-json", "-user", "bob")...)
	var list allocationList
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list.Allocations) != 1 || list.Allocations[0].Key != "bob.wg" {
		t.Fatalf("list -json -user bob: %s (%v)", out, err)
	}
	out, _ = cli(t, false, "", append(append([]string{"assign"}, srv...), "alice.ssh", "31005")...)
	if !strings.Contains(out, "alice.ssh now holds port 31005") {
		t.Fatalf("assign: %s", out)
	}
	if port := register(t, base, "alice", "alice.ssh", "tcp"); port != 31005 {
		t.Fatalf("after assign the plugin answers %d; want 31005", port)
	}
	_, errOut := cli(t, true, "", append(append([]string{"assign"}, srv...), "carol.ssh", "31005")...)
	if !strings.Contains(errOut, "reserved") {
		t.Fatalf("assign taken port: %s", errOut)
	}
	out, _ = cli(t, false, "", append(append([]string{"show"}, srv...), "alice.ssh")...)
	if !strings.Contains(out, `"port": 31005`) {
		t.Fatalf("show: %s", out)
	}
	cli(t, false, "", append(append([]string{"release"}, srv...), "bob.wg")...)
	_, errOut = cli(t, true, "", append(append([]string{"show"}, srv...), "bob.wg")...)
	if !strings.Contains(errOut, "no allocation") {
		t.Fatalf("show released: %s", errOut)
	}
	_, errOut = cli(t, true, "", "list", "-server", base)
	if !strings.Contains(errOut, "401") {
		t.Fatalf("list without token: %s", errOut)
	}
	// The token also comes from the environment.
	cmd := exec.Command(binary(t), "list", "-server", base)
	cmd.Env = append(os.Environ(), "FRP_PORT_KEEPER_ADMIN_TOKEN=tok")
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "alice.ssh") {
		t.Fatalf("list with env token: %v %s", err, out)
	}
	for _, args := range [][]string{{"version"}, {"-version"}} {
		if out, _ := cli(t, false, "", args...); strings.TrimSpace(out) != "frp-port-keeper v-test" {
			t.Errorf("%v = %q; want the stamped version", args, out)
		}
	}
}

func TestExportImportAndLock(t *testing.T) {
	dir := t.TempDir()
	base, stop := startServer(t, "-data-dir", dir, "-allow-ports", "31000-31009")
	ports := map[string]int{}
	for _, name := range []string{"a.one", "a.two", "b.three"} {
		ports[name] = register(t, base, strings.Split(name, ".")[0], name, "tcp")
	}
	// While the server runs, the directory is locked: export and a second server refuse.
	_, errOut := cli(t, true, "", "export", "-data-dir", dir)
	if !strings.Contains(errOut, "in use by another frp-port-keeper") {
		t.Fatalf("export during serve: %s", errOut)
	}
	_, errOut = cli(t, true, "", "-listen", "127.0.0.1:0", "-data-dir", dir)
	if !strings.Contains(errOut, "in use by another frp-port-keeper") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Fatalf("second server on the same directory: %q; want one clear line", errOut)
	}
	stop()

	exported, _ := cli(t, false, "", "export", "-data-dir", dir)
	var file exportFile
	if err := json.Unmarshal([]byte(exported), &file); err != nil || len(file.Allocations) != 3 {
		t.Fatalf("export: %v\n%s", err, exported)
	}
	fresh := t.TempDir()
	_, errOut = cli(t, false, exported, "import", "-data-dir", fresh)
	if !strings.Contains(errOut, "imported 3") {
		t.Fatalf("import: %s", errOut)
	}
	again, _ := cli(t, false, "", "export", "-data-dir", fresh)
	if again != exported {
		t.Fatalf("round trip differs:\n%s\nwant\n%s", again, exported)
	}
	base2, _ := startServer(t, "-data-dir", fresh, "-allow-ports", "31000-31009")
	for name, port := range ports {
		if got := register(t, base2, strings.Split(name, ".")[0], name, "tcp"); got != port {
			t.Errorf("%s after import = %d; want %d", name, got, port)
		}
	}
	// An import that conflicts with what is there changes nothing.
	conflict := `{"allocations":[{"key":"z.new","port":31009,"user":"z","proxy_name":"z.new","proxy_type":"tcp"},{"key":"z.x","port":31000,"user":"z","proxy_name":"z.x","proxy_type":"tcp"}]}`
	other := t.TempDir()
	cli(t, false, exported, "import", "-data-dir", other)
	_, errOut = cli(t, true, conflict, "import", "-data-dir", other)
	if !strings.Contains(errOut, "port 31000") {
		t.Fatalf("conflicting import: %s", errOut)
	}
	if out, _ := cli(t, false, "", "export", "-data-dir", other); out != exported {
		t.Fatalf("a refused import changed the store:\n%s", out)
	}
}

// adminGet decodes a GET of an admin URL (from loopback, no token).
func adminGet(t testing.TB, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

// TestSignalsAndSecondServer runs the real binary: a second server on the
// same directory exits at once with one clear line (gokv's bbolt would
// otherwise wait forever for the first one's file lock), and SIGTERM stops
// the first cleanly, writing its checkpoint.
func TestSignalsAndSecondServer(t *testing.T) {
	for _, st := range storeKinds {
		t.Run(st, func(t *testing.T) {
			dir := t.TempDir()
			addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
			var stderr bytes.Buffer
			first := exec.Command(binary(t), "-listen", addr, "-data-dir", dir, "-store", st, "-probe=false", "-allow-ports", "31000-31009")
			first.Stderr = &stderr
			if err := first.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { first.Process.Kill(); first.Wait() })
			base := "http://" + addr
			waitFor(t, "the first server", 10*time.Second, func() bool {
				resp, err := http.Get(base + "/ping")
				if err == nil {
					resp.Body.Close()
				}
				return err == nil
			})
			port := register(t, base, "a", "a.p", "tcp")

			start := time.Now()
			_, errOut := cli(t, true, "", "-listen", "127.0.0.1:0", "-data-dir", dir, "-store", st)
			if !strings.Contains(errOut, "in use by another frp-port-keeper") || time.Since(start) > 10*time.Second {
				t.Fatalf("second server: %q after %v; want a prompt refusal", errOut, time.Since(start))
			}

			first.Process.Signal(syscall.SIGTERM)
			done := make(chan error, 1)
			go func() { done <- first.Wait() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("SIGTERM: exit %v; want 0\n%s", err, stderr.String())
				}
			case <-time.After(15 * time.Second):
				t.Fatal("SIGTERM: the server did not stop")
			}
			if !strings.Contains(stderr.String(), "shutting down") {
				t.Fatalf("no shutdown in the log:\n%s", stderr.String())
			}
			if _, err := os.Stat(filepath.Join(dir, file.CheckpointName)); st == "file" && err != nil {
				t.Fatalf("no checkpoint after SIGTERM: %v", err)
			}
			base2, _ := startServer(t, "-data-dir", dir, "-store", st, "-allow-ports", "31000-31009")
			if got := register(t, base2, "a", "a.p", "tcp"); got != port {
				t.Fatalf("after SIGTERM and restart a.p = %d; want %d", got, port)
			}
		})
	}
}

// TestAdminTokenSchemeAnyCase: the scheme of an Authorization header is
// case-insensitive (RFC 7235 section 2.1), so "bearer TOKEN" and "BEARER
// TOKEN" are taken as "Bearer TOKEN" is; the token itself is not.
func TestAdminTokenSchemeAnyCase(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{adminToken: "s3cret"})
	for _, tc := range []struct {
		auth string
		want int
	}{
		{"Bearer s3cret", 200},
		{"bearer s3cret", 200},
		{"BEARER s3cret", 200},
		{"bEaReR s3cret", 200},
		{"Bearer  s3cret", 200}, // RFC 7235: 1*SP after the scheme
		{"Bearer S3CRET", 401},
		{"Bearers3cret", 401},
		{"Basic s3cret", 401},
		{"bearer", 401},
		{"s3cret", 401},
	} {
		req := httptest.NewRequest("GET", "/api/allocations", nil)
		req.RemoteAddr = "192.0.2.7:4000"
		req.Header.Set("Authorization", tc.auth)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("Authorization: %q = %d %s; want %d", tc.auth, rec.Code, rec.Body, tc.want)
		}
	}
}
