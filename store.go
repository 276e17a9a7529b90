package main

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"frp-port-keeper/internal/store"
	"maps"
	"slices"
	"syscall"
	"time"
)

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

func validRecord(r store.Record) bool {
	return r.Key != "" && r.Port >= 1 && r.Port <= maxPort
}

func sameRecord(a, b store.Record) bool {
	return a.Key == b.Key && a.Port == b.Port && a.User == b.User && a.ProxyName == b.ProxyName &&
		a.ProxyType == b.ProxyType && a.Group == b.Group &&
		a.CreatedAt.Equal(b.CreatedAt) && a.AssignedAt.Equal(b.AssignedAt) && a.Pinned == b.Pinned && a.Note == b.Note
}

// rawRecords is what a two-record store (file, bbolt) holds before
// resolve decides what it means.
type rawRecords struct {
	ports map[int]store.Record    // valid port records
	keys  map[string]store.Record // valid key records, by key
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
	return rawRecords{ports: map[int]store.Record{}, keys: map[string]store.Record{}, damagedKeys: map[string]bool{},
		damagedPorts: map[int]string{}, seen: map[string]seenRecord{}, freed: map[int]time.Time{}}
}

// resolution is what resolve decided, with the writes that make the
// records say it again.
type resolution struct {
	allocations map[string]store.Record
	// rewrite are records to write again (port records that disagree with
	// their committed key record, key records rebuilt from port records).
	rewrite     []store.Record
	rewriteKeys []store.Record
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
	res := resolution{allocations: map[string]store.Record{}, heldBack: map[int]string{}}
	report := func(format string, args ...any) {
		res.problems = append(res.problems, fmt.Sprintf(format, args...))
	}
	byPort := map[int][]store.Record{}
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
		slices.SortFunc(cands, func(a, b store.Record) int {
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
func (res resolution) snapshot(raw rawRecords) store.Snapshot {
	snap := store.Snapshot{LastSeen: make(map[string]time.Time, len(raw.seen)), Online: map[string]bool{}, Freed: map[int]time.Time{},
		Problems: res.problems, Allocations: make([]store.Record, 0, len(res.allocations))}
	held := make(map[int]bool, len(res.allocations))
	for _, r := range res.allocations {
		snap.Allocations = append(snap.Allocations, r)
		held[r.Port] = true
		if s, ok := raw.seen[r.Key]; ok {
			snap.LastSeen[r.Key] = s.LastSeen
			if s.Online {
				snap.Online[r.Key] = true
			}
		}
	}
	for port, t := range raw.freed {
		if !held[port] && res.heldBack[port] == "" {
			snap.Freed[port] = t
		}
	}
	if len(res.heldBack) > 0 {
		snap.HeldBack = res.heldBack
	}
	slices.SortFunc(snap.Allocations, func(a, b store.Record) int { return cmp.Compare(a.Port, b.Port) })
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
	rec    *store.Record
	seen   int64 // unix nanoseconds; 0: never written
	online bool
}

// shareStrings makes records that repeat a few users and types, and whose
// proxy name is usually their key, share those strings, in place. Tens of
// thousands of records decoded one by one hold a copy each otherwise, and
// both the store's index and the allocator keep them.
func shareStrings(recs []store.Record) {
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

func newLocalIndex(snap store.Snapshot) localIndex {
	shareStrings(snap.Allocations)
	idx := localIndex{byKey: make(map[string]indexEntry, len(snap.Allocations)), byPort: make([]string, maxPort+1),
		perUser: map[string]int{}, freed: map[int]time.Time{}, damaged: map[int]string{}}
	for p, why := range snap.HeldBack {
		idx.damaged[p] = why
	}
	for i := range snap.Allocations {
		r := &snap.Allocations[i]
		e := indexEntry{rec: r, online: snap.Online[r.Key]}
		if t, ok := snap.LastSeen[r.Key]; ok {
			e.seen = t.UnixNano()
		}
		idx.byKey[r.Key], idx.byPort[r.Port] = e, r.Key
		idx.perUser[r.User]++
	}
	for p, t := range snap.Freed {
		idx.freed[p] = t
	}
	return idx
}

// get returns key's record.
func (idx *localIndex) get(key string) (store.Record, bool) {
	e, ok := idx.byKey[key]
	if !ok {
		return store.Record{}, false
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
func (idx *localIndex) current(key string, port int) []store.Change {
	var out []store.Change
	if r, ok := idx.get(key); ok {
		out = append(out, store.Change{Kind: store.ChangePut, Key: key, Rec: r})
	} else {
		out = append(out, store.Change{Kind: store.ChangeDelete, Key: key})
	}
	if holder, ok := idx.holder(port); ok && holder != key {
		r, _ := idx.get(holder)
		out = append(out, store.Change{Kind: store.ChangePut, Key: holder, Rec: r})
	}
	return out
}

// check says whether c still fits what the index holds.
func (idx *localIndex) check(c store.Claim) error {
	want := c.Want
	cur, has := idx.get(want.Key)
	conflict := func() error {
		current := idx.current(want.Key, want.Port)
		if c.Victim != nil {
			if v, ok := idx.get(c.Victim.Key); ok {
				current = append(current, store.Change{Kind: store.ChangePut, Key: v.Key, Rec: v})
			} else {
				current = append(current, store.Change{Kind: store.ChangeDelete, Key: c.Victim.Key})
			}
		}
		return &store.ConflictError{Current: current}
	}
	if why := idx.damaged[want.Port]; why != "" {
		return fmt.Errorf("port %d is held back by a damaged record (%s)", want.Port, why)
	}
	switch {
	case c.Old == nil && has, c.Old != nil && (!has || !sameRecord(cur, *c.Old)):
		return conflict()
	case c.Victim != nil && (c.Old != nil || c.Victim.Port != want.Port):
		return errors.New("a claim takes a victim's port for a new key only")
	}
	if holder, held := idx.holder(want.Port); held && holder != want.Key {
		v, ok := idx.get(holder)
		if c.Victim == nil || c.Victim.Key != holder || !ok || !sameRecord(v, *c.Victim) {
			return conflict()
		}
	} else if c.Victim != nil {
		return conflict()
	}
	if c.Old == nil && c.MaxKeys > 0 && idx.perUser[want.User] >= c.MaxKeys {
		return &store.ConflictError{Quota: true, Current: idx.current(want.Key, want.Port)}
	}
	return nil
}

// claimed records a claim that reached the disk and returns its changes.
func (idx *localIndex) claimed(c store.Claim) []store.Change {
	var out []store.Change
	if c.Victim != nil {
		idx.forget(*c.Victim, c.At)
		out = append(out, store.Change{Kind: store.ChangeDelete, Key: c.Victim.Key, At: c.At})
	}
	want := c.Want
	e := indexEntry{rec: &want}
	if c.Old != nil {
		if prev, ok := idx.byKey[c.Old.Key]; ok {
			e.seen, e.online = prev.seen, prev.online
		}
		idx.forget(*c.Old, c.At)
	}
	idx.byKey[c.Want.Key], idx.byPort[c.Want.Port] = e, c.Want.Key
	idx.perUser[c.Want.User]++
	delete(idx.freed, c.Want.Port)
	return append(out, store.Change{Kind: store.ChangePut, Key: c.Want.Key, Rec: c.Want, At: c.At})
}

// released records a release that reached the disk.
func (idx *localIndex) released(r store.Record, at time.Time) []store.Change {
	idx.forget(r, at)
	return []store.Change{{Kind: store.ChangeDelete, Key: r.Key, At: at}}
}

// forget drops r from the index, its port free as of at.
func (idx *localIndex) forget(r store.Record, at time.Time) {
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
func (idx *localIndex) snapshot() store.Snapshot {
	snap := store.Snapshot{Allocations: make([]store.Record, 0, len(idx.byKey)), LastSeen: make(map[string]time.Time, len(idx.byKey)),
		Online: map[string]bool{}, Freed: make(map[int]time.Time, len(idx.freed))}
	for k, e := range idx.byKey {
		snap.Allocations = append(snap.Allocations, *e.rec)
		if e.seen != 0 {
			snap.LastSeen[k] = time.Unix(0, e.seen).UTC()
		}
		if e.online {
			snap.Online[k] = true
		}
	}
	slices.SortFunc(snap.Allocations, func(a, b store.Record) int { return cmp.Compare(a.Port, b.Port) })
	for p, t := range idx.freed {
		snap.Freed[p] = t
	}
	if len(idx.damaged) > 0 {
		snap.HeldBack = maps.Clone(idx.damaged)
	}
	return snap
}

// classify names what a failed write says about the data directory.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%w: %v", store.ErrFull, err)
	case errors.Is(err, syscall.EROFS):
		return fmt.Errorf("%w: %v", store.ErrReadOnly, err)
	}
	return err
}
