package main

import (
	"os"

	"frp-port-keeper/internal/store/file"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"

	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/philippgille/gokv"
	gokvbbolt "github.com/philippgille/gokv/bbolt"
)

// seedStore allocates name->port in a fresh file store and returns its dir.
func seedStore(t *testing.T, allocs map[string]int) string {
	t.Helper()
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	for name, port := range allocs {
		r := req("u", name, "tcp")
		r.RemotePort = port
		mustAllocate(t, a, r)
	}
	return dir
}

func storeFile(dir, name string) string { return filepath.Join(dir, name+".json") }

func TestLoadRepairsTornFiles(t *testing.T) {
	allocs := map[string]int{"u.a": 30001, "u.b": 30002, "u.c": 30003, "u.d": 30004, "u.e": 30005}
	dir := seedStore(t, allocs)
	// Damage both kinds of record, one side of an allocation at a time.
	damage := map[string][]byte{
		storeFile(dir, local.PortName(store.TCPPort(30001))): {},                         // empty port record
		storeFile(dir, local.KeyName("u.b")):                 []byte(`{"key":"u.b","po`), // truncated key record
		storeFile(dir, local.PortName(store.TCPPort(30003))): []byte("\x00\x00garbage"),  // garbage port record
		storeFile(dir, local.KeyName("u.d")):                 []byte(`[]`),               // wrong shape
	}
	for path, data := range damage {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	st := newTestStore(t, dir)
	set, _ := parsePorts("30000-30099")
	a, got, err := newAllocator(st, set, allocatorOptions{log: testLogger(t)})
	if err != nil {
		t.Fatalf("start with torn files: %v", err)
	}
	for name, port := range allocs {
		if r, _, ok := a.lookup(name); !ok || r.Port != port {
			t.Errorf("%s = %+v (found %v); want port %d", name, r, ok, port)
		}
	}
	// Each damaged file is reported by name and kept in quarantine.
	report := strings.Join(got.Problems, "\n")
	for path := range damage {
		if !strings.Contains(report, filepath.Base(path)) {
			t.Errorf("problems do not name %s:\n%s", filepath.Base(path), report)
		}
	}
	q, _ := os.ReadDir(filepath.Join(dir, file.QuarantineDir))
	if len(q) != len(damage) {
		t.Errorf("quarantine holds %d files; want %d", len(q), len(damage))
	}
	// The repairs were written: a second start finds nothing to report.
	_, again, err := newAllocator(newTestStore(t, dir), set, allocatorOptions{})
	if err != nil || len(again.Problems) != 0 || len(again.Allocations) != len(allocs) {
		t.Fatalf("second start: %v, problems %v, %d allocations", err, again.Problems, len(again.Allocations))
	}
}

// TestLoadTornWithoutTwin: a torn port record whose key record is gone too
// was never acknowledged; its port is free again and nobody's port moves.
func TestLoadTornWithoutTwin(t *testing.T) {
	dir := seedStore(t, map[string]int{"u.a": 30001, "u.b": 30002})
	os.WriteFile(storeFile(dir, local.PortName(store.TCPPort(30001))), nil, 0o600)
	os.Remove(storeFile(dir, local.KeyName("u.a")))
	a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	if _, _, ok := a.lookup("u.a"); ok {
		t.Fatal("u.a survived with no intact record")
	}
	if r, _, _ := a.lookup("u.b"); r.Port != 30002 {
		t.Fatalf("u.b = %d; want 30002", r.Port)
	}
}

// TestLoadInterruptedMove: every prefix of a move's writes reloads as one
// allocation, on the old port until the key record is replaced, on the
// new one after, never both.
func TestLoadInterruptedMove(t *testing.T) {
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	old := store.Record{Key: "u.a", Port: 30001, User: "u", ProxyName: "u.a", ProxyType: "tcp", CreatedAt: at, AssignedAt: at}
	moved := old
	moved.Port, moved.AssignedAt = 30009, at.Add(time.Hour)
	tests := []struct {
		name     string
		setup    func(kv gokv.Store)
		wantPort int
	}{
		{"new port record written", func(kv gokv.Store) {
			kv.Set(local.PortName(store.TCPPort(30001)), old)
			kv.Set(local.KeyName("u.a"), old)
			kv.Set(local.PortName(store.TCPPort(30009)), moved)
		}, 30001},
		{"key record replaced", func(kv gokv.Store) {
			kv.Set(local.PortName(store.TCPPort(30001)), old)
			kv.Set(local.PortName(store.TCPPort(30009)), moved)
			kv.Set(local.KeyName("u.a"), moved)
		}, 30009},
		{"old port record deleted", func(kv gokv.Store) {
			kv.Set(local.PortName(store.TCPPort(30009)), moved)
			kv.Set(local.KeyName("u.a"), moved)
		}, 30009},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tt.setup(newFileKV(t, dir))
			a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
			if r, _, ok := a.lookup("u.a"); !ok || r.Port != tt.wantPort {
				t.Fatalf("u.a = %+v; want port %d", r, tt.wantPort)
			}
			if n := len(a.snapshot()); n != 1 {
				t.Fatalf("%d allocations; want 1", n)
			}
			a2 := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
			if n := len(a2.snapshot()); n != 1 {
				t.Fatalf("after repair, %d allocations; want 1", n)
			}
			if _, err := os.Stat(storeFile(dir, local.PortName(store.TCPPort(30001+30009-tt.wantPort)))); !os.IsNotExist(err) {
				t.Fatalf("the losing port record is still there (%v)", err)
			}
		})
	}
}

// TestLoadConflictingKeyRecord: a key record naming a port that another
// key's port record holds loses; the port is never handed to two keys.
func TestLoadConflictingKeyRecord(t *testing.T) {
	dir := seedStore(t, map[string]int{"u.a": 30001, "u.b": 30002})
	os.Remove(storeFile(dir, local.PortName(store.TCPPort(30002))))
	// u.b's port record is gone and its key record now points at u.a's port.
	b := store.Record{Key: "u.b", Port: 30001, User: "u", ProxyName: "u.b", ProxyType: "tcp"}
	newFileKV(t, dir).Set(local.KeyName("u.b"), b)
	a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	if r, _, _ := a.lookup("u.a"); r.Port != 30001 {
		t.Fatalf("u.a = %d; want 30001", r.Port)
	}
	if _, _, ok := a.lookup("u.b"); ok {
		t.Fatal("u.b kept a claim on u.a's port")
	}
}

// TestStoresReadGokvLayout: records written by gokv itself (as every
// earlier version wrote them, file and bbolt) load unchanged.
func TestStoresReadGokvLayout(t *testing.T) {
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	recs := []store.Record{
		{Key: "u.a", Port: 30001, User: "u", ProxyName: "u.a", ProxyType: "tcp", CreatedAt: at, AssignedAt: at},
		{Key: "group:web", Port: 30099, User: "v", ProxyName: "v.w1", ProxyType: "tcp", Group: "web", CreatedAt: at, AssignedAt: at},
	}
	write := func(t *testing.T, kv gokv.Store) {
		for _, r := range recs {
			if err := kv.Set(local.PortName(store.TCPPort(r.Port)), r); err != nil {
				t.Fatal(err)
			}
			if err := kv.Set(local.KeyName(r.Key), r); err != nil {
				t.Fatal(err)
			}
		}
		kv.Set(local.SeenName("u.a"), local.SeenRecord{Key: "u.a", LastSeen: at.Add(time.Hour)})
		kv.Close()
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			if kind == "bbolt" {
				kv, err := gokvbbolt.NewStore(gokvbbolt.Options{Path: filepath.Join(dir, "allocations.bbolt")})
				if err != nil {
					t.Fatal(err)
				}
				write(t, kv)
			} else {
				write(t, newFileKV(t, dir))
			}
			a := newAllocatorOn(t, openTestStore(t, kind, dir), "30000-30099", allocatorOptions{})
			for _, r := range recs {
				if got, _, ok := a.lookup(r.Key); !ok || !store.SameRecord(got, r) {
					t.Errorf("%s = %+v; want %+v", r.Key, got, r)
				}
			}
			if _, seen, _ := a.lookup("u.a"); !seen.Equal(at.Add(time.Hour)) {
				t.Errorf("u.a last seen %v; want %v", seen, at.Add(time.Hour))
			}
		})
	}
}

func TestLongAndHostileKeysStore(t *testing.T) {
	dir := t.TempDir()
	a := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	names := []string{strings.Repeat("x", 100<<10), "../../etc/passwd", "a/b\x00c", "%2F..%2F", "\xff\xfe"}
	ports := map[string]int{}
	for _, n := range names {
		p, _ := mustAllocate(t, a, req("u", n, "tcp"))
		ports[n] = p
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if len(e.Name()) > 255 || strings.ContainsAny(e.Name(), "/\x00") {
			t.Errorf("store file name %q", e.Name())
		}
	}
	b := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	for n, p := range ports {
		if r, _, ok := b.lookup(n); !ok || r.Port != p {
			t.Errorf("after restart key of %d bytes = %+v; want %d", len(n), r, p)
		}
	}
}

// TestCheckpoint: a clean stop's checkpoint makes the next start read one
// file; that start deletes it before any write, so a crash after it reads
// every record again and finds every write made since.
func TestCheckpoint(t *testing.T) {
	cfg := config{dataDir: t.TempDir(), store: "file"}
	open := func() (*allocator, store.Snapshot, store.Store, func()) {
		t.Helper()
		st, unlock, err := openStore(cfg, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		set, _ := parsePorts("30000-30099")
		a, got, err := newAllocator(st, set, allocatorOptions{log: testLogger(t)})
		if err != nil {
			t.Fatal(err)
		}
		return a, got, st, unlock
	}
	crash := func(st store.Store, unlock func()) { st.(*file.Store).Crash(); unlock() }
	stop := func(a *allocator, st store.Store, unlock func()) {
		if _, err := a.flushSeen(0); err != nil {
			t.Fatal(err)
		}
		st.Close()
		unlock()
	}
	a, got, st, unlock := open()
	if got.From == "checkpoint" {
		t.Fatal("an empty directory loaded from a checkpoint")
	}
	mustAllocate(t, a, req("u", "u.a", "tcp"))
	mustAllocate(t, a, req("u", "u.b", "tcp"))
	mustAllocate(t, a, req("u", "u.c", "tcp"))
	if err := a.release("u.b", "test"); err != nil {
		t.Fatal(err)
	}
	_, seenA, _ := a.lookup("u.a")
	stop(a, st, unlock)

	a, got, st, unlock = open()
	if got.From != "checkpoint" {
		t.Fatalf("a clean restart loaded from %q; want the checkpoint", got.From)
	}
	if _, err := os.Stat(filepath.Join(cfg.dataDir, file.CheckpointName)); !os.IsNotExist(err) {
		t.Fatalf("the checkpoint outlived the start that used it (%v)", err)
	}
	if r, seen, ok := a.lookup("u.a"); !ok || r.Port != 30000 || !seen.Equal(seenA) {
		t.Fatalf("u.a from the checkpoint = %+v %v; want 30000 seen %v", r, seen, seenA)
	}
	if _, _, ok := a.lookup("u.b"); ok {
		t.Fatal("released u.b came back from the checkpoint")
	}
	// 30001 was given back: never-used 30003 comes first, then 30001.
	if p, _ := mustAllocate(t, a, req("u", "u.d", "tcp")); p != 30003 {
		t.Fatalf("after a warm start u.d = %d; want 30003", p)
	}
	stop(a, st, unlock)

	a, got, st, unlock = open()
	if got.From != "checkpoint" {
		t.Fatalf("the second clean restart loaded from %q; want the checkpoint", got.From)
	}
	// A record rewritten in place leaves the directory's mtime alone: a
	// checkpoint trusted by mtime would hide it after a crash.
	later := time.Now().Round(0)
	a.now = func() time.Time { return later }
	if p, how, _ := a.allocate(req("u", "u.c", "tcp")); p != 30002 || how != outcomeHit {
		t.Fatalf("u.c = %d %s; want a hit on 30002", p, how)
	}
	if _, err := a.flushSeen(0); err != nil {
		t.Fatal(err)
	}
	crash(st, unlock)

	a, got, st, unlock = open()
	defer crash(st, unlock)
	if got.From == "checkpoint" {
		t.Fatal("a start after a crash trusted a checkpoint")
	}
	for key, port := range map[string]int{"u.a": 30000, "u.c": 30002, "u.d": 30003} {
		if r, _, ok := a.lookup(key); !ok || r.Port != port {
			t.Errorf("after the crash %s = %+v; want %d", key, r, port)
		}
	}
	if _, seen, _ := a.lookup("u.c"); !seen.Equal(later) {
		t.Errorf("after the crash u.c last seen %v; want %v (written after the warm start)", seen, later)
	}
}
