package main

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// newPortStore is the seam between the allocation rules and durable storage.
// file, bbolt and etcd implement it; the allocator calls nothing else.
// Every method may block; callers bound each call with ctx.
type newPortStore interface {
	// load returns every allocation and the revision it is current as of,
	// after the store repaired what a crash left behind (best effort: what
	// it could not repair is reported in problems, never fatal).
	load(ctx context.Context) (snapshot, error)
	// claim writes c.want, retiring c.old (the key's previous record) and
	// c.victim (a reclaimed key's record on the same port) in one step. If
	// the store no longer holds what the caller saw it writes nothing and
	// returns a *conflictError carrying the records it holds now. It returns
	// the changes it made (a put for want, a delete for a victim), which the
	// caller applies to memory.
	claim(ctx context.Context, c claim) ([]change, error)
	// release deletes r if it is still the key's record (else *conflictError);
	// its port is free as of at.
	release(ctx context.Context, r record, at time.Time) ([]change, error)
	// touch records when keys were last seen, and whether their proxy was
	// online. Losing it is harmless. It writes nothing for a key whose
	// record is gone.
	touch(ctx context.Context, marks []seenMark) error
	// watch calls apply, in revision order, for every change made after rev
	// by anyone else (other instances sharing the store) and for the late
	// outcome of calls whose ctx ended before the store answered. It returns
	// when ctx ends. A store only this process writes may just wait for ctx.
	// After a gap it cannot fill (etcd compaction) it delivers a changeReset
	// carrying a whole new snapshot.
	watch(ctx context.Context, rev int64, apply func(change)) error
	// close releases the store (file and bbolt write their shutdown
	// checkpoint here: it is theirs alone).
	close() error
}

// snapshot is what load hands the allocator.
type snapshot struct {
	rev         int64 // changes after rev come through watch
	allocations []record
	lastSeen    map[string]time.Time
	online      map[string]bool // keys whose proxy was online when last written
	freed       map[int]time.Time
	// problems are human-readable reports of what was repaired, set aside,
	// or could not be repaired.
	problems []string
	// degraded, when not empty, says why this store cannot take writes
	// now (a full disk, a read-only directory): it serves what it loaded.
	degraded string
	// from says where the allocations came from, for the log
	// ("checkpoint", "records", "etcd").
	from string
}

// claim is one allocation to write and what it replaces.
type claim struct {
	want record
	// old is the key's record as the caller saw it; nil: the key is new.
	old *record
	// victim is the record of another key whose port want takes (reclaim).
	victim *record
	// maxKeys, when > 0, makes the claim of a NEW key (old == nil) fail with
	// a *conflictError unless want.User holds fewer than maxKeys keys in
	// the store (an exact quota across every instance sharing it).
	maxKeys int
	// at is when old's (or victim's) port becomes free.
	at time.Time
}

// seenMark is one key's last_seen for touch.
type seenMark struct {
	key    string
	seen   time.Time
	online bool
}

// changeKind says what a change did.
type changeKind int

const (
	changePut    changeKind = iota + 1 // rec is the key's record now
	changeDelete                       // the key's record is gone; its port is free as of at
	changeSeen                         // only last_seen/online of key changed
	changeReset                        // a whole new state: reset (the watch fell behind)
)

// change is one step of the store's history, applied to memory by one path
// (allocator.apply) whether it came from this instance or through watch.
type change struct {
	kind   changeKind
	rev    int64 // the store's revision of this change (0 when it has none)
	key    string
	rec    record    // changePut
	at     time.Time // changeDelete: when the port became free
	seen   time.Time // changeSeen
	online bool      // changeSeen
	reset  *snapshot // changeReset
}

// conflictError says the store no longer holds what a claim or release
// expected; it wrote nothing. current are the changes that bring the
// caller's memory up to date (puts and deletes of the key and the port
// involved), so it can decide again.
type conflictError struct {
	current []change
	// quota is set when the conflict is the user's key count (maxKeys).
	quota bool
}

func (e *conflictError) Error() string {
	if e.quota {
		return "the store refused the claim: quota reached"
	}
	return fmt.Sprintf("the store holds newer records (%d changes)", len(e.current))
}

// errOutcomeUnknown wraps a store call whose ctx ended before the store
// answered: it may still land; watch delivers it if it does.
var errOutcomeUnknown = errors.New("the store did not answer in time; the write may still land")
