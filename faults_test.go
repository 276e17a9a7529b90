package main

// The promise under faults: a port the plugin announced stays with its key
// through failed writes, full disks, read-only directories, crashes and
// clock skew, and the plugin keeps answering. Each test here reproduces one
// way the promise was broken.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/store/storetest"
	"frp-port-keeper/internal/testenv"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"
)

// crashStore drops a file store the way SIGKILL does: no checkpoint.
func crashStore(s *file.Store) { s.Crash() }

// TestFailedMoveKeepsOldPort: whichever step of a move fails, the key
// keeps the port it was last answered with, in memory and after a crash;
// a failure after the commit leaves the move done. The admin assign takes
// the same path.
func TestFailedMoveKeepsOldPort(t *testing.T) {
	tests := []struct {
		name     string
		pick     func(op, name string) bool
		wantPort int // after the failed request and a crash
		moved    bool
	}{
		{"port record write", func(op, name string) bool { return op == "write" && strings.HasPrefix(name, local.PortPrefix) }, 61000, false},
		{"key record write", func(op, name string) bool { return op == "write" && strings.HasPrefix(name, local.KeyPrefix) }, 61000, false},
		{"key record rename", func(op, name string) bool { return op == "rename" && strings.HasPrefix(name, local.KeyPrefix) }, 61000, false},
		{"old port record delete", func(op, name string) bool { return op == "remove" && strings.HasPrefix(name, local.PortPrefix) }, 61005, true},
	}
	for _, via := range []string{"plugin", "assign"} {
		for _, tt := range tests {
			t.Run(via+"/"+tt.name, func(t *testing.T) {
				dir := t.TempDir()
				st, faults := newFaultyStore(t, dir)
				a := newAllocatorOn(t, st, "61000-61010", allocatorOptions{})
				if p, _ := mustAllocate(t, a, req("u", "u.m-0", "tcp")); p != 61000 {
					t.Fatalf("u.m-0 = %d; want 61000", p)
				}
				faults.failWhen(fmt.Errorf("open: %w", syscall.ENOSPC), tt.pick)
				moveTo := req("u", "u.m-0", "tcp")
				moveTo.RemotePort = 61005
				var err error
				if via == "plugin" {
					_, _, err = a.allocate(moveTo)
				} else {
					_, err = a.assign("u.m-0", 61005, "", operatorChange{})
				}
				if tt.moved != (err == nil) {
					t.Fatalf("move with a failing %s: %v; want success %v", tt.name, err, tt.moved)
				}
				faults.set(nil, nil)
				// The plain request is answered with the last acknowledged port.
				p, how := mustAllocate(t, a, req("u", "u.m-0", "tcp"))
				if p != tt.wantPort || how != outcomeHit {
					t.Fatalf("after the failed move u.m-0 = %d %s; want a hit on %d", p, how, tt.wantPort)
				}
				crashStore(st)

				b := newTestAllocator(t, dir, "61000-61010", allocatorOptions{})
				if r, _, ok := b.lookup("u.m-0"); !ok || r.Port != tt.wantPort {
					t.Fatalf("after a crash u.m-0 = %+v (found %v); want %d", r, ok, tt.wantPort)
				}
				other, _ := mustAllocate(t, b, req("v", "v.new", "tcp"))
				if other == tt.wantPort {
					t.Fatalf("a stranger got u.m-0's port %d", other)
				}
				if len(b.snapshot()) != 2 {
					t.Fatalf("allocations after the crash: %+v; want 2", b.snapshot())
				}
			})
		}
	}
}

// TestUnfinishedAllocationDropped: a fresh allocation whose commit failed
// was answered reject; it does not come back at the next start as the
// owner of its port, and it does not count against the user's quota.
func TestUnfinishedAllocationDropped(t *testing.T) {
	dir := t.TempDir()
	st, faults := newFaultyStore(t, dir)
	pol := mustPolicy(t, "", "30000-30001", 1, 0)
	a := newAllocatorOn(t, st, "30000-30001", allocatorOptions{policy: pol})
	faults.failWhen(syscall.ENOSPC, func(op, name string) bool { return op == "syncdir" }) // a new key's commit
	_, _, err := a.allocate(req("u", "u.ghost", "tcp"))
	if err == nil || !strings.Contains(rejectReason(err), "disk is full") {
		t.Fatalf("allocation with a failing commit: %v (%q); want a reject naming the full disk", err, rejectReason(err))
	}
	for _, name := range []string{local.PortName(store.TCPPort(30000)), local.KeyName("u.ghost")} {
		if _, err := os.Stat(storeFile(dir, name)); !os.IsNotExist(err) {
			t.Fatalf("the unfinished allocation's %s was left behind (%v)", name, err)
		}
	}
	faults.set(nil, nil)
	crashStore(st)
	// Leave the port record behind as a crash at that moment would.
	newFileKV(t, dir).Set(local.PortName(store.TCPPort(30000)), store.Record{Key: "u.ghost", Port: 30000, User: "u", ProxyName: "u.ghost", ProxyType: "tcp"})

	b := newAllocatorOn(t, newTestStore(t, dir), "30000-30001", allocatorOptions{policy: pol})
	if _, _, ok := b.lookup("u.ghost"); ok {
		t.Fatal("an allocation answered with reject came back as the owner of its port")
	}
	if p, _ := mustAllocate(t, b, req("u", "u.real", "tcp")); p != 30000 {
		t.Fatalf("u.real = %d; want 30000, the port nobody was promised", p)
	}
}

// mountTmpfs mounts a tmpfs of size at a new directory (needs root).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs (CI runs as root)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// fillDisk writes into dir until the file system is full.
func fillDisk(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	// Small files may still fit in a part-used block; take those too.
	for i := 0; ; i++ {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("filler-%d", i)), buf[:512], 0o600); err != nil {
			break
		}
	}
}

// TestStartOnFullDisk: a start on a full disk serves every intact
// allocation, says what it could not repair, and rejects new keys with a
// reason; once space is back, new keys work without a restart.
func TestStartOnFullDisk(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			dir := filepath.Join(mountTmpfs(t, "2m"), "data")
			s := startInProc(t, "-data-dir", dir, "-store", kind, "-allow-ports", "30000-30009", "-probe=false")
			ports := map[string]int{}
			for _, name := range []string{"u.a", "u.b", "u.c"} {
				_, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", name, "tcp", "")))
				ports[name] = portOfRaw(t, body)
			}
			s.stop(t)
			if kind == "file" {
				// A crash left u.b's port record missing: the start must rebuild it.
				os.Remove(filepath.Join(dir, file.CheckpointName))
				os.Remove(storeFile(dir, local.PortName(store.TCPPort(ports["u.b"]))))
			}
			fillDisk(t, filepath.Dir(dir))

			s = startInProc(t, "-data-dir", dir, "-store", kind, "-allow-ports", "30000-30009", "-probe=false")
			for name, want := range ports {
				if _, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", name, "tcp", ""))); portOfRaw(t, body) != want {
					t.Fatalf("%s on a full disk: %s; want port %d", name, body, want)
				}
			}
			_, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.new", "tcp", "")))
			// bbolt may still commit into pages its file already holds.
			if ans := decodeAnswer(t, string(body)); (kind == "file" || ans.Reject) && !strings.Contains(ans.RejectReason, "disk is full") {
				t.Fatalf("new key on a full disk: %s; want a reject naming the full disk", body)
			}
			if kind == "file" {
				waitFor(t, "the log to say what could not be repaired", 5*time.Second, func() bool {
					return strings.Contains(s.log.String(), "could not rewrite "+local.PortName(store.TCPPort(ports["u.b"])))
				})
			}
			filler, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), "filler*"))
			for _, f := range filler {
				os.Remove(f)
			}
			_, body = s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.new", "tcp", "")))
			if p := portOfRaw(t, body); p == 0 {
				t.Fatalf("new key once space is back: %s", body)
			}
		})
	}
}

// TestStartReadOnly: a read-only data directory (a read-only bind mount)
// starts, serves what it holds, and rejects new keys naming the cause.
func TestStartReadOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a read-only bind mount (CI runs as root)")
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			src := t.TempDir()
			s := startInProc(t, "-data-dir", src, "-store", kind, "-allow-ports", "30000-30009", "-probe=false")
			_, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.a", "tcp", "")))
			port := portOfRaw(t, body)
			s.stop(t)
			ro := t.TempDir()
			for _, args := range [][]string{{"--bind", src, ro}, {"-o", "remount,bind,ro", ro}} {
				if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
					t.Fatalf("mount %v: %v %s", args, err, out)
				}
			}
			t.Cleanup(func() { exec.Command("umount", "-l", ro).Run() })

			s = startInProc(t, "-data-dir", ro, "-store", kind, "-allow-ports", "30000-30009", "-probe=false")
			if _, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.a", "tcp", ""))); portOfRaw(t, body) != port {
				t.Fatalf("u.a from a read-only directory: %s; want %d", body, port)
			}
			_, body = s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.new", "tcp", "")))
			if ans := decodeAnswer(t, string(body)); !ans.Reject || !strings.Contains(ans.RejectReason, "read-only") {
				t.Fatalf("new key in a read-only directory: %s; want a reject naming it", body)
			}
			waitFor(t, "the log to say the store is read-only", 5*time.Second, func() bool {
				return strings.Contains(s.log.String(), "cannot take writes")
			})
		})
	}
}

// TestStopIgnoresClockSkew: with the data directory's mtime an hour ahead
// of the clock, a stop still takes well under a second (it once slept
// until the mtime).
func TestStopIgnoresClockSkew(t *testing.T) {
	dir := t.TempDir()
	s := startInProc(t, "-data-dir", dir, "-allow-ports", "30000-30009", "-probe=false")
	_, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.a", "tcp", "")))
	portOfRaw(t, body)
	ahead := time.Now().Add(time.Hour)
	if err := os.Chtimes(dir, ahead, ahead); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s.stop(t)
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("stop with the directory's mtime an hour ahead took %v", took)
	}
}

// TestFutureTimesClamped: a record created by a clock that was ahead does
// not pin its key as seen in the future; it can still be reclaimed.
func TestFutureTimesClamped(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	now, advance := fakeClock(clock)
	future := clock.AddDate(1, 0, 0)
	r := store.Record{Key: "u.old", Port: 30000, User: "u", ProxyName: "u.old", ProxyType: "tcp", CreatedAt: future, AssignedAt: future}
	kv := newFileKV(t, dir)
	kv.Set(local.PortName(store.TCPPort(30000)), r)
	kv.Set(local.KeyName(r.Key), r)
	kv.Set(local.SeenName(r.Key), local.SeenRecord{Key: r.Key, LastSeen: future})
	pol := mustPolicy(t, "", "30000-30000", 0, time.Hour)
	a := newTestAllocator(t, dir, "30000-30000", allocatorOptions{policy: pol, now: now})
	if _, seen, _ := a.lookup("u.old"); seen.After(clock) {
		t.Fatalf("last seen %v is after now %v", seen, clock)
	}
	advance(2 * time.Hour)
	if p, _, err := a.allocate(req("v", "v.new", "tcp")); err != nil || p != 30000 {
		t.Fatalf("reclaim of a key created in the future: %d, %v; want 30000", p, err)
	}
}

// TestDataDirRemoved: a data directory deleted while the server runs (and
// replaced by another server's) is noticed: new keys are refused, known
// keys still answered, and no checkpoint lands in the new directory.
func TestDataDirRemoved(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	s := startInProc(t, "-data-dir", dir, "-allow-ports", "30000-30009", "-probe=false")
	_, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.a", "tcp", "")))
	port := portOfRaw(t, body)
	// The history is written in the background: a file it creates while
	// RemoveAll runs makes RemoveAll fail ("directory not empty"), so try
	// until the directory is gone.
	waitFor(t, "the data directory to be removed", 5*time.Second, func() bool { return os.RemoveAll(dir) == nil })
	if err := os.MkdirAll(dir, 0o700); err != nil { // another server's directory now
		t.Fatal(err)
	}
	if _, body := s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.a", "tcp", ""))); portOfRaw(t, body) != port {
		t.Fatalf("u.a after its directory went: %s; want %d", body, port)
	}
	_, body = s.post(t, "NewProxy", "r", []byte(newProxyBody("u", "u.b", "tcp", "")))
	if ans := decodeAnswer(t, string(body)); !ans.Reject || !strings.Contains(ans.RejectReason, "removed or replaced") {
		t.Fatalf("new key after the directory went: %s; want a reject naming it", body)
	}
	waitFor(t, "the log to say the directory went", 5*time.Second, func() bool {
		return strings.Contains(s.log.String(), "data directory was removed or replaced")
	})
	s.stop(t)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		t.Errorf("the old server wrote %s into the new directory", e.Name())
	}
}

// TestReclaimSparesOnlineProxies: a key whose proxy frps reported online
// (NewProxy, no CloseProxy since) is never reclaimed, however long ago it
// registered; nor is one whose port something still listens on (frps,
// after this plugin restarted and lost the online state); after its
// CloseProxy it is.
func TestReclaimSparesOnlineProxies(t *testing.T) {
	dir := t.TempDir()
	now, advance := fakeClock(time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC))
	// Two neighbouring ports that bind now (other tests run alongside).
	busyPort := 0
	for range 50 {
		p := testenv.FreePort(t)
		if p < maxPort && bindProbe("0.0.0.0")(store.TCPPort(p)) == nil && bindProbe("0.0.0.0")(store.TCPPort(p+1)) == nil {
			busyPort = p
			break
		}
	}
	if busyPort == 0 {
		t.Fatal("no two neighbouring free ports")
	}
	pool := fmt.Sprintf("%d-%d", busyPort, busyPort+1)
	pol := mustPolicy(t, "", pool, 0, 3*time.Second)
	opts := allocatorOptions{policy: pol, now: now, probe: bindProbe("127.0.0.1")}
	a := newTestAllocator(t, dir, pool, opts)
	p0 := req("a", "a.p0", "tcp")
	p1 := req("a", "a.p1", "tcp")
	for _, r := range []frpplugin.Proxy{p0, p1} {
		mustAllocate(t, a, r)
		a.proxyOpened(r)
	}
	advance(4 * time.Second)
	if p, _, err := a.allocate(req("b", "b.p", "tcp")); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("b.p while a's proxies are online = %d, %v; want the pool exhausted", p, err)
	}
	// Online state survives a restart of the plugin (frps re-sends nothing).
	if _, err := a.flushSeen(0); err != nil {
		t.Fatal(err)
	}
	a = newTestAllocator(t, dir, pool, opts)
	advance(4 * time.Second)
	if p, _, err := a.allocate(req("b", "b.p", "tcp")); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("b.p after a plugin restart = %d, %v; want the pool exhausted", p, err)
	}
	// CloseProxy of a.p0 makes it reclaimable, unless its port is in use.
	a.proxyClosed("a", "a.p0")
	a.proxyClosed("a", "a.p1")
	r0, _, _ := a.lookup("a.p0")
	hold, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", r0.Port))
	if err != nil {
		t.Fatal(err)
	}
	advance(4 * time.Second)
	p, _, err := a.allocate(req("b", "b.p", "tcp"))
	if err != nil {
		t.Fatalf("b.p after a's proxies closed: %v; want a.p1's port", err)
	}
	if p == r0.Port {
		t.Fatalf("b.p got %d, a port something still listens on", p)
	}
	if r, _, ok := a.lookup("a.p0"); !ok || r.Port != r0.Port {
		t.Fatalf("a.p0 = %+v (found %v); want it kept on %d", r, ok, r0.Port)
	}
	hold.Close()
}

// TestGroupMoveKeepsCounts: when bob's member of group web moves the port
// alice's member created, the per-user counts follow the record, whether
// the store takes the write or fails it.
func TestGroupMoveKeepsCounts(t *testing.T) {
	for _, fails := range []bool{false, true} {
		t.Run(fmt.Sprintf("store fails %v", fails), func(t *testing.T) {
			st := storetest.NewFake()
			a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
			alice := frpplugin.Proxy{User: "alice", ProxyName: "alice.w", ProxyType: "tcp", Group: "web"}
			mustAllocate(t, a, alice)
			if fails {
				st.Fail(errors.New("injected"))
			}
			bob := frpplugin.Proxy{User: "bob", ProxyName: "bob.w", ProxyType: "tcp", Group: "web", RemotePort: 30005}
			_, _, err := a.allocate(bob)
			if fails != (err != nil) {
				t.Fatalf("move: %v", err)
			}
			r, _, _ := a.lookup("group:web")
			a.mu.RLock()
			counts := fmt.Sprint(a.perUser)
			a.mu.RUnlock()
			if want := fmt.Sprint(map[string]int{r.User: 1}); counts != want {
				t.Fatalf("perUser = %s with the record's user %q; want %s", counts, r.User, want)
			}
		})
	}
}

// TestProbeOutsideLock: while a fresh allocation's bind test hangs, sticky
// hits of other keys are answered.
func TestProbeOutsideLock(t *testing.T) {
	hang := make(chan struct{})
	var probing sync.WaitGroup
	probing.Add(1)
	var once sync.Once
	probe := func(store.Slot) error {
		once.Do(func() { probing.Done(); <-hang })
		return nil
	}
	a := newAllocatorOn(t, storetest.NewFake(), "30000-30009", allocatorOptions{})
	mustAllocate(t, a, req("u", "u.a", "tcp"))
	a.probe = probe
	done := make(chan struct{})
	go func() {
		defer close(done)
		mustAllocate(t, a, req("u", "u.b", "tcp"))
	}()
	probing.Wait()
	if p, how := mustAllocate(t, a, req("u", "u.a", "tcp")); how != outcomeHit || p != 30000 {
		t.Fatalf("u.a during u.b's bind test = %d %s", p, how)
	}
	close(hang)
	<-done
}

// TestLostRaceRetried: a claim that another instance beat is decided
// again with the winner's state and never announces the lost port.
func TestLostRaceRetried(t *testing.T) {
	st := storetest.NewFake()
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	at := time.Now()
	st.Rival(func(f *storetest.Fake) {
		f.Put(store.Record{Key: "other.x", Port: 30000, User: "other", ProxyName: "other.x", ProxyType: "tcp", CreatedAt: at, AssignedAt: at})
	})
	p, how := mustAllocate(t, a, req("u", "u.a", "tcp"))
	if p == 30000 || how != outcomeNew {
		t.Fatalf("after losing 30000 to another instance u.a = %d %s; want another fresh port", p, how)
	}
	if r, _, ok := a.lookup("other.x"); !ok || r.Port != 30000 {
		t.Fatalf("the winner is not in memory: %+v", r)
	}
	// The same key won at the other instance: both answer its port.
	st.Rival(func(f *storetest.Fake) {
		f.Put(store.Record{Key: "u.b", Port: 30007, User: "u", ProxyName: "u.b", ProxyType: "tcp", CreatedAt: at, AssignedAt: at})
	})
	if p, how := mustAllocate(t, a, req("u", "u.b", "tcp")); p != 30007 || how != outcomeHit {
		t.Fatalf("u.b claimed elsewhere first = %d %s; want a hit on 30007", p, how)
	}
}

// TestImportAllOrNothing: an import (or adopt) through the server whose
// second write fails undoes the first; one that names a held port writes
// nothing; ports outside the pool are kept and reported.
func TestImportAllOrNothing(t *testing.T) {
	dir := t.TempDir()
	st, faults := newFaultyStore(t, dir)
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	mustAllocate(t, a, req("u", "u.held", "tcp"))
	recs := []store.Record{{Key: "u.x", Port: 30005, User: "u", ProxyType: "tcp"}, {Key: "u.y", Port: 6000, User: "u", ProxyType: "tcp"}}
	if _, err := a.importAll(append(recs, store.Record{Key: "u.z", Port: 30000}), store.HistImported, "test"); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Fatalf("import naming a held port: %v; want it refused", err)
	}
	writes := 0
	faults.failWhen(syscall.ENOSPC, func(op, name string) bool {
		if op == "create" { // a new key's key record
			writes++
			return writes == 2
		}
		return false
	})
	if _, err := a.importAll(recs, store.HistImported, "test"); err == nil {
		t.Fatal("import with a failing second write succeeded")
	}
	faults.set(nil, nil)
	for _, k := range []string{"u.x", "u.y"} {
		if r, _, ok := a.lookup(k); ok {
			t.Fatalf("%s = %+v after a failed import; want nothing", k, r)
		}
	}
	b := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	if len(b.snapshot()) != 1 {
		t.Fatalf("after a failed import and a restart: %+v; want only u.held", b.snapshot())
	}
	n, err := b.importAll(recs, store.HistImported, "test")
	if err != nil || n != 2 {
		t.Fatalf("import = %d, %v", n, err)
	}
	if v, _ := b.find("u.y"); !v.OutsidePool || v.Port != 6000 {
		t.Fatalf("u.y = %+v; want it kept on 6000, outside the pool", v)
	}
}
