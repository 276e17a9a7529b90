package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
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
