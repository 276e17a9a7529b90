package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store/file"

	"frp-port-keeper/internal/store"

	"github.com/philippgille/gokv"
	gokvfile "github.com/philippgille/gokv/file"
)

// testLogger sends logs to t.Logf, so they show only for failing tests.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

// newFileKV opens a gokv file store in dir.
func newFileKV(t testing.TB, dir string) gokv.Store {
	t.Helper()
	kv, err := gokvfile.NewStore(gokvfile.Options{Directory: dir})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// storeKinds are the backends every core test runs on.
var storeKinds = []string{"file", "bbolt"}

// openTestStore opens a store of kind in dir the way the server does,
// lock included.
func openTestStore(t testing.TB, kind, dir string) store.Store {
	t.Helper()
	st, unlock, err := openStore(config{dataDir: dir, store: kind}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close(); unlock() })
	return st
}

// newTestAllocator opens an allocator over a file store in dir with pool.
func newTestAllocator(t testing.TB, dir, pool string, opts allocatorOptions) *allocator {
	t.Helper()
	return newAllocatorOn(t, newTestStore(t, dir), pool, opts)
}

func newAllocatorOn(t testing.TB, st store.Store, pool string, opts allocatorOptions) *allocator {
	t.Helper()
	set, err := parsePorts(pool)
	if err != nil {
		t.Fatal(err)
	}
	if opts.log == nil {
		opts.log = testLogger(t)
	}
	a, _, err := newAllocator(st, set, opts)
	if err != nil {
		t.Fatalf("newAllocator: %v", err)
	}
	return a
}

// post sends a plugin request to h and returns the status and body.
func post(t testing.TB, h http.Handler, op, body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest("POST", pluginPath+"?version=0.1.0&op="+op, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Frp-Reqid", "test")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// newProxyBody is a NewProxy request as frps sends it, with extra content fields.
func newProxyBody(user, name, typ string, extra string) string {
	content := `{"user":{"user":"` + user + `","metas":null,"run_id":"r1"},"proxy_name":"` + name + `","proxy_type":"` + typ + `"`
	if extra != "" {
		content += "," + extra
	}
	return `{"version":"0.1.0","op":"NewProxy","content":` + content + `}}`
}

// answer is the plugin's reply as frps decodes it.
type answer struct {
	Reject       bool                       `json:"reject"`
	RejectReason string                     `json:"reject_reason"`
	Unchange     bool                       `json:"unchange"`
	Content      map[string]json.RawMessage `json:"content"`
	Error        string                     `json:"error"`
	Message      string                     `json:"message"`
}

func decodeAnswer(t testing.TB, body string) answer {
	t.Helper()
	var a answer
	if err := json.Unmarshal([]byte(body), &a); err != nil {
		t.Fatalf("answer %q is not JSON: %v", body, err)
	}
	return a
}

// portOf returns the remote_port of an allowing answer, failing otherwise.
func portOf(t testing.TB, body string) int {
	t.Helper()
	a := decodeAnswer(t, body)
	if a.Reject || a.Unchange {
		t.Fatalf("answer %s: want a port", body)
	}
	var port int
	if err := json.Unmarshal(a.Content["remote_port"], &port); err != nil {
		t.Fatalf("answer %s: remote_port: %v", body, err)
	}
	return port
}

// faultyOps are a file store's writes, failing or stalling on demand.
type faultyOps struct {
	file.Ops
	mu    sync.Mutex
	fail  error         // returned by every write when set
	stall chan struct{} // writes block until it is closed, when set
	// failOn, when set, picks the writes that fail with fail.
	failOn func(op, name string) bool
}

func (f *faultyOps) set(fail error, stall chan struct{}) {
	f.mu.Lock()
	f.fail, f.stall, f.failOn = fail, stall, nil
	f.mu.Unlock()
}

// failWhen makes only the writes that pick chooses fail with err.
func (f *faultyOps) failWhen(err error, pick func(op, name string) bool) {
	f.mu.Lock()
	f.fail, f.stall, f.failOn = err, nil, pick
	f.mu.Unlock()
}

func (f *faultyOps) fault(op, name string) error {
	f.mu.Lock()
	fail, stall, pick := f.fail, f.stall, f.failOn
	f.mu.Unlock()
	if stall != nil {
		<-stall
	}
	if pick != nil && !pick(op, name) {
		return nil
	}
	return fail
}

func (f *faultyOps) WriteFile(name string, data []byte) error {
	if err := f.fault("write", name); err != nil {
		return err
	}
	return f.Ops.WriteFile(name, data)
}

func (f *faultyOps) CreateFile(name string, data []byte) error {
	if err := f.fault("create", name); err != nil {
		return err
	}
	return f.Ops.CreateFile(name, data)
}

func (f *faultyOps) Rename(from, to string) error {
	if err := f.fault("rename", to); err != nil {
		return err
	}
	return f.Ops.Rename(from, to)
}

func (f *faultyOps) Remove(name string) error {
	if err := f.fault("remove", name); err != nil {
		return err
	}
	return f.Ops.Remove(name)
}

func (f *faultyOps) SyncFile(name string) error {
	if err := f.fault("sync", name); err != nil {
		return err
	}
	return f.Ops.SyncFile(name)
}

func (f *faultyOps) SyncDir(name string) error {
	if err := f.fault("syncdir", name); err != nil {
		return err
	}
	return f.Ops.SyncDir(name)
}

// fullTier skips t under make test-unit (go test -short): it needs what
// only the full suite provides (frps and frpc, etcd, Docker, a browser,
// loop devices). make test, which CI runs, runs it.
func fullTier(t testing.TB, needs string) {
	t.Helper()
	if testing.Short() {
		t.Skipf("needs %s: run by make test, not by make test-unit", needs)
	}
}

// newTestStore opens a file store on dir without the directory lock.
func newTestStore(t testing.TB, dir string) *file.Store {
	t.Helper()
	s, err := file.OpenUnlocked(dir, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newFaultyStore is a file store on dir whose writes fail on demand.
func newFaultyStore(t testing.TB, dir string) (*file.Store, *faultyOps) {
	t.Helper()
	s := newTestStore(t, dir)
	f := &faultyOps{}
	s.WrapOps(func(inner file.Ops) file.Ops { f.Ops = inner; return f })
	return s, f
}

var errDiskFull = errors.New("no space left on device")

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// fakeClock is a clock that moves only when told to.
func fakeClock(start time.Time) (now func() time.Time, advance func(time.Duration)) {
	var mu sync.Mutex
	clock := start
	now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance = func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	return now, advance
}

// GoBuildTool runs `go build -o OUT PKGS...` inside the pinned tool module
// tools/NAME (GOWORK off), with its binaries going to bin/NAME/; out is
// relative to that directory ("" for the directory itself). It returns the
