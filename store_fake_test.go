package main

import (
	"context"
	"sync"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"
)

// fakeStore is a portStore in memory that can stall, fail, and lose races
// to a make-believe second instance: it drives the allocator's tests
// without disk.
type fakeStore struct {
	mu   sync.Mutex
	idx  local.Index
	rev  int64
	fail error
	// stall, when set, blocks every write until it is closed.
	stall chan struct{}
	// rival, when set, runs before a claim is checked, as another
	// instance's write that lands first; its changes reach watch.
	rival  func(f *fakeStore)
	events chan store.Change
}

func newFakeStore() *fakeStore {
	return &fakeStore{idx: local.NewIndex(store.Snapshot{}), events: make(chan store.Change, 1024)}
}

func (f *fakeStore) Load(context.Context) (store.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	snap := f.idx.Snapshot()
	snap.Rev = f.rev
	return snap, nil
}

func (f *fakeStore) hold() error {
	f.mu.Lock()
	stall, fail := f.stall, f.fail
	f.mu.Unlock()
	if stall != nil {
		<-stall
	}
	return fail
}

// stamp gives changes this store's revisions.
func (f *fakeStore) stamp(cs []store.Change) []store.Change {
	for i := range cs {
		f.rev++
		cs[i].Rev = f.rev
	}
	return cs
}

// put writes r as another instance would, and tells watch.
func (f *fakeStore) put(r store.Record) {
	if old, ok := f.idx.Get(r.Key); ok {
		f.idx.Forget(old, r.AssignedAt)
	}
	if holder, ok := f.idx.Holder(r.Port); ok {
		h, _ := f.idx.Get(holder)
		f.idx.Forget(h, r.AssignedAt)
		f.events <- f.stamp([]store.Change{{Kind: store.ChangeDelete, Key: holder, At: r.AssignedAt}})[0]
	}
	f.events <- f.stamp(f.idx.Claimed(store.Claim{Want: r}))[0]
}

func (f *fakeStore) Claim(_ context.Context, c store.Claim) ([]store.Change, error) {
	if err := f.hold(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.rival != nil {
		rival := f.rival
		f.rival = nil
		rival(f)
	}
	if err := f.idx.Check(c); err != nil {
		if ce, ok := err.(*store.ConflictError); ok {
			for i := range ce.Current {
				ce.Current[i].Rev = f.rev
			}
		}
		return nil, err
	}
	return f.stamp(f.idx.Claimed(c)), nil
}

func (f *fakeStore) Release(_ context.Context, r store.Record, at time.Time) ([]store.Change, error) {
	if err := f.hold(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.idx.Get(r.Key); !ok || !store.SameRecord(cur, r) {
		return nil, &store.ConflictError{Current: f.idx.Current(r.Key, r.Port)}
	}
	return f.stamp(f.idx.Released(r, at)), nil
}

func (f *fakeStore) Touch(_ context.Context, marks []store.SeenMark) error {
	if err := f.hold(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range marks {
		f.idx.Seen(m.Key, m.Seen, m.Online)
	}
	return nil
}

func (f *fakeStore) Watch(ctx context.Context, _ int64, apply func(store.Change)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case c := <-f.events:
			apply(c)
		}
	}
}

func (f *fakeStore) Close() error { return nil }

func (f *fakeStore) ReleaseDamaged(context.Context, int) error { return store.ErrNotHeldBack }

// History: the fake keeps none.
func (f *fakeStore) History() store.HistoryLog { return nil }
