// Package storetest is the contract suite every store.Store runs (Run),
// and Fake, a store in memory written from that contract, for the tests
// of the allocation rules.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
)

// contractTimeout bounds every store call of the suite.
const contractTimeout = 10 * time.Second

// Backend is one kind of store under test.
type Backend struct {
	Kind string
	// New makes fresh, empty backing data for one case and returns how to
	// open a handle on it (again after a close: a restart).
	New func(t *testing.T) (open func(t *testing.T) store.Store)
	// Shared says two handles may be open at once (stores that several
	// servers share), which the watch cases need.
	Shared bool
	// Compact, when set, cuts the store's history of changes (etcd's
	// compaction), so that a watch behind it must start over.
	Compact func(t testing.TB, s store.Store)
}

// Run runs the contract against one kind of store. The suite closes every
// handle it opens.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name   string
		shared bool // needs two handles open at once
		run    func(t *testing.T, h *Harness)
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
		{"tcp and udp claims of one number both win", false, contractSpacesApart},
		{"release frees its own space only", false, contractReleaseOneSpace},
		{"move to the other space frees the old slot", false, contractMoveAcrossSpaces},
		{"reclaim of a victim in the other space is refused", false, contractVictimOtherSpace},
		{"maxKeys is exact", false, contractMaxKeys},
		{"concurrent claims of one port: one wins", false, contractConcurrentOnePort},
		{"concurrent claims of one number in both spaces: one wins in each", false, contractConcurrentBothSpaces},
		{"concurrent claims of many ports: all win", false, contractConcurrentManyPorts},
		{"outcome unknown: the answer agrees with what loads", false, contractOutcomeUnknown},
		{"history, when kept", false, contractHistory},
		{"watch returns ctx's error when ctx ends", false, contractWatchEnds},
		{"watch sees another handle's changes in order", true, contractWatch},
		{"watch behind a compaction resets", true, contractWatchReset},
	}
	for _, tt := range tests {
		if tt.shared && !b.Shared {
			continue // not this store's contract: one handle at a time
		}
		t.Run(tt.name, func(t *testing.T) {
			open := b.New(t)
			tt.run(t, &Harness{t: t, kind: b.Kind, open: open, compact: b.Compact})
		})
	}
}

// NewHarness is a Harness for tests of one store beyond the contract.
func NewHarness(t *testing.T, kind string) *Harness { return &Harness{t: t, kind: kind} }

// Harness opens handles and makes store calls that must succeed.
type Harness struct {
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
func (h *Harness) openStore() store.Store {
	h.t.Helper()
	s := h.open(h.t)
	h.t.Cleanup(func() { h.close(s) })
	return s
}

func (h *Harness) close(s store.Store) {
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
func (h *Harness) reopen(s store.Store) (store.Store, store.Snapshot) {
	h.t.Helper()
	h.close(s)
	s = h.openStore()
	return s, h.Load(s)
}

func (h *Harness) Load(s store.Store) store.Snapshot {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	snap, err := s.Load(ctx)
	if err != nil {
		h.t.Fatalf("load: %v", err)
	}
	return snap
}

func (h *Harness) Claim(s store.Store, c store.Claim) ([]store.Change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.Claim(ctx, c)
}

// ClaimOK claims and wants success.
func (h *Harness) ClaimOK(s store.Store, c store.Claim) []store.Change {
	h.t.Helper()
	changes, err := h.Claim(s, c)
	if err != nil {
		h.t.Fatalf("claim %s@%s: %v", c.Want.Key, c.Want.Slot(), err)
	}
	return changes
}

// claimConflict claims and wants a *conflictError.
func (h *Harness) claimConflict(s store.Store, c store.Claim) *store.ConflictError {
	h.t.Helper()
	_, err := h.Claim(s, c)
	var cerr *store.ConflictError
	if !errors.As(err, &cerr) {
		h.t.Fatalf("claim %s@%s = %v; want a *conflictError", c.Want.Key, c.Want.Slot(), err)
	}
	return cerr
}

func (h *Harness) Release(s store.Store, r store.Record, at time.Time) ([]store.Change, error) {
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	return s.Release(ctx, r, at)
}

func (h *Harness) Touch(s store.Store, marks ...store.SeenMark) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	if err := s.Touch(ctx, marks); err != nil {
		h.t.Fatalf("touch: %v", err)
	}
}

// Base is the time records are stamped from: UTC with nanoseconds,
// so a store that loses either shows.
var Base = time.Date(2026, 11, 25, 16, 14, 5, 123456789, time.UTC)

// Rec is an allocation of key on port for user, a tcp proxy.
func Rec(key string, port int, user string) store.Record {
	at := Base.Add(time.Duration(port) * time.Second)
	return store.Record{Key: key, Port: port, User: user, ProxyName: key, ProxyType: "tcp", CreatedAt: at, AssignedAt: at}
}

// UDPRec is Rec for a udp proxy: its port is in the udp space.
func UDPRec(key string, port int, user string) store.Record {
	r := Rec(key, port, user)
	r.ProxyType = "udp"
	return r
}

// contractInSpace is r moved to space, keeping its port.
func contractInSpace(r store.Record, space store.Space) store.Record {
	r.ProxyType = string(space)
	r.AssignedAt = r.AssignedAt.Add(time.Hour)
	return r
}

// contractMoved is r on another port, assigned later.
func contractMoved(r store.Record, port int) store.Record {
	r.Port = port
	r.AssignedAt = r.AssignedAt.Add(time.Hour)
	return r
}

// WantAllocations fails unless snap holds exactly recs.
func WantAllocations(t *testing.T, what string, snap store.Snapshot, recs ...store.Record) {
	t.Helper()
	got := map[string]store.Record{}
	for _, r := range snap.Allocations {
		if _, dup := got[r.Key]; dup {
			t.Fatalf("%s: key %q loaded twice", what, r.Key)
		}
		got[r.Key] = r
	}
	slots := map[store.Slot]string{}
	for _, r := range snap.Allocations {
		if other, dup := slots[r.Slot()]; dup {
			t.Fatalf("%s: %s loaded for %q and %q", what, r.Slot(), other, r.Key)
		}
		slots[r.Slot()] = r.Key
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

func contractEmptyLoad(t *testing.T, h *Harness) {
	s := h.openStore()
	snap := h.Load(s)
	WantAllocations(t, "empty store", snap)
	if len(snap.Freed) != 0 || len(snap.LastSeen) != 0 {
		t.Fatalf("empty store: freed %v, lastSeen %v; want none", snap.Freed, snap.LastSeen)
	}
}

func contractClaimNew(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	wantChanges(t, "claim", h.ClaimOK(s, store.Claim{Want: a}), contractPut(a))
	_, snap := h.reopen(s)
	WantAllocations(t, "after reopen", snap, a)
}

func contractHeldPort(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	h.ClaimOK(s, store.Claim{Want: a})
	b := Rec("bob.web", 20001, "bob")
	cerr := h.claimConflict(s, store.Claim{Want: b})
	wantCurrent(t, "bob on alice's port", cerr, []store.Record{a}, nil)
	if cerr.Quota {
		t.Fatalf("bob on alice's port: quota = true; want false")
	}
	_, snap := h.reopen(s)
	WantAllocations(t, "after the refused claim", snap, a)
}

func contractExistingKey(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	h.ClaimOK(s, store.Claim{Want: a})
	again := Rec("alice.web", 20002, "alice")
	cerr := h.claimConflict(s, store.Claim{Want: again})
	wantCurrent(t, "alice claimed as new again", cerr, []store.Record{a}, nil)
	_, snap := h.reopen(s)
	WantAllocations(t, "after the refused claim", snap, a)
}

func contractMove(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	h.ClaimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	at := Base.Add(48 * time.Hour)
	wantChanges(t, "move", h.ClaimOK(s, store.Claim{Want: a2, Old: &a, At: at}), contractPut(a2))
	s, snap := h.reopen(s)
	WantAllocations(t, "after the move", snap, a2)
	if got, ok := snap.Freed[a.Slot()]; !ok || !got.Equal(at) {
		t.Fatalf("after the move: freed[%s] = %v, %v; want %v", a.Slot(), got, ok, at)
	}
	// The new port is held: nobody else gets it, and the old one is free.
	cerr := h.claimConflict(s, store.Claim{Want: Rec("bob.web", a2.Port, "bob")})
	wantCurrent(t, "bob on alice's new port", cerr, []store.Record{a2}, nil)
	h.ClaimOK(s, store.Claim{Want: Rec("bob.web", a.Port, "bob")})
}

func contractStaleMove(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	h.ClaimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	h.ClaimOK(s, store.Claim{Want: a2, Old: &a, At: Base})
	a3 := contractMoved(a, 20003)
	cerr := h.claimConflict(s, store.Claim{Want: a3, Old: &a, At: Base})
	wantCurrent(t, "move from a stale record", cerr, []store.Record{a2}, nil)
	_, snap := h.reopen(s)
	WantAllocations(t, "after the refused move", snap, a2)
}

func contractReclaim(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	v := Rec("old.dev", 20001, "old")
	h.ClaimOK(s, store.Claim{Want: v})
	h.Touch(s, store.SeenMark{Key: v.Key, Seen: Base, Online: false})
	w := Rec("new.dev", 20001, "new")
	at := Base.Add(time.Hour)
	changes := h.ClaimOK(s, store.Claim{Want: w, Victim: &v, At: at})
	if !slices.ContainsFunc(changes, func(c store.Change) bool { return c.Kind == store.ChangeDelete && c.Key == v.Key }) ||
		!slices.ContainsFunc(changes, func(c store.Change) bool { return c.Kind == store.ChangePut && store.SameRecord(c.Rec, w) }) || len(changes) != 2 {
		t.Fatalf("reclaim: changes = %+v; want a delete of %q and a put of %+v", changes, v.Key, w)
	}
	_, snap := h.reopen(s)
	WantAllocations(t, "after the reclaim", snap, w)
	if _, ok := snap.LastSeen[v.Key]; ok {
		t.Fatalf("after the reclaim: lastSeen[%q] still there", v.Key)
	}
	if _, ok := snap.Freed[w.Slot()]; ok {
		t.Fatalf("after the reclaim: %s listed as freed while %q holds it", w.Slot(), w.Key)
	}
}

func contractStaleVictim(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	v := Rec("old.dev", 20001, "old")
	h.ClaimOK(s, store.Claim{Want: v})
	if _, err := h.Release(s, v, Base); err != nil {
		t.Fatal(err)
	}
	w := Rec("new.dev", 20001, "new")
	cerr := h.claimConflict(s, store.Claim{Want: w, Victim: &v, At: Base})
	wantCurrent(t, "reclaim of a released victim", cerr, nil, []string{v.Key})
	s, snap := h.reopen(s)
	WantAllocations(t, "after the refused reclaim", snap)
	// The port is simply free now.
	h.ClaimOK(s, store.Claim{Want: w})
}

func contractRelease(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	b := Rec("bob.web", 20002, "bob")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})
	h.Touch(s, store.SeenMark{Key: a.Key, Seen: Base, Online: true})
	at := Base.Add(72 * time.Hour)
	changes, err := h.Release(s, a, at)
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	wantChanges(t, "release", changes, contractDel(a.Key, at))
	_, snap := h.reopen(s)
	WantAllocations(t, "after the release", snap, b)
	if got, ok := snap.Freed[a.Slot()]; !ok || !got.Equal(at) {
		t.Fatalf("after the release: freed[%s] = %v, %v; want %v", a.Slot(), got, ok, at)
	}
	if _, ok := snap.LastSeen[a.Key]; ok {
		t.Fatalf("after the release: lastSeen[%q] still there", a.Key)
	}
}

func contractStaleRelease(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	h.ClaimOK(s, store.Claim{Want: a})
	a2 := contractMoved(a, 20002)
	h.ClaimOK(s, store.Claim{Want: a2, Old: &a, At: Base})
	_, err := h.Release(s, a, Base)
	var cerr *store.ConflictError
	if !errors.As(err, &cerr) {
		t.Fatalf("release of a stale record = %v; want a *conflictError", err)
	}
	wantCurrent(t, "release of a stale record", cerr, []store.Record{a2}, nil)
	_, snap := h.reopen(s)
	WantAllocations(t, "after the refused release", snap, a2)
}

func contractTouch(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	b := Rec("bob.web", 20002, "bob")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})
	seenA, seenB := Base.Add(time.Minute), Base.Add(2*time.Minute)
	h.Touch(s,
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

func contractMaxKeys(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	const limit = 2
	a1, a2 := Rec("alice.one", 20001, "alice"), Rec("alice.two", 20002, "alice")
	h.ClaimOK(s, store.Claim{Want: a1, MaxKeys: limit})
	h.ClaimOK(s, store.Claim{Want: a2, MaxKeys: limit})
	a3 := Rec("alice.three", 20003, "alice")
	cerr := h.claimConflict(s, store.Claim{Want: a3, MaxKeys: limit})
	if !cerr.Quota {
		t.Fatalf("third key of alice with maxKeys %d: conflict %+v; want quota", limit, cerr)
	}
	// Others are not counted against alice, moves are not new keys, and
	// no limit means none.
	h.ClaimOK(s, store.Claim{Want: Rec("bob.one", 20004, "bob"), MaxKeys: limit})
	a1m := contractMoved(a1, 20005)
	h.ClaimOK(s, store.Claim{Want: a1m, Old: &a1, MaxKeys: limit, At: Base})
	s, snap := h.reopen(s)
	WantAllocations(t, "after the refused third key", snap, a1m, a2, Rec("bob.one", 20004, "bob"))
	if _, err := h.Release(s, a2, Base); err != nil {
		t.Fatal(err)
	}
	h.ClaimOK(s, store.Claim{Want: a3, MaxKeys: limit})
	cerr = h.claimConflict(s, store.Claim{Want: Rec("alice.four", 20006, "alice"), MaxKeys: limit})
	if !cerr.Quota {
		t.Fatalf("alice over her limit after a release and a claim: %+v; want quota", cerr)
	}
	h.ClaimOK(s, store.Claim{Want: Rec("alice.four", 20006, "alice")})
}

// contractSpacesApart: a tcp and a udp record hold one number at once, as
// frps lets a tcp and a udp proxy listen on it; each slot is still held
// against a third key.
func contractSpacesApart(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	b := UDPRec("bob.dns", 20001, "bob")
	wantChanges(t, "tcp claim", h.ClaimOK(s, store.Claim{Want: a}), contractPut(a))
	wantChanges(t, "udp claim of the same number", h.ClaimOK(s, store.Claim{Want: b}), contractPut(b))
	s, snap := h.reopen(s)
	WantAllocations(t, "after reopen", snap, a, b)
	cerr := h.claimConflict(s, store.Claim{Want: UDPRec("carol.dns", 20001, "carol")})
	wantCurrent(t, "carol on bob's udp slot", cerr, []store.Record{b}, nil)
	cerr = h.claimConflict(s, store.Claim{Want: Rec("carol.web", 20001, "carol")})
	wantCurrent(t, "carol on alice's tcp slot", cerr, []store.Record{a}, nil)
	_, snap = h.reopen(s)
	WantAllocations(t, "after the refused claims", snap, a, b)
}

// contractReleaseOneSpace: releasing the udp record of a number frees its
// udp slot; the tcp record of that number stays, and so does its slot.
func contractReleaseOneSpace(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	b := UDPRec("bob.dns", 20001, "bob")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})
	at := Base.Add(72 * time.Hour)
	changes, err := h.Release(s, b, at)
	if err != nil {
		t.Fatalf("release of the udp record: %v", err)
	}
	wantChanges(t, "release of the udp record", changes, contractDel(b.Key, at))
	s, snap := h.reopen(s)
	WantAllocations(t, "after the release", snap, a)
	if got, ok := snap.Freed[b.Slot()]; !ok || !got.Equal(at) {
		t.Fatalf("after the release: freed[%s] = %v, %v; want %v", b.Slot(), got, ok, at)
	}
	if got, ok := snap.Freed[a.Slot()]; ok {
		t.Fatalf("after the release: %s listed as freed (%v) while %q holds it", a.Slot(), got, a.Key)
	}
	cerr := h.claimConflict(s, store.Claim{Want: Rec("carol.web", 20001, "carol")})
	wantCurrent(t, "carol on alice's tcp slot", cerr, []store.Record{a}, nil)
	c := UDPRec("carol.dns", 20001, "carol")
	h.ClaimOK(s, store.Claim{Want: c})
	_, snap = h.reopen(s)
	WantAllocations(t, "after carol took the udp slot", snap, a, c)
}

// contractMoveAcrossSpaces: a key whose proxy turns from tcp to udp moves
// to a udp slot, on its number or another, and its tcp slot is free.
func contractMoveAcrossSpaces(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("alice.web", 20001, "alice")
	b := Rec("bob.web", 20003, "bob")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})
	at := Base.Add(48 * time.Hour)
	a2 := contractInSpace(a, store.UDP)
	b2 := contractMoved(contractInSpace(b, store.UDP), 20004)
	wantChanges(t, "move to udp on the same number", h.ClaimOK(s, store.Claim{Want: a2, Old: &a, At: at}), contractPut(a2))
	wantChanges(t, "move to udp on another number", h.ClaimOK(s, store.Claim{Want: b2, Old: &b, At: at}), contractPut(b2))
	s, snap := h.reopen(s)
	WantAllocations(t, "after the moves", snap, a2, b2)
	for _, old := range []store.Record{a, b} {
		if got, ok := snap.Freed[old.Slot()]; !ok || !got.Equal(at) {
			t.Fatalf("after the moves: freed[%s] = %v, %v; want %v", old.Slot(), got, ok, at)
		}
	}
	if got, ok := snap.Freed[a2.Slot()]; ok {
		t.Fatalf("after the moves: %s listed as freed (%v) while %q holds it", a2.Slot(), got, a2.Key)
	}
	c, d := Rec("carol.web", 20001, "carol"), Rec("dave.web", 20003, "dave")
	h.ClaimOK(s, store.Claim{Want: c})
	h.ClaimOK(s, store.Claim{Want: d})
	cerr := h.claimConflict(s, store.Claim{Want: UDPRec("erin.dns", 20001, "erin")})
	wantCurrent(t, "erin on alice's new udp slot", cerr, []store.Record{a2}, nil)
	_, snap = h.reopen(s)
	WantAllocations(t, "after the tcp slots were taken again", snap, a2, b2, c, d)
}

// contractVictimOtherSpace: a reclaim takes the victim's slot, so a victim
// on the number's other space is no victim at all: the claim is refused
// and writes nothing.
func contractVictimOtherSpace(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	v := Rec("old.dev", 20001, "old")
	h.ClaimOK(s, store.Claim{Want: v})
	w := UDPRec("new.dev", 20001, "new")
	if _, err := h.Claim(s, store.Claim{Want: w, Victim: &v, At: Base}); err == nil {
		t.Fatalf("a claim of %s reclaiming %s won; want it refused", w.Slot(), v.Slot())
	}
	s, snap := h.reopen(s)
	WantAllocations(t, "after the refused reclaim", snap, v)
	if got, ok := snap.Freed[v.Slot()]; ok {
		t.Fatalf("after the refused reclaim: %s listed as freed (%v)", v.Slot(), got)
	}
	// Without a victim the udp slot is simply free.
	h.ClaimOK(s, store.Claim{Want: w})
	_, snap = h.reopen(s)
	WantAllocations(t, "after the plain claim", snap, v, w)
}

// Watcher gathers what a watch delivers.
type Watcher struct {
	ch   chan store.Change
	done chan error
}

func (h *Harness) StartWatch(s store.Store, rev int64) *Watcher {
	ctx, cancel := context.WithCancel(context.Background())
	w := &Watcher{ch: make(chan store.Change, 1000), done: make(chan error, 1)}
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

// Next is the Next change the watch delivers.
func (w *Watcher) Next(t *testing.T, what string) store.Change {
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

// Quiet fails if the watch delivers anything within d.
func (w *Watcher) Quiet(t *testing.T, what string, d time.Duration) {
	t.Helper()
	select {
	case c := <-w.ch:
		t.Fatalf("%s: unexpected change %+v", what, c)
	case <-time.After(d):
	}
}

func contractWatch(t *testing.T, h *Harness) {
	a, b := h.openStore(), h.openStore()
	h.Load(a)
	w := h.StartWatch(b, h.Load(b).Rev)

	x := Rec("alice.web", 20001, "alice")
	x2 := contractMoved(x, 20002)
	seen, at := Base.Add(time.Minute), Base.Add(time.Hour)
	h.ClaimOK(a, store.Claim{Want: x})
	h.ClaimOK(a, store.Claim{Want: x2, Old: &x, At: Base})
	h.Touch(a, store.SeenMark{Key: x.Key, Seen: seen, Online: true})
	if _, err := h.Release(a, x2, at); err != nil {
		t.Fatal(err)
	}

	// A reclaim: the victim's delete comes before the put that takes its
	// port, so memory never holds two keys on one port.
	v := Rec("old.dev", 20003, "old")
	nw := Rec("new.dev", 20003, "new")
	h.ClaimOK(a, store.Claim{Want: v})
	h.ClaimOK(a, store.Claim{Want: nw, Victim: &v, At: at})

	var got []store.Change
	for range 7 {
		got = append(got, w.Next(t, "watch of the other handle"))
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
	w.Quiet(t, "watch after the last change", 300*time.Millisecond)
}

func contractWatchReset(t *testing.T, h *Harness) {
	a, b := h.openStore(), h.openStore()
	if h.compact == nil {
		t.Skipf("%s store has no history to compact", h.kind)
	}
	h.Load(a)
	behind := h.Load(b).Rev
	k1, k2 := Rec("k.one", 20001, "u"), Rec("k.two", 20002, "u")
	h.ClaimOK(a, store.Claim{Want: k1})
	h.ClaimOK(a, store.Claim{Want: k2})
	h.compact(t, a)

	w := h.StartWatch(b, behind)
	c := w.Next(t, "watch behind a compaction")
	if c.Kind != store.ChangeReset || c.Reset == nil {
		t.Fatalf("watch behind a compaction: first change %+v; want a changeReset", c)
	}
	WantAllocations(t, "reset snapshot", *c.Reset, k1, k2)
	if c.Rev != c.Reset.Rev {
		t.Fatalf("reset: change rev %d, snapshot rev %d; want equal", c.Rev, c.Reset.Rev)
	}
	k3 := Rec("k.three", 20003, "u")
	h.ClaimOK(a, store.Claim{Want: k3})
	next := w.Next(t, "watch after the reset")
	wantChanges(t, "watch after the reset", []store.Change{next}, contractPut(k3))
	if next.Rev <= c.Reset.Rev {
		t.Fatalf("watch after the reset: rev %d; want after the snapshot's %d", next.Rev, c.Reset.Rev)
	}
}

// The contract on the stores this process alone writes.

// contractConcurrentOnePort: claims of one free port by many new keys at
// once: exactly one wins, every other gets a conflict, and what loads
// after a restart is the winner alone.
func contractConcurrentOnePort(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	const keys = 8
	var wg sync.WaitGroup
	errs := make([]error, keys)
	for i := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = h.Claim(s, store.Claim{Want: Rec("k.c"+string(rune('a'+i)), 20001, "u")})
		}()
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		var cerr *store.ConflictError
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("claims %d and %d of one port both won", winner, i)
		case err == nil:
			winner = i
		case !errors.As(err, &cerr):
			t.Fatalf("claim %d: %v; want a win or a *ConflictError", i, err)
		}
	}
	if winner < 0 {
		t.Fatalf("no claim of a free port won: %v", errs)
	}
	_, snap := h.reopen(s)
	WantAllocations(t, "after concurrent claims of one port", snap, Rec("k.c"+string(rune('a'+winner)), 20001, "u"))
}

// contractConcurrentBothSpaces: claims of one number, half of them tcp and
// half udp, by many new keys at once: exactly one wins in each space.
func contractConcurrentBothSpaces(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	const keys = 8
	recs := make([]store.Record, keys)
	for i := range recs {
		recs[i] = Rec("k.s"+string(rune('a'+i)), 20001, "u")
		if i%2 == 1 {
			recs[i] = UDPRec(recs[i].Key, 20001, "u")
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, keys)
	for i := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = h.Claim(s, store.Claim{Want: recs[i]})
		}()
	}
	wg.Wait()
	winner := map[store.Space]int{}
	var won []store.Record
	for i, err := range errs {
		var cerr *store.ConflictError
		switch {
		case err == nil:
			if other, dup := winner[recs[i].Space()]; dup {
				t.Fatalf("claims %d and %d of %s both won", other, i, recs[i].Slot())
			}
			winner[recs[i].Space()] = i
			won = append(won, recs[i])
		case !errors.As(err, &cerr):
			t.Fatalf("claim %d of %s: %v; want a win or a *ConflictError", i, recs[i].Slot(), err)
		}
	}
	if len(won) != len(store.Spaces) {
		t.Fatalf("winners %v of claims %v; want one in each space", winner, errs)
	}
	_, snap := h.reopen(s)
	WantAllocations(t, "after concurrent claims of one number in both spaces", snap, won...)
}

// contractConcurrentManyPorts: claims of different ports by different
// keys at once all win and all load after a restart (claim is called
// concurrently; a store serializes what it must itself).
func contractConcurrentManyPorts(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	const keys = 16
	var want []store.Record
	for i := range keys {
		want = append(want, Rec("k.m"+string(rune('a'+i)), 20001+i, "u"))
	}
	var wg sync.WaitGroup
	for _, r := range want {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := h.Claim(s, store.Claim{Want: r}); err != nil {
				t.Errorf("claim of %s on a free port %d: %v", r.Key, r.Port, err)
			}
		}()
	}
	wg.Wait()
	_, snap := h.reopen(s)
	WantAllocations(t, "after concurrent claims of many ports", snap, want...)
}

// contractOutcomeUnknown: a claim whose ctx has already ended either
// answers (then it holds), or says the outcome is unknown (then it may
// hold: what loads is either nothing or the claim), or fails definitely
// (then nothing holds). Whatever it says, a later claim of the same key
// as new settles it without a duplicate.
func contractOutcomeUnknown(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	a := Rec("k.unknown", 20001, "u")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.Claim(ctx, store.Claim{Want: a})
	snap := h.Load(s)
	held := slices.ContainsFunc(snap.Allocations, func(r store.Record) bool { return r.Key == a.Key })
	switch {
	case err == nil && !held:
		t.Fatalf("a claim answered without error but does not load")
	case err != nil && !errors.Is(err, store.ErrOutcomeUnknown) && !errors.Is(err, context.Canceled) && held:
		t.Fatalf("a claim failed definitely (%v) but loads", err)
	}
	// A second claim as new settles it: a conflict naming a's record if
	// the first one landed (an unknown outcome may land later still), a
	// win otherwise; never two records.
	unknown := err != nil && (errors.Is(err, store.ErrOutcomeUnknown) || errors.Is(err, context.Canceled))
	_, err = h.Claim(s, store.Claim{Want: a})
	var cerr *store.ConflictError
	landed := errors.As(err, &cerr)
	switch {
	case err != nil && !landed:
		t.Fatalf("claiming again: %v; want a win or a conflict", err)
	case landed && !slices.ContainsFunc(cerr.Current, func(c store.Change) bool { return c.Kind == store.ChangePut && c.Rec.Key == a.Key }):
		t.Fatalf("claiming again: a conflict that does not name the first claim's record: %+v", cerr.Current)
	case !unknown && landed != held:
		t.Fatalf("claiming again after a first claim that %s: %v", map[bool]string{true: "landed", false: "did not land"}[held], err)
	}
	_, snap = h.reopen(s)
	WantAllocations(t, "after the claim of unknown outcome", snap, a)
}

// contractHistory: a store that keeps a history (History() != nil) gives
// back what was appended, newest first, selected by port and key, and
// prunes what is older than asked.
func contractHistory(t *testing.T, h *Harness) {
	s := h.openStore()
	h.Load(s)
	log := s.History()
	if log == nil {
		t.Skipf("%s store keeps no history", h.kind)
	}
	ctx, cancel := context.WithTimeout(context.Background(), contractTimeout)
	defer cancel()
	entry := func(i int, key string, port, oldPort int, change store.HistoryChange) store.HistoryEntry {
		at := Base.Add(time.Duration(i) * 40 * 24 * time.Hour) // a month apart: a file history prunes whole months
		return store.HistoryEntry{ID: fmt.Sprintf("%019d-t-%06d", at.UnixNano(), i), Time: at, Key: key, User: "u",
			ProxyType: "tcp", Port: port, OldPort: oldPort, Change: change, By: "test"}
	}
	es := []store.HistoryEntry{
		entry(1, "k.one", 20001, 0, store.HistNew),
		entry(2, "k.two", 20002, 0, store.HistNew),
		entry(3, "k.one", 20003, 20001, store.HistMoved),
	}
	if err := log.Append(ctx, es); err != nil {
		t.Fatalf("append: %v", err)
	}
	ids := func(q store.HistoryQuery) []string {
		t.Helper()
		got, err := log.Entries(ctx, q)
		if err != nil {
			t.Fatalf("entries %+v: %v", q, err)
		}
		var out []string
		for _, e := range got {
			out = append(out, e.ID)
		}
		return out
	}
	if got, want := ids(store.HistoryQuery{}), []string{es[2].ID, es[1].ID, es[0].ID}; !slices.Equal(got, want) {
		t.Fatalf("every entry: %v; want newest first %v", got, want)
	}
	if got, want := ids(store.HistoryQuery{Port: 20001}), []string{es[2].ID, es[0].ID}; !slices.Equal(got, want) {
		t.Fatalf("port 20001: %v; want the move away and the first claim %v", got, want)
	}
	if got, want := ids(store.HistoryQuery{Key: "k.two"}), []string{es[1].ID}; !slices.Equal(got, want) {
		t.Fatalf("key k.two: %v; want %v", got, want)
	}
	if n, err := log.Prune(ctx, es[1].Time); err != nil || n != 1 {
		t.Fatalf("prune before the second entry: %d, %v; want 1", n, err)
	}
	s, _ = h.reopen(s)
	log = s.History()
	if got, want := ids(store.HistoryQuery{}), []string{es[2].ID, es[1].ID}; !slices.Equal(got, want) {
		t.Fatalf("after prune and reopen: %v; want %v", got, want)
	}
}

// contractWatchEnds: Watch returns ctx's error once ctx ends, whether or
// not anyone else writes the store.
func contractWatchEnds(t *testing.T, h *Harness) {
	s := h.openStore()
	snap := h.Load(s)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Watch(ctx, snap.Rev, func(store.Change) {}) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Watch after its ctx ended returned %v; want context.Canceled", err)
		}
	case <-time.After(contractTimeout):
		t.Fatalf("Watch did not return within %v of its ctx ending", contractTimeout)
	}
}
