package main

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store"
)

func req(user, name, typ string) frpplugin.Proxy {
	return frpplugin.Proxy{User: user, ProxyName: name, ProxyType: typ}
}

func mustAllocate(t testing.TB, a *allocator, r frpplugin.Proxy) (int, outcome) {
	t.Helper()
	port, how, err := a.allocate(r)
	if err != nil {
		t.Fatalf("allocate(%+v): %v", r, err)
	}
	return port, how
}

func TestAllocatorRules(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30004", allocatorOptions{})

	// Fresh: lowest free port; sticky afterwards.
	p1, how := mustAllocate(t, a, req("alice", "alice.ssh", "tcp"))
	if p1 != 30000 || how != outcomeNew {
		t.Fatalf("first allocation = %d %s; want 30000 new", p1, how)
	}
	if p, how := mustAllocate(t, a, req("alice", "alice.ssh", "tcp")); p != p1 || how != outcomeHit {
		t.Fatalf("second allocation = %d %s; want %d hit", p, how, p1)
	}
	// A proxy that changes protocol keeps its number, in the other port
	// space, and back again; another name gets another port.
	if p, _ := mustAllocate(t, a, req("alice", "alice.ssh", "udp")); p != p1 {
		t.Fatalf("same key, other type = %d; want %d", p, p1)
	}
	if r, _ := a.current("alice.ssh"); r.Slot() != store.UDPPort(p1) {
		t.Fatalf("alice.ssh as udp = %v; want %d/udp", r.Slot(), p1)
	}
	if p, _ := mustAllocate(t, a, req("alice", "alice.ssh", "tcp")); p != p1 {
		t.Fatalf("same key, back to tcp = %d; want %d", p, p1)
	}
	p2, _ := mustAllocate(t, a, req("alice", "alice.wg", "tcp"))
	if p2 == p1 {
		t.Fatalf("two keys share port %d", p1)
	}

	// Groups share one port, whatever the member.
	web1 := frpplugin.Proxy{User: "alice", ProxyName: "alice.web1", ProxyType: "tcp", Group: "web"}
	web2 := frpplugin.Proxy{User: "bob", ProxyName: "bob.web2", ProxyType: "tcp", Group: "web"}
	g1, _ := mustAllocate(t, a, web1)
	if g2, how := mustAllocate(t, a, web2); g2 != g1 || how != outcomeHit {
		t.Fatalf("group members got %d and %d (%s); want one port", g1, g2, how)
	}

	// Explicit request: a free port is granted and becomes sticky, moving the key.
	r := req("bob", "bob.ssh", "tcp")
	r.RemotePort = 30004
	if p, how := mustAllocate(t, a, r); p != 30004 || how != outcomeRequested {
		t.Fatalf("explicit 30004 = %d %s", p, how)
	}
	if p, how := mustAllocate(t, a, req("bob", "bob.ssh", "tcp")); p != 30004 || how != outcomeHit {
		t.Fatalf("after explicit: %d %s; want 30004 hit", p, how)
	}
	// ... held by someone else: reserved.
	r = req("carol", "carol.ssh", "tcp")
	r.RemotePort = 30004
	if _, _, err := a.allocate(r); !errors.Is(err, errPortReserved) {
		t.Fatalf("explicit port of another key: err = %v; want errPortReserved", err)
	}
	// A key moving to a free port gives its old one back.
	r = req("alice", "alice.wg", "tcp")
	r.RemotePort = 30003
	if p, _ := mustAllocate(t, a, r); p != 30003 {
		t.Fatalf("move = %d; want 30003", p)
	}
	// Exhaustion: 30000 ssh, 30002 web, 30003 wg, 30004 bob; 30001 was freed.
	if p, _ := mustAllocate(t, a, req("dave", "dave.a", "tcp")); p != 30001 {
		t.Fatalf("freed port not reused: got %d; want 30001", p)
	}
	_, _, err := a.allocate(req("dave", "dave.b", "tcp"))
	var pe *poolError
	if !errors.As(err, &pe) || pe.pool != "30000-30004" {
		t.Fatalf("full pool: err = %v; want a poolError naming 30000-30004", err)
	}

	// Restart from the same directory: every key keeps its port.
	want := map[string]int{"alice.ssh": 30000, "group:web": g1, "alice.wg": 30003, "bob.ssh": 30004, "dave.a": 30001}
	b := newTestAllocator(t, dir, "30000-30004", allocatorOptions{})
	for key, port := range want {
		got, _, ok := b.lookup(key)
		if !ok || got.Port != port {
			t.Errorf("after restart %s = %+v (found %v); want port %d", key, got, ok, port)
		}
	}
	if n := len(b.snapshot()); n != len(want) {
		t.Errorf("after restart %d allocations; want %d", n, len(want))
	}
}

func TestAllocatorSkipsBusyPorts(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := busy.Addr().(*net.TCPAddr).Port
	pool := fmt.Sprintf("%d-%d", port, port+1)
	if port+1 > maxPort {
		t.Fatalf("listener got the top port %d", port)
	}
	a := newTestAllocator(t, t.TempDir(), pool, allocatorOptions{probe: bindProbe("127.0.0.1")})
	got, _ := mustAllocate(t, a, req("a", "a.p", "tcp"))
	if got == port {
		t.Fatalf("handed out port %d that a listener holds", port)
	}
	r := req("b", "b.p", "tcp")
	r.RemotePort = port
	if _, _, err := a.allocate(r); !errors.Is(err, errPortInUse) {
		t.Fatalf("explicit busy port: err = %v; want errPortInUse", err)
	}
	// The busy port is not remembered as taken: once free, it is handed out.
	busy.Close()
	if p, _ := mustAllocate(t, a, req("c", "c.p", "tcp")); p != port {
		t.Fatalf("after the listener closed got %d; want %d", p, port)
	}
}

func TestAllocatorExcludedPorts(t *testing.T) {
	a := newTestAllocator(t, t.TempDir(), "7000-7001", allocatorOptions{excluded: map[store.Slot]string{store.TCPPort(7000): "frps bindPort"}})
	a.pool.remove(7000)
	r := req("a", "a.p", "tcp")
	r.RemotePort = 7000
	_, _, err := a.allocate(r)
	if !errors.Is(err, errPortForFrps) || rejectReason(err) != "remote port 7000 is used by frps itself (frps bindPort)" {
		t.Fatalf("frps's own port: %v (%q)", err, rejectReason(err))
	}
}

// TestAllocatorConcurrency: many goroutines, overlapping keys. One key
// never gets two ports and two keys never share one. Run with -race.
func TestAllocatorConcurrency(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "20000-20999", allocatorOptions{})
	const workers, keys = 16, 200
	got := make([][]int, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[w] = make([]int, keys)
			for i := range keys {
				k := (i*7 + w) % keys // every worker touches every key, in different orders
				r := req("u", "u.p"+strconv.Itoa(k), "tcp")
				if k%10 == 0 {
					r.Group = "g" + strconv.Itoa(k/10%3)
				}
				port, _, err := a.allocate(r)
				if err != nil {
					t.Error(err)
					return
				}
				got[w][k] = port
			}
		}()
	}
	wg.Wait()
	owner := map[int]string{}
	for k := range keys {
		r := req("u", "u.p"+strconv.Itoa(k), "tcp")
		if k%10 == 0 {
			r.Group = "g" + strconv.Itoa(k/10%3)
		}
		for w := range workers {
			if got[w][k] != got[0][k] {
				t.Fatalf("key %s got ports %d and %d", keyOf(r), got[0][k], got[w][k])
			}
		}
		if o, ok := owner[got[0][k]]; ok && o != keyOf(r) {
			t.Fatalf("port %d shared by %s and %s", got[0][k], o, keyOf(r))
		}
		owner[got[0][k]] = keyOf(r)
	}
	// 180 plain keys + 3 groups.
	if len(owner) != 183 {
		t.Fatalf("%d distinct ports; want 183", len(owner))
	}
	b := newTestAllocator(t, dir, "20000-20999", allocatorOptions{})
	for port, key := range owner {
		if r, _, ok := b.lookup(key); !ok || r.Port != port {
			t.Fatalf("after restart %s = %+v; want %d", key, r, port)
		}
	}
}

func TestReleaseAndAssign(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	p, _ := mustAllocate(t, a, req("a", "a.p", "tcp"))
	if err := a.release("a.p", "test"); err != nil {
		t.Fatal(err)
	}
	if err := a.release("a.p", "test"); !errors.Is(err, errNoAllocation) {
		t.Fatalf("second release: %v; want errNoAllocation", err)
	}
	// A given-back port waits until every never-used port is gone.
	if q, _ := mustAllocate(t, a, req("b", "b.p", "tcp")); q == p {
		t.Fatalf("released port %d reused while never-used ports are left", p)
	}
	if _, err := a.assign("b.p", 30005, "", operatorChange{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.assign("c.p", 30005, "", operatorChange{}); !errors.Is(err, errPortReserved) {
		t.Fatalf("assign taken port: %v", err)
	}
	// An operator may keep a key outside the pool (as adopt does); it is
	// shown as such, never handed out by the pool.
	if r, err := a.assign("c.p", 40000, "", operatorChange{}); err != nil || r.Port != 40000 {
		t.Fatalf("assign outside pool: %+v, %v", r, err)
	}
	if v, _ := a.find("c.p"); !v.OutsidePool || v.OutsidePolicy {
		t.Fatalf("c.p outside the pool is shown as %+v; want outside pool, not outside policy", v)
	}
	b := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	if r, _, ok := b.lookup("b.p"); !ok || r.Port != 30005 {
		t.Fatalf("after restart b.p = %+v; want 30005", r)
	}
	if _, _, ok := b.lookup("a.p"); ok {
		t.Fatalf("released key came back after restart")
	}
}

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in, want, err string
	}{
		{in: "6000-7000,8080", want: "6000-7000,8080"},
		{in: " 8080 , 6000-6002 ", want: "6000-6002,8080"},
		{in: "1-65535", want: "1-65535"},
		{in: "5,6,7", want: "5-7"},
		{in: "", err: "empty"},
		{in: "0", err: "not a port"},
		{in: "65536", err: "not a port"},
		{in: "7000-6000", err: "below its start"},
		{in: "a-b", err: "not a port"},
		{in: "6000,,7000", err: "empty item"},
		{in: "6000-", err: "not a port"},
	}
	for _, tt := range tests {
		set, err := parsePorts(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("parsePorts(%q) error = %v; want one containing %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil || set.String() != tt.want {
			t.Errorf("parsePorts(%q) = %v, %v; want %s", tt.in, set, err, tt.want)
		}
	}
}

// TestOperatorPin: an operator's assign wins over the device's own
// remote_port until the operator releases the key: the device asking for
// another port is answered the pinned one; a key assigned before its
// device ever registered gets its user, type and proxy name from the
// first registration.
func TestOperatorPin(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	if _, err := a.assign("myiphone.ssh", 30003, "", operatorChange{}); err != nil {
		t.Fatal(err)
	}
	if v, _ := a.find("myiphone.ssh"); v.User != "" || !v.Pinned {
		t.Fatalf("assigned key = %+v; want anonymous and pinned", v)
	}
	asks := req("myiphone", "myiphone.ssh", "tcp")
	asks.RemotePort = 30007
	if p, how := mustAllocate(t, a, asks); p != 30003 || how != outcomePinned {
		t.Fatalf("device asking for 30007 while pinned to 30003 = %d %s; want 30003 pinned", p, how)
	}
	p, how := mustAllocate(t, a, req("myiphone", "myiphone.ssh", "tcp"))
	if p != 30003 || how != outcomeHit {
		t.Fatalf("plain registration = %d %s; want a hit on 30003", p, how)
	}
	b := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	v, _ := b.find("myiphone.ssh")
	if v.User != "myiphone" || v.ProxyType != "tcp" || v.ProxyName != "myiphone.ssh" || !v.Pinned || v.Port != 30003 {
		t.Fatalf("after the first registration and a restart = %+v; want user, type and name filled in, still pinned", v)
	}
	if err := b.release("myiphone.ssh", "test"); err != nil {
		t.Fatal(err)
	}
	if p, how := mustAllocate(t, b, asks); p != 30007 || how != outcomeRequested {
		t.Fatalf("after release the device's request = %d %s; want 30007", p, how)
	}
}
