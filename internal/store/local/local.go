// Package local holds what the two stores on a local directory, file and
// bbolt, share and the seam must not: record names, the one rule that
// resolves their two-record layout after a crash, the in-memory index
// that checks claims, the mapping of system errors to the seam's, and the
// data directory's lock.
package local

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"syscall"
	"time"

	"frp-port-keeper/internal/store"
)

// Record names, shared by the file and bbolt stores. Ports are
// zero-padded so a directory listing sorts by port; keys are hashed because
// proxy names may hold any byte and any length, while file names may not.
const (
	PortPrefix  = "port-"
	KeyPrefix   = "key-"
	SeenPrefix  = "seen-"
	FreedPrefix = "freed-"
)

func PortName(port int) string { return fmt.Sprintf("%s%05d", PortPrefix, port) }
func KeyName(key string) string {
	sum := sha256.Sum256([]byte(key))
	return KeyPrefix + hex.EncodeToString(sum[:16])
}
func SeenName(key string) string { return SeenPrefix + KeyName(key)[len(KeyPrefix):] }
func FreedName(port int) string  { return fmt.Sprintf("%s%05d", FreedPrefix, port) }

// SeenRecord holds the fields that change often, in a record of their own.
type SeenRecord struct {
	Key      string    `json:"key"`
	LastSeen time.Time `json:"last_seen"`
	Online   bool      `json:"online,omitempty"`
}

// FreedRecord says since when a port has been free again; it orders
// reuse. Losing it is harmless: the port then counts as never used.
type FreedRecord struct {
	Port    int       `json:"port"`
	FreedAt time.Time `json:"freed_at"`
}

// RawRecords is what a two-record store (file, bbolt) holds before
// resolve decides what it means.
type RawRecords struct {
	Ports map[int]store.Record    // valid port records
	Keys  map[string]store.Record // valid key records, by key
	// DamagedKeys names key records that exist but could not be read: a
	// key record is only ever replaced whole, so a damaged one was
	// committed and is rebuilt from its port record.
	DamagedKeys map[string]bool
	// DamagedPorts are port records that exist but could not be read, with
	// why: their port is held back unless a key record names it.
	DamagedPorts map[int]string
	Seen         map[string]SeenRecord
	Freed        map[int]time.Time
}

func NewRawRecords() RawRecords {
	return RawRecords{Ports: map[int]store.Record{}, Keys: map[string]store.Record{}, DamagedKeys: map[string]bool{},
		DamagedPorts: map[int]string{}, Seen: map[string]SeenRecord{}, Freed: map[int]time.Time{}}
}

// Resolution is what resolve decided, with the writes that make the
// records say it again.
type Resolution struct {
	Allocations map[string]store.Record
	// Rewrite are records to write again (port records that disagree with
	// their committed key record, key records rebuilt from port records).
	Rewrite     []store.Record
	RewriteKeys []store.Record
	// Drop are port records no committed key stands behind; setAside are
	// key records that lost their port to another key.
	Drop     []int
	SetAside []string
	// HeldBack are damaged port records no key record names.
	HeldBack map[int]string
	Problems []string
}

// Resolve is the one rule that turns the records of a file or bbolt store
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
func Resolve(raw RawRecords) Resolution {
	res := Resolution{Allocations: map[string]store.Record{}, HeldBack: map[int]string{}}
	report := func(format string, args ...any) {
		res.Problems = append(res.Problems, fmt.Sprintf(format, args...))
	}
	byPort := map[int][]store.Record{}
	for _, k := range raw.Keys {
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
		pr, hasPort := raw.Ports[port]
		if len(cands) > 1 && hasPort {
			for _, k := range cands {
				if k.Key == pr.Key {
					win = k
				}
			}
		}
		for _, k := range cands {
			if k.Key != win.Key {
				report("%s: %q claims port %d, which belongs to %q; set aside", KeyName(k.Key), k.Key, port, win.Key)
				res.SetAside = append(res.SetAside, k.Key)
			}
		}
		owner[port] = win.Key
		res.Allocations[win.Key] = win
		if !hasPort || !store.SameRecord(pr, win) {
			if hasPort && pr.Key != win.Key {
				report("%s: unfinished write for %q replaced by %q's record", PortName(port), pr.Key, win.Key)
			} else if hasPort {
				report("%s: rewritten to match the key record of %q", PortName(port), win.Key)
			} else {
				report("%s: port record for %q rebuilt from its key record", PortName(port), win.Key)
			}
			res.Rewrite = append(res.Rewrite, win)
		}
	}
	stray := make([]int, 0)
	for port := range raw.Ports {
		if _, ok := owner[port]; !ok {
			stray = append(stray, port)
		}
	}
	slices.Sort(stray)
	for _, port := range stray {
		pr := raw.Ports[port]
		if _, has := res.Allocations[pr.Key]; !has && raw.DamagedKeys[KeyName(pr.Key)] {
			report("%s: key record for %q rebuilt from %s", KeyName(pr.Key), pr.Key, PortName(port))
			res.Allocations[pr.Key] = pr
			owner[port] = pr.Key
			res.RewriteKeys = append(res.RewriteKeys, pr)
			continue
		}
		report("%s: %q never committed it (an unfinished write); dropped", PortName(port), pr.Key)
		res.Drop = append(res.Drop, port)
	}
	for port, why := range raw.DamagedPorts {
		if _, ok := owner[port]; !ok { // else rewritten from its key record above
			res.HeldBack[port] = why
		}
	}
	return res
}

// finish turns a resolution into a Snapshot.
func (res Resolution) Snapshot(raw RawRecords) store.Snapshot {
	snap := store.Snapshot{LastSeen: make(map[string]time.Time, len(raw.Seen)), Online: map[string]bool{}, Freed: map[int]time.Time{},
		Problems: res.Problems, Allocations: make([]store.Record, 0, len(res.Allocations))}
	held := make(map[int]bool, len(res.Allocations))
	for _, r := range res.Allocations {
		snap.Allocations = append(snap.Allocations, r)
		held[r.Port] = true
		if s, ok := raw.Seen[r.Key]; ok {
			snap.LastSeen[r.Key] = s.LastSeen
			if s.Online {
				snap.Online[r.Key] = true
			}
		}
	}
	for port, t := range raw.Freed {
		if !held[port] && res.HeldBack[port] == "" {
			snap.Freed[port] = t
		}
	}
	if len(res.HeldBack) > 0 {
		snap.HeldBack = res.HeldBack
	}
	slices.SortFunc(snap.Allocations, func(a, b store.Record) int { return cmp.Compare(a.Port, b.Port) })
	return snap
}

// Index is what a store that only this process writes (file, bbolt)
// holds, exactly as its load would resolve the records. Claims are
// checked against it, so these stores keep the same contract as a shared
// one: a claim on stale information is a conflict and writes nothing. Its
// changes carry no revision: nothing but their caller ever sees them, so
// there is no echo to tell apart. It is kept compact (one map entry per
// key, ports in a slice): it doubles what the allocator holds.
type Index struct {
	byKey   map[string]indexEntry
	byPort  []string // by port: the key holding it, "" when free
	perUser map[string]int
	freed   map[int]time.Time
	// Damaged are ports held back by a Damaged record (snapshot.heldBack).
	Damaged map[int]string
}

// indexEntry is one key's record and its last written last_seen. The
// record is shared, never changed; at start it points into the snapshot
// that the allocator's memory points into too.
type indexEntry struct {
	rec    *store.Record
	seen   int64 // unix nanoseconds; 0: never written
	online bool
}

// maxPort is the highest port number.
const maxPort = 65535

// NewIndex indexes snap.
func NewIndex(snap store.Snapshot) Index {
	store.ShareStrings(snap.Allocations)
	idx := Index{byKey: make(map[string]indexEntry, len(snap.Allocations)), byPort: make([]string, maxPort+1),
		perUser: map[string]int{}, freed: map[int]time.Time{}, Damaged: map[int]string{}}
	for p, why := range snap.HeldBack {
		idx.Damaged[p] = why
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

// Get returns key's record.
func (idx *Index) Get(key string) (store.Record, bool) {
	e, ok := idx.byKey[key]
	if !ok {
		return store.Record{}, false
	}
	return *e.rec, true
}

// Holder returns the key holding port.
func (idx *Index) Holder(port int) (string, bool) {
	if port < 0 || port >= len(idx.byPort) || idx.byPort[port] == "" {
		return "", false
	}
	return idx.byPort[port], true
}

// Seen records a last_seen written for key.
func (idx *Index) Seen(key string, at time.Time, online bool) {
	if e, ok := idx.byKey[key]; ok {
		e.seen, e.online = at.UnixNano(), online
		idx.byKey[key] = e
	}
}

// Current describes key and port as the index holds them, for a conflict.
func (idx *Index) Current(key string, port int) []store.Change {
	var out []store.Change
	if r, ok := idx.Get(key); ok {
		out = append(out, store.Change{Kind: store.ChangePut, Key: key, Rec: r})
	} else {
		out = append(out, store.Change{Kind: store.ChangeDelete, Key: key})
	}
	if holder, ok := idx.Holder(port); ok && holder != key {
		r, _ := idx.Get(holder)
		out = append(out, store.Change{Kind: store.ChangePut, Key: holder, Rec: r})
	}
	return out
}

// Check says whether c still fits what the index holds.
func (idx *Index) Check(c store.Claim) error {
	want := c.Want
	cur, has := idx.Get(want.Key)
	conflict := func() error {
		current := idx.Current(want.Key, want.Port)
		if c.Victim != nil {
			if v, ok := idx.Get(c.Victim.Key); ok {
				current = append(current, store.Change{Kind: store.ChangePut, Key: v.Key, Rec: v})
			} else {
				current = append(current, store.Change{Kind: store.ChangeDelete, Key: c.Victim.Key})
			}
		}
		return &store.ConflictError{Current: current}
	}
	if why := idx.Damaged[want.Port]; why != "" {
		return fmt.Errorf("port %d is held back by a damaged record (%s)", want.Port, why)
	}
	switch {
	case c.Old == nil && has, c.Old != nil && (!has || !store.SameRecord(cur, *c.Old)):
		return conflict()
	case c.Victim != nil && (c.Old != nil || c.Victim.Port != want.Port):
		return errors.New("a claim takes a victim's port for a new key only")
	}
	if holder, held := idx.Holder(want.Port); held && holder != want.Key {
		v, ok := idx.Get(holder)
		if c.Victim == nil || c.Victim.Key != holder || !ok || !store.SameRecord(v, *c.Victim) {
			return conflict()
		}
	} else if c.Victim != nil {
		return conflict()
	}
	if c.Old == nil && c.MaxKeys > 0 && idx.perUser[want.User] >= c.MaxKeys {
		return &store.ConflictError{Quota: true, Current: idx.Current(want.Key, want.Port)}
	}
	return nil
}

// Claimed records a claim that reached the disk and returns its changes.
func (idx *Index) Claimed(c store.Claim) []store.Change {
	var out []store.Change
	if c.Victim != nil {
		idx.Forget(*c.Victim, c.At)
		out = append(out, store.Change{Kind: store.ChangeDelete, Key: c.Victim.Key, At: c.At})
	}
	want := c.Want
	e := indexEntry{rec: &want}
	if c.Old != nil {
		if prev, ok := idx.byKey[c.Old.Key]; ok {
			e.seen, e.online = prev.seen, prev.online
		}
		idx.Forget(*c.Old, c.At)
	}
	idx.byKey[c.Want.Key], idx.byPort[c.Want.Port] = e, c.Want.Key
	idx.perUser[c.Want.User]++
	delete(idx.freed, c.Want.Port)
	return append(out, store.Change{Kind: store.ChangePut, Key: c.Want.Key, Rec: c.Want, At: c.At})
}

// Released records a release that reached the disk.
func (idx *Index) Released(r store.Record, at time.Time) []store.Change {
	idx.Forget(r, at)
	return []store.Change{{Kind: store.ChangeDelete, Key: r.Key, At: at}}
}

// Forget drops r from the index, its port free as of at.
func (idx *Index) Forget(r store.Record, at time.Time) {
	if e, ok := idx.byKey[r.Key]; ok && e.rec.Port == r.Port {
		delete(idx.byKey, r.Key)
	}
	if holder, _ := idx.Holder(r.Port); holder == r.Key {
		idx.byPort[r.Port] = ""
		idx.freed[r.Port] = at
	}
	if idx.perUser[r.User]--; idx.perUser[r.User] <= 0 {
		delete(idx.perUser, r.User)
	}
}

// Snapshot is the index as load would return it.
func (idx *Index) Snapshot() store.Snapshot {
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
	if len(idx.Damaged) > 0 {
		snap.HeldBack = maps.Clone(idx.Damaged)
	}
	return snap
}

// Classify names what a failed write says about the data directory.
func Classify(err error) error {
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
