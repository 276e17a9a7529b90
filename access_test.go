package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// bufferLogger logs text lines into a buffer the test can read.
func bufferLogger() (*slog.Logger, *bytes.Buffer) {
	var buf bytes.Buffer
	return slog.New(slog.NewTextHandler(&buf, nil)), &buf
}

// postFrom sends a NewProxy to h as if from remoteAddr.
func postFrom(h http.Handler, remoteAddr, path string) *httptest.ResponseRecorder {
	req := httptest.NewRequest("POST", path+"?version=0.1.0&op=NewProxy", strings.NewReader(newProxyBody("a", "a.p", "tcp", "")))
	req.RemoteAddr = remoteAddr
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// TestPluginAllow: peers inside -plugin-allow get their port, others 403
// with a JSON error and one warning naming the address and the flag.
func TestPluginAllow(t *testing.T) {
	tests := []struct {
		name   string
		allow  string
		peer   string
		status int
	}{
		{"default: IPv4 loopback", defaultPluginAllow, "127.0.0.1:40000", 200},
		{"default: all of 127/8", defaultPluginAllow, "127.8.9.10:40000", 200},
		{"default: IPv6 loopback", defaultPluginAllow, "[::1]:40000", 200},
		{"default: another host", defaultPluginAllow, "192.0.2.7:40000", 403},
		{"default: another IPv6 host", defaultPluginAllow, "[2001:db8::7]:40000", 403},
		{"a network", "10.0.0.0/8", "10.20.30.40:40000", 200},
		{"outside the network", "10.0.0.0/8", "11.0.0.1:40000", 403},
		{"loopback not listed", "10.0.0.0/8", "127.0.0.1:40000", 403},
		{"a bare address", "192.0.2.7, 10.0.0.0/8", "192.0.2.7:40000", 200},
		{"its neighbour", "192.0.2.7", "192.0.2.8:40000", 403},
		{"IPv4-mapped peer on a dual-stack listener", "10.0.0.0/8", "[::ffff:10.1.2.3]:40000", 200},
		{"everyone", "0.0.0.0/0,::/0", "203.0.113.9:40000", 200},
		{"an IPv4-mapped address", "::ffff:192.0.2.2", "192.0.2.2:40000", 200},
		{"an IPv4-mapped address, mapped peer", "::ffff:192.0.2.2", "[::ffff:192.0.2.2]:40000", 200},
		{"an IPv4-mapped network", "::ffff:10.0.0.0/104", "10.20.30.40:40000", 200},
		{"outside an IPv4-mapped network", "::ffff:10.0.0.0/104", "11.0.0.1:40000", 403},
		{"not an address", defaultPluginAllow, "@", 403},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allow, err := parseAllowList(tt.allow)
			if err != nil {
				t.Fatal(err)
			}
			log, logs := bufferLogger()
			a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
			h := newServer(a, log, serverOptions{pluginAllow: allow})
			rec := postFrom(h, tt.peer, pluginPath)
			if rec.Code != tt.status {
				t.Fatalf("POST from %s with -plugin-allow %s = %d %s; want %d", tt.peer, tt.allow, rec.Code, rec.Body, tt.status)
			}
			if tt.status == 200 {
				portOf(t, rec.Body.String())
				return
			}
			var e struct{ Error string }
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || !strings.Contains(e.Error, "-plugin-allow") {
				t.Errorf("403 body = %s; want a JSON error naming -plugin-allow", rec.Body)
			}
			host, _, _ := net.SplitHostPort(tt.peer)
			if host == "" {
				host = tt.peer
			}
			line := logs.String()
			if !strings.Contains(line, "level=WARN") || !strings.Contains(line, "-plugin-allow") || !strings.Contains(line, "peer="+host) {
				t.Errorf("log = %q; want a warning naming peer %s and -plugin-allow", line, host)
			}
			if len(a.snapshot()) != 0 {
				t.Errorf("a refused peer got an allocation: %v", a.snapshot())
			}
		})
	}
}

// TestPluginAllowRateLimit: a refused peer that keeps calling is logged
// once a minute, with the count of calls in between.
func TestPluginAllowRateLimit(t *testing.T) {
	log, logs := bufferLogger()
	a := newTestAllocator(t, t.TempDir(), "30000-30009", allocatorOptions{})
	now := time.Unix(1_700_000_000, 0)
	// The server as newServer builds it, with a clock the test moves.
	inner := &server{alloc: a, log: log, metrics: newMetrics(a.stats), pluginAllow: allowList{}, quiet: newLogLimiter(peerWarnEvery)}
	inner.quiet.now = func() time.Time { return now }
	refuse := func(peer string) {
		req := httptest.NewRequest("POST", pluginPath, nil)
		req.RemoteAddr = peer
		rec := httptest.NewRecorder()
		inner.serveRegistration(rec, req)
		if rec.Code != 403 {
			t.Fatalf("POST from %s = %d; want 403", peer, rec.Code)
		}
	}
	for range 5 {
		refuse("192.0.2.7:1000")
	}
	refuse("192.0.2.8:1000") // another peer has its own allowance
	if n := strings.Count(logs.String(), "plugin call refused"); n != 2 {
		t.Fatalf("log lines after 5 calls from one peer and 1 from another = %d; want 2:\n%s", n, logs)
	}
	now = now.Add(peerWarnEvery)
	logs.Reset()
	refuse("192.0.2.7:1001")
	if line := logs.String(); !strings.Contains(line, "peer=192.0.2.7") || !strings.Contains(line, "repeats=4") {
		t.Fatalf("log a minute later = %q; want one line for 192.0.2.7 with repeats=4", line)
	}
}

func TestPluginAllowParse(t *testing.T) {
	tests := []struct {
		spec    string
		want    string // String() of the list, or the error's text
		wantErr bool
	}{
		{defaultPluginAllow, "127.0.0.0/8,::1/128", false},
		{" 10.1.2.3/8 , 192.0.2.7 ,2001:db8::1", "10.0.0.0/8,192.0.2.7/32,2001:db8::1/128", false},
		{"0.0.0.0/0", "0.0.0.0/0", false},
		{"", "empty address list", true},
		{"10.0.0.0/33", `"10.0.0.0/33" is not an address or CIDR`, true},
		{"frps.example.net", `"frps.example.net" is not an address or CIDR`, true},
		{"10.0.0.0/8,", `"" is not an address or CIDR`, true},
		{"fe80::1%eth0", `"fe80::1%eth0" is not an address or CIDR`, true},
		// Go unmaps an IPv4 peer's address, so an IPv4-mapped entry is
		// taken in its IPv4 form: ::ffff:a.b.c.d/N is a.b.c.d/(N-96).
		{"::ffff:192.0.2.2", "192.0.2.2/32", false},
		{"::ffff:192.0.2.2/128", "192.0.2.2/32", false},
		{"::ffff:10.1.2.3/104", "10.0.0.0/8", false},
		{"::ffff:0:0/96", "0.0.0.0/0", false},
		{"::ffff:10.0.0.0/90", `"::ffff:10.0.0.0/90" reaches beyond the IPv4-mapped addresses (::ffff:0:0/96): write the IPv4 form`, true},
	}
	for _, tt := range tests {
		got, err := parseAllowList(tt.spec)
		switch {
		case tt.wantErr && (err == nil || !strings.Contains(err.Error(), tt.want)):
			t.Errorf("parseAllowList(%q) = %v, %v; want an error containing %q", tt.spec, got, err, tt.want)
		case !tt.wantErr && (err != nil || got.String() != tt.want):
			t.Errorf("parseAllowList(%q) = %v, %v; want %s", tt.spec, got, err, tt.want)
		}
	}
}

// TestPluginAllowStartWarning: the start warns when a listener other than
// loopback serves the plugin path to every address, and only then.
func TestPluginAllowStartWarning(t *testing.T) {
	tests := []struct {
		listen string
		allow  string
		warn   bool
	}{
		{"0.0.0.0:8080", "0.0.0.0/0", true},
		{"[::]:8080", "::/0", true},
		{"192.0.2.10:8080", "10.0.0.0/8,0.0.0.0/0", true},
		{"0.0.0.0:8080", defaultPluginAllow, false},
		{"0.0.0.0:8080", "10.0.0.0/8", false},
		{"127.0.0.1:8080", "0.0.0.0/0", false},
		{"[::1]:8080", "::/0", false},
	}
	for _, tt := range tests {
		addr, err := net.ResolveTCPAddr("tcp", tt.listen)
		if err != nil {
			t.Fatal(err)
		}
		allow, _ := parseAllowList(tt.allow)
		got := openPluginWarning(addr, allow)
		if (got != "") != tt.warn {
			t.Errorf("openPluginWarning(%s, %s) = %q; want a warning: %v", tt.listen, tt.allow, got, tt.warn)
		}
		if tt.warn && (!strings.Contains(got, "-plugin-allow") || !strings.Contains(got, tt.listen)) {
			t.Errorf("openPluginWarning(%s, %s) = %q; want it to name -plugin-allow and the listener", tt.listen, tt.allow, got)
		}
	}
}

// TestPluginAllowServe: a real start logs the allow-list in use, and
// loopback callers get their port with the default.
func TestPluginAllowServe(t *testing.T) {
	srv := startInProc(t, "-probe=false", "-data-dir", t.TempDir(), "-allow-ports", "31000-31009", "-plugin-allow", "0.0.0.0/0")
	base, logs := srv.url, srv.log
	if port := register(t, base, "a", "a.p", "tcp"); port != 31000 {
		t.Fatalf("register from loopback = %d; want 31000", port)
	}
	if s := logs.String(); !strings.Contains(s, "plugin_allow=0.0.0.0/0") || strings.Contains(s, "level=WARN") {
		t.Fatalf("start log on loopback with -plugin-allow 0.0.0.0/0 = %q; want plugin_allow=0.0.0.0/0 and no warning", s)
	}
}
