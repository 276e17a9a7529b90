package main

// One contract suite for every implementation of the store seam
// (portStore): what the allocator may rely on, whatever keeps the
// records. Each store runs it from its own Test function.

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store/bolt"
	"frp-port-keeper/internal/store/file"

	"frp-port-keeper/internal/store"
)

// contractTimeout bounds every store call of the suite.
const contractTimeout = 10 * time.Second

// testStoreContract runs the contract against one kind of store.
// newBackend makes fresh, empty backing data for one case; open opens a
// handle on it (again after a close: a restart). shared says two handles
// may be open at once (stores that several servers share), which the watch
// cases need. The suite closes every handle it opens.
func testStoreContract(t *testing.T, kind string, compact func(testing.TB, store.Store), newBackend func(t *testing.T) (open func(t *testing.T) store.Store, shared bool)) {
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
			tt.run(t, &contractHarness{t: t, kind: kind, open: open, compact: compact})
		})
	}
}

// contractHarness opens handles and makes store calls that must succeed.
type contractHarness struct {
	t    *testing.T
	kind string
	open func(t *testing.T) store.Store
	// compact, when set, cuts the store's history (etcd's compaction).
	compact func(testing.TB, store.Store)

	mu     sync.Mutex
	closed map[store.Store]bool
}

// openStore opens a handle, closed at the end of the case unless closed
// before.
func (h *contractHarness) openStore() store.Store {
	h.t.Helper()
	s := h.open(h.t)
	h.t.Cleanup(func() { h.close(s) })
	return s
}

func (h *contractHarness) close(s store.Store) {
	h.t.Helper()
	h.mu.Lock()
	if h.closed == nil {
		h.closed = map[store.Store]bool{}
	}
	done := h.closed[s]
	h.closed[s] = true
	h.mu.Unlock()
	if !done {
		if err := s.Close(); err != nil {
			h.t.Errorf("close: %v", err)
		}
	}
}

// reopen closes s (a restart) and returns a new handle and what it loads.
func (h *contractHarness) reopen(s store.Store) (store.Store, store.Snapshot) {
	h.t.Helper()
	h.close(s)
	s = h.openStore()
	return s, h.load(s)
}

func (h *contractHarness) load(s store.Store) store.Snapshot {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	snap, err := s.Load(ctx)
	if err != nil {
		h.t.Fatalf("load: %v", err)
	}
	return snap
}

func (h *contractHarness) claim(s store.Store, c store.Claim) ([]store.Change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.Claim(ctx, c)
}

// claimOK claims and wants success.
func (h *contractHarness) claimOK(s store.Store, c store.Claim) []store.Change {
	h.t.Helper()
	changes, err := h.claim(s, c)
	if err != nil {
		h.t.Fatalf("claim %s@%d: %v", c.Want.Key, c.Want.Port, err)
	}
	return changes
}

// claimConflict claims and wants a *conflictError.
func (h *contractHarness) claimConflict(s store.Store, c store.Claim) *store.ConflictError {
	h.t.Helper()
	_, err := h.claim(s, c)
	var cerr *store.ConflictError
	if !errors.As(err, &cerr) {
		h.t.Fatalf("claim %s@%d = %v; want a *conflictError", c.Want.Key, c.Want.Port, err)
	}
	return cerr
}

func (h *contractHarness) release(s store.Store, r store.Record, at time.Time) ([]store.Change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.Release(ctx, r, at)
}

func (h *contractHarness) touch(s store.Store, marks ...store.SeenMark) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	if err := s.Touch(ctx, marks); err != nil {
		h.t.Fatalf("touch: %v", err)
	}
}

// contractBase is the time records are stamped from: UTC with nanoseconds,
// so a store that loses either shows.
var contractBase = time.Date(2026, 11, 25, 16, 14, 5, 123456789, time.UTC)

// contractRec is an allocation of key on port for user.
func contractRec(key string, port int, user string) store.Record {
	at := contractBase.Add(time.Duration(port) * time.Second)
	return store.Record{Key: key, Port: port, User: user, ProxyName: key, ProxyType: "tcp", CreatedAt: at, AssignedAt: at}
}

// contractMoved is r on another port, assigned later.
func contractMoved(r store.Record, port int) store.Record {
	r.Port = port
	r.AssignedAt = r.AssignedAt.Add(time.Hour)
	return r
}

// wantAllocations fails unless snap holds exactly recs.
func wantAllocations(t *testing.T, what string, snap store.Snapshot, recs ...store.Record) {
	t.Helper()
	got := map[string]store.Record{}
	for _, r := range snap.Allocations {
		if _, dup := got[r.Key]; dup {
			t.Fatalf("%s: key %q loaded twice", what, r.Key)
		}
		got[r.Key] = r
	}
	ports := map[int]string{}
	for _, r := range snap.Allocations {
		if other, dup := ports[r.Port]; dup {
			t.Fatalf("%s: port %d loaded for %q and %q", what, r.Port, other, r.Key)
		}
		ports[r.Port] = r.Key
	}
	for _, want := range recs {
		if g, ok := got[want.Key]; !ok || !store.SameRecord(g, want) {
			t.Fatalf("%s: allocations = %+v; want %+v among them", what, snap.Allocations, want)
		}
	}
	if len(snap.Allocations) != len(recs) {
		t.Fatalf("%s: %d allocations %+v; want %d", what, len(snap.Allocations), snap.Allocations, len(recs))
	}
}

// wantChanges fails unless changes are, in order, puts of puts' records
// and deletes of the keys in deletes, as listed by want.
func wantChanges(t *testing.T, what string, got []store.Change, want ...store.Change) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: changes = %+v; want %+v", what, got, want)
	}
	for i := range want {
		g, w := got[i], want[i]
		ok := g.Kind == w.Kind && g.Key == w.Key
		switch w.Kind {
		case store.ChangePut:
			ok = ok && store.SameRecord(g.Rec, w.Rec)
		case store.ChangeDelete:
			ok = ok && (w.At.IsZero() || g.At.Equal(w.At))
		}
		if !ok {
			t.Fatalf("%s: change %d = %+v; want %+v", what, i, g, w)
		}
	}
	var last int64
	for _, c := range got {
		if c.Rev != 0 && c.Rev < last {
			t.Fatalf("%s: revisions go back: %+v", what, got)
		}
		last = max(last, c.Rev)
	}
}

// wantCurrent fails unless cerr.current holds a put of each record in
// puts and a delete of each key in deletes.
func wantCurrent(t *testing.T, what string, cerr *store.ConflictError, puts []store.Record, deletes []string) {
	t.Helper()
	for _, want := range puts {
		if !slices.ContainsFunc(cerr.Current, func(c store.Change) bool { return c.Kind == store.ChangePut && store.SameRecord(c.Rec, want) }) {
			t.Fatalf("%s: conflict current = %+v; want a put of %+v", what, cerr.Current, want)
		}
	}
	for _, key := range deletes {
		if !slices.ContainsFunc(cerr.Current, func(c store.Change) bool { return c.Kind == store.ChangeDelete && c.Key == key }) {
			t.Fatalf("%s: conflict current = %+v; want a delete of %q", what, cerr.Current, key)
		}
	}
	for _, c := range cerr.Current {
		if c.Kind == store.ChangePut && !store.ValidRecord(c.Rec) {
			t.Fatalf("%s: conflict current holds an invalid put %+v", what, c)
		}
	}
}

func contractPut(r store.Record) store.Change {
	return store.Change{Kind: store.ChangePut, Key: r.Key, Rec: r}
}
func contractDel(key string, at time.Time) store.Change {
	return store.Change{Kind: store.ChangeDelete, Key: key, At: at}
}

// ---------------------------------------------------------------------------
// The cases.

func contractEmptyLoad(t *testing.T, h *contractHarness) {
	s := h.openStore()
	snap := h.load(s)
	wantAllocations(t, "empty store", snap)
	if len(snap.Freed) != 0 || len(snap.LastSeen) != 0 {
		t.Fatalf("empty store: freed %v, lastSeen %v; want none", snap.Freed, snap.LastSeen)
	}
}

func contractClaimNew(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	wantChanges(t, "claim", h.claimOK(s, store.Claim{Want: a}), contractPut(a))
	_, snap := h.reopen(s)
	wantAllocations(t, "after reopen", snap, a)
}

func contractHeldPort(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, store.Claim{Want: a})
	b := contractRec("bob.web", 20001, "bob")
	cerr := h.claimConflict(s, store.Claim{Want: b})
	wantCurrent(t, "bob on alice's port", cerr, []store.Record{a}, nil)
	if cerr.Quota {
		t.Fatalf("bob on alice's port: quota = true; want false")
	}
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused claim", snap, a)
}

func contractExistingKey(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, store.Claim{Want: a})
	again := contractRec("alice.web", 20002, "alice")
	cerr := h.claimConflict(s, store.Claim{Want: again})
	wantCurrent(t, "alice claimed as new again", cerr, []store.Record{a}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused claim", snap, a)
}

func contractMove(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	at := contractBase.Add(48 * time.Hour)
	wantChanges(t, "move", h.claimOK(s, store.Claim{Want: a2, Old: &a, At: at}), contractPut(a2))
	s, snap := h.reopen(s)
	wantAllocations(t, "after the move", snap, a2)
	if got, ok := snap.Freed[a.Port]; !ok || !got.Equal(at) {
		t.Fatalf("after the move: freed[%d] = %v, %v; want %v", a.Port, got, ok, at)
	}
	// The new port is held: nobody else gets it, and the old one is free.
	cerr := h.claimConflict(s, store.Claim{Want: contractRec("bob.web", a2.Port, "bob")})
	wantCurrent(t, "bob on alice's new port", cerr, []store.Record{a2}, nil)
	h.claimOK(s, store.Claim{Want: contractRec("bob.web", a.Port, "bob")})
}

func contractStaleMove(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	h.claimOK(s, store.Claim{Want: a2, Old: &a, At: contractBase})
	a3 := contractMoved(a, 20003)
	cerr := h.claimConflict(s, store.Claim{Want: a3, Old: &a, At: contractBase})
	wantCurrent(t, "move from a stale record", cerr, []store.Record{a2}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused move", snap, a2)
}

func contractReclaim(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	v := contractRec("old.dev", 20001, "old")
	h.claimOK(s, store.Claim{Want: v})
	h.touch(s, store.SeenMark{Key: v.Key, Seen: contractBase, Online: false})
	w := contractRec("new.dev", 20001, "new")
	at := contractBase.Add(time.Hour)
	changes := h.claimOK(s, store.Claim{Want: w, Victim: &v, At: at})
	if !slices.ContainsFunc(changes, func(c store.Change) bool { return c.Kind == store.ChangeDelete && c.Key == v.Key }) ||
		!slices.ContainsFunc(changes, func(c store.Change) bool { return c.Kind == store.ChangePut && store.SameRecord(c.Rec, w) }) || len(changes) != 2 {
		t.Fatalf("reclaim: changes = %+v; want a delete of %q and a put of %+v", changes, v.Key, w)
	}
	_, snap := h.reopen(s)
	wantAllocations(t, "after the reclaim", snap, w)
	if _, ok := snap.LastSeen[v.Key]; ok {
		t.Fatalf("after the reclaim: lastSeen[%q] still there", v.Key)
	}
	if _, ok := snap.Freed[w.Port]; ok {
		t.Fatalf("after the reclaim: port %d listed as freed while %q holds it", w.Port, w.Key)
	}
}

func contractStaleVictim(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	v := contractRec("old.dev", 20001, "old")
	h.claimOK(s, store.Claim{Want: v})
	if _, err := h.release(s, v, contractBase); err != nil {
		t.Fatal(err)
	}
	w := contractRec("new.dev", 20001, "new")
	cerr := h.claimConflict(s, store.Claim{Want: w, Victim: &v, At: contractBase})
	wantCurrent(t, "reclaim of a released victim", cerr, nil, []string{v.Key})
	s, snap := h.reopen(s)
	wantAllocations(t, "after the refused reclaim", snap)
	// The port is simply free now.
	h.claimOK(s, store.Claim{Want: w})
}

func contractRelease(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	b := contractRec("bob.web", 20002, "bob")
	h.claimOK(s, store.Claim{Want: a})
	h.claimOK(s, store.Claim{Want: b})
	h.touch(s, store.SeenMark{Key: a.Key, Seen: contractBase, Online: true})
	at := contractBase.Add(72 * time.Hour)
	changes, err := h.release(s, a, at)
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	wantChanges(t, "release", changes, contractDel(a.Key, at))
	_, snap := h.reopen(s)
	wantAllocations(t, "after the release", snap, b)
	if got, ok := snap.Freed[a.Port]; !ok || !got.Equal(at) {
		t.Fatalf("after the release: freed[%d] = %v, %v; want %v", a.Port, got, ok, at)
	}
	if _, ok := snap.LastSeen[a.Key]; ok {
		t.Fatalf("after the release: lastSeen[%q] still there", a.Key)
	}
}

func contractStaleRelease(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	h.claimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	h.claimOK(s, store.Claim{Want: a2, Old: &a, At: contractBase})
	_, err := h.release(s, a, contractBase)
	var cerr *store.ConflictError
	if !errors.As(err, &cerr) {
		t.Fatalf("release of a stale record = %v; want a *conflictError", err)
	}
	wantCurrent(t, "release of a stale record", cerr, []store.Record{a2}, nil)
	_, snap := h.reopen(s)
	wantAllocations(t, "after the refused release", snap, a2)
}

func contractTouch(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	a := contractRec("alice.web", 20001, "alice")
	b := contractRec("bob.web", 20002, "bob")
	h.claimOK(s, store.Claim{Want: a})
	h.claimOK(s, store.Claim{Want: b})
	seenA, seenB := contractBase.Add(time.Minute), contractBase.Add(2*time.Minute)
	h.touch(s,
		store.SeenMark{Key: a.Key, Seen: seenA, Online: true},
		store.SeenMark{Key: b.Key, Seen: seenB, Online: false},
		store.SeenMark{Key: "ghost.web", Seen: seenB, Online: true})
	_, snap := h.reopen(s)
	if got := snap.LastSeen[a.Key]; !got.Equal(seenA) || !snap.Online[a.Key] {
		t.Fatalf("after touch: %q last seen %v online %v; want %v true", a.Key, got, snap.Online[a.Key], seenA)
	}
	if got := snap.LastSeen[b.Key]; !got.Equal(seenB) || snap.Online[b.Key] {
		t.Fatalf("after touch: %q last seen %v online %v; want %v false", b.Key, got, snap.Online[b.Key], seenB)
	}
	if _, ok := snap.LastSeen["ghost.web"]; ok {
		t.Fatalf("after touch: a key without a record got a last-seen time")
	}
}

func contractMaxKeys(t *testing.T, h *contractHarness) {
	s := h.openStore()
	h.load(s)
	const limit = 2
	a1, a2 := contractRec("alice.one", 20001, "alice"), contractRec("alice.two", 20002, "alice")
	h.claimOK(s, store.Claim{Want: a1, MaxKeys: limit})
	h.claimOK(s, store.Claim{Want: a2, MaxKeys: limit})
	a3 := contractRec("alice.three", 20003, "alice")
	cerr := h.claimConflict(s, store.Claim{Want: a3, MaxKeys: limit})
	if !cerr.Quota {
		t.Fatalf("third key of alice with maxKeys %d: conflict %+v; want quota", limit, cerr)
	}
	// Others are not counted against alice, moves are not new keys, and
	// no limit means none.
	h.claimOK(s, store.Claim{Want: contractRec("bob.one", 20004, "bob"), MaxKeys: limit})
	a1m := contractMoved(a1, 20005)
	h.claimOK(s, store.Claim{Want: a1m, Old: &a1, MaxKeys: limit, At: contractBase})
	s, snap := h.reopen(s)
	wantAllocations(t, "after the refused third key", snap, a1m, a2, contractRec("bob.one", 20004, "bob"))
	if _, err := h.release(s, a2, contractBase); err != nil {
		t.Fatal(err)
	}
	h.claimOK(s, store.Claim{Want: a3, MaxKeys: limit})
	cerr = h.claimConflict(s, store.Claim{Want: contractRec("alice.four", 20006, "alice"), MaxKeys: limit})
	if !cerr.Quota {
		t.Fatalf("alice over her limit after a release and a claim: %+v; want quota", cerr)
	}
	h.claimOK(s, store.Claim{Want: contractRec("alice.four", 20006, "alice")})
}

// watchCollector gathers what a watch delivers.
type watchCollector struct {
	ch   chan store.Change
	done chan error
}

func (h *contractHarness) startWatch(s store.Store, rev int64) *watchCollector {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchCollector{ch: make(chan store.Change, 1000), done: make(chan error, 1)}
	go func() { w.done <- s.Watch(ctx, rev, func(c store.Change) { w.ch <- c }) }()
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
func (w *watchCollector) next(t *testing.T, what string) store.Change {
	t.Helper()
	select {
	case c := <-w.ch:
		return c
	case err := <-w.done:
		t.Fatalf("%s: watch returned %v", what, err)
	case <-time.After(contractTimeout):
		t.Fatalf("%s: no change delivered within %v", what, contractTimeout)
	}
	return store.Change{}
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
	w := h.startWatch(b, h.load(b).Rev)

	x := contractRec("alice.web", 20001, "alice")
	x2 := contractMoved(x, 20002)
	seen, at := contractBase.Add(time.Minute), contractBase.Add(time.Hour)
	h.claimOK(a, store.Claim{Want: x})
	h.claimOK(a, store.Claim{Want: x2, Old: &x, At: contractBase})
	h.touch(a, store.SeenMark{Key: x.Key, Seen: seen, Online: true})
	if _, err := h.release(a, x2, at); err != nil {
		t.Fatal(err)
	}

	// A reclaim: the victim's delete comes before the put that takes its
	// port, so memory never holds two keys on one port.
	v := contractRec("old.dev", 20003, "old")
	nw := contractRec("new.dev", 20003, "new")
	h.claimOK(a, store.Claim{Want: v})
	h.claimOK(a, store.Claim{Want: nw, Victim: &v, At: at})

	var got []store.Change
	for range 7 {
		got = append(got, w.next(t, "watch of the other handle"))
	}
	wantChanges(t, "watch of the other handle", got,
		contractPut(x), contractPut(x2), store.Change{Kind: store.ChangeSeen, Key: x.Key}, contractDel(x.Key, at),
		contractPut(v), contractDel(v.Key, time.Time{}), contractPut(nw))
	if c := got[2]; !c.Seen.Equal(seen) || !c.Online {
		t.Fatalf("watch: seen change %+v; want last seen %v, online", c, seen)
	}
	for i := 1; i < 5; i++ {
		if got[i].Rev <= got[i-1].Rev {
			t.Fatalf("watch: revisions not increasing: %+v", got)
		}
	}
	w.quiet(t, "watch after the last change", 300*time.Millisecond)
}

func contractWatchReset(t *testing.T, h *contractHarness) {
	a, b := h.openStore(), h.openStore()
	if h.compact == nil {
		t.Skipf("%s store has no history to compact", h.kind)
	}
	h.load(a)
	behind := h.load(b).Rev
	k1, k2 := contractRec("k.one", 20001, "u"), contractRec("k.two", 20002, "u")
	h.claimOK(a, store.Claim{Want: k1})
	h.claimOK(a, store.Claim{Want: k2})
	h.compact(t, a)

	w := h.startWatch(b, behind)
	c := w.next(t, "watch behind a compaction")
	if c.Kind != store.ChangeReset || c.Reset == nil {
		t.Fatalf("watch behind a compaction: first change %+v; want a changeReset", c)
	}
	wantAllocations(t, "reset snapshot", *c.Reset, k1, k2)
	if c.Rev != c.Reset.Rev {
		t.Fatalf("reset: change rev %d, snapshot rev %d; want equal", c.Rev, c.Reset.Rev)
	}
	k3 := contractRec("k.three", 20003, "u")
	h.claimOK(a, store.Claim{Want: k3})
	next := w.next(t, "watch after the reset")
	wantChanges(t, "watch after the reset", []store.Change{next}, contractPut(k3))
	if next.Rev <= c.Reset.Rev {
		t.Fatalf("watch after the reset: rev %d; want after the snapshot's %d", next.Rev, c.Reset.Rev)
	}
}

// The contract on the stores this process alone writes.
func TestStoreContractFile(t *testing.T) {
	testStoreContract(t, "file", nil, func(t *testing.T) (func(t *testing.T) store.Store, bool) {
		dir := t.TempDir()
		return func(t *testing.T) store.Store {
			s, err := file.Open(dir, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, false
	})
}

func TestStoreContractBbolt(t *testing.T) {
	testStoreContract(t, "bbolt", nil, func(t *testing.T) (func(t *testing.T) store.Store, bool) {
		dir := t.TempDir()
		return func(t *testing.T) store.Store {
			s, err := bolt.Open(dir, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, false
	})
}

// The fake store the allocator tests use keeps the contract too.
func TestStoreContractFake(t *testing.T) {
	testStoreContract(t, "fake", nil, func(t *testing.T) (func(t *testing.T) store.Store, bool) {
		f := newFakeStore()
		return func(t *testing.T) store.Store { return f }, false
	})
}
