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
