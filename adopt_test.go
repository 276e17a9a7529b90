package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAdoptDashboardTooSlowOrTooBig: a dashboard that drips its answer is
// reported as too slow, naming the URL, and one that answers more than
// adopt reads as too big, naming the limit; neither as a JSON error.
func TestAdoptDashboardTooSlowOrTooBig(t *testing.T) {
	t.Run("drips", func(t *testing.T) {
		stop := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"proxies":[`))
			for {
				w.(http.Flusher).Flush()
				select {
				case <-stop:
					return
				case <-r.Context().Done():
					return
				case <-time.After(50 * time.Millisecond):
					w.Write([]byte(" "))
				}
			}
		}))
		defer srv.Close()
		defer close(stop)
		d := frpsDashboard{base: srv.URL, timeout: 300 * time.Millisecond}
		_, _, err := d.onlinePorts(context.Background())
		if err == nil || strings.Contains(err.Error(), "JSON") || !strings.Contains(err.Error(), "too slowly") ||
			!strings.Contains(err.Error(), srv.URL+"/api/proxy/tcp") {
			t.Errorf("dripping dashboard: %v; want it answered too slowly, naming %s/api/proxy/tcp", err, srv.URL)
		}
	})
	t.Run("too big", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"proxies":[`))
			w.Write([]byte(strings.Repeat(" ", 2000)))
			w.Write([]byte(`]}`))
		}))
		defer srv.Close()
		d := frpsDashboard{base: srv.URL, maxBody: 1000}
		_, _, err := d.onlinePorts(context.Background())
		if err == nil || strings.Contains(err.Error(), "JSON") || !strings.Contains(err.Error(), fmt.Sprint(1000)) ||
			!strings.Contains(err.Error(), "more than") {
			t.Errorf("oversized dashboard answer: %v; want it too big, naming the limit of 1000 bytes", err)
		}
	})
}

// TestAdoptUser: the user of an adopted proxy is what frps's dashboard
// reports for it, when it reports one (an empty user too: an frpc without
// user whose proxy is "my.cam"); only when it reports none is the text
// before the first dot taken, the "user." frpc puts before the name.
func TestAdoptUser(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/proxy/tcp" {
			w.Write([]byte(`{"proxies":[]}`))
			return
		}
		w.Write([]byte(`{"proxies":[
			{"name":"my.cam","user":"","status":"online","conf":{"name":"my.cam","remotePort":30001}},
			{"name":"bob.x.y","user":"bob","status":"online","conf":{"remotePort":30002}},
			{"name":"alice.ssh","status":"online","conf":{"remotePort":30003}},
			{"name":"plain","status":"online","conf":{"remotePort":30004}}]}`))
	}))
	defer srv.Close()
	found, _, err := frpsDashboard{base: srv.URL}.onlinePorts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"my.cam": "", "bob.x.y": "bob", "alice.ssh": "alice", "plain": ""}
	for _, r := range found {
		if u, ok := want[r.Key]; !ok || r.User != u {
			t.Errorf("%s adopted with user %q; want %q", r.Key, r.User, u)
		}
		delete(want, r.Key)
	}
	if len(want) > 0 {
		t.Errorf("not adopted: %v", want)
	}
}

// TestAdoptDryRunAndSkipConflicts: adopt -dry-run checks what the real run
// checks, with the running server, and exits as it would: a port another
// key holds and frps's own port are named with why, and nothing is
// written; the real run refuses all of it the same way; -skip-conflicts
// adopts the rest and names what it left.
func TestAdoptDryRunAndSkipConflicts(t *testing.T) {
	dash := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/proxy/tcp" {
			w.Write([]byte(`{"proxies":[]}`))
			return
		}
		w.Write([]byte(`{"proxies":[
			{"name":"alice.ssh","status":"online","conf":{"remotePort":30001}},
			{"name":"bob.ssh","status":"online","conf":{"remotePort":30002}},
			{"name":"carol.ssh","status":"online","conf":{"remotePort":7000}}]}`))
	}))
	defer dash.Close()
	frpsConfig := filepath.Join(t.TempDir(), "frps.toml")
	if err := os.WriteFile(frpsConfig, []byte("bindPort = 7000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := startInProc(t, "-probe=false", "-data-dir", t.TempDir(), "-allow-ports", "30000-30009", "-frps-config", frpsConfig)
	if p := tryPost(s, "dave", "dave.web", "").port; p != 30000 {
		t.Fatalf("dave.web = %d; want 30000", p)
	}
	if _, _, err := runCLI(nil, "assign", "-server", s.url, "dave.web", "30002"); err != nil {
		t.Fatal(err)
	}
	adopt := func(args ...string) (string, error) {
		stdout, stderr, err := runCLI(nil, append([]string{"adopt", "-server", s.url, "-frps-api", dash.URL}, args...)...)
		if err != nil {
			stderr += err.Error()
		}
		return stdout + stderr, err
	}
	held := func() []string {
		out, _, err := runCLI(nil, "list", "-server", s.url, "-json")
		if err != nil {
			t.Fatal(err)
		}
		var keys []string
		for _, k := range []string{"alice.ssh", "bob.ssh", "carol.ssh"} {
			if strings.Contains(out, `"`+k+`"`) {
				keys = append(keys, k)
			}
		}
		return keys
	}

	dry, dryErr := adopt("-dry-run")
	real, realErr := adopt()
	if dryErr == nil || realErr == nil {
		t.Fatalf("adopt with conflicts: dry run %v, real run %v; want both to fail\n%s\n%s", dryErr, realErr, dry, real)
	}
	for _, out := range []string{dry, real} {
		for _, want := range []string{"port 30002", "bob.ssh", "port 7000", "carol.ssh", "used by frps itself"} {
			if !strings.Contains(out, want) {
				t.Errorf("adopt said:\n%s\nwant it to name %q", out, want)
			}
		}
	}
	if got := held(); len(got) != 0 {
		t.Fatalf("after a refused adopt the server holds %v; want none of them", got)
	}

	dry, err := adopt("-dry-run", "-skip-conflicts")
	if err != nil || !strings.Contains(dry, "would adopt: alice.ssh on port 30001") || !strings.Contains(dry, "not adopted: bob.ssh on port 30002") ||
		!strings.Contains(dry, "1 would be adopted") {
		t.Fatalf("adopt -dry-run -skip-conflicts: %v\n%s", err, dry)
	}
	if got := held(); len(got) != 0 {
		t.Fatalf("after a dry run the server holds %v; want nothing adopted", got)
	}
	out, err := adopt("-skip-conflicts")
	if err != nil || !strings.Contains(out, "adopted: alice.ssh on port 30001") || !strings.Contains(out, "not adopted: carol.ssh on port 7000") ||
		!strings.Contains(out, "1 adopted (0 already held those ports), 2 not") {
		t.Fatalf("adopt -skip-conflicts: %v\n%s", err, out)
	}
	if got := held(); len(got) != 1 || got[0] != "alice.ssh" {
		t.Fatalf("after adopt -skip-conflicts the server holds %v; want alice.ssh alone", got)
	}
}
