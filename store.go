package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"syscall"
	"time"
)

// portStore is the seam between the allocation rules and durable storage.
// The file store (store_file.go), bbolt (store_bolt.go) and etcd
// (store_etcd.go) implement it; the allocator calls nothing else. Each
// store keeps its own concerns (record layout, crash repair, checkpoints,
// locks) to itself. Every method may block; callers bound each call with ctx.
type portStore interface {
	// load returns every allocation and the revision it is current as of,
	// after repairing what a crash left behind. Repairs are best effort:
	// what could not be repaired is reported in problems, never fatal, so
	// a full disk or a read-only directory still serves what it holds.
	load(ctx context.Context) (snapshot, error)
	// claim writes c.want, retiring c.old (the key's previous record) or
	// c.victim (a reclaimed key's record on the same port) in one step. If
	// the store no longer holds what the caller saw it writes nothing and
	// returns a *conflictError carrying the records it holds now. It
	// returns the changes it made, which the caller applies to memory: the
	// victim's delete (if any) before want's put, both of one revision.
	claim(ctx context.Context, c claim) ([]change, error)
	// release deletes r if it is still the key's record (else a
	// *conflictError); its port is free as of at.
	release(ctx context.Context, r record, at time.Time) ([]change, error)
	// touch records when keys were last seen and whether their proxy was
	// online. Losing it is harmless; keys whose record is gone are skipped.
	touch(ctx context.Context, marks []seenMark) error
	// watch calls apply, in revision order, for every change made after rev
	// by anyone else sharing the store and for the late outcome of calls
	// whose ctx ended before the store answered, until ctx ends. A store
	// that only this process writes just waits. After a gap it cannot fill
	// it delivers a changeReset carrying a whole new snapshot. It returns
	// ctx's error when ctx ends, or an error when the store is closed.
	watch(ctx context.Context, rev int64, apply func(change)) error
	// releaseDamaged forgets the damaged record that holds port back (see
	// snapshot.heldBack): an operator's word that nobody holds it.
	// errNotHeldBack when no such record is there.
	releaseDamaged(ctx context.Context, port int) error
	// close releases the store; a file store writes its checkpoint here.
	close() error
}

// errNotHeldBack says a port is not held back by a damaged record.
var errNotHeldBack = errors.New("no damaged record holds this port back")

// record is one allocation as the store keeps it.
type record struct {
	Key       string    `json:"key"`
	Port      int       `json:"port"`
	User      string    `json:"user"`
	ProxyName string    `json:"proxy_name"`
	ProxyType string    `json:"proxy_type"`
	Group     string    `json:"group,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// AssignedAt is when the key got this port.
	AssignedAt time.Time `json:"assigned_at"`
	// Pinned is set by an operator's assign: the device's own request for
	// another port is refused until the operator releases the key.
	Pinned bool `json:"pinned,omitempty"`
	// Note is an operator's note ("Alice's NAS"); it stays across moves.
	Note string `json:"note,omitempty"`
}

// snapshot is what load hands the allocator.
type snapshot struct {
	rev         int64 // changes after rev come through watch
	allocations []record
	lastSeen    map[string]time.Time
	online      map[string]bool // keys whose proxy was online when last written
	freed       map[int]time.Time
	// heldBack are ports whose record was found damaged (a power cut left
	// it empty, say) with no allocation behind it: the key that held them
	// is unknown, so they are kept from fresh allocation, with the reason,
	// until an operator releases them (releaseDamaged).
	heldBack map[int]string
	// damaged counts the records found damaged (unreadable, empty, or not
	// matching their name), for the start's summary.
	damaged int
	// problems are human-readable reports of what was repaired, set aside,
	// or could not be repaired.
	problems []string
	// degraded, when not empty, says why this store cannot take writes
	// now (a read-only directory, say): it serves what it loaded.
	degraded string
	// from says where the allocations came from, for the log.
	from string
}

// claim is one allocation to write and what it replaces.
type claim struct {
	want record
	// old is the key's record as the caller saw it; nil: the key is new.
	old *record
	// victim is the record of another key whose port want takes (reclaim).
	victim *record
	// maxKeys, when > 0, makes the claim of a new key fail with a quota
	// conflict unless want.User holds fewer than maxKeys keys in the store:
	// exact across every instance that shares it.
	maxKeys int
	// at is when old's (or victim's) port becomes free; zero: now.
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
	changeSeen                         // only last_seen and online of key changed
	changeReset                        // a whole new state (the watch fell behind)
)

// change is one step of the store's history. The allocator applies local
// outcomes and watched changes by the same path (allocator.apply).
type change struct {
	kind   changeKind
	rev    int64 // the store's revision of this change
	key    string
	rec    record    // changePut
	at     time.Time // changeDelete: when the port became free; changePut of a move: when the old one did (zero: unknown)
	seen   time.Time // changeSeen
	online bool      // changeSeen
	reset  *snapshot // changeReset
}

// conflictError says the store no longer holds what a claim or release
// expected; it wrote nothing. current brings the caller's memory up to
// date (puts and deletes of the key and the port involved).
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
// answered: it may still land, and watch delivers it if it does.
var errOutcomeUnknown = errors.New("the store did not answer in time; the write may still land")

// Why a store refuses writes, when it knows; rejectReason names them.
var (
	errStoreFull     = errors.New("the data directory's disk is full")
	errStoreReadOnly = errors.New("the data directory is read-only")
	errStoreGone     = errors.New("the data directory was removed or replaced while the server ran")
	// errStoreRestoring: a shared store lost its data under the running
	// server (etcd restarted empty, a backup restored); writes wait until
	// the allocations held in memory are written back.
	errStoreRestoring = errors.New("the store lost its data and is being written back from memory")
)

// restoreReport counts what a store that lost its data wrote back from
// memory: records written again, records found present (another instance
// wrote them back first), and records lost to one another writer made
// first (the key then follows what the store holds).
type restoreReport struct{ restored, present, lost int }

// Record names, shared by the file and bbolt stores. Ports are
// zero-padded so a directory listing sorts by port; keys are hashed because
// proxy names may hold any byte and any length, while file names may not.
const (
	portPrefix  = "port-"
	keyPrefix   = "key-"
	seenPrefix  = "seen-"
	freedPrefix = "freed-"
)

func portName(port int) string { return fmt.Sprintf("%s%05d", portPrefix, port) }
func keyName(key string) string {
	sum := sha256.Sum256([]byte(key))
	return keyPrefix + hex.EncodeToString(sum[:16])
}
func seenName(key string) string { return seenPrefix + keyName(key)[len(keyPrefix):] }
func freedName(port int) string  { return fmt.Sprintf("%s%05d", freedPrefix, port) }

// seenRecord holds the fields that change often, in a record of their own.
type seenRecord struct {
	Key      string    `json:"key"`
	LastSeen time.Time `json:"last_seen"`
	Online   bool      `json:"online,omitempty"`
}

// freedRecord says since when a port has been free again; it orders
// reuse. Losing it is harmless: the port then counts as never used.
type freedRecord struct {
	Port    int       `json:"port"`
	FreedAt time.Time `json:"freed_at"`
}

func validRecord(r record) bool {
	return r.Key != "" && r.Port >= 1 && r.Port <= maxPort
}

func sameRecord(a, b record) bool {
	return a.Key == b.Key && a.Port == b.Port && a.User == b.User && a.ProxyName == b.ProxyName &&
		a.ProxyType == b.ProxyType && a.Group == b.Group &&
		a.CreatedAt.Equal(b.CreatedAt) && a.AssignedAt.Equal(b.AssignedAt) && a.Pinned == b.Pinned && a.Note == b.Note
}

// rawRecords is what a two-record store (file, bbolt) holds before
// resolve decides what it means.
type rawRecords struct {
	ports map[int]record    // valid port records
	keys  map[string]record // valid key records, by key
	// damagedKeys names key records that exist but could not be read: a
	// key record is only ever replaced whole, so a damaged one was
	// committed and is rebuilt from its port record.
	damagedKeys map[string]bool
	// damagedPorts are port records that exist but could not be read, with
	// why: their port is held back unless a key record names it.
	damagedPorts map[int]string
	seen         map[string]seenRecord
	freed        map[int]time.Time
}

func newRawRecords() rawRecords {
	return rawRecords{ports: map[int]record{}, keys: map[string]record{}, damagedKeys: map[string]bool{},
		damagedPorts: map[int]string{}, seen: map[string]seenRecord{}, freed: map[int]time.Time{}}
}

// resolution is what resolve decided, with the writes that make the
// records say it again.
type resolution struct {
	allocations map[string]record
	// rewrite are records to write again (port records that disagree with
	// their committed key record, key records rebuilt from port records).
	rewrite     []record
	rewriteKeys []record
	// drop are port records no committed key stands behind; setAside are
	// key records that lost their port to another key.
	drop     []int
	setAside []string
	// heldBack are damaged port records no key record names.
	heldBack map[int]string
	problems []string
}

// resolve is the one rule that turns the records of a file or bbolt store
// into allocations. The key record is the commit point of every write (it
// is replaced whole, never written in place), so:
//   - a key record is an allocation; its port record is rewritten to match;
//   - two key records naming one port: the port record names the winner
//     (a reclaim that crashed before retiring the victim), else the newest;
//   - a port record with no key record behind it is an unfinished write
//     (a new key or a move that never committed, a release that did) and is
//     dropped, unless its key record is damaged, when it rebuilds it;
//   - a damaged port record no key record names holds its port back: whose
//     it was cannot be told, and handing it out could give an acknowledged
//     port to a stranger.
func resolve(raw rawRecords) resolution {
	res := resolution{allocations: map[string]record{}, heldBack: map[int]string{}}
	report := func(format string, args ...any) {
		res.problems = append(res.problems, fmt.Sprintf(format, args...))
	}
	byPort := map[int][]record{}
	for _, k := range raw.keys {
		byPort[k.Port] = append(byPort[k.Port], k)
	}
	ports := make([]int, 0, len(byPort))
	for p := range byPort {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	owner := map[int]string{}
	for _, port := range ports {
		cands := byPort[port]
		slices.SortFunc(cands, func(a, b record) int {
			if c := b.AssignedAt.Compare(a.AssignedAt); c != 0 {
				return c
			}
			return cmp.Compare(a.Key, b.Key)
		})
		win := cands[0]
		pr, hasPort := raw.ports[port]
		if len(cands) > 1 && hasPort {
			for _, k := range cands {
				if k.Key == pr.Key {
					win = k
				}
			}
		}
		for _, k := range cands {
			if k.Key != win.Key {
				report("%s: %q claims port %d, which belongs to %q; set aside", keyName(k.Key), k.Key, port, win.Key)
				res.setAside = append(res.setAside, k.Key)
			}
		}
		owner[port] = win.Key
		res.allocations[win.Key] = win
		if !hasPort || !sameRecord(pr, win) {
			if hasPort && pr.Key != win.Key {
				report("%s: unfinished write for %q replaced by %q's record", portName(port), pr.Key, win.Key)
			} else if hasPort {
				report("%s: rewritten to match the key record of %q", portName(port), win.Key)
			} else {
				report("%s: port record for %q rebuilt from its key record", portName(port), win.Key)
			}
			res.rewrite = append(res.rewrite, win)
		}
	}
	stray := make([]int, 0)
	for port := range raw.ports {
		if _, ok := owner[port]; !ok {
			stray = append(stray, port)
		}
	}
	slices.Sort(stray)
	for _, port := range stray {
		pr := raw.ports[port]
		if _, has := res.allocations[pr.Key]; !has && raw.damagedKeys[keyName(pr.Key)] {
			report("%s: key record for %q rebuilt from %s", keyName(pr.Key), pr.Key, portName(port))
			res.allocations[pr.Key] = pr
			owner[port] = pr.Key
			res.rewriteKeys = append(res.rewriteKeys, pr)
			continue
		}
		report("%s: %q never committed it (an unfinished write); dropped", portName(port), pr.Key)
		res.drop = append(res.drop, port)
	}
	for port, why := range raw.damagedPorts {
		if _, ok := owner[port]; !ok { // else rewritten from its key record above
			res.heldBack[port] = why
		}
	}
	return res
}

// finish turns a resolution into a snapshot.
func (res resolution) snapshot(raw rawRecords) snapshot {
	snap := snapshot{lastSeen: make(map[string]time.Time, len(raw.seen)), online: map[string]bool{}, freed: map[int]time.Time{},
		problems: res.problems, allocations: make([]record, 0, len(res.allocations))}
	held := make(map[int]bool, len(res.allocations))
	for _, r := range res.allocations {
		snap.allocations = append(snap.allocations, r)
		held[r.Port] = true
		if s, ok := raw.seen[r.Key]; ok {
			snap.lastSeen[r.Key] = s.LastSeen
			if s.Online {
				snap.online[r.Key] = true
			}
		}
	}
	for port, t := range raw.freed {
		if !held[port] && res.heldBack[port] == "" {
			snap.freed[port] = t
		}
	}
	if len(res.heldBack) > 0 {
		snap.heldBack = res.heldBack
	}
	slices.SortFunc(snap.allocations, func(a, b record) int { return cmp.Compare(a.Port, b.Port) })
	return snap
}

// localIndex is what a store that only this process writes (file, bbolt)
// holds, exactly as its load would resolve the records. Claims are
// checked against it, so these stores keep the same contract as a shared
// one: a claim on stale information is a conflict and writes nothing. Its
// changes carry no revision: nothing but their caller ever sees them, so
// there is no echo to tell apart. It is kept compact (one map entry per
// key, ports in a slice): it doubles what the allocator holds.
type localIndex struct {
	byKey   map[string]indexEntry
	byPort  []string // by port: the key holding it, "" when free
	perUser map[string]int
	freed   map[int]time.Time
	// damaged are ports held back by a damaged record (snapshot.heldBack).
	damaged map[int]string
}

// indexEntry is one key's record and its last written last_seen. The
// record is shared, never changed; at start it points into the snapshot
// that the allocator's memory points into too.
type indexEntry struct {
	rec    *record
	seen   int64 // unix nanoseconds; 0: never written
	online bool
}

// shareStrings makes records that repeat a few users and types, and whose
// proxy name is usually their key, share those strings, in place. Tens of
// thousands of records decoded one by one hold a copy each otherwise, and
// both the store's index and the allocator keep them.
func shareStrings(recs []record) {
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

func newLocalIndex(snap snapshot) localIndex {
	shareStrings(snap.allocations)
	idx := localIndex{byKey: make(map[string]indexEntry, len(snap.allocations)), byPort: make([]string, maxPort+1),
		perUser: map[string]int{}, freed: map[int]time.Time{}, damaged: map[int]string{}}
	for p, why := range snap.heldBack {
		idx.damaged[p] = why
	}
	for i := range snap.allocations {
		r := &snap.allocations[i]
		e := indexEntry{rec: r, online: snap.online[r.Key]}
		if t, ok := snap.lastSeen[r.Key]; ok {
			e.seen = t.UnixNano()
		}
		idx.byKey[r.Key], idx.byPort[r.Port] = e, r.Key
		idx.perUser[r.User]++
	}
	for p, t := range snap.freed {
		idx.freed[p] = t
	}
	return idx
}

// get returns key's record.
func (idx *localIndex) get(key string) (record, bool) {
	e, ok := idx.byKey[key]
	if !ok {
		return record{}, false
	}
	return *e.rec, true
}

// holder returns the key holding port.
func (idx *localIndex) holder(port int) (string, bool) {
	if port < 0 || port >= len(idx.byPort) || idx.byPort[port] == "" {
		return "", false
	}
	return idx.byPort[port], true
}

// seen records a last_seen written for key.
func (idx *localIndex) seen(key string, at time.Time, online bool) {
	if e, ok := idx.byKey[key]; ok {
		e.seen, e.online = at.UnixNano(), online
		idx.byKey[key] = e
	}
}

// current describes key and port as the index holds them, for a conflict.
func (idx *localIndex) current(key string, port int) []change {
	var out []change
	if r, ok := idx.get(key); ok {
		out = append(out, change{kind: changePut, key: key, rec: r})
	} else {
		out = append(out, change{kind: changeDelete, key: key})
	}
	if holder, ok := idx.holder(port); ok && holder != key {
		r, _ := idx.get(holder)
		out = append(out, change{kind: changePut, key: holder, rec: r})
	}
	return out
}

// check says whether c still fits what the index holds.
func (idx *localIndex) check(c claim) error {
	want := c.want
	cur, has := idx.get(want.Key)
	conflict := func() error {
		current := idx.current(want.Key, want.Port)
		if c.victim != nil {
			if v, ok := idx.get(c.victim.Key); ok {
				current = append(current, change{kind: changePut, key: v.Key, rec: v})
			} else {
				current = append(current, change{kind: changeDelete, key: c.victim.Key})
			}
		}
		return &conflictError{current: current}
	}
	if why := idx.damaged[want.Port]; why != "" {
		return fmt.Errorf("port %d is held back by a damaged record (%s)", want.Port, why)
	}
	switch {
	case c.old == nil && has, c.old != nil && (!has || !sameRecord(cur, *c.old)):
		return conflict()
	case c.victim != nil && (c.old != nil || c.victim.Port != want.Port):
		return errors.New("a claim takes a victim's port for a new key only")
	}
	if holder, held := idx.holder(want.Port); held && holder != want.Key {
		v, ok := idx.get(holder)
		if c.victim == nil || c.victim.Key != holder || !ok || !sameRecord(v, *c.victim) {
			return conflict()
		}
	} else if c.victim != nil {
		return conflict()
	}
	if c.old == nil && c.maxKeys > 0 && idx.perUser[want.User] >= c.maxKeys {
		return &conflictError{quota: true, current: idx.current(want.Key, want.Port)}
	}
	return nil
}

// claimed records a claim that reached the disk and returns its changes.
func (idx *localIndex) claimed(c claim) []change {
	var out []change
	if c.victim != nil {
		idx.forget(*c.victim, c.at)
		out = append(out, change{kind: changeDelete, key: c.victim.Key, at: c.at})
	}
	want := c.want
	e := indexEntry{rec: &want}
	if c.old != nil {
		if prev, ok := idx.byKey[c.old.Key]; ok {
			e.seen, e.online = prev.seen, prev.online
		}
		idx.forget(*c.old, c.at)
	}
	idx.byKey[c.want.Key], idx.byPort[c.want.Port] = e, c.want.Key
	idx.perUser[c.want.User]++
	delete(idx.freed, c.want.Port)
	return append(out, change{kind: changePut, key: c.want.Key, rec: c.want, at: c.at})
}

// released records a release that reached the disk.
func (idx *localIndex) released(r record, at time.Time) []change {
	idx.forget(r, at)
	return []change{{kind: changeDelete, key: r.Key, at: at}}
}

// forget drops r from the index, its port free as of at.
func (idx *localIndex) forget(r record, at time.Time) {
	if e, ok := idx.byKey[r.Key]; ok && e.rec.Port == r.Port {
		delete(idx.byKey, r.Key)
	}
	if holder, _ := idx.holder(r.Port); holder == r.Key {
		idx.byPort[r.Port] = ""
		idx.freed[r.Port] = at
	}
	if idx.perUser[r.User]--; idx.perUser[r.User] <= 0 {
		delete(idx.perUser, r.User)
	}
}

// snapshot is the index as load would return it.
func (idx *localIndex) snapshot() snapshot {
	snap := snapshot{allocations: make([]record, 0, len(idx.byKey)), lastSeen: make(map[string]time.Time, len(idx.byKey)),
		online: map[string]bool{}, freed: make(map[int]time.Time, len(idx.freed))}
	for k, e := range idx.byKey {
		snap.allocations = append(snap.allocations, *e.rec)
		if e.seen != 0 {
			snap.lastSeen[k] = time.Unix(0, e.seen).UTC()
		}
		if e.online {
			snap.online[k] = true
		}
	}
	slices.SortFunc(snap.allocations, func(a, b record) int { return cmp.Compare(a.Port, b.Port) })
	for p, t := range idx.freed {
		snap.freed[p] = t
	}
	if len(idx.damaged) > 0 {
		snap.heldBack = maps.Clone(idx.damaged)
	}
	return snap
}

// classify names what a failed write says about the data directory.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%w: %v", errStoreFull, err)
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("%w: %v", errStoreReadOnly, err)
	}
	return err
}
