package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/file"

	"frp-port-keeper/internal/store/local"
)

// testStart is when tests on a fake clock begin.
var testStart = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// httptestDo runs one request against h and returns the body.
func httptestDo(t *testing.T, h http.Handler, method, path, body string) string {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req.RemoteAddr = "127.0.0.1:5555"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Body.String()
}

// httptestStatus runs one request against h and returns the status.
func httptestStatus(t *testing.T, h http.Handler, method, path string) int {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	req.RemoteAddr = "127.0.0.1:5555"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code
}

// recordingOps logs every write a file store makes, in order.
type recordingOps struct {
	file.Ops
	mu  sync.Mutex
	ops []string
	// hold, when set, blocks the first directory fsync until closed.
	hold    chan struct{}
	holding bool
}

func (r *recordingOps) note(op, name string) {
	r.mu.Lock()
	r.ops = append(r.ops, op+" "+name)
	r.mu.Unlock()
}

func (r *recordingOps) WriteFile(name string, data []byte) error {
	r.note("write", name)
	return r.Ops.WriteFile(name, data)
}
func (r *recordingOps) CreateFile(name string, data []byte) error {
	r.note("create", name)
	return r.Ops.CreateFile(name, data)
}
func (r *recordingOps) Rename(from, to string) error {
	r.note("rename", to)
	return r.Ops.Rename(from, to)
}
func (r *recordingOps) Remove(name string) error {
	r.note("remove", name)
	return r.Ops.Remove(name)
}
func (r *recordingOps) SyncFile(name string) error {
	r.note("sync", name)
	return r.Ops.SyncFile(name)
}
func (r *recordingOps) SyncDir(name string) error {
	r.mu.Lock()
	hold := r.hold
	first := hold != nil && !r.holding
	r.holding = r.holding || first
	r.mu.Unlock()
	if first {
		<-hold
	}
	r.note("syncdir", name)
	return r.Ops.SyncDir(name)
}

func (r *recordingOps) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.ops
	r.ops = nil
	return out
}

func (r *recordingOps) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, op := range r.ops {
		if strings.HasPrefix(op, prefix) {
			n++
		}
	}
	return n
}

func newRecordingStore(t *testing.T, dir string) (*file.Store, *recordingOps) {
	t.Helper()
	s := newTestStore(t, dir)
	r := &recordingOps{}
	s.WrapOps(func(inner file.Ops) file.Ops { r.Ops = inner; return r })
	return s, r
}

// inOrder fails unless each of steps is found in ops, in that order.
func inOrder(t *testing.T, what string, ops []string, steps ...string) {
	t.Helper()
	at := 0
	for _, step := range steps {
		i := slices.Index(ops[at:], step)
		if i < 0 {
			t.Fatalf("%s: %q not found after step %d in %q", what, step, at, ops)
		}
		at += i + 1
	}
}

// TestDurableCommitOrder: every acknowledged change is on stable storage
// before it is answered, in the order the crash-state table relies on: the
// key record's data synced, then renamed into place, then the directory
// synced (a new key: its records written, then they and the directory
// synced; a release: the key record deleted, then the directory synced).
func TestDurableCommitOrder(t *testing.T) {
	dir := t.TempDir()
	st, rec := newRecordingStore(t, dir)
	a := newAllocatorOn(t, st, "30000-30001", allocatorOptions{})
	key := file.RecordFile(local.KeyName("u.a"))

	if p, _ := mustAllocate(t, a, req("u", "u.a", "tcp")); p != 30000 {
		t.Fatalf("u.a = %d; want 30000", p)
	}
	// A new key's key record is created under its own name, and both
	// records and the directory are synced once both are written.
	ops := rec.take()
	port := file.RecordFile(local.PortName(store.TCPPort(30000)))
	for _, sync := range []string{"sync " + port, "sync " + key, "syncdir ."} {
		inOrder(t, "new key", ops, "write "+port, "create "+key, sync)
	}
	if slices.ContainsFunc(ops, func(op string) bool {
		return strings.HasPrefix(op, "rename ") || strings.Contains(op, ".tmp") && !strings.Contains(op, ".write-test")
	}) {
		t.Fatalf("new key: %q; want no temporary file and no rename", ops)
	}

	if _, err := a.assign("u.a", 30001, "", operatorChange{}); err != nil {
		t.Fatal(err)
	}
	inOrder(t, "move", rec.take(), "write "+file.RecordFile(local.PortName(store.TCPPort(30001))), "write "+key+".tmp", "sync "+key+".tmp",
		"rename "+key, "syncdir .", "remove "+file.RecordFile(local.PortName(store.TCPPort(30000))))

	if err := a.release("u.a", "test"); err != nil {
		t.Fatal(err)
	}
	inOrder(t, "release", rec.take(), "remove "+key, "syncdir .", "remove "+file.RecordFile(local.PortName(store.TCPPort(30001))))
}

// TestReclaimSyncsPortRecord: a reclaim's port record names the new owner
// on stable storage before the key record commits, so if the old owner's
// key record is still there after a power cut, the port record decides
// for the acknowledged owner.
func TestReclaimSyncsPortRecord(t *testing.T) {
	dir := t.TempDir()
	now, advance := fakeClock(testStart)
	pol := mustPolicy(t, "", "30000-30000", 0, time.Hour)
	st, rec := newRecordingStore(t, dir)
	a := newAllocatorOn(t, st, "30000-30000", allocatorOptions{policy: pol, now: now})
	mustAllocate(t, a, req("u", "u.old", "tcp"))
	advance(2 * pol.reclaimAfter)
	rec.take()
	if p, _ := mustAllocate(t, a, req("v", "v.new", "tcp")); p != 30000 {
		t.Fatalf("v.new = %d; want the reclaimed 30000", p)
	}
	port := file.RecordFile(local.PortName(store.TCPPort(30000)))
	inOrder(t, "reclaim", rec.take(), "write "+port, "sync "+port, "rename "+file.RecordFile(local.KeyName("v.new")),
		"remove "+file.RecordFile(local.KeyName("u.old")), "syncdir .")
}

// TestGroupCommit: writes that arrive while a batch waits for the disk are
// committed together in the next one, sharing one directory fsync.
func TestGroupCommit(t *testing.T) {
	dir := t.TempDir()
	st, rec := newRecordingStore(t, dir)
	a := newAllocatorOn(t, st, "30000-30099", allocatorOptions{})
	rec.take()
	rec.mu.Lock()
	rec.hold = make(chan struct{})
	rec.mu.Unlock()
	const writers = 16
	var wg sync.WaitGroup
	ports := make(chan int, writers)
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, _, err := a.allocate(req("u", fmt.Sprintf("u.k%d", i), "tcp"))
			if err != nil {
				t.Error(err)
			}
			ports <- p
		}()
	}
	// One writer leads a batch and waits on the held fsync; the others
	// queue behind it.
	waitFor(t, "15 writes to queue behind the first batch", 10*time.Second, func() bool {
		return st.Waiting() == writers-1
	})
	close(rec.hold)
	wg.Wait()
	close(ports)
	seen := map[int]bool{}
	for p := range ports {
		if seen[p] {
			t.Fatalf("port %d answered twice", p)
		}
		seen[p] = true
	}
	if n := rec.count("syncdir"); n != 2 {
		t.Fatalf("%d writers made %d directory fsyncs; want 2 (the first batch, then all the rest)", writers, n)
	}
	if n := rec.count("sync "); n != 2*writers {
		t.Fatalf("%d records synced; want %d (a key and a port record each)", n, 2*writers)
	}
	crashStore(st)
	b := newTestAllocator(t, dir, "30000-30099", allocatorOptions{})
	if len(b.snapshot()) != writers {
		t.Fatalf("after a crash %d allocations; want %d", len(b.snapshot()), writers)
	}
}

// TestFailedSyncKeepsOldState: an fsync that fails refuses the write and
// leaves the key as it was, in memory and at the next start.
func TestFailedSyncKeepsOldState(t *testing.T) {
	for _, op := range []string{"sync", "syncdir"} {
		t.Run(op, func(t *testing.T) {
			dir := t.TempDir()
			st, faults := newFaultyStore(t, dir)
			a := newAllocatorOn(t, st, "30000-30010", allocatorOptions{})
			mustAllocate(t, a, req("u", "u.a", "tcp"))
			faults.failWhen(syscall.EIO, func(o, _ string) bool { return o == op })
			if _, err := a.assign("u.a", 30005, "", operatorChange{}); err == nil {
				t.Fatal("a move whose fsync failed was acknowledged")
			}
			if _, _, err := a.allocate(req("u", "u.new", "tcp")); err == nil {
				t.Fatal("a new key whose fsync failed was acknowledged")
			}
			if op == "syncdir" { // a release syncs no file, only the directory
				if err := a.release("u.a", "test"); err == nil {
					t.Fatal("a release whose fsync failed was acknowledged")
				}
			}
			faults.set(nil, nil)
			if r, _, ok := a.lookup("u.a"); !ok || r.Port != 30000 {
				t.Fatalf("u.a in memory = %+v (%v); want 30000", r, ok)
			}
			crashStore(st)
			b := newTestAllocator(t, dir, "30000-30010", allocatorOptions{})
			got := b.snapshot()
			if len(got) != 1 || got[0].Key != "u.a" || got[0].Port != 30000 {
				t.Fatalf("after a crash: %+v; want only u.a on 30000", got)
			}
		})
	}
}

// TestDamagedPortHeldBack: a port record a crash left damaged, with no key
// record naming its port, holds the port back from fresh allocation and
// from a device's request until an operator releases it, across restarts
// (checkpoint included); list shows it as held by an unknown key.
func TestDamagedPortHeldBack(t *testing.T) {
	dir := seedStore(t, map[string]int{"u.a": 30000})
	if err := os.WriteFile(storeFile(dir, local.PortName(store.TCPPort(30001))), nil, 0o600); err != nil { // a new key's record, torn by a power cut
		t.Fatal(err)
	}
	st := newTestStore(t, dir)
	set, _ := parsePorts("30000-30003")
	a, got, err := newAllocator(st, set, allocatorOptions{log: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if got.Damaged != 1 || got.HeldBack[store.TCPPort(30001)] == "" {
		t.Fatalf("load: damaged %d, held back %v; want 1 and port 30001", got.Damaged, got.HeldBack)
	}
	if p, _ := mustAllocate(t, a, req("v", "v.b", "tcp")); p != 30002 {
		t.Fatalf("a new key got %d; want 30002, past the held-back 30001", p)
	}
	asks := req("w", "w.c", "tcp")
	asks.RemotePort = 30001
	if _, _, err := a.allocate(asks); err == nil || !strings.Contains(rejectReason(err), "held back") {
		t.Fatalf("a device asking for the held-back port: %v (%q); want a reject saying it is held back", err, rejectReason(err))
	}
	h := newServer(a, testLogger(t), serverOptions{unpaced: true})
	list := func() allocationList {
		t.Helper()
		rr := httptestDo(t, h, "GET", "/api/allocations", "")
		var l allocationList
		if err := json.Unmarshal([]byte(rr), &l); err != nil {
			t.Fatalf("list: %v: %s", err, rr)
		}
		return l
	}
	l := list()
	if len(l.Allocations) != 3 || l.Allocations[1].Port != 30001 || l.Allocations[1].Key != "" || l.Allocations[1].HeldBack == "" {
		t.Fatalf("list: %+v; want 30001 as a held-back row of no key", l.Allocations)
	}
	if l.Pool.TCP.Free != 1 {
		t.Fatalf("pool %+v; want 1 free (the held-back port counts as used)", l.Pool)
	}

	// A clean stop and start (the checkpoint) keeps it held back.
	st.Close()
	a = newTestAllocator(t, dir, "30000-30003", allocatorOptions{})
	if p, _ := mustAllocate(t, a, req("x", "x.d", "tcp")); p != 30003 {
		t.Fatalf("after a restart a new key got %d; want 30003", p)
	}
	h = newServer(a, testLogger(t), serverOptions{unpaced: true})
	if code := httptestStatus(t, h, "DELETE", "/api/ports/30002"); code != http.StatusNoContent {
		t.Fatalf("DELETE /api/ports/30002 (v.b's) = %d; want 204", code)
	}
	if _, _, ok := a.lookup("v.b"); ok {
		t.Fatal("DELETE /api/ports/30002 did not release v.b")
	}
	if code := httptestStatus(t, h, "DELETE", "/api/ports/30001"); code != http.StatusNoContent {
		t.Fatalf("DELETE /api/ports/30001 = %d; want 204", code)
	}
	if code := httptestStatus(t, h, "DELETE", "/api/ports/30001"); code != http.StatusNotFound {
		t.Fatalf("second DELETE /api/ports/30001 = %d; want 404", code)
	}
	if _, err := os.Stat(storeFile(dir, local.PortName(store.TCPPort(30001)))); !os.IsNotExist(err) {
		t.Fatalf("the damaged record is still there after its release (%v)", err)
	}
	crashStore(a.store.(*file.Store))
	b := newTestAllocator(t, dir, "30000-30003", allocatorOptions{})
	asks.User, asks.ProxyName = "y", "y.e"
	if p, how, err := b.allocate(asks); err != nil || p != 30001 {
		t.Fatalf("after the release, asking for 30001: %d %s %v; want it", p, how, err)
	}
}

// TestDamagedFreedRecordReusedLast: a freed-port record left empty by a
// power cut loses how long the port was free, not its place in line: it
// counts as freed at the start, so ports free for longer go first.
func TestDamagedFreedRecordReusedLast(t *testing.T) {
	dir := seedStore(t, map[string]int{"u.a": 30002})
	newFileKV(t, dir).Set(local.FreedName(store.TCPPort(30000)), local.FreedRecord{Port: 30000, FreedAt: testStart})
	if err := os.WriteFile(storeFile(dir, local.FreedName(store.TCPPort(30001))), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	a := newTestAllocator(t, dir, "30000-30002", allocatorOptions{})
	if p, _ := mustAllocate(t, a, req("v", "v.b", "tcp")); p != 30000 {
		t.Fatalf("first new key = %d; want 30000, free the longest", p)
	}
	if p, _ := mustAllocate(t, a, req("v", "v.c", "tcp")); p != 30001 {
		t.Fatalf("second new key = %d; want 30001", p)
	}
}
