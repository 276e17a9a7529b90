package main

import (
	"errors"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store"
)

// TestAdoptRequests: while -adopt-requests lasts, a device's own
// remote_port outside the pool is adopted (kept, recorded as adopted with
// the reason) when an operator could put it there; frps's own port and a
// port another key holds are still refused; once the window is over, a
// request outside the pool is refused again, while adopted keys stay.
func TestAdoptRequests(t *testing.T) {
	now, advance := fakeClock(time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC))
	h := newHistoryAllocator(t, "file", "30000-30009", allocatorOptions{now: now,
		excluded:   map[store.Slot]string{store.TCPPort(7000): "frps bindPort"},
		adoptUntil: now().Add(time.Hour)})

	p, how := mustAllocate(t, h.allocator, withPort(req("alice", "alice.ssh", "tcp"), 31022))
	if p != 31022 || how != outcomeAdopted {
		t.Fatalf("alice.ssh asking for 31022 during -adopt-requests = %d %s; want 31022 adopted", p, how)
	}
	if p, how := mustAllocate(t, h.allocator, withPort(req("alice", "alice.ssh", "tcp"), 31022)); p != 31022 || how != outcomeHit {
		t.Fatalf("alice.ssh again = %d %s; want a hit on 31022", p, how)
	}
	for _, tt := range []struct {
		name string
		port int
		want error
	}{
		{"bob.ssh", 31022, errPortReserved}, // alice's now
		{"bob.frps", 7000, errPortForFrps},  // frps's own
	} {
		if _, _, err := h.allocate(withPort(req("bob", tt.name, "tcp"), tt.port)); !errors.Is(err, tt.want) {
			t.Fatalf("%s asking for %d during -adopt-requests: %v; want %v", tt.name, tt.port, err, tt.want)
		}
	}
	advance(time.Hour)
	if _, _, err := h.allocate(withPort(req("carol", "carol.ssh", "tcp"), 31023)); !errors.Is(err, errPortOutside) {
		t.Fatalf("carol.ssh asking for 31023 after -adopt-requests ended: %v; want refused as outside the pool", err)
	}
	if p, how := mustAllocate(t, h.allocator, withPort(req("alice", "alice.ssh", "tcp"), 31022)); p != 31022 || how != outcomeHit {
		t.Fatalf("alice.ssh after the window = %d %s; want a hit on 31022", p, how)
	}
	if v, ok := h.find("alice.ssh"); !ok || !v.OutsidePool {
		t.Fatalf("list shows alice.ssh as %+v; want it on 31022, outside the pool", v)
	}
	es := h.all(t)
	if len(es) != 1 || es[0].Change != store.HistAdopted || es[0].Port != 31022 ||
		!strings.Contains(es[0].By, "-adopt-requests") || !strings.Contains(es[0].Reason, "asked for 31022, outside the pool 30000-30009") {
		t.Fatalf("history: %s; want one adopted entry for alice.ssh on 31022 saying why", describeAll(es))
	}
}

func withPort(r frpplugin.Proxy, port int) frpplugin.Proxy {
	r.RemotePort = port
	return r
}
