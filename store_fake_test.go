package main

import (
	"context"
	"sync"
	"time"
)

// fakeStore is a portStore in memory that can stall, fail, and lose races
// to a make-believe second instance: it drives the allocator's tests
// without disk.
type fakeStore struct {
	mu   sync.Mutex
	idx  localIndex
	rev  int64
	fail error
	// stall, when set, blocks every write until it is closed.
	stall chan struct{}
	// rival, when set, runs before a claim is checked, as another
	// instance's write that lands first; its changes reach watch.
	rival  func(f *fakeStore)
	events chan change
}

func newFakeStore() *fakeStore {
	return &fakeStore{idx: newLocalIndex(snapshot{}), events: make(chan change, 1024)}
}

func (f *fakeStore) load(context.Context) (snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	snap := f.idx.snapshot()
	snap.rev = f.rev
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
func (f *fakeStore) stamp(cs []change) []change {
	for i := range cs {
		f.rev++
		cs[i].rev = f.rev
	}
	return cs
}

// put writes r as another instance would, and tells watch.
func (f *fakeStore) put(r record) {
	if old, ok := f.idx.get(r.Key); ok {
		f.idx.forget(old, r.AssignedAt)
	}
	if holder, ok := f.idx.holder(r.Port); ok {
		h, _ := f.idx.get(holder)
		f.idx.forget(h, r.AssignedAt)
		f.events <- f.stamp([]change{{kind: changeDelete, key: holder, at: r.AssignedAt}})[0]
	}
	f.events <- f.stamp(f.idx.claimed(claim{want: r}))[0]
}

func (f *fakeStore) claim(_ context.Context, c claim) ([]change, error) {
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
	if err := f.idx.check(c); err != nil {
		if ce, ok := err.(*conflictError); ok {
			for i := range ce.current {
				ce.current[i].rev = f.rev
			}
		}
		return nil, err
	}
	return f.stamp(f.idx.claimed(c)), nil
}

func (f *fakeStore) release(_ context.Context, r record, at time.Time) ([]change, error) {
	if err := f.hold(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.idx.get(r.Key); !ok || !sameRecord(cur, r) {
		return nil, &conflictError{current: f.idx.current(r.Key, r.Port)}
	}
	return f.stamp(f.idx.released(r, at)), nil
}

func (f *fakeStore) touch(_ context.Context, marks []seenMark) error {
	if err := f.hold(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, m := range marks {
		f.idx.seen(m.key, m.seen, m.online)
	}
	return nil
}

func (f *fakeStore) watch(ctx context.Context, _ int64, apply func(change)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case c := <-f.events:
			apply(c)
		}
	}
}

func (f *fakeStore) close() error { return nil }

func (f *fakeStore) releaseDamaged(context.Context, int) error { return errNotHeldBack }
