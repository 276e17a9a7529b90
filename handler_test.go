package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin/frpplugintest"
)

const invalidAnswer = `{"error":"VALIDATEERR","message":"Invalid inputs. Please check your frpc.ini config"}`

// TestPluginProtocol walks every answer of the protocol.
func TestPluginProtocol(t *testing.T) {
	tests := []struct {
		name       string
		op         string
		body       string
		wantStatus int
		wantBody   string // exact, when set
		wantPort   int    // remote_port of an allowing answer, when set
		wantReason string // substring of reject_reason, when set
	}{
		{name: "tcp without remote_port gets the lowest pool port", op: "NewProxy",
			body: newProxyBody("alice", "alice.ssh", "tcp", ""), wantStatus: 200, wantPort: 30000},
		{name: "udp gets a port of its own space", op: "NewProxy",
			body: newProxyBody("alice", "alice.wg", "udp", ""), wantStatus: 200, wantPort: 30000},
		{name: "remote_port 0 means any port", op: "NewProxy",
			body: newProxyBody("alice", "alice.zero", "tcp", `"remote_port":0`), wantStatus: 200, wantPort: 30001},
		{name: "remote_port null means any port", op: "NewProxy",
			body: newProxyBody("alice", "alice.null", "tcp", `"remote_port":null`), wantStatus: 200, wantPort: 30002},
		{name: "explicit free port is granted", op: "NewProxy",
			body: newProxyBody("bob", "bob.ssh", "tcp", `"remote_port":30007`), wantStatus: 200, wantPort: 30007},
		{name: "explicit port held by another key is rejected", op: "NewProxy",
			body: newProxyBody("carol", "carol.ssh", "tcp", `"remote_port":30007`), wantStatus: 200, wantReason: "remote port 30007 is reserved for another proxy"},
		{name: "explicit port outside the pool is rejected", op: "NewProxy",
			body: newProxyBody("carol", "carol.web", "tcp", `"remote_port":80`), wantStatus: 200, wantReason: "remote port 80 is outside the allowed ports"},
		{name: "remote_port out of range is rejected", op: "NewProxy",
			body: newProxyBody("carol", "carol.neg", "tcp", `"remote_port":-1`), wantStatus: 200, wantReason: "remote port -1 is not a valid port number"},
		{name: "remote_port 65536 is rejected", op: "NewProxy",
			body: newProxyBody("carol", "carol.big", "tcp", `"remote_port":65536`), wantStatus: 200, wantReason: "remote port 65536 is not a valid port number"},
		{name: "remote_port as a string is invalid", op: "NewProxy",
			body: newProxyBody("carol", "carol.str", "tcp", `"remote_port":"6000"`), wantStatus: 400, wantBody: invalidAnswer},
		{name: "user without a user name is fine when empty", op: "NewProxy",
			body: newProxyBody("", "anon", "tcp", ""), wantStatus: 200, wantPort: 30003},
		{name: "http has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.site", "http", `"custom_domains":["a.test"]`), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "https has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.s", "https", ""), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "tcpmux has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.m", "tcpmux", ""), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "stcp has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.st", "stcp", `"sk":"abc"`), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "sudp has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.su", "sudp", ""), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "xtcp has no remote port", op: "NewProxy",
			body: newProxyBody("alice", "alice.x", "xtcp", ""), wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "Login with a string user passes", op: "Login",
			body: `{"version":"0.1.0","op":"Login","content":{"version":"0.65.0","user":"alice","metas":{}}}`, wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "CloseProxy passes", op: "CloseProxy",
			body: `{"version":"0.1.0","op":"CloseProxy","content":{"user":{"user":"alice"},"proxy_name":"alice.ssh"}}`, wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "Ping passes", op: "Ping",
			body: `{"version":"0.1.0","op":"Ping","content":{"user":{"user":"alice"},"timestamp":1}}`, wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "NewWorkConn passes", op: "NewWorkConn",
			body: `{"version":"0.1.0","op":"NewWorkConn","content":{"user":{"user":"alice"},"run_id":"r"}}`, wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "NewUserConn passes", op: "NewUserConn",
			body: `{"version":"0.1.0","op":"NewUserConn","content":{"user":{"user":"alice"},"proxy_name":"a","proxy_type":"tcp","remote_addr":"1.2.3.4:5"}}`, wantStatus: 200, wantBody: `{"reject":false,"unchange":true}`},
		{name: "op only in the query still counts", op: "NewProxy",
			body: `{"version":"0.1.0","content":{"user":{"user":"q"},"proxy_name":"q.p","proxy_type":"tcp"}}`, wantStatus: 200, wantPort: 30004},
		{name: "not JSON", op: "NewProxy", body: `{"version":`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "not JSON for another op", op: "Ping", body: `hello`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "JSON but not an object", op: "NewProxy", body: `[1,2]`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy without content", op: "NewProxy", body: `{"version":"0.1.0","op":"NewProxy"}`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy without user.user", op: "NewProxy",
			body: `{"op":"NewProxy","content":{"user":{"metas":{}},"proxy_name":"a","proxy_type":"tcp"}}`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy with the Login shape of user", op: "NewProxy",
			body: `{"op":"NewProxy","content":{"user":"alice","proxy_name":"a","proxy_type":"tcp"}}`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy without proxy_name", op: "NewProxy",
			body: `{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_type":"tcp"}}`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy without proxy_type", op: "NewProxy",
			body: `{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a"}}`, wantStatus: 400, wantBody: invalidAnswer},
		{name: "NewProxy with an empty proxy_name", op: "NewProxy",
			body: newProxyBody("a", "", "tcp", ""), wantStatus: 400, wantBody: invalidAnswer},
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			a := newAllocatorOn(t, openTestStore(t, kind, t.TempDir()), "30000-30009", allocatorOptions{})
			h := newServer(a, testLogger(t), serverOptions{})
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					status, body := post(t, h, tt.op, tt.body)
					if status != tt.wantStatus {
						t.Fatalf("status = %d; want %d (body %s)", status, tt.wantStatus, body)
					}
					if tt.wantBody != "" && body != tt.wantBody {
						t.Fatalf("body = %s; want %s", body, tt.wantBody)
					}
					if tt.wantPort != 0 {
						if got := portOf(t, body); got != tt.wantPort {
							t.Fatalf("remote_port = %d; want %d", got, tt.wantPort)
						}
						assertSameContent(t, tt.body, body)
					}
					if tt.wantReason != "" {
						ans := decodeAnswer(t, body)
						if !ans.Reject || !strings.Contains(ans.RejectReason, tt.wantReason) {
							t.Fatalf("answer = %s; want reject with reason containing %q", body, tt.wantReason)
						}
					}
				})
			}
		})
	}
}

// assertSameContent checks that every field of the request's content but
// remote_port comes back byte for byte.
func assertSameContent(t testing.TB, request, answer string) {
	t.Helper()
	var req struct {
		Content map[string]json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal([]byte(request), &req); err != nil {
		t.Fatal(err)
	}
	got := decodeAnswer(t, answer).Content
	for k, v := range req.Content {
		if k == "remote_port" {
			continue
		}
		if !bytes.Equal(got[k], v) {
			t.Errorf("content field %s = %s; want %s", k, got[k], v)
		}
	}
	for k := range got {
		if _, ok := req.Content[k]; !ok && k != "remote_port" {
			t.Errorf("content gained field %s", k)
		}
	}
}

// TestCapturedRequests replays what real frps v0.65.0 and v0.51.3 sent
// and checks that every field of every NewProxy survives.
func TestCapturedRequests(t *testing.T) {
	for _, capture := range []string{frpplugintest.CapturePath("frps-v0.65.0.jsonl"), frpplugintest.CapturePath("frps-v0.51.3.jsonl")} {
		t.Run(capture, func(t *testing.T) {
			f, err := os.Open(capture)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			a := newTestAllocator(t, t.TempDir(), "29000-29999", allocatorOptions{})
			h := newServer(a, testLogger(t), serverOptions{})
			sc := bufio.NewScanner(f)
			sc.Buffer(nil, 1<<20)
			ports := map[string]int{}
			for sc.Scan() {
				var c struct {
					Path    string            `json:"path"`
					Headers map[string]string `json:"headers"`
					Body    json.RawMessage   `json:"body"`
				}
				if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
					t.Fatal(err)
				}
				req := httptest.NewRequest("POST", c.Path, bytes.NewReader(c.Body))
				for k, v := range c.Headers {
					req.Header.Set(k, v)
				}
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, req)
				if rec.Code != 200 {
					t.Fatalf("%s: status %d %s", c.Path, rec.Code, rec.Body)
				}
				var body struct {
					Content struct {
						ProxyName string `json:"proxy_name"`
						ProxyType string `json:"proxy_type"`
						Port      int    `json:"remote_port"`
					} `json:"content"`
				}
				json.Unmarshal(c.Body, &body)
				isPort := strings.Contains(c.Path, "op=NewProxy") && (body.Content.ProxyType == "tcp" || body.Content.ProxyType == "udp")
				if !isPort {
					if got := rec.Body.String(); got != `{"reject":false,"unchange":true}` {
						t.Errorf("%s %s: answer %s; want unchanged", c.Path, body.Content.ProxyName, got)
					}
					continue
				}
				port := portOf(t, rec.Body.String())
				assertSameContent(t, string(c.Body), rec.Body.String())
				if body.Content.Port != 0 && port != body.Content.Port {
					t.Errorf("%s asked for %d; got %d", body.Content.ProxyName, body.Content.Port, port)
				}
				ports[body.Content.ProxyName] = port
			}
			if len(ports) != 3 {
				t.Fatalf("allocated %v; want 3 proxies with ports", ports)
			}
		})
	}
}

func TestMethodsAndLimits(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{})
	for _, method := range []string{"GET", "PUT", "DELETE", "PATCH"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, pluginPath, nil))
		if rec.Code != http.StatusMethodNotAllowed {
			t.Errorf("%s %s = %d; want 405", method, pluginPath, rec.Code)
		}
	}
	big := `{"op":"NewProxy","content":{"pad":"` + strings.Repeat("x", 1<<20) + `"}}`
	if status, _ := post(t, h, "NewProxy", big); status != http.StatusRequestEntityTooLarge {
		t.Errorf("1 MiB body: status %d; want 413", status)
	}
	// The server still answers after both.
	if status, body := post(t, h, "NewProxy", newProxyBody("a", "a.b", "tcp", "")); status != 200 || portOf(t, body) != 30000 {
		t.Errorf("after limits: %d %s", status, body)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/ping", nil))
	if rec.Code != 200 || rec.Body.String() != "pong" {
		t.Errorf("GET /ping = %d %q; want 200 pong", rec.Code, rec.Body)
	}
}

// TestUnknownFieldsRoundTrip: frps takes our content wholesale, so fields
// this program has never heard of must come back untouched, in order.
func TestUnknownFieldsRoundTrip(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{})
	content := `{"user":{"user":"u","metas":{"k":"<v>&"},"run_id":"x"},"proxy_name":"u.p","proxy_type":"tcp",` +
		`"use_encryption":true,"bandwidth_limit":"2MB","future_field":{"nested":[1,2.50,"\u00e9"]},"remote_port":0,"annotations":{"note":"a b"}}`
	_, body := post(t, h, "NewProxy", `{"version":"0.1.0","op":"NewProxy","content":`+content+`}`)
	want := `{"reject":false,"unchange":false,"content":` + strings.Replace(content, `"remote_port":0`, `"remote_port":30000`, 1) + `}`
	if body != want {
		t.Fatalf("answer\n%s\nwant\n%s", body, want)
	}
}

// TestStoreFaultsReject: a store that fails or stalls turns into a reject
// with a reason, within the deadline.
func TestStoreFaultsReject(t *testing.T) {
	dir := t.TempDir()
	st, kv := newFaultyStore(t, dir)
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{storeTimeout: 200 * time.Millisecond})
	h := newServer(a, testLogger(t), serverOptions{})

	kv.set(errDiskFull, nil)
	_, body := post(t, h, "NewProxy", newProxyBody("a", "a.fail", "tcp", ""))
	if ans := decodeAnswer(t, body); !ans.Reject || !strings.Contains(ans.RejectReason, "port store failed") {
		t.Fatalf("failing store: %s; want reject naming the store", body)
	}
	if strings.Contains(body, errDiskFull.Error()) {
		t.Fatalf("reject reason leaks the store's error: %s", body)
	}

	stall := make(chan struct{})
	kv.set(nil, stall)
	start := time.Now()
	_, body = post(t, h, "NewProxy", newProxyBody("a", "a.stall", "tcp", ""))
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("stalled store answered after %v; want about 200ms", took)
	}
	if ans := decodeAnswer(t, body); !ans.Reject || !strings.Contains(ans.RejectReason, "did not answer in time") {
		t.Fatalf("stalling store: %s; want reject naming the timeout", body)
	}
	kv.set(nil, nil)
	close(stall)
	// The stalled write landed late: the key keeps that port, nobody else gets it.
	waitFor(t, "late write to settle", 2*time.Second, func() bool { _, _, ok := a.lookup("a.stall"); return ok })
	_, body = post(t, h, "NewProxy", newProxyBody("a", "a.stall", "tcp", ""))
	stalled := portOf(t, body)
	_, body = post(t, h, "NewProxy", newProxyBody("a", "a.other", "tcp", ""))
	if other := portOf(t, body); other == stalled {
		t.Fatalf("a.other got %d, the port of the late write", other)
	}
}

// TestWrongPath: a plugin call to a path that is not the plugin's gets
// the same 404 (or 405) as before, and the log says which path frps should
// use, once a minute per path. Other misses stay quiet.
func TestWrongPath(t *testing.T) {
	log, logs := bufferLogger()
	a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
	h := newServer(a, log, serverOptions{})
	const fromFrps, plain = true, false
	tests := []struct {
		method, path string
		frps         bool // sent as frps sends plugin calls: ?version=…&op=… and X-Frp-Reqid
		status       int
		logged       bool
	}{
		{"POST", "/port-registration", fromFrps, 404, true},
		{"POST", "/port-registrations/", fromFrps, 404, true},
		{"POST", "/handler", plain, 404, true},
		{"POST", "/", fromFrps, 405, true},                   // frps without `path`; / has the GET page
		{"POST", "/port-registration", fromFrps, 404, false}, // the same path again within a minute
		{"POST", "/api/allocations", plain, 405, false},      // an admin's mistake, not frps's
		{"GET", "/favicon.ico", plain, 404, false},
		{"GET", pluginPath, fromFrps, 405, false},
		{"DELETE", "/ping", plain, 405, false},
	}
	for _, tt := range tests {
		logs.Reset()
		target := tt.path
		if tt.frps {
			target += "?version=0.1.0&op=NewProxy"
		}
		req := httptest.NewRequest(tt.method, target, strings.NewReader(newProxyBody("a", "a.p", "tcp", "")))
		if tt.frps {
			req.Header.Set("X-Frp-Reqid", "r1")
		}
		req.RemoteAddr = "127.0.0.1:40000"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != tt.status {
			t.Errorf("%s %s = %d; want %d", tt.method, target, rec.Code, tt.status)
		}
		line := logs.String()
		hinted := strings.Contains(line, "frps's plugin path is "+pluginPath) && strings.Contains(line, "path="+tt.path+" ")
		if hinted != tt.logged || strings.Count(line, "\n") > 1 {
			t.Errorf("%s %s logged %q; want one hint naming %s: %v", tt.method, target, line, pluginPath, tt.logged)
		}
	}
	if status, body := post(t, h, "NewProxy", newProxyBody("a", "a.p", "tcp", "")); status != 200 || portOf(t, body) != 30000 {
		t.Errorf("the right path after the wrong ones: %d %s", status, body)
	}
	if len(a.snapshot()) != 1 {
		t.Errorf("allocations = %v; want only the one from the right path", a.snapshot())
	}
}
