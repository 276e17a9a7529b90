package main

// Robustness of the running server: torn store files at start, slow
// clients, hostile inputs. Each test runs the whole program through run()
// in this process, on loopback only, with every wait bounded.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/frpplugin/frpplugintest"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/store/local"
	"frp-port-keeper/internal/testenv"
)

// ---------------------------------------------------------------------------
// Helpers shared by robust_test.go and kill_test.go.

// syncBuffer is a bytes.Buffer that the server's log and the test may use
// at the same time.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// inProcServer is run() serving in a goroutine of the test.
type inProcServer struct {
	url    string
	log    *syncBuffer // stdout and stderr
	client *http.Client
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

const inProcTimeout = 10 * time.Second // start and stop bounds

// startInProc calls run() with args on a free loopback port and waits until
// it answers /ping.
func startInProc(t testing.TB, args ...string) *inProcServer {
	t.Helper()
	port := testenv.FreePort(t)
	args = append([]string{"-listen", fmt.Sprintf("127.0.0.1:%d", port)}, args...)
	ctx, cancel := context.WithCancel(context.Background())
	s := &inProcServer{
		url: fmt.Sprintf("http://127.0.0.1:%d", port), log: &syncBuffer{}, cancel: cancel, done: make(chan error, 1),
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}},
	}
	go func() {
		defer func() {
			if r := recover(); r != nil {
				s.done <- fmt.Errorf("run panicked: %v", r)
			}
		}()
		s.done <- run(ctx, args, func(string) string { return "" }, s.log, s.log)
	}()
	t.Cleanup(func() { s.stop(t) })
	deadline := time.Now().Add(inProcTimeout)
	for {
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("run(%q) returned %v before answering /ping; log:\n%s", args, err, s.log)
		default:
		}
		if s.ping() == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("run(%q): no pong within %v; log:\n%s", args, inProcTimeout, s.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping checks that GET /ping answers 200 "pong".
func (s *inProcServer) ping() error {
	resp, err := s.client.Get(s.url + "/ping")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(b) != "pong" {
		return fmt.Errorf("GET /ping: got %d %q; want 200 \"pong\"", resp.StatusCode, b)
	}
	return nil
}

// stop cancels run's context and waits for it to return nil.
func (s *inProcServer) stop(t testing.TB) {
	t.Helper()
	s.once.Do(func() {
		s.cancel()
		s.client.CloseIdleConnections()
		select {
		case err := <-s.done:
			if err != nil {
				t.Errorf("run returned %v after cancel; want nil", err)
			}
		case <-time.After(inProcTimeout):
			t.Errorf("run did not return within %v after cancel", inProcTimeout)
		}
	})
}

// post sends a plugin request with op in the query and returns the status
// and body.
func (s *inProcServer) post(t testing.TB, op, reqid string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.url+pluginPath+"?version=0.1.0&op="+op, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Frp-Reqid", reqid)
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatalf("POST %s (%d-byte body): %v; log:\n%s", pluginPath, len(body), err, tail(s.log.String(), 4000))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

// outcomes maps request ids to the outcome the server logged for them.
func (s *inProcServer) outcomes(t testing.TB) map[string]string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "log")
	if err := os.WriteFile(path, []byte(s.log.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := decisionOutcomes(path)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// requestContent is the raw content member of a plugin request body.
func requestContent(t testing.TB, body []byte) []byte {
	t.Helper()
	var env struct {
		Content json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		t.Fatalf("request body: %v", err)
	}
	return env.Content
}

// ---------------------------------------------------------------------------
// TestTornFilesLive

// TestTornFilesLive: files torn while the server was down (empty,
// truncated, garbage, wrong shape), one twin per allocation, are named in
// the log at the next start and every allocation keeps its port.
func TestTornFilesLive(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	args := []string{"-data-dir", dataDir, "-allow-ports", "40000-40099", "-probe=false"}

	s := startInProc(t, args...)
	const n = 12
	names := make([]string, n)
	ports := map[string]int{}
	for i := range names {
		names[i] = fmt.Sprintf("torn.p%02d", i)
		status, body := s.post(t, "NewProxy", "seed", []byte(newProxyBody("torn", names[i], "tcp", "")))
		if status != http.StatusOK {
			t.Fatalf("seed %s: status %d %s; want 200", names[i], status, body)
		}
		ports[names[i]] = portOf(t, string(body))
		// A hit, so the stop writes a last-seen record too.
		s.post(t, "NewProxy", "seed-again", []byte(newProxyBody("torn", names[i], "tcp", "")))
	}
	s.stop(t)
	// Torn files come from a crash, and a crash leaves no checkpoint that
	// still describes the directory: drop the one the clean stop wrote, so
	// the start reads every record, as after a crash.
	if err := os.RemoveAll(filepath.Join(dataDir, file.CheckpointDir)); err != nil {
		t.Fatal(err)
	}

	// One damage per allocation, never both twins; the last allocations
	// stay intact.
	damage := []struct {
		what string
		kind string // "port", "key" or "seen" record
		make func(orig []byte) []byte
	}{
		{"empty port record", "port", func([]byte) []byte { return nil }},
		{"truncated port record", "port", func(b []byte) []byte { return b[:len(b)/2] }},
		{"garbage port record", "port", func([]byte) []byte { return []byte("\x00\xff\xfegarbage{{") }},
		{"null port record", "port", func([]byte) []byte { return []byte("null") }},
		{"empty key record", "key", func([]byte) []byte { return nil }},
		{"truncated key record", "key", func(b []byte) []byte { return b[:len(b)-1] }},
		{"garbage key record", "key", func([]byte) []byte { return randomBytes(64) }},
		{"wrong-shape key record", "key", func([]byte) []byte { return []byte(`[1,2,3]`) }},
		{"key record of another key", "key", func([]byte) []byte { return []byte(`{"key":"someone.else","port":40099}`) }},
		{"truncated last-seen record", "seen", func(b []byte) []byte { return b[:len(b)/3] }},
	}
	damaged := map[string]string{} // file name -> what
	for i, d := range damage {
		name := names[i]
		file := local.PortName(store.TCPPort(ports[name])) + ".json"
		switch d.kind {
		case "key":
			file = local.KeyName(name) + ".json"
		case "seen":
			file = local.SeenName(name) + ".json"
		}
		path := filepath.Join(dataDir, file)
		orig, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s: %v", d.what, err)
		}
		if err := os.WriteFile(path, d.make(orig), 0o600); err != nil {
			t.Fatal(err)
		}
		damaged[file] = d.what
	}

	s = startInProc(t, args...)
	log := s.log.String()
	for file, what := range damaged {
		if !strings.Contains(log, file) {
			t.Errorf("start log does not name %s (%s); log:\n%s", file, what, log)
		}
	}
	for i, name := range names {
		reqid := fmt.Sprintf("torn-%d", i)
		status, body := s.post(t, "NewProxy", reqid, []byte(newProxyBody("torn", name, "tcp", "")))
		if status != http.StatusOK {
			t.Fatalf("%s: status %d %s; want 200", name, status, body)
		}
		if got := portOf(t, string(body)); got != ports[name] {
			t.Errorf("%s after restart: port %d; want %d", name, got, ports[name])
		}
	}
	got := s.outcomes(t)
	for i, name := range names {
		if oc := got[fmt.Sprintf("torn-%d", i)]; oc != "hit" {
			t.Errorf("%s after restart: outcome %q; want \"hit\"", name, oc)
		}
	}
	// A fresh key gets a port nobody holds.
	status, body := s.post(t, "NewProxy", "fresh", []byte(newProxyBody("torn", "torn.fresh", "tcp", "")))
	if status != http.StatusOK {
		t.Fatalf("fresh key: status %d %s", status, body)
	}
	fresh := portOf(t, string(body))
	for name, p := range ports {
		if p == fresh {
			t.Errorf("fresh key got port %d; want one not held by %s", fresh, name)
		}
	}
	s.stop(t)

	// Damaged files were set aside, not deleted, and the repairs stuck: the
	// next start finds nothing to report.
	q, err := os.ReadDir(filepath.Join(dataDir, file.QuarantineDir))
	if err != nil {
		t.Fatalf("quarantine: %v", err)
	}
	for file := range damaged {
		found := false
		for _, e := range q {
			found = found || strings.HasPrefix(e.Name(), file)
		}
		if !found {
			t.Errorf("quarantine holds no copy of %s", file)
		}
	}
	s = startInProc(t, args...)
	log = s.log.String()
	for file := range damaged {
		if strings.Contains(log, file) {
			t.Errorf("third start names %s again; want the repair written back; log:\n%s", file, log)
		}
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.IntN(256))
	}
	b[0] = 0xff // never valid JSON
	return b
}

// ---------------------------------------------------------------------------
// TestSlowClients

const (
	slowConns     = 500
	slowByteEvery = 100 * time.Millisecond
	slowMaxBytes  = 90 // per connection: 9 s at most
	slowPrompt    = time.Second
	slowCloseBy   = 10 * time.Second // the server's ReadHeaderTimeout is 5 s
)

// TestSlowClients: 500 connections that dribble a request header a byte at
// a time must not delay a normal NewProxy, and the server must drop them
// after its header timeout.
func TestSlowClients(t *testing.T) {
	conns := slowConns
	if need := uint64(2*conns + 200); !raiseNoFile(t, need) {
		// Both ends of each connection live in this process.
		conns = 200
		t.Logf("open-files limit too low for %d slow connections: using %d", slowConns, conns)
	}
	s := startInProc(t, "-data-dir", filepath.Join(t.TempDir(), "data"), "-allow-ports", "41000-41099", "-probe=false")

	header := []byte("POST " + pluginPath + "?version=0.1.0&op=NewProxy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: " +
		strings.Repeat("s", 200) + "\r\n\r\n")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	var open, closedByServer atomic.Int32
	start := time.Now()
	for i := range conns {
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(s.url, "http://"), 2*time.Second)
		if err != nil {
			t.Fatalf("slow connection %d: %v", i, err)
		}
		open.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			tick := time.NewTicker(slowByteEvery)
			defer tick.Stop()
			for j := 0; j < slowMaxBytes; j++ {
				c.SetWriteDeadline(time.Now().Add(time.Second))
				if _, err := c.Write(header[j : j+1]); err != nil {
					closedByServer.Add(1)
					open.Add(-1)
					return
				}
				select {
				case <-ctx.Done():
					open.Add(-1)
					return
				case <-tick.C:
				}
			}
			open.Add(-1)
		}()
	}
	t.Logf("%d slow connections opened in %v", conns, time.Since(start).Round(time.Millisecond))
	time.Sleep(3 * slowByteEvery) // every one has sent a few bytes

	// Normal requests, each on a new connection as frps makes them.
	var slowest time.Duration
	for i := range 5 {
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		body := newProxyBody("slow", fmt.Sprintf("slow.normal%d", i), "tcp", "")
		req, _ := http.NewRequest(http.MethodPost, s.url+pluginPath+"?version=0.1.0&op=NewProxy", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		began := time.Now()
		resp, err := client.Do(req)
		took := time.Since(began)
		slowest = max(slowest, took)
		if err != nil {
			t.Fatalf("normal NewProxy %d with %d slow connections open: %v (after %v)", i, open.Load(), err, took)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("normal NewProxy %d: status %d %s; want 200", i, resp.StatusCode, b)
		}
		portOf(t, string(b))
		if took > slowPrompt {
			t.Errorf("normal NewProxy %d answered after %v; want within %v", i, took, slowPrompt)
		}
		if n := open.Load(); n != int32(conns) {
			t.Errorf("normal NewProxy %d: %d slow connections still open; want all %d (measured while they are open)", i, n, conns)
		}
	}
	t.Logf("5 normal NewProxy requests beside %d slow connections: slowest answered in %v", conns, slowest.Round(time.Microsecond))
	if err := s.ping(); err != nil {
		t.Fatal(err)
	}

	// The server's header timeout drops every one of them.
	deadline := time.Now().Add(slowCloseBy - time.Since(start))
	for open.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := closedByServer.Load(); n != int32(conns) {
		t.Errorf("%d of %d slow connections closed by the server %v after they opened; want all (ReadHeaderTimeout)", n, conns, time.Since(start).Round(time.Millisecond))
	} else {
		t.Logf("server dropped all %d slow connections within %v", conns, time.Since(start).Round(time.Millisecond))
	}
}

// raiseNoFile makes sure the soft open-files limit is at least need,
// raising it up to the hard limit. It reports whether need fits.
func raiseNoFile(t testing.TB, need uint64) bool {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Logf("getrlimit: %v", err)
		return false
	}
	if lim.Cur >= need {
		return true
	}
	if lim.Max < need {
		return false
	}
	old := lim.Cur
	lim.Cur = need
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Logf("setrlimit: %v", err)
		return false
	}
	t.Cleanup(func() {
		lim.Cur = old
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	})
	return true
}

// ---------------------------------------------------------------------------
// TestHostileInputs

type hostileWant int

const (
	expectPort      hostileWant = iota // 200 with a remote_port in the pool
	expectReject                       // 200 {"reject":true, ...}
	expectInvalid                      // 400 VALIDATEERR
	expectUnchanged                    // 200 {"reject":false,"unchange":true}
	expectTooLarge                     // 413
)

func (w hostileWant) String() string {
	return [...]string{"200 with a port", "200 reject", "400 invalid", "200 unchanged", "413 too large"}[w]
}

const hostilePool = "42000-42199"

// hostileBody is a NewProxy body with the raw JSON text name for
// proxy_name (quotes included) and extra content members.
func hostileBody(user, rawName, extra string) []byte {
	content := `{"user":{"user":` + user + `,"metas":null,"run_id":"r"},"proxy_name":` + rawName + `,"proxy_type":"tcp"`
	if extra != "" {
		content += "," + extra
	}
	return []byte(`{"version":"0.1.0","op":"NewProxy","content":` + content + `}}`)
}

func q(s string) string { // a JSON string literal, escapes as encoding/json makes them
	b, _ := json.Marshal(s)
	return string(b)
}

func TestHostileInputs(t *testing.T) {
	nest := func(depth int, closed bool) string {
		s := strings.Repeat("[", depth)
		if closed {
			s += strings.Repeat("]", depth)
		}
		return s
	}
	manyMembers := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, `"m%d":%d,`, i, i)
		}
		return strings.TrimSuffix(b.String(), ",")
	}
	tests := []struct {
		name string
		op   string // query op; NewProxy when empty
		body []byte
		want hostileWant
		// wantReqPort is the port an allowing answer must carry, when set.
		wantReqPort int
		// reason is a substring of the reject reason, when set.
		reason string
	}{
		{name: "plain", body: hostileBody(`"h"`, q("h.plain"), ""), want: expectPort},
		{name: "slashes", body: hostileBody(`"h"`, q("h.a/b/c"), ""), want: expectPort},
		{name: "absolute path", body: hostileBody(`"h"`, q("/etc/passwd"), ""), want: expectPort},
		{name: "dot dot", body: hostileBody(`"h"`, q("../../../../../../tmp/evil"), ""), want: expectPort},
		{name: "dot", body: hostileBody(`""`, q("."), ""), want: expectPort},
		{name: "dotdot alone", body: hostileBody(`""`, q(".."), ""), want: expectPort},
		{name: "percent-encoded slash", body: hostileBody(`"h"`, q("h.%2F..%2F..%2Fx"), ""), want: expectPort},
		{name: "percent alone", body: hostileBody(`"h"`, q("h.%"), ""), want: expectPort},
		{name: "store-like names", body: hostileBody(`""`, q("port-42000.json"), ""), want: expectPort},
		{name: "lock and quarantine names", body: hostileBody(`""`, q(".lock/../quarantine"), ""), want: expectPort},
		{name: "backslashes", body: hostileBody(`"h"`, q(`h.a\..\..\b`), ""), want: expectPort},
		{name: "escaped NUL", body: hostileBody(`"h"`, `"h.a\u0000b"`, ""), want: expectPort},
		{name: "raw NUL byte", body: hostileBody(`"h"`, "\"h.a\x00b\"", ""), want: expectInvalid},
		{name: "escaped control characters", body: hostileBody(`"h"`, `"h.\u0001\u001f\t\n\r\b\f\u007f"`, ""), want: expectPort},
		{name: "raw control character", body: hostileBody(`"h"`, "\"h.a\x01b\"", ""), want: expectInvalid},
		{name: "raw newline in string", body: hostileBody(`"h"`, "\"h.a\nb\"", ""), want: expectInvalid},
		{name: "name of 255 bytes", body: hostileBody(`"h"`, q(strings.Repeat("n", 255)), ""), want: expectPort},
		{name: "name of 300 bytes", body: hostileBody(`"h"`, q(strings.Repeat("x", 300)), ""), want: expectPort},
		{name: "name of 100 KB", body: hostileBody(`"h"`, q(strings.Repeat("y", 100<<10)), ""), want: expectPort},
		{name: "name of 100 KB of slashes", body: hostileBody(`"h"`, q(strings.Repeat("/", 100<<10)), ""), want: expectPort},
		{name: "raw invalid UTF-8 in name", body: hostileBody(`"h"`, "\"h.\xff\xfe\xc0\xaf\"", ""), want: expectPort},
		{name: "raw invalid UTF-8 in user", body: hostileBody("\"\xff\"", q("h.badutf8user"), ""), want: expectPort},
		{name: "lone surrogate escape", body: hostileBody(`"h"`, `"h.\ud800"`, ""), want: expectPort},
		{name: "non-ASCII name", body: hostileBody(`"h"`, q("h.日本語🙂\u202e"), ""), want: expectPort},
		{name: "empty user", body: hostileBody(`""`, q("nouser"), ""), want: expectPort},

		{name: "remote_port -1", body: hostileBody(`"h"`, q("h.rp-neg"), `"remote_port":-1`), want: expectReject, reason: "not a valid port number"},
		{name: "remote_port 0", body: hostileBody(`"h"`, q("h.rp0"), `"remote_port":0`), want: expectPort},
		{name: "remote_port -0", body: hostileBody(`"h"`, q("h.rp-0"), `"remote_port":-0`), want: expectPort},
		{name: "remote_port null", body: hostileBody(`"h"`, q("h.rpnull"), `"remote_port":null`), want: expectPort},
		{name: "remote_port 65536", body: hostileBody(`"h"`, q("h.rp65536"), `"remote_port":65536`), want: expectReject, reason: "not a valid port number"},
		// An integer outside 0-65535 is a reject naming the port, whatever
		// its size, as long as frps itself can hold it (a Go int).
		{name: "remote_port 2^31", body: hostileBody(`"h"`, q("h.rp2p31"), `"remote_port":2147483648`), want: expectReject, reason: "not a valid port number"},
		// frps decodes remote_port into a Go int, so it can never send
		// this: not a valid request.
		{name: "remote_port beyond int64", body: hostileBody(`"h"`, q("h.rphuge"), `"remote_port":99999999999999999999999`), want: expectInvalid},
		{name: `remote_port "6000"`, body: hostileBody(`"h"`, q("h.rpstr"), `"remote_port":"6000"`), want: expectInvalid},
		{name: "remote_port 1e3", body: hostileBody(`"h"`, q("h.rpexp"), `"remote_port":1e3`), want: expectInvalid},
		{name: "remote_port 42001.0", body: hostileBody(`"h"`, q("h.rpfrac"), `"remote_port":42001.0`), want: expectInvalid},
		{name: "remote_port true", body: hostileBody(`"h"`, q("h.rpbool"), `"remote_port":true`), want: expectInvalid},
		{name: "remote_port object", body: hostileBody(`"h"`, q("h.rpobj"), `"remote_port":{"a":1}`), want: expectInvalid},
		{name: "remote_port outside the pool", body: hostileBody(`"h"`, q("h.rp80"), `"remote_port":80`), want: expectReject, reason: "outside the allowed ports"},
		{name: "remote_port in the pool", body: hostileBody(`"h"`, q("h.rp42150"), `"remote_port":42150`), want: expectPort, wantReqPort: 42150},
		{name: "remote_port twice", body: hostileBody(`"h"`, q("h.rptwice"), `"remote_port":0,"x":1,"remote_port":null`), want: expectPort},
		{name: "remote_port in another case", body: hostileBody(`"h"`, q("h.rpcase"), `"Remote_Port":42151`), want: expectPort, wantReqPort: 42151},

		{name: "100000 levels of [ unclosed", body: hostileBody(`"h"`, q("h.deep1"), `"x":`+nest(100000, false)), want: expectInvalid},
		{name: "100000 levels of [] closed", body: hostileBody(`"h"`, q("h.deep2"), `"x":`+nest(100000, true)), want: expectInvalid},
		{name: "100000 levels as the whole body", body: []byte(nest(100000, true)), want: expectInvalid},
		{name: "500 levels in an unknown member", body: hostileBody(`"h"`, q("h.deep3"), `"x":`+nest(500, true)), want: expectPort},
		{name: "10000 unknown members", body: hostileBody(`"h"`, q("h.wide"), manyMembers(10000)), want: expectPort},
		{name: "duplicate proxy_name: the last counts", body: hostileBody(`"h"`, q("h.dupfirst")+`,"proxy_name":"h.duplast"`, ""), want: expectPort},
		{name: "duplicate content", body: []byte(`{"op":"NewProxy","content":{"x":1},"content":` + string(requestContent(t, hostileBody(`"h"`, q("h.dupcontent"), ""))) + `}`), want: expectPort},
		{name: "member names in other cases", body: []byte(`{"OP":"NewProxy","Content":{"USER":{"User":"h"},"Proxy_Name":"h.case","PROXY_TYPE":"tcp"}}`), want: expectPort},
		{name: "escaped member names", body: []byte(`{"op":"NewProxy","content":{"user":{"user":"h"},"proxy\u005fname":"h.esc","proxy_typ\u0065":"tcp"}}`), want: expectPort},
		{name: "whitespace everywhere", body: []byte(" \n{ \"op\" :\t\"NewProxy\" , \"content\" : { \"user\" : { \"user\" : \"h\" } , \"proxy_name\" : \"h.ws\" , \"proxy_type\" : \"udp\" , \"remote_port\" : 0 } } \r\n"), want: expectPort},
		{name: "group with slashes", body: hostileBody(`"h"`, q("h.grp"), `"group":"../../g/x","group_key":"k"`), want: expectPort},
		{name: "group null", body: hostileBody(`"h"`, q("h.grpnull"), `"group":null`), want: expectPort},
		{name: "group a number", body: hostileBody(`"h"`, q("h.grpnum"), `"group":5`), want: expectInvalid},

		{name: "content null", body: []byte(`{"op":"NewProxy","content":null}`), want: expectInvalid},
		{name: "content an array", body: []byte(`{"op":"NewProxy","content":[]}`), want: expectInvalid},
		{name: "content a string", body: []byte(`{"op":"NewProxy","content":"{}"}`), want: expectInvalid},
		{name: "no content", body: []byte(`{"op":"NewProxy"}`), want: expectInvalid},
		{name: "user a string", body: []byte(`{"op":"NewProxy","content":{"user":"h","proxy_name":"h.us","proxy_type":"tcp"}}`), want: expectInvalid},
		{name: "user null", body: []byte(`{"op":"NewProxy","content":{"user":null,"proxy_name":"h.un","proxy_type":"tcp"}}`), want: expectInvalid},
		{name: "user.user a number", body: hostileBody(`5`, q("h.unum"), ""), want: expectInvalid},
		{name: "proxy_name empty", body: hostileBody(`"h"`, `""`, ""), want: expectInvalid},
		{name: "proxy_name a number", body: hostileBody(`"h"`, `42`, ""), want: expectInvalid},
		{name: "proxy_type TCP in capitals", body: []byte(`{"op":"NewProxy","content":{"user":{"user":"h"},"proxy_name":"h.caps","proxy_type":"TCP"}}`), want: expectUnchanged},
		{name: "op in the body wins", op: "NewProxy", body: []byte(`{"op":"Login","content":{"user":"h"}}`), want: expectUnchanged},
		{name: "op a number", body: []byte(`{"op":1,"content":{}}`), want: expectInvalid},
		{name: "unknown op", op: "Evil/../Op", body: []byte(`{"content":{}}`), want: expectUnchanged},
		{name: "empty body", body: nil, want: expectInvalid},
		{name: "null body", body: []byte(`null`), want: expectInvalid},
		{name: "trailing garbage", body: append(hostileBody(`"h"`, q("h.trail"), ""), "}{"...), want: expectInvalid},
		{name: "byte order mark", body: append([]byte("\xef\xbb\xbf"), hostileBody(`"h"`, q("h.bom"), "")...), want: expectInvalid},
		{name: "unterminated string", body: []byte(`{"op":"NewProxy","content":{"proxy_name":"h.x`), want: expectInvalid},
		{name: "body just over 1 MiB", body: hostileBody(`"h"`, q("h.big"), `"pad":"`+strings.Repeat("p", 1<<20)+`"`), want: expectTooLarge},
	}

	parent := t.TempDir()
	dataDir := filepath.Join(parent, "data")
	args := []string{"-data-dir", dataDir, "-allow-ports", hostilePool, "-probe=false"}
	s := startInProc(t, args...)
	pool, _ := parsePorts(hostilePool)
	ports := map[int]int{} // row -> port of an allowing answer
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			op := tt.op
			if op == "" {
				op = "NewProxy"
			}
			status, body := s.post(t, op, fmt.Sprintf("hostile-%d", i), tt.body)
			if !json.Valid(body) {
				t.Fatalf("answer %.200q: not JSON", body)
			}
			var ans answer
			json.Unmarshal(body, &ans)
			var got hostileWant
			switch {
			case status == http.StatusRequestEntityTooLarge:
				got = expectTooLarge
			case status == http.StatusBadRequest && string(body) == string(frpplugin.AnswerInvalid):
				got = expectInvalid
			case status != http.StatusOK:
				t.Fatalf("status %d %.200s; want %v", status, body, tt.want)
			case ans.Reject:
				got = expectReject
			case ans.Unchange:
				got = expectUnchanged
			default:
				got = expectPort
			}
			if got != tt.want {
				t.Fatalf("got %v (status %d, %.300s); want %v", got, status, body, tt.want)
			}
			switch got {
			case expectReject:
				if !strings.Contains(ans.RejectReason, tt.reason) {
					t.Errorf("reject_reason %q; want it to contain %q", ans.RejectReason, tt.reason)
				}
			case expectPort:
				port := portOfRaw(t, body)
				if !pool.has(port) {
					t.Errorf("port %d; want one in %s", port, hostilePool)
				}
				if tt.wantReqPort != 0 && port != tt.wantReqPort {
					t.Errorf("port %d; want the requested %d", port, tt.wantReqPort)
				}
				if err := frpplugintest.SameContentExceptPort(requestContent(t, tt.body), requestContent(t, body)); err != nil {
					t.Error(err)
				}
				ports[i] = port
				// The same request again: the same port.
				_, again := s.post(t, op, fmt.Sprintf("hostile-%d-again", i), tt.body)
				if p := portOfRaw(t, again); p != port {
					t.Errorf("second request: port %d; want %d", p, port)
				}
			}
			if err := s.ping(); err != nil {
				t.Fatalf("after this input: %v", err)
			}
		})
	}

	// The duplicate proxy_name counted with its last value.
	for i, tt := range tests {
		if strings.HasPrefix(tt.name, "duplicate proxy_name") && ports[i] != 0 {
			status, body := s.post(t, "NewProxy", "dup-last", hostileBody(`"h"`, q("h.duplast"), ""))
			if p := portOfRaw(t, body); status != http.StatusOK || p != ports[i] {
				t.Errorf("h.duplast alone: port %d; want %d, the port of the request naming it last", p, ports[i])
			}
		}
	}
	// A proxy whose name looks like a group's key is not that group: frpc
	// without a user sends proxy names unprefixed, so "group:web" is a
	// name anyone can pick.
	_, body := s.post(t, "NewProxy", "grp-member", hostileBody(`"h"`, q("h.lbmember"), `"group":"lb","group_key":"k"`))
	groupPort := portOfRaw(t, body)
	_, body = s.post(t, "NewProxy", "grp-lookalike", hostileBody(`""`, q("group:lb"), ""))
	if p := portOfRaw(t, body); p == groupPort {
		t.Errorf("proxy named \"group:lb\" (no group) got port %d; want a port other than load-balancing group lb's %d", p, groupPort)
	}
	if log := s.log.String(); strings.Contains(strings.ToLower(log), "panic") {
		t.Errorf("server log mentions a panic:\n%s", tail(log, 8000))
	}
	checkDataDir(t, parent, dataDir)

	// After a restart every allocation, long keys included, is where it was.
	s.stop(t)
	s = startInProc(t, args...)
	for i, tt := range tests {
		if ports[i] == 0 {
			continue
		}
		op := tt.op
		if op == "" {
			op = "NewProxy"
		}
		_, body := s.post(t, op, fmt.Sprintf("restart-%d", i), tt.body)
		if p := portOfRaw(t, body); p != ports[i] {
			t.Errorf("%s after restart: port %d; want %d", tt.name, p, ports[i])
		}
	}
	// Log lines are written in batches: wait for the last one.
	var outcomes map[string]string
	waitFor(t, "every decision in the log", 5*time.Second, func() bool {
		outcomes = s.outcomes(t)
		for i := range tests {
			if _, logged := outcomes[fmt.Sprintf("restart-%d", i)]; ports[i] != 0 && !logged {
				return false
			}
		}
		return true
	})
	for i, tt := range tests {
		if ports[i] != 0 {
			if oc := outcomes[fmt.Sprintf("restart-%d", i)]; oc != "hit" {
				t.Errorf("%s after restart: outcome %q; want \"hit\"", tt.name, oc)
			}
		}
	}
	if log := s.log.String(); strings.Contains(log, "store repaired") {
		t.Errorf("restart repaired the store; want it intact:\n%s", tail(log, 4000))
	}
	s.stop(t)
	checkDataDir(t, parent, dataDir)
}

// portOfRaw returns the remote_port of an allowing answer, matching the
// member name case-insensitively as frps's decoder does.
func portOfRaw(t testing.TB, body []byte) int {
	t.Helper()
	var ans struct {
		Reject   bool `json:"reject"`
		Unchange bool `json:"unchange"`
		Content  struct {
			RemotePort *int `json:"remote_port"`
		} `json:"content"`
	}
	if err := json.Unmarshal(body, &ans); err != nil {
		t.Fatalf("answer %.200q: %v", body, err)
	}
	if ans.Reject || ans.Unchange || ans.Content.RemotePort == nil {
		t.Fatalf("answer %.300s: got no remote_port; want an allowing answer with one", body)
	}
	return *ans.Content.RemotePort
}

// checkDataDir checks that the store wrote nothing outside dataDir and
// nothing but regular files directly inside it, in quarantine/, or the
// lock, each with a name of at most 255 bytes.
func checkDataDir(t testing.TB, parent, dataDir string) {
	t.Helper()
	top, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range top {
		if e.Name() != filepath.Base(dataDir) {
			t.Errorf("%s holds %q; want only %s", parent, e.Name(), filepath.Base(dataDir))
		}
	}
	n := 0
	err = filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dataDir, path)
		if rel == "." {
			return nil
		}
		n++
		if len(d.Name()) > 255 {
			t.Errorf("%s: name of %d bytes; want at most 255", rel, len(d.Name()))
		}
		switch {
		case d.IsDir() && (rel == file.QuarantineDir || rel == file.CheckpointDir || rel == file.HistoryDir):
		case d.Type().IsRegular() && (filepath.Dir(rel) == "." || filepath.Dir(rel) == file.QuarantineDir || filepath.Dir(rel) == file.CheckpointDir || filepath.Dir(rel) == file.HistoryDir):
		default:
			t.Errorf("%s (%v): want a regular file directly in the data dir or in %s/ or %s/", rel, d.Type(), file.QuarantineDir, file.CheckpointDir)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Errorf("%s is empty; want the store's files", dataDir)
	}
}
