package main

// One contract suite for every implementation of the store seam
// (portStore): what the allocator may rely on, whatever keeps the
// records. Each store runs it from its own Test function.

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// contractTimeout bounds every store call of the suite.
const contractTimeout = 10 * time.Second

// testStoreContract runs the contract against one kind of store.
// newBackend makes fresh, empty backing data for one case; open opens a
// handle on it (again after a close: a restart). shared says two handles
// may be open at once (stores that several servers share), which the watch
// cases need. The suite closes every handle it opens.
func testStoreContract(t *testing.T, kind string, newBackend func(t *testing.T) (open func(t *testing.T) portStore, shared bool)) {
	tests := []struct {
		name   string
		shared bool // needs two handles open at once
		run    func(t *testing.T, h *contractHarness)
	}{
		{"empty load", false, contractEmptyLoad},
		{"claim new then reload", false, contractClaimNew},
		{"held port is a conflict", false, contractHeldPort},
		{"existing key claimed as new is a conflict", false, contractExistingKey},
		{"move frees the old port", false, contractMove},
		{"move with a stale old record is a conflict", false, contractStaleMove},
		{"reclaim retires the victim", false, contractReclaim},
		{"reclaim of a victim already gone is a conflict", false, contractStaleVictim},
		{"release", false, contractRelease},
		{"release of a stale record is a conflict", false, contractStaleRelease},
		{"touch", false, contractTouch},
		{"maxKeys is exact", false, contractMaxKeys},
		{"watch sees another handle's changes in order", true, contractWatch},
		{"watch behind a compaction resets", true, contractWatchReset},
	}
	_, sharedKind := newBackend(t)
	for _, tt := range tests {
		if tt.shared && !sharedKind {
			continue // not this store's contract: one handle at a time
		}
		t.Run(tt.name, func(t *testing.T) {
			open, _ := newBackend(t)
			tt.run(t, &contractHarness{t: t, kind: kind, open: open})
		})
	}
}

// contractHarness opens handles and makes store calls that must succeed.
type contractHarness struct {
	t    *testing.T
	kind string
	open func(t *testing.T) portStore

	mu     sync.Mutex
	closed map[portStore]bool
}

// openStore opens a handle, closed at the end of the case unless closed
// before.
func (h *contractHarness) openStore() portStore {
	h.t.Helper()
	s := h.open(h.t)
	h.t.Cleanup(func() { h.close(s) })
	return s
}

func (h *contractHarness) close(s portStore) {
	h.t.Helper()
	h.mu.Lock()
	if h.closed == nil {
		h.closed = map[portStore]bool{}
	}
	done := h.closed[s]
	h.closed[s] = true
	h.mu.Unlock()
	if !done {
		if err := s.close(); err != nil {
			h.t.Errorf("close: %v", err)
		}
	}
}

// reopen closes s (a restart) and returns a new handle and what it loads.
func (h *contractHarness) reopen(s portStore) (portStore, snapshot) {
	h.t.Helper()
	h.close(s)
	s = h.openStore()
	return s, h.load(s)
}

func (h *contractHarness) load(s portStore) snapshot {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	snap, err := s.load(ctx)
	if err != nil {
		h.t.Fatalf("load: %v", err)
	}
	return snap
}

func (h *contractHarness) claim(s portStore, c claim) ([]change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.claim(ctx, c)
}

// claimOK claims and wants success.
func (h *contractHarness) claimOK(s portStore, c claim) []change {
	h.t.Helper()
	changes, err := h.claim(s, c)
	if err != nil {
		h.t.Fatalf("claim %s@%d: %v", c.want.Key, c.want.Port, err)
	}
	return changes
}

// claimConflict claims and wants a *conflictError.
func (h *contractHarness) claimConflict(s portStore, c claim) *conflictError {
	h.t.Helper()
	_, err := h.claim(s, c)
	var cerr *conflictError
	if !errors.As(err, &cerr) {
		h.t.Fatalf("claim %s@%d = %v; want a *conflictError", c.want.Key, c.want.Port, err)
	}
	return cerr
}

func (h *contractHarness) release(s portStore, r record, at time.Time) ([]change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.release(ctx, r, at)
}

func (h *contractHarness) touch(s portStore, marks ...seenMark) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	if err := s.touch(ctx, marks); err != nil {
		h.t.Fatalf("touch: %v", err)
	}
}

// contractBase is the time records are stamped from: UTC with nanoseconds,
// so a store that loses either shows.
var contractBase = time.Date(2026, 11, 25, 16, 14, 5, 123456789, time.UTC)

// contractRec is an allocation of key on port for user.
func contractRec(key string, port int, user string) record {
	at := contractBase.Add(time.Duration(port) * time.Second)
	return record{Key: key, Port: port, User: user, ProxyName: key, ProxyType: "tcp", CreatedAt: at, AssignedAt: at}
}

// contractMoved is r on another port, assigned later.
func contractMoved(r record, port int) record {
	r.Port = port
	r.AssignedAt = r.AssignedAt.Add(time.Hour)
	return r
}

// wantAllocations fails unless snap holds exactly recs.
func wantAllocations(t *testing.T, what string, snap snapshot, recs ...record) {
	t.Helper()
	got := map[string]record{}
	for _, r := range snap.allocations {
		if _, dup := got[r.Key]; dup {
			t.Fatalf("%s: key %q loaded twice", what, r.Key)
		}
		got[r.Key] = r
	}
	ports := map[int]string{}
	for _, r := range snap.allocations {
		if other, dup := ports[r.Port]; dup {
			t.Fatalf("%s: port %d loaded for %q and %q", what, r.Port, other, r.Key)
		}
		ports[r.Port] = r.Key
	}
	for _, want := range recs {
		if g, ok := got[want.Key]; !ok || !sameRecord(g, want) {
			t.Fatalf("%s: allocations = %+v; want %+v among them", what, snap.allocations, want)
		}
	}
	if len(snap.allocations) != len(recs) {
		t.Fatalf("%s: %d allocations %+v; want %d", what, len(snap.allocations), snap.allocations, len(recs))
	}
}

// wantChanges fails unless changes are, in order, puts of puts' records
// and deletes of the keys in deletes, as listed by want.
func wantChanges(t *testing.T, what string, got []change, want ...change) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: changes = %+v; want %+v", what, got, want)
	}
	for i := range want {
		g, w := got[i], want[i]
		ok := g.kind == w.kind && g.key == w.key
		switch w.kind {
		case changePut:
			ok = ok && sameRecord(g.rec, w.rec)
		case changeDelete:
			ok = ok && (w.at.IsZero() || g.at.Equal(w.at))
		}
		if !ok {
			t.Fatalf("%s: change %d = %+v; want %+v", what, i, g, w)
		}
	}
	var last int64
	for _, c := range got {
		if c.rev != 0 && c.rev < last {
			t.Fatalf("%s: revisions go back: %+v", what, got)
		}
		last = max(last, c.rev)
	}
}

// wantCurrent fails unless cerr.current holds a put of each record in
// puts and a delete of each key in deletes.
func wantCurrent(t *testing.T, what string, cerr *conflictError, puts []record, deletes []string) {
	t.Helper()
	for _, want := range puts {
		if !slices.ContainsFunc(cerr.current, func(c change) bool { return c.kind == changePut && sameRecord(c.rec, want) }) {
			t.Fatalf("%s: conflict current = %+v; want a put of %+v", what, cerr.current, want)
		}
	}
	for _, key := range deletes {
		if !slices.ContainsFunc(cerr.current, func(c change) bool { return c.kind == changeDelete && c.key == key }) {
			t.Fatalf("%s: conflict current = %+v; want a delete of %q", what, cerr.current, key)
		}
	}
	for _, c := range cerr.current {
		if c.kind == changePut && !validRecord(c.rec) {
			t.Fatalf("%s: conflict current holds an invalid put %+v", what, c)
		}
	}
}

func contractPut(r record) change { return change{kind: changePut, key: r.Key, rec: r} }
func contractDel(key string, at time.Time) change {
	return change{kind: changeDelete, key: key, at: at}
}

// ---------------------------------------------------------------------------
// The cases.

func contractEmptyLoad(t *testing.T, h *contractHarness) {
	s := h.openStore()
	snap := h.load(s)
	wantAllocations(t, "empty store", snap)
	if len(snap.freed) != 0 || len(snap.lastSeen) != 0 {
		t.Fatalf("empty store: freed %v, lastSeen %v; want none", snap.freed, snap.lastSeen)
	}
}

func contractClaimNew(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	wantChanges(t, "claim", h.claimOK(s, claim{want: a}), contractPut(a))
	_, snap := h.reopen(s)
	wantAllocations(t, "after reopen", snap, a)
}

func contractHeldPort(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, claim{want: a})
	b := contractRec("bob.web", 20001, "bob")
	cerr := h.claimConflict(s, claim{want: b})
	wantCurrent(t, "bob on alice's port", cerr, []record{a}, nil)
	if cerr.quota {
		t.Fatalf("bob on alice's port: quota = true; want false")
	}
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused claim", snap, a)
}

func contractExistingKey(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, claim{want: a})
	again := contractRec("alice.web", 20002, "alice")
	cerr := h.claimConflict(s, claim{want: again})
	wantCurrent(t, "alice claimed as new again", cerr, []record{a}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused claim", snap, a)
}

func contractMove(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, claim{want: a})
	a2 := contractMoved(a, 20002)
	at := contractBase.Add(48 * time.Hour)
	wantChanges(t, "move", h.claimOK(s, claim{want: a2, old: &a, at: at}), contractPut(a2))
	s, snap := h.reopen(s)
	wantAllocations(t, "after the move", snap, a2)
	if got, ok := snap.freed[a.Port]; !ok || !got.Equal(at) {
		t.Fatalf("after the move: freed[%d] = %v, %v; want %v", a.Port, got, ok, at)
	}
	// The new port is held: nobody else gets it, and the old one is free.
	cerr := h.claimConflict(s, claim{want: contractRec("bob.web", a2.Port, "bob")})
	wantCurrent(t, "bob on alice's new port", cerr, []record{a2}, nil)
	h.claimOK(s, claim{want: contractRec("bob.web", a.Port, "bob")})
}

func contractStaleMove(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, claim{want: a})
	a2 := contractMoved(a, 20002)
	h.claimOK(s, claim{want: a2, old: &a, at: contractBase})
	a3 := contractMoved(a, 20003)
	cerr := h.claimConflict(s, claim{want: a3, old: &a, at: contractBase})
	wantCurrent(t, "move from a stale record", cerr, []record{a2}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused move", snap, a2)
}

func contractReclaim(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	v := contractRec("old.dev", 20001, "old")
	h.claimOK(s, claim{want: v})
	h.touch(s, seenMark{key: v.Key, seen: contractBase, online: false})
	w := contractRec("new.dev", 20001, "new")
	at := contractBase.Add(time.Hour)
	changes := h.claimOK(s, claim{want: w, victim: &v, at: at})
	if !slices.ContainsFunc(changes, func(c change) bool { return c.kind == changeDelete && c.key == v.Key }) ||
		!slices.ContainsFunc(changes, func(c change) bool { return c.kind == changePut && sameRecord(c.rec, w) }) || len(changes) != 2 {
		t.Fatalf("reclaim: changes = %+v; want a delete of %q and a put of %+v", changes, v.Key, w)
	}
	_, snap := h.reopen(s)
	wantAllocations(t, "after the reclaim", snap, w)
	if _, ok := snap.lastSeen[v.Key]; ok {
		t.Fatalf("after the reclaim: lastSeen[%q] still there", v.Key)
	}
	if _, ok := snap.freed[w.Port]; ok {
		t.Fatalf("after the reclaim: port %d listed as freed while %q holds it", w.Port, w.Key)
	}
}

func contractStaleVictim(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	v := contractRec("old.dev", 20001, "old")
	h.claimOK(s, claim{want: v})
	if _, err := h.release(s, v, contractBase); err != nil {
		t.Fatal(err)
	}
	w := contractRec("new.dev", 20001, "new")
	cerr := h.claimConflict(s, claim{want: w, victim: &v, at: contractBase})
	wantCurrent(t, "reclaim of a released victim", cerr, nil, []string{v.Key})
	s, snap := h.reopen(s)
	wantAllocations(t, "after the refused reclaim", snap)
	// The port is simply free now.
	h.claimOK(s, claim{want: w})
}

func contractRelease(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	b := contractRec("bob.web", 20002, "bob")
	h.claimOK(s, claim{want: a})
	h.claimOK(s, claim{want: b})
	h.touch(s, seenMark{key: a.Key, seen: contractBase, online: true})
	at := contractBase.Add(72 * time.Hour)
	changes, err := h.release(s, a, at)
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	wantChanges(t, "release", changes, contractDel(a.Key, at))
	_, snap := h.reopen(s)
	wantAllocations(t, "after the release", snap, b)
	if got, ok := snap.freed[a.Port]; !ok || !got.Equal(at) {
		t.Fatalf("after the release: freed[%d] = %v, %v; want %v", a.Port, got, ok, at)
	}
	if _, ok := snap.lastSeen[a.Key]; ok {
		t.Fatalf("after the release: lastSeen[%q] still there", a.Key)
	}
}

func contractStaleRelease(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, claim{want: a})
	a2 := contractMoved(a, 20002)
	h.claimOK(s, claim{want: a2, old: &a, at: contractBase})
	_, err := h.release(s, a, contractBase)
	var cerr *conflictError
	if !errors.As(err, &cerr) {
		t.Fatalf("release of a stale record = %v; want a *conflictError", err)
	}
	wantCurrent(t, "release of a stale record", cerr, []record{a2}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused release", snap, a2)
}

func contractTouch(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	b := contractRec("bob.web", 20002, "bob")
	h.claimOK(s, claim{want: a})
	h.claimOK(s, claim{want: b})
	seenA, seenB := contractBase.Add(time.Minute), contractBase.Add(2*time.Minute)
	h.touch(s,
		seenMark{key: a.Key, seen: seenA, online: true},
		seenMark{key: b.Key, seen: seenB, online: false},
		seenMark{key: "ghost.web", seen: seenB, online: true})
	_, snap := h.reopen(s)
	if got := snap.lastSeen[a.Key]; !got.Equal(seenA) || !snap.online[a.Key] {
		t.Fatalf("after touch: %q last seen %v online %v; want %v true", a.Key, got, snap.online[a.Key], seenA)
	}
	if got := snap.lastSeen[b.Key]; !got.Equal(seenB) || snap.online[b.Key] {
		t.Fatalf("after touch: %q last seen %v online %v; want %v false", b.Key, got, snap.online[b.Key], seenB)
	}
	if _, ok := snap.lastSeen["ghost.web"]; ok {
		t.Fatalf("after touch: a key without a record got a last-seen time")
	}
}

func contractMaxKeys(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	const limit = 2
	a1, a2 := contractRec("alice.one", 20001, "alice"), contractRec("alice.two", 20002, "alice")
	h.claimOK(s, claim{want: a1, maxKeys: limit})
	h.claimOK(s, claim{want: a2, maxKeys: limit})
	a3 := contractRec("alice.three", 20003, "alice")
	cerr := h.claimConflict(s, claim{want: a3, maxKeys: limit})
	if !cerr.quota {
		t.Fatalf("third key of alice with maxKeys %d: conflict %+v; want quota", limit, cerr)
	}
	// Others are not counted against alice, moves are not new keys, and
	// no limit means none.
	h.claimOK(s, claim{want: contractRec("bob.one", 20004, "bob"), maxKeys: limit})
	a1m := contractMoved(a1, 20005)
	h.claimOK(s, claim{want: a1m, old: &a1, maxKeys: limit, at: contractBase})
	s, snap := h.reopen(s)
	wantAllocations(t, "after the refused third key", snap, a1m, a2, contractRec("bob.one", 20004, "bob"))
	if _, err := h.release(s, a2, contractBase); err != nil {
		t.Fatal(err)
	}
	h.claimOK(s, claim{want: a3, maxKeys: limit})
	cerr = h.claimConflict(s, claim{want: contractRec("alice.four", 20006, "alice"), maxKeys: limit})
	if !cerr.quota {
		t.Fatalf("alice over her limit after a release and a claim: %+v; want quota", cerr)
	}
	h.claimOK(s, claim{want: contractRec("alice.four", 20006, "alice")})
}

// watchCollector gathers what a watch delivers.
type watchCollector struct {
	ch   chan change
	done chan error
}

func (h *contractHarness) startWatch(s portStore, rev int64) *watchCollector {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchCollector{ch: make(chan change, 1000), done: make(chan error, 1)}
	go func() { w.done <- s.watch(ctx, rev, func(c change) { w.ch <- c }) }()
	h.t.Cleanup(func() {
		cancel()
		select {
		case <-w.done:
		case <-time.After(contractTimeout):
			h.t.Errorf("watch did not return within %v of its ctx ending", contractTimeout)
		}
	})
	return w
}

// next is the next change the watch delivers.
func (w *watchCollector) next(t *testing.T, what string) change {
	t.Helper()
	select {
	case c := <-w.ch:
		return c
	case err := <-w.done:
		t.Fatalf("%s: watch returned %v", what, err)
	case <-time.After(contractTimeout):
		t.Fatalf("%s: no change delivered within %v", what, contractTimeout)
	}
	return change{}
}

// quiet fails if the watch delivers anything within d.
func (w *watchCollector) quiet(t *testing.T, what string, d time.Duration) {
	t.Helper()
	select {
	case c := <-w.ch:
		t.Fatalf("%s: unexpected change %+v", what, c)
	case <-time.After(d):
	}
}

func contractWatch(t *testing.T, h *contractHarness) {
	a, b := h.openStore(), h.openStore()
	h.load(a)
	w := h.startWatch(b, h.load(b).rev)

	x := contractRec("alice.web", 20001, "alice")
	x2 := contractMoved(x, 20002)
	seen, at := contractBase.Add(time.Minute), contractBase.Add(time.Hour)
	h.claimOK(a, claim{want: x})
	h.claimOK(a, claim{want: x2, old: &x, at: contractBase})
	h.touch(a, seenMark{key: x.Key, seen: seen, online: true})
	if _, err := h.release(a, x2, at); err != nil {
		t.Fatal(err)
	}

	// A reclaim: the victim's delete comes before the put that takes its
	// port, so memory never holds two keys on one port.
	v := contractRec("old.dev", 20003, "old")
	nw := contractRec("new.dev", 20003, "new")
	h.claimOK(a, claim{want: v})
	h.claimOK(a, claim{want: nw, victim: &v, at: at})

	var got []change
	for range 7 {
		got = append(got, w.next(t, "watch of the other handle"))
	}
	wantChanges(t, "watch of the other handle", got,
		contractPut(x), contractPut(x2), change{kind: changeSeen, key: x.Key}, contractDel(x.Key, at),
		contractPut(v), contractDel(v.Key, time.Time{}), contractPut(nw))
	if c := got[2]; !c.seen.Equal(seen) || !c.online {
		t.Fatalf("watch: seen change %+v; want last seen %v, online", c, seen)
	}
	for i := 1; i < 5; i++ {
		if got[i].rev <= got[i-1].rev {
			t.Fatalf("watch: revisions not increasing: %+v", got)
		}
	}
	w.quiet(t, "watch after the last change", 300*time.Millisecond)
}

// compacter is a store whose history can be cut for a test (etcd's
// compaction).
type compacter interface{ compactForTest(t testing.TB) }

func contractWatchReset(t *testing.T, h *contractHarness) {
	a, b := h.openStore(), h.openStore()
	cut, ok := a.(compacter)
	if !ok {
		t.Skipf("%s store has no history to compact", h.kind)
	}
	h.load(a)
	behind := h.load(b).rev
	k1, k2 := contractRec("k.one", 20001, "u"), contractRec("k.two", 20002, "u")
	h.claimOK(a, claim{want: k1})
	h.claimOK(a, claim{want: k2})
	cut.compactForTest(t)

	w := h.startWatch(b, behind)
	c := w.next(t, "watch behind a compaction")
	if c.kind != changeReset || c.reset == nil {
		t.Fatalf("watch behind a compaction: first change %+v; want a changeReset", c)
	}
	wantAllocations(t, "reset snapshot", *c.reset, k1, k2)
	if c.rev != c.reset.rev {
		t.Fatalf("reset: change rev %d, snapshot rev %d; want equal", c.rev, c.reset.rev)
	}
	k3 := contractRec("k.three", 20003, "u")
	h.claimOK(a, claim{want: k3})
	next := w.next(t, "watch after the reset")
	wantChanges(t, "watch after the reset", []change{next}, contractPut(k3))
	if next.rev <= c.reset.rev {
		t.Fatalf("watch after the reset: rev %d; want after the snapshot's %d", next.rev, c.reset.rev)
	}
}

// The contract on the stores this process alone writes.
func TestStoreContractFile(t *testing.T) {
	testStoreContract(t, "file", func(t *testing.T) (func(t *testing.T) portStore, bool) {
		dir := t.TempDir()
		return func(t *testing.T) portStore {
			s, err := openFileStore(dir, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, false
	})
}

func TestStoreContractBbolt(t *testing.T) {
	testStoreContract(t, "bbolt", func(t *testing.T) (func(t *testing.T) portStore, bool) {
		path := filepath.Join(t.TempDir(), "allocations.bbolt")
		return func(t *testing.T) portStore {
			s, err := openBoltStore(path, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, false
	})
}

// The fake store the allocator tests use keeps the contract too.
func TestStoreContractFake(t *testing.T) {
	testStoreContract(t, "fake", func(t *testing.T) (func(t *testing.T) portStore, bool) {
		f := newFakeStore()
		return func(t *testing.T) portStore { return f }, false
	})
}
