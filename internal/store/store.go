// Package store is the seam between the allocation rules and durable
// storage: the Store interface, whose doc comment is its whole contract,
// and the records, claims and changes that cross it. Each store lives in a
// package of its own under internal/store; this package imports nothing
// but the standard library.
package store

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Store is the seam between the allocation rules and durable storage.
// The file store (internal/store/file), bbolt (internal/store/bolt) and
// etcd (internal/store/etcd) implement it; the allocator calls nothing
// else. Each store keeps its own concerns (record layout, crash repair,
// checkpoints, locks) to itself. The contract, which
// internal/store/storetest checks for every store:
//
//   - Concurrency: every method may be called from many goroutines at once,
//     Claim and Release included (one per key in flight); a store
//     serializes what must be serialized. Every method may block; callers
//     bound each call with ctx.
//   - Acknowledged means durable: when Claim or Release returns its
//     changes, they survive a crash of the process and of the machine.
//   - Ports live in two spaces, as frps keeps them (see Space): a tcp
//     record and a udp record may hold the same number at once, and every
//     check, free port and held-back port below is of a Slot, a number in
//     its space.
//   - Conflicts: Claim and Release check what the caller saw (Claim.Old,
//     Claim.Victim, the released record, the port being free) against
//     what the store holds, and on a mismatch write nothing and return a
//     *ConflictError whose Current brings the caller up to date.
//   - Revisions order changes. A shared store (etcd) gives every change a
//     revision above every earlier one, in Snapshot.Rev, Change.Rev and
//     ConflictError.Current; the caller skips a change older than what it
//     holds for the key or port, which is how it tells echoes of its own
//     writes from news. A store that only this process writes may use
//     revision 0 throughout, and then must not echo its own writes
//     through Watch.
//   - Watch delivers, in revision order, every change made by anyone else
//     sharing the store, and may deliver this handle's own writes again
//     (etcd does; see Revisions). After a gap it cannot fill it delivers
//     ChangeReset with a whole new Snapshot.
//   - Outcome unknown: a call whose ctx ends before the store answered
//     returns an error wrapping ErrOutcomeUnknown (or ctx's error); the
//     write may still land, and if it does Watch delivers it.
//   - Errors are store-neutral: ErrFull, ErrReadOnly, ErrGone and
//     ErrRestoring (wrapped) say why a store refuses writes when it knows;
//     their text reaches frps clients.
type Store interface {
	// Load returns every allocation and the revision it is current as of,
	// after repairing what a crash left behind. Repairs are best effort:
	// what could not be repaired is reported in problems, never fatal, so
	// a full disk or a read-only directory still serves what it holds.
	Load(ctx context.Context) (Snapshot, error)
	// Claim writes c.Want, retiring c.Old (the key's previous record) or
	// c.Victim (a reclaimed key's record on the same port) in one step. If
	// the store no longer holds what the caller saw it writes nothing and
	// returns a *ConflictError carrying the records it holds now. It
	// returns the changes it made, which the caller applies to memory: the
	// victim's delete (if any) before Want's put, both of one revision.
	Claim(ctx context.Context, c Claim) ([]Change, error)
	// Release deletes r if it is still the key's record (else a
	// *ConflictError); its port is free as of at.
	Release(ctx context.Context, r Record, at time.Time) ([]Change, error)
	// Touch records when keys were last seen and whether their proxy was
	// online. Losing it is harmless; keys whose record is gone are skipped.
	Touch(ctx context.Context, marks []SeenMark) error
	// Watch calls apply, in revision order, for every change made after rev
	// by anyone else sharing the store and for the late outcome of calls
	// whose ctx ended before the store answered, until ctx ends. A store
	// that only this process writes just waits. After a gap it cannot fill
	// it delivers a ChangeReset carrying a whole new snapshot. It returns
	// ctx's error when ctx ends, or an error when the store is closed.
	Watch(ctx context.Context, rev int64, apply func(Change)) error
	// ReleaseDamaged forgets the damaged record that holds slot back (see
	// Snapshot.HeldBack): an operator's word that nobody holds it.
	// ErrNotHeldBack when no such record is there.
	ReleaseDamaged(ctx context.Context, slot Slot) error
	// History is where this store keeps the history of changes, beside
	// the allocations; nil when it keeps none (/api/history then answers
	// 404 and nothing is recorded).
	History() HistoryLog
	// Close releases the store; a file store writes its checkpoint here.
	Close() error
}

// ErrNotHeldBack says a port is not held back by a damaged record.
var ErrNotHeldBack = errors.New("no damaged record holds this port back")

// Space is a port space. frps keeps tcp and udp ports apart: a tcp proxy
// and a udp proxy may both listen on 53 (DNS), on one number beside
// WireGuard, and so on, so the plugin keeps two spaces too.
type Space string

const (
	TCP Space = "tcp"
	UDP Space = "udp"
)

// Spaces lists every space, in the order lists show them.
var Spaces = []Space{TCP, UDP}

// SpaceOf is the space a proxy type's remote port lives in: udp for udp
// proxies, tcp for every other (tcp, and the empty type of a record an
// operator assigned before its device was seen).
func SpaceOf(proxyType string) Space {
	if proxyType == string(UDP) {
		return UDP
	}
	return TCP
}

// ParseSpace reads "tcp" or "udp"; the empty string is both (ok, "").
func ParseSpace(s string) (Space, error) {
	switch Space(s) {
	case "", TCP, UDP:
		return Space(s), nil
	}
	return "", fmt.Errorf("protocol %q: want tcp or udp", s)
}

// Slot is a port number in its space: 53/udp.
type Slot struct {
	Space Space
	Port  int
}

func (s Slot) String() string { return fmt.Sprintf("%d/%s", s.Port, s.Space) }

// TCPPort and UDPPort name a slot.
func TCPPort(port int) Slot { return Slot{TCP, port} }
func UDPPort(port int) Slot { return Slot{UDP, port} }

// Record is one allocation as the store keeps it.
type Record struct {
	Key       string    `json:"key"`
	Port      int       `json:"port"`
	User      string    `json:"user"`
	ProxyName string    `json:"proxy_name"`
	ProxyType string    `json:"proxy_type"`
	Group     string    `json:"group,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// AssignedAt is when the key got this port.
	AssignedAt time.Time `json:"assigned_at"`
	// Pinned is set by an operator's assign: the device gets this port
	// whatever port it asks for, until the operator releases the key.
	Pinned bool `json:"pinned,omitempty"`
	// Note is an operator's note ("Alice's NAS"); it stays across moves.
	Note string `json:"note,omitempty"`
}

// Space is the space r's port lives in, by its proxy type.
func (r Record) Space() Space { return SpaceOf(r.ProxyType) }

// Slot is r's port in its space.
func (r Record) Slot() Slot { return Slot{r.Space(), r.Port} }

// Snapshot is what load hands the allocator.
type Snapshot struct {
	Rev         int64 // changes after rev come through watch
	Allocations []Record
	LastSeen    map[string]time.Time
	Online      map[string]bool // keys whose proxy was online when last written
	Freed       map[Slot]time.Time
	// HeldBack are ports whose record was found damaged (a power cut left
	// it empty, say) with no allocation behind it: the key that held them
	// is unknown, so they are kept from fresh allocation, with the reason,
	// until an operator releases them (releaseDamaged).
	HeldBack map[Slot]string
	// Damaged counts the records found Damaged (unreadable, empty, or not
	// matching their name), for the start's summary.
	Damaged int
	// Problems are human-readable reports of what was repaired, set aside,
	// or could not be repaired.
	Problems []string
	// Degraded, when not empty, says why this store cannot take writes
	// now (a read-only directory, say): it serves what it loaded.
	Degraded string
	// From says where the allocations came From, for the log.
	From string
}

// Claim is one allocation to write and what it replaces.
type Claim struct {
	Want Record
	// Old is the key's record as the caller saw it; nil: the key is new.
	Old *Record
	// Victim is the record of another key whose slot want takes (reclaim).
	Victim *Record
	// MaxKeys, when > 0, makes the claim of a new key fail with a quota
	// conflict unless want.User holds fewer than MaxKeys keys in the store:
	// exact across every instance that shares it.
	MaxKeys int
	// At is when old's (or victim's) port becomes free; zero: now.
	At time.Time
}

// SeenMark is one key's last_seen for touch.
type SeenMark struct {
	Key    string
	Seen   time.Time
	Online bool
}

// ChangeKind says what a change did.
type ChangeKind int

const (
	ChangePut    ChangeKind = iota + 1 // rec is the key's record now
	ChangeDelete                       // the key's record is gone; its port is free as of at
	ChangeSeen                         // only last_seen and online of key changed
	ChangeReset                        // a whole new state (the watch fell behind)
)

// Change is one step of the store's history. The allocator applies local
// outcomes and watched changes by the same path (allocator.apply).
type Change struct {
	Kind   ChangeKind
	Rev    int64 // the store's revision of this change
	Key    string
	Rec    Record    // changePut
	At     time.Time // changeDelete: when the port became free; changePut of a move: when the old one did (zero: unknown)
	Seen   time.Time // changeSeen
	Online bool      // changeSeen
	Reset  *Snapshot // changeReset
}

// ConflictError says the store no longer holds what a claim or release
// expected; it wrote nothing. current brings the caller's memory up to
// date (puts and deletes of the key and the port involved).
type ConflictError struct {
	Current []Change
	// Quota is set when the conflict is the user's key count (maxKeys).
	Quota bool
}

func (e *ConflictError) Error() string {
	if e.Quota {
		return "the store refused the claim: quota reached"
	}
	return fmt.Sprintf("the store holds newer records (%d changes)", len(e.Current))
}

// ErrOutcomeUnknown wraps a store call whose ctx ended before the store
// answered: it may still land, and watch delivers it if it does.
var ErrOutcomeUnknown = errors.New("the store did not answer in time; the write may still land")

// Why a store refuses writes, when it knows; rejectReason names them.
var (
	ErrFull     = errors.New("the store's disk is full")
	ErrReadOnly = errors.New("the store is read-only")
	ErrGone     = errors.New("the store's data was removed or replaced while the server ran")
	// ErrRestoring: a shared store lost its data under the running
	// server (etcd restarted empty, a backup restored); writes wait until
	// the allocations held in memory are written back.
	ErrRestoring = errors.New("the store lost its data and is being written back from memory")
)

// RestoreReport counts what a store that lost its data wrote back from
// memory: records written again, records found present (another instance
// wrote them back first), and records lost to one another writer made
// first (the key then follows what the store holds).
type RestoreReport struct{ Restored, Present, Lost int }

// HistoryEntry is one change of an allocation, as the history keeps it and
// as webhooks and /api/events deliver it. A sticky hit is not a change; a
// pinned key's device asking for another port is recorded (HistPinned).
type HistoryEntry struct {
	// ID orders entries: the time in nanoseconds, zero-padded, then the
	// writing instance and a sequence number, so IDs sort as time does.
	ID        string    `json:"id"`
	Time      time.Time `json:"time"`
	Key       string    `json:"key"`
	User      string    `json:"user,omitempty"`
	ProxyType string    `json:"proxy_type,omitempty"`
	Port      int       `json:"port,omitempty"`     // the key's port after the change; 0: none
	OldPort   int       `json:"old_port,omitempty"` // its port before; 0: none
	// OldProxyType is the key's type before, set only when the change
	// moved it to the other port space (its proxy changed protocol).
	OldProxyType string        `json:"old_proxy_type,omitempty"`
	Change       HistoryChange `json:"change"`
	// By says who caused it: "frps reqid=…", "admin 127.0.0.1:5555",
	// "import", "adopt".
	By     string `json:"by"`
	Reason string `json:"reason,omitempty"`
	// Victim is the key whose port a reclaim took.
	Victim string `json:"victim,omitempty"`
	Note   string `json:"note,omitempty"`
}

// HistoryChange names a kind of change.
type HistoryChange string

const (
	HistNew       HistoryChange = "new"       // a fresh port from the pool
	HistRequested HistoryChange = "requested" // the port the device asked for
	HistFilledIn  HistoryChange = "filled_in" // an assigned key's first registration
	HistMoved     HistoryChange = "moved"     // the device asked for another port
	HistAssigned  HistoryChange = "assigned"  // an operator's assign
	HistReleased  HistoryChange = "released"  // an operator's release
	HistReclaimed HistoryChange = "reclaimed" // taken from an abandoned key (Victim)
	HistImported  HistoryChange = "imported"
	HistAdopted   HistoryChange = "adopted"
	HistNoted     HistoryChange = "noted" // an operator's note changed
	// HistPinned: the device of a pinned key asked for another port
	// (Reason) and was given its pin; the allocation is unchanged. Recorded
	// once per port asked for under one pin, not at every reconnect.
	HistPinned HistoryChange = "pinned"
)

// Space is the space of e's Port, by its proxy type.
func (e HistoryEntry) Space() Space { return SpaceOf(e.ProxyType) }

// OldSpace is the space of e's OldPort.
func (e HistoryEntry) OldSpace() Space {
	if e.OldProxyType != "" {
		return SpaceOf(e.OldProxyType)
	}
	return e.Space()
}

// Holds says whether e leaves its key on slot.
func (e HistoryEntry) Holds(slot Slot) bool { return e.Port == slot.Port && e.Space() == slot.Space }

// Involves says whether e concerns port in space ("": either space), as
// holder before or after.
func (e HistoryEntry) Involves(port int, space Space) bool {
	return e.Port == port && (space == "" || e.Space() == space) ||
		e.OldPort == port && (space == "" || e.OldSpace() == space)
}

// HistoryLog is where a store keeps the history, beside its allocations.
type HistoryLog interface {
	Append(ctx context.Context, entries []HistoryEntry) error
	// Entries returns the Entries q selects, newest first.
	Entries(ctx context.Context, q HistoryQuery) ([]HistoryEntry, error)
	// Prune deletes entries older than before and says how many.
	Prune(ctx context.Context, before time.Time) (int, error)
}

// HistoryAppendError is an append that failed after the first written of
// its entries were written (and made durable); the rest are lost.
type HistoryAppendError struct {
	Written int
	Err     error
}

func (e *HistoryAppendError) Error() string { return e.Err.Error() }
func (e *HistoryAppendError) Unwrap() error { return e.Err }

// HistoryQuery selects entries; zero fields select everything.
type HistoryQuery struct {
	Port         int
	Space        Space // with Port: only entries of this space; "": both
	Key, User    string
	Since, Until time.Time // inclusive
	Before       string    // only entries with an ID below this (paging)
	Limit        int       // 0: no limit
}

func (q HistoryQuery) Match(e HistoryEntry) bool {
	switch {
	case q.Port != 0 && !e.Involves(q.Port, q.Space),
		q.Port == 0 && q.Space != "" && e.Space() != q.Space && e.OldSpace() != q.Space,
		q.Key != "" && e.Key != q.Key && e.Victim != q.Key,
		q.User != "" && e.User != q.User,
		!q.Since.IsZero() && e.Time.Before(q.Since),
		!q.Until.IsZero() && e.Time.After(q.Until),
		q.Before != "" && e.ID >= q.Before:
		return false
	}
	return true
}

// ValidRecord says whether r names a key and a port.
func ValidRecord(r Record) bool {
	return r.Key != "" && r.Port >= 1 && r.Port <= 65535
}

// SameRecord says whether a and b are the same record, field by field.
func SameRecord(a, b Record) bool {
	return a.Key == b.Key && a.Port == b.Port && a.User == b.User && a.ProxyName == b.ProxyName &&
		a.ProxyType == b.ProxyType && a.Group == b.Group &&
		a.CreatedAt.Equal(b.CreatedAt) && a.AssignedAt.Equal(b.AssignedAt) && a.Pinned == b.Pinned && a.Note == b.Note
}

// ShareStrings makes records that repeat a few users and types, and whose
// proxy name is usually their key, share those strings, in place. Tens of
// thousands of records decoded one by one hold a copy each otherwise, and
// both the store's index and the allocator keep them.
func ShareStrings(recs []Record) {
	seen := map[string]string{}
	share := func(s string) string {
		if v, ok := seen[s]; ok {
			return v
		}
		seen[s] = s
		return s
	}
	for i := range recs {
		r := &recs[i]
		r.User, r.ProxyType = share(r.User), share(r.ProxyType)
		if r.ProxyName == r.Key {
			r.ProxyName = r.Key
		}
	}
}
