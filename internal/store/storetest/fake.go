package storetest

import (
	"context"
	"maps"
	"sync"
	"time"

	"frp-port-keeper/internal/store"
)

// Fake is a store.Store in memory, written from the contract on
// store.Store alone: one record per key, a slot held by at most one key,
// every change a new revision. It can stall, fail, and lose races to a
// make-believe second instance, which drives the allocator's tests
// without a disk. It keeps no history.
type Fake struct {
	mu    sync.Mutex
	rev   int64
	keys  map[string]store.Record
	slots map[store.Slot]string // the key holding each slot
	seen  map[string]time.Time
	onl   map[string]bool
	freed map[store.Slot]time.Time

	fail   error
	stall  chan struct{}
	rival  func(f *Fake)
	events chan store.Change
}

// NewFake returns a fake store holding recs.
func NewFake(recs ...store.Record) *Fake {
	f := &Fake{keys: map[string]store.Record{}, slots: map[store.Slot]string{}, seen: map[string]time.Time{},
		onl: map[string]bool{}, freed: map[store.Slot]time.Time{}, events: make(chan store.Change, 1024)}
	for _, r := range recs {
		f.keys[r.Key], f.slots[r.Slot()] = r, r.Key
	}
	return f
}

// Fail makes every later write fail with err (nil: succeed again).
func (f *Fake) Fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// Stall makes every later write wait until ch is closed (nil: no wait).
func (f *Fake) Stall(ch chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stall = ch
}

// Rival runs once, before the next claim is checked, as another
// instance's write that lands first: it calls f.Put.
func (f *Fake) Rival(rival func(f *Fake)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rival = rival
}

// Get returns the record the store holds for key.
func (f *Fake) Get(key string) (store.Record, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.keys[key]
	return r, ok
}

// Put writes r as another instance would, taking r's slot from whoever
// holds it, and tells Watch.
func (f *Fake) Put(r store.Record) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if holder, ok := f.slots[r.Slot()]; ok && holder != r.Key {
		f.drop(holder, r.AssignedAt)
		f.rev++
		f.events <- store.Change{Kind: store.ChangeDelete, Rev: f.rev, Key: holder, At: r.AssignedAt}
	}
	if old, ok := f.keys[r.Key]; ok {
		f.drop(old.Key, r.AssignedAt)
	}
	f.keys[r.Key], f.slots[r.Slot()] = r, r.Key
	delete(f.freed, r.Slot())
	f.rev++
	f.events <- store.Change{Kind: store.ChangePut, Rev: f.rev, Key: r.Key, Rec: r}
}

// drop forgets key's record, its slot free as of at.
func (f *Fake) drop(key string, at time.Time) {
	r, ok := f.keys[key]
	if !ok {
		return
	}
	delete(f.keys, key)
	delete(f.seen, key)
	delete(f.onl, key)
	if f.slots[r.Slot()] == key {
		delete(f.slots, r.Slot())
		f.freed[r.Slot()] = at
	}
}

// hold waits out a stall and returns the failure to inject, if any.
func (f *Fake) hold() error {
	f.mu.Lock()
	stall, fail := f.stall, f.fail
	f.mu.Unlock()
	if stall != nil {
		<-stall
	}
	return fail
}

func (f *Fake) Load(context.Context) (store.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	snap := store.Snapshot{Rev: f.rev, LastSeen: maps.Clone(f.seen), Online: maps.Clone(f.onl), Freed: maps.Clone(f.freed), From: "memory"}
	for _, r := range f.keys {
		snap.Allocations = append(snap.Allocations, r)
	}
	return snap, nil
}

// current describes key and slot as the store holds them, for a conflict.
func (f *Fake) current(key string, slot store.Slot, also ...string) []store.Change {
	var out []store.Change
	describe := func(k string) {
		if r, ok := f.keys[k]; ok {
			out = append(out, store.Change{Kind: store.ChangePut, Rev: f.rev, Key: k, Rec: r})
		} else {
			out = append(out, store.Change{Kind: store.ChangeDelete, Rev: f.rev, Key: k})
		}
	}
	describe(key)
	if holder, ok := f.slots[slot]; ok && holder != key {
		describe(holder)
	}
	for _, k := range also {
		describe(k)
	}
	return out
}

func (f *Fake) Claim(_ context.Context, c store.Claim) ([]store.Change, error) {
	if err := f.hold(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	rival := f.rival
	f.rival = nil
	f.mu.Unlock()
	if rival != nil {
		rival(f)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := c.Want
	cur, has := f.keys[want.Key]
	var victims []string
	if c.Victim != nil {
		victims = append(victims, c.Victim.Key)
	}
	conflict := func() error { return &store.ConflictError{Current: f.current(want.Key, want.Slot(), victims...)} }
	// What the caller saw of the key must still be so.
	if (c.Old == nil && has) || (c.Old != nil && (!has || !store.SameRecord(cur, *c.Old))) {
		return nil, conflict()
	}
	// The slot must be free, the key's own, or the victim's as seen (so
	// a victim is on want's slot).
	holder, held := f.slots[want.Slot()]
	switch {
	case held && holder != want.Key:
		if c.Victim == nil || c.Victim.Key != holder || !store.SameRecord(f.keys[holder], *c.Victim) {
			return nil, conflict()
		}
	case c.Victim != nil:
		return nil, conflict()
	}
	if c.Old == nil && c.MaxKeys > 0 {
		n := 0
		for _, r := range f.keys {
			if r.User == want.User {
				n++
			}
		}
		if n >= c.MaxKeys {
			return nil, &store.ConflictError{Quota: true, Current: f.current(want.Key, want.Slot())}
		}
	}
	// One revision for the whole claim: the victim's delete, then the put.
	f.rev++
	var out []store.Change
	if c.Victim != nil {
		f.drop(c.Victim.Key, c.At)
		out = append(out, store.Change{Kind: store.ChangeDelete, Rev: f.rev, Key: c.Victim.Key, At: c.At})
	}
	if old := c.Old; old != nil && old.Slot() != want.Slot() && f.slots[old.Slot()] == want.Key {
		delete(f.slots, old.Slot())
		f.freed[old.Slot()] = c.At
	}
	f.keys[want.Key], f.slots[want.Slot()] = want, want.Key
	delete(f.freed, want.Slot())
	return append(out, store.Change{Kind: store.ChangePut, Rev: f.rev, Key: want.Key, Rec: want, At: c.At}), nil
}

func (f *Fake) Release(_ context.Context, r store.Record, at time.Time) ([]store.Change, error) {
	if err := f.hold(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.keys[r.Key]; !ok || !store.SameRecord(cur, r) {
		return nil, &store.ConflictError{Current: f.current(r.Key, r.Slot())}
	}
	f.drop(r.Key, at)
	f.rev++
	return []store.Change{{Kind: store.ChangeDelete, Rev: f.rev, Key: r.Key, At: at}}, nil
}

func (f *Fake) Touch(_ context.Context, marks []store.SeenMark) error {
	if err := f.hold(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range marks {
		if _, ok := f.keys[m.Key]; ok {
			f.seen[m.Key], f.onl[m.Key] = m.Seen, m.Online
		}
	}
	return nil
}

// Watch delivers what Put wrote (another instance's changes), never the
// handle's own claims and releases.
func (f *Fake) Watch(ctx context.Context, _ int64, apply func(store.Change)) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case c := <-f.events:
			apply(c)
		}
	}
}

func (f *Fake) ReleaseDamaged(context.Context, store.Slot) error { return store.ErrNotHeldBack }

// History: the fake keeps none.
func (f *Fake) History() store.HistoryLog { return nil }

func (f *Fake) Close() error { return nil }
