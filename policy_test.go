package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
)

func writePolicy(t testing.TB, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.toml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustPolicy(t testing.TB, body, pool string, maxPorts int, reclaimAfter time.Duration) *policy {
	t.Helper()
	set, _ := parsePorts(pool)
	p, err := loadPolicy(writePolicy(t, body), set, maxPorts, reclaimAfter)
	if err != nil {
		t.Fatalf("loadPolicy: %v", err)
	}
	return p
}

func TestPolicyParseErrors(t *testing.T) {
	tests := []struct {
		name, body, want string
	}{
		{"syntax", "[[rule]]\nusers = [\"a\"\n", "line 3 column 1"},
		{"unknown setting", "[[rule]]\nusers = [\"a\"]\nmax_port = 3\n", "unknown setting"},
		{"no users", "[[rule]]\nports = \"30000-30010\"\n", "rule 1 (): users is empty"},
		{"bad glob", "[[rule]]\nusers = [\"lab-[\"]\n", `rule 1 (lab-[): user pattern "lab-[" is not a valid glob`},
		{"bad range", "[[rule]]\nusers = [\"a\"]\nports = \"30010-30000\"\n", "rule 1 (a): ports: port list item"},
		{"outside the pool", "[[rule]]\nusers = [\"a\"]\nports = \"30090-30200\"\n", "rule 1 (a): ports 30100-30200 are outside the pool (30000-30099)"},
		{"overlap", "[[rule]]\nusers = [\"a\"]\nports = \"30000-30010\"\n[[rule]]\nusers = [\"b\"]\nports = \"30005-30020\"\n",
			"rule 2 (b): ports 30005-30010 overlap rule 1 (a)'s ports 30000-30010"},
		{"negative quota", "[[rule]]\nusers = [\"a\"]\nmax_ports = -1\n", "rule 1 (a): max_ports -1"},
	}
	set, _ := parsePorts("30000-30099")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writePolicy(t, tt.body)
			_, err := loadPolicy(path, set, 0, 0)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("loadPolicy = %v; want one line containing %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error %q does not name the file", err)
			}
		})
	}
	// The same range in two rules is one sub-pool shared by both.
	if _, err := loadPolicy(writePolicy(t, "[[rule]]\nusers = [\"a\"]\nports = \"30000-30010\"\n[[rule]]\nusers = [\"b\"]\nports = \"30000-30010\"\n"), set, 0, 0); err != nil {
		t.Fatalf("identical ranges: %v", err)
	}
}

const labPolicy = `
[[rule]]
users = ["lab-*"]
ports = "30090-30099"
max_ports = 2

[[rule]]
users = ["vip"]
max_ports = 0
`

func TestPolicyQuota(t *testing.T) {
	p := mustPolicy(t, labPolicy, "30000-30099", 3, 0)
	a := newTestAllocator(t, t.TempDir(), "30000-30099", allocatorOptions{policy: p})
	// lab-1: rule quota 2.
	mustAllocate(t, a, req("lab-1", "lab-1.a", "tcp"))
	mustAllocate(t, a, req("lab-1", "lab-1.b", "tcp"))
	_, _, err := a.allocate(req("lab-1", "lab-1.c", "tcp"))
	var qe *quotaError
	if !errors.As(err, &qe) || rejectReason(err) != `user "lab-1" has reached its quota of 2 ports (rule 1 (lab-*))` {
		t.Fatalf("third key of lab-1: %v (%q); want the rule's quota", err, rejectReason(err))
	}
	// An explicit port for a new key counts too.
	r := req("lab-1", "lab-1.d", "tcp")
	r.RemotePort = 30095
	if _, _, err := a.allocate(r); !errors.As(err, &qe) {
		t.Fatalf("explicit port over quota: %v", err)
	}
	// Sticky ports keep working, and moving an existing key is no new key.
	if _, how := mustAllocate(t, a, req("lab-1", "lab-1.a", "tcp")); how != outcomeHit {
		t.Fatalf("existing key over quota: %s; want hit", how)
	}
	r = req("lab-1", "lab-1.a", "tcp")
	r.RemotePort = 30098
	if p, _ := mustAllocate(t, a, r); p != 30098 {
		t.Fatalf("move within quota = %d", p)
	}
	// Others: the global default of 3; vip: unlimited by its rule.
	for i := range 3 {
		mustAllocate(t, a, req("bob", "bob."+string(rune('a'+i)), "tcp"))
	}
	if _, _, err := a.allocate(req("bob", "bob.z", "tcp")); !errors.As(err, &qe) || !strings.Contains(rejectReason(err), "quota of 3 ports (-max-ports-per-user)") {
		t.Fatalf("fourth key of bob: %v", err)
	}
	for i := range 5 {
		mustAllocate(t, a, req("vip", "vip."+string(rune('a'+i)), "tcp"))
	}
	// A released key frees quota.
	if err := a.release("bob.a", "test"); err != nil {
		t.Fatal(err)
	}
	mustAllocate(t, a, req("bob", "bob.z", "tcp"))
}

func TestPolicySubPools(t *testing.T) {
	p := mustPolicy(t, strings.Replace(labPolicy, "max_ports = 2", "", 1), "30000-30099", 0, 0)
	a := newTestAllocator(t, t.TempDir(), "30000-30099", allocatorOptions{policy: p})
	if port, _ := mustAllocate(t, a, req("lab-7", "lab-7.ssh", "tcp")); port != 30090 {
		t.Fatalf("lab user got %d; want 30090 from its range", port)
	}
	if port, _ := mustAllocate(t, a, req("alice", "alice.ssh", "tcp")); port != 30000 {
		t.Fatalf("other user got %d; want 30000", port)
	}
	tests := []struct {
		user string
		port int
		want string // reject reason substring; empty: granted
	}{
		{"lab-7", 30010, `remote port 30010 is outside the allowed ports (user "lab-7" may use 30090-30099, by rule 1 (lab-*))`},
		{"lab-7", 30095, ""},
		{"alice", 30093, "remote port 30093 is reserved for another proxy (by rule 1 (lab-*))"},
		{"alice", 30050, ""},
		{"vip", 30094, "reserved for another proxy (by rule 1 (lab-*))"},
	}
	for i, tt := range tests {
		r := req(tt.user, tt.user+".x"+string(rune('a'+i)), "tcp")
		r.RemotePort = tt.port
		port, _, err := a.allocate(r)
		switch {
		case tt.want == "" && (err != nil || port != tt.port):
			t.Errorf("%s asks %d: %d, %v; want it granted", tt.user, tt.port, port, err)
		case tt.want != "" && (err == nil || !strings.Contains(rejectReason(err), tt.want)):
			t.Errorf("%s asks %d: err %v (%q); want %q", tt.user, tt.port, err, rejectReason(err), tt.want)
		}
	}
	// A full sub-pool says which pool is full; others are unaffected.
	for i := range 8 { // with lab-7's two, all ten ports of the range
		mustAllocate(t, a, req("lab-8", "lab-8.p"+string(rune('a'+i)), "tcp"))
	}
	_, _, err := a.allocate(req("lab-9", "lab-9.p", "tcp"))
	if rejectReason(err) != "no free port left in pool 30090-30099 of rule 1 (lab-*)" {
		t.Fatalf("full sub-pool: %q", rejectReason(err))
	}
	if _, _, err := a.allocate(req("zed", "zed.p", "tcp")); err != nil {
		t.Fatalf("shared pool user blocked by a full sub-pool: %v", err)
	}
}

// TestPolicyReuseOrderAndReclaim: never-used ports first, lowest first;
// then given-back ports, longest free first; then, with reclaim on, the
// port of the key unseen for longest — only past reclaim-after.
func TestPolicyReuseOrderAndReclaim(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	p := mustPolicy(t, "", "30000-30004", 0, 90*24*time.Hour)
	reclaimed := []string{}
	opts := allocatorOptions{policy: p, now: now, reclaimed: func(r store.Record) { reclaimed = append(reclaimed, r.Key) }}
	a := newTestAllocator(t, dir, "30000-30004", opts)
	for _, k := range []string{"k0", "k1", "k2", "k3", "k4"} {
		mustAllocate(t, a, req("u", k, "tcp"))
		advance(time.Hour)
	}
	// Give back 30003 first, then 30001: 30003 has been free longest.
	a.release("k3", "test")
	advance(time.Hour)
	a.release("k1", "test")
	advance(time.Hour)
	if port, _ := mustAllocate(t, a, req("u", "n1", "tcp")); port != 30003 {
		t.Fatalf("first reuse = %d; want 30003, free the longest", port)
	}
	// The order survives a restart.
	a = newTestAllocator(t, dir, "30000-30004", opts)
	if port, _ := mustAllocate(t, a, req("u", "n2", "tcp")); port != 30001 {
		t.Fatalf("second reuse after restart = %d; want 30001", port)
	}
	// Pool full; nobody is old enough yet.
	if _, _, err := a.allocate(req("u", "n3", "tcp")); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("full pool before reclaim-after: %v", err)
	}
	// Keep k0 and k4 alive; k2 (last seen at its creation) becomes the oldest.
	advance(91 * 24 * time.Hour)
	mustAllocate(t, a, req("u", "k0", "tcp"))
	mustAllocate(t, a, req("u", "k4", "tcp"))
	mustAllocate(t, a, req("u", "n1", "tcp"))
	port, how := mustAllocate(t, a, req("u", "n3", "tcp"))
	if port != 30002 || how != outcomeNew {
		t.Fatalf("reclaim gave %d %s; want k2's 30002", port, how)
	}
	if len(reclaimed) != 1 || reclaimed[0] != "k2" {
		t.Fatalf("reclaimed %v; want [k2]", reclaimed)
	}
	if _, _, ok := a.lookup("k2"); ok {
		t.Fatal("k2 still holds a port")
	}
	// k2 coming back gets a port by the same rules: the oldest left is n2 (30001).
	if port, _ := mustAllocate(t, a, req("u", "k2", "tcp")); port != 30001 {
		t.Fatalf("k2 back = %d; want n2's 30001, unseen the longest", port)
	}
	b := newTestAllocator(t, dir, "30000-30004", allocatorOptions{policy: p, now: now})
	for key, want := range map[string]int{"n3": 30002, "k2": 30001, "k0": 30000} {
		if r, _, ok := b.lookup(key); !ok || r.Port != want {
			t.Errorf("after restart %s = %+v; want %d", key, r, want)
		}
	}
}

// TestPolicyReload runs the real server: SIGHUP applies a good file, keeps
// the old policy on a bad one, and sticky ports outside a new range stay
// and are marked.
func TestPolicyReload(t *testing.T) {
	path := writePolicy(t, "")
	base, _ := startServer(t, "-data-dir", t.TempDir(), "-allow-ports", "31000-31099", "-policy", path)
	if port := register(t, base, "lab-1", "lab-1.a", "tcp"); port != 31000 {
		t.Fatalf("before the rule: %d", port)
	}
	os.WriteFile(path, []byte("[[rule]]\nusers = [\"lab-*\"]\nports = \"31090-31099\"\n"), 0o600)
	syscall.Kill(syscall.Getpid(), syscall.SIGHUP)
	probes := 0
	waitFor(t, "policy reload", 5*time.Second, func() bool {
		probes++ // a new key each time: a key allocated before the reload stays sticky
		return register(t, base, "lab-1", fmt.Sprintf("lab-1.probe%d", probes), "tcp") >= 31090
	})
	if port := register(t, base, "lab-1", "lab-1.a", "tcp"); port != 31000 {
		t.Fatalf("existing key moved to %d; want it sticky on 31000", port)
	}
	var held apiAllocation
	if adminGet(t, base+"/api/allocations/lab-1.a", &held); !held.OutsidePolicy || held.Port != 31000 {
		t.Fatalf("lab-1.a = %+v; want port 31000 marked outside policy", held)
	}
	// A bad file keeps the old policy.
	os.WriteFile(path, []byte("[[rule]]\nusers = [\"lab-*\"]\nports = \"1-5\"\n"), 0o600)
	syscall.Kill(syscall.Getpid(), syscall.SIGHUP)
	time.Sleep(300 * time.Millisecond)
	if port := register(t, base, "lab-2", "lab-2.a", "tcp"); port < 31090 {
		t.Fatalf("after a bad reload lab-2 got %d; want the old rule's range", port)
	}
	out, _ := cli(t, false, "", "list", "-server", base)
	var outside string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "lab-1.a ") {
			outside = line
		}
	}
	if !strings.Contains(outside, "outside policy") {
		t.Fatalf("list does not mark lab-1.a outside policy:\n%s", out)
	}
	resp, err := http.Get(base + "/?q=lab-1.a")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(page), `<span class="warn">outside policy</span>`) {
		t.Fatalf("the page does not mark lab-1.a outside policy:\n%s", page)
	}
}

// TestReclaimStoreFailure: a reclaim the store refuses leaves the victim
// its port.
func TestReclaimStoreFailure(t *testing.T) {
	dir := t.TempDir()
	st, kv := newFaultyStore(t, dir)
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	a := newAllocatorOn(t, st, "30000-30000",
		allocatorOptions{policy: mustPolicy(t, "", "30000-30000", 0, time.Hour), now: now})
	mustAllocate(t, a, req("u", "old", "tcp"))
	mu.Lock()
	clock = clock.Add(2 * time.Hour)
	mu.Unlock()
	kv.set(errDiskFull, nil)
	if _, _, err := a.allocate(req("u", "new", "tcp")); !errors.Is(err, errStoreFailed) {
		t.Fatalf("reclaim with a failing store: %v", err)
	}
	if r, _, ok := a.lookup("old"); !ok || r.Port != 30000 {
		t.Fatalf("victim after a failed reclaim = %+v, %v; want it on 30000", r, ok)
	}
	kv.set(nil, nil)
	if port, _ := mustAllocate(t, a, req("u", "new", "tcp")); port != 30000 {
		t.Fatalf("reclaim once the store works = %d", port)
	}
	if _, _, ok := a.lookup("old"); ok {
		t.Fatal("victim kept its port after the reclaim")
	}
}
