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
	"strconv"
	"strings"
	"syscall"
	"time"

	"frp-port-keeper/internal/store"
)

// Record names, shared by the file and bbolt stores. Ports are
// zero-padded so a directory listing sorts by port; keys are hashed because
// proxy names may hold any byte and any length, while file names may not.
// A tcp slot's records keep the names of the versions that had one port
// space (port-06001), so their data loads unchanged; a udp slot's carry
// the space after the prefix (port-udp-06001).
const (
	PortPrefix  = "port-"
	KeyPrefix   = "key-"
	SeenPrefix  = "seen-"
	FreedPrefix = "freed-"
	udpInfix    = "udp-"
)

func PortName(slot store.Slot) string  { return slotName(PortPrefix, slot) }
func FreedName(slot store.Slot) string { return slotName(FreedPrefix, slot) }
func KeyName(key string) string {
	sum := sha256.Sum256([]byte(key))
	return KeyPrefix + hex.EncodeToString(sum[:16])
}
func SeenName(key string) string { return SeenPrefix + KeyName(key)[len(KeyPrefix):] }

func slotName(prefix string, slot store.Slot) string {
	if slot.Space == store.UDP {
		prefix += udpInfix
	}
	return fmt.Sprintf("%s%05d", prefix, slot.Port)
}

// ParseSlotName reads the slot a port or freed-port record's name gives
// (prefix is PortPrefix or FreedPrefix); ok is false for a name that is
// not one this package makes, which the stores leave alone.
func ParseSlotName(prefix, name string) (slot store.Slot, ok bool) {
	rest, found := strings.CutPrefix(name, prefix)
	if !found {
		return slot, false
	}
	slot.Space = store.TCP
	if r, udp := strings.CutPrefix(rest, udpInfix); udp {
		slot.Space, rest = store.UDP, r
	}
	port, err := strconv.Atoi(rest)
	if err != nil || port < 1 || port > maxPort {
		return slot, false
	}
	slot.Port = port
	return slot, true
}

// SeenRecord holds the fields that change often, in a record of their own.
type SeenRecord struct {
	Key      string    `json:"key"`
	LastSeen time.Time `json:"last_seen"`
	Online   bool      `json:"online,omitempty"`
}

// FreedRecord says since when a slot has been free again; it orders
// reuse. Losing it is harmless: the slot then counts as never used.
type FreedRecord struct {
	Port int `json:"port"`
	// Space is empty in the records of versions that had one port space;
	// they count as tcp's, which at worst reorders the reuse of a udp
	// port once.
	Space   store.Space `json:"space,omitempty"`
	FreedAt time.Time   `json:"freed_at"`
}

func NewFreedRecord(slot store.Slot, at time.Time) FreedRecord {
	return FreedRecord{Port: slot.Port, Space: slot.Space, FreedAt: at.UTC()}
}

func (f FreedRecord) Slot() store.Slot {
	return store.Slot{Space: store.SpaceOf(string(f.Space)), Port: f.Port}
}

// RawRecords is what a two-record store (file, bbolt) holds before
// resolve decides what it means.
type RawRecords struct {
	Ports map[store.Slot]store.Record // valid port records, by the slot their name gives
	// LegacyUDP are udp records found under their number's tcp name, by
	// port: versions with one port space named every port record
	// port-NNNNN. Each stands for its udp slot's port record, unless that
	// slot has one under its own name too (a migration cut short), which
	// is then the newer.
	LegacyUDP map[int]store.Record
	Keys      map[string]store.Record // valid key records, by key
	// DamagedKeys names key records that exist but could not be read: a
	// key record is replaced whole, or (the file store's new keys) created
	// and fsync'd with its port record before the answer, so a damaged one
	// was committed, or is a new key's claim that was never answered,
	// whose port nobody else holds: either way it is rebuilt from its port
	// record.
	DamagedKeys map[string]bool
	// DamagedPorts are port records that exist but could not be read, with
	// why, by the slot their name gives (all there is to go by): that slot
	// is held back unless a key record names it.
	DamagedPorts map[store.Slot]string
	Seen         map[string]SeenRecord
	Freed        map[store.Slot]time.Time
}

func NewRawRecords() RawRecords {
	return RawRecords{Ports: map[store.Slot]store.Record{}, LegacyUDP: map[int]store.Record{}, Keys: map[string]store.Record{},
		DamagedKeys: map[string]bool{}, DamagedPorts: map[store.Slot]string{}, Seen: map[string]SeenRecord{},
		Freed: map[store.Slot]time.Time{}}
}

// Resolution is what resolve decided, with the writes that make the
// records say it again.
type Resolution struct {
	Allocations map[string]store.Record
	// Rewrite are port records to write again, under PortName(r.Slot()):
	// those that disagree with their committed key record, those rebuilt
	// from it, and legacy udp records moved to their udp name. RewriteKeys
	// are key records rebuilt from port records.
	Rewrite     []store.Record
	RewriteKeys []store.Record
	// Drop are port records no committed key stands behind; setAside are
	// key records that lost their slot to another key.
	Drop     []store.Slot
	SetAside []string
	// Legacy are the ports whose tcp-named record is a udp record (see
	// RawRecords.LegacyUDP). Each is removed once the udp slot's record
	// is in Rewrite's hands (written, or not to be written), and only
	// while it still holds a udp record: a rewrite of the tcp slot may
	// have put its own record there.
	Legacy []int
	// HeldBack are damaged port records no key record names.
	HeldBack map[store.Slot]string
	Problems []string
}

// Resolve is the one rule that turns the records of a file or bbolt store
// into allocations. The key record is the commit point of every write (it
// is replaced whole or, for a new key, created whole, never written in
// place), so:
//   - a key record is an allocation; its port record is rewritten to match;
//   - two key records naming one slot: the port record names the winner
//     (a reclaim that crashed before retiring the victim), else the newest;
//   - a port record with no key record behind it is an unfinished write
//     (a new key or a move that never committed, a release that did) and is
//     dropped, unless its key record is damaged, when it rebuilds it (a
//     committed record, or a new key's unanswered claim: the slot is
//     nobody else's either way);
//   - a damaged port record no key record names holds its slot back: whose
//     it was cannot be told, and handing it out could give an acknowledged
//     port to a stranger.
func Resolve(raw RawRecords) Resolution {
	res := Resolution{Allocations: map[string]store.Record{}, HeldBack: map[store.Slot]string{}}
	report := func(format string, args ...any) {
		res.Problems = append(res.Problems, fmt.Sprintf(format, args...))
	}
	ports, legacy := raw.Ports, map[store.Slot]bool{}
	if len(raw.LegacyUDP) > 0 {
		ports = maps.Clone(raw.Ports)
		for port, r := range raw.LegacyUDP {
			res.Legacy = append(res.Legacy, port)
			if _, ok := ports[r.Slot()]; ok {
				report("%s: %q's udp record under its tcp name, beside %s (a move to the udp name cut short); removed",
					PortName(store.TCPPort(port)), r.Key, PortName(r.Slot()))
				continue
			}
			ports[r.Slot()], legacy[r.Slot()] = r, true
		}
		slices.Sort(res.Legacy)
	}
	// fileOf names where a slot's port record was found.
	fileOf := func(slot store.Slot) string {
		if legacy[slot] {
			return PortName(store.TCPPort(slot.Port))
		}
		return PortName(slot)
	}
	moved := func(slot store.Slot, key string) {
		report("%s: %q's udp record under its tcp name, as versions with one port space wrote it; moved to %s",
			fileOf(slot), key, PortName(slot))
	}
	bySlot := map[store.Slot][]store.Record{}
	for _, k := range raw.Keys {
		bySlot[k.Slot()] = append(bySlot[k.Slot()], k)
	}
	slots := slices.SortedFunc(maps.Keys(bySlot), compareSlots)
	owner := map[store.Slot]string{}
	for _, slot := range slots {
		cands := bySlot[slot]
		slices.SortFunc(cands, func(a, b store.Record) int {
			if c := b.AssignedAt.Compare(a.AssignedAt); c != 0 {
				return c
			}
			return cmp.Compare(a.Key, b.Key)
		})
		win := cands[0]
		pr, hasPort := ports[slot]
		if len(cands) > 1 && hasPort {
			for _, k := range cands {
				if k.Key == pr.Key {
					win = k
				}
			}
		}
		for _, k := range cands {
			if k.Key != win.Key {
				report("%s: %q claims %s, which belongs to %q; set aside", KeyName(k.Key), k.Key, slot, win.Key)
				res.SetAside = append(res.SetAside, k.Key)
			}
		}
		owner[slot] = win.Key
		res.Allocations[win.Key] = win
		switch {
		case !hasPort:
			report("%s: port record for %q rebuilt from its key record", PortName(slot), win.Key)
		case pr.Key != win.Key:
			report("%s: unfinished write for %q replaced by %q's record", fileOf(slot), pr.Key, win.Key)
		case !store.SameRecord(pr, win):
			report("%s: rewritten to match the key record of %q", fileOf(slot), win.Key)
		case !legacy[slot]:
			continue
		}
		if legacy[slot] {
			moved(slot, win.Key)
		}
		res.Rewrite = append(res.Rewrite, win)
	}
	var stray []store.Slot
	for slot := range ports {
		if _, ok := owner[slot]; !ok {
			stray = append(stray, slot)
		}
	}
	slices.SortFunc(stray, compareSlots)
	for _, slot := range stray {
		pr := ports[slot]
		if _, has := res.Allocations[pr.Key]; !has && raw.DamagedKeys[KeyName(pr.Key)] {
			report("%s: key record for %q rebuilt from %s", KeyName(pr.Key), pr.Key, fileOf(slot))
			res.Allocations[pr.Key] = pr
			owner[slot] = pr.Key
			res.RewriteKeys = append(res.RewriteKeys, pr)
			if legacy[slot] {
				moved(slot, pr.Key)
				res.Rewrite = append(res.Rewrite, pr)
			}
			continue
		}
		report("%s: %q never committed it (an unfinished write); dropped", fileOf(slot), pr.Key)
		if !legacy[slot] { // else removed as Legacy
			res.Drop = append(res.Drop, slot)
		}
	}
	for slot, why := range raw.DamagedPorts {
		if _, ok := owner[slot]; ok { // rewritten from its key record above
			continue
		}
		if udp := store.UDPPort(slot.Port); slot.Space == store.TCP && owner[udp] != "" {
			_, named := raw.Ports[udp]
			if _, damaged := raw.DamagedPorts[udp]; !named && !damaged {
				// The udp key on this number has no record under its udp
				// name: this is its record as versions with one port space
				// named it, damaged, and its key record says whose it was.
				report("%s: damaged (%s); %q's udp record as versions with one port space named it, rebuilt as %s",
					PortName(slot), why, owner[udp], PortName(udp))
				continue
			}
		}
		res.HeldBack[slot] = why
	}
	return res
}

// compareSlots orders slots as listings show them: by port, tcp first.
func compareSlots(a, b store.Slot) int {
	return cmp.Or(cmp.Compare(a.Port, b.Port), cmp.Compare(slices.Index(store.Spaces, a.Space), slices.Index(store.Spaces, b.Space)))
}

func compareRecords(a, b store.Record) int { return compareSlots(a.Slot(), b.Slot()) }

// Snapshot turns a resolution into what load returns.
func (res Resolution) Snapshot(raw RawRecords) store.Snapshot {
	snap := store.Snapshot{LastSeen: make(map[string]time.Time, len(raw.Seen)), Online: map[string]bool{}, Freed: map[store.Slot]time.Time{},
		Problems: res.Problems, Allocations: make([]store.Record, 0, len(res.Allocations))}
	held := make(map[store.Slot]bool, len(res.Allocations))
	for _, r := range res.Allocations {
		snap.Allocations = append(snap.Allocations, r)
		held[r.Slot()] = true
		if s, ok := raw.Seen[r.Key]; ok {
			snap.LastSeen[r.Key] = s.LastSeen
			if s.Online {
				snap.Online[r.Key] = true
			}
		}
	}
	for slot, t := range raw.Freed {
		if !held[slot] && res.HeldBack[slot] == "" {
			snap.Freed[slot] = t
		}
	}
	if len(res.HeldBack) > 0 {
		snap.HeldBack = res.HeldBack
	}
	slices.SortFunc(snap.Allocations, compareRecords)
	return snap
}

// Index is what a store that only this process writes (file, bbolt)
// holds, exactly as its load would resolve the records. Claims are
// checked against it, so these stores keep the same contract as a shared
// one: a claim on stale information is a conflict and writes nothing. Its
// changes carry no revision: nothing but their caller ever sees them, so
// there is no echo to tell apart. It is kept compact (one map entry per
// key, each space's ports in a slice): it doubles what the allocator holds.
type Index struct {
	byKey   map[string]indexEntry
	byPort  map[store.Space][]string // by space, then port: the key holding it, "" when free
	perUser map[string]int
	freed   map[store.Slot]time.Time
	// Damaged are slots held back by a Damaged record (snapshot.heldBack).
	Damaged map[store.Slot]string
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
	idx := Index{byKey: make(map[string]indexEntry, len(snap.Allocations)), byPort: map[store.Space][]string{},
		perUser: map[string]int{}, freed: maps.Clone(snap.Freed), Damaged: maps.Clone(snap.HeldBack)}
	for _, space := range store.Spaces {
		idx.byPort[space] = make([]string, maxPort+1)
	}
	if idx.freed == nil {
		idx.freed = map[store.Slot]time.Time{}
	}
	if idx.Damaged == nil {
		idx.Damaged = map[store.Slot]string{}
	}
	for i := range snap.Allocations {
		r := &snap.Allocations[i]
		e := indexEntry{rec: r, online: snap.Online[r.Key]}
		if t, ok := snap.LastSeen[r.Key]; ok {
			e.seen = t.UnixNano()
		}
		idx.byKey[r.Key] = e
		idx.hold(r.Slot(), r.Key)
		idx.perUser[r.User]++
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

// Holder returns the key holding slot.
func (idx *Index) Holder(slot store.Slot) (string, bool) {
	ports := idx.byPort[slot.Space]
	if slot.Port < 0 || slot.Port >= len(ports) || ports[slot.Port] == "" {
		return "", false
	}
	return ports[slot.Port], true
}

// hold makes key slot's holder ("": nobody's).
func (idx *Index) hold(slot store.Slot, key string) { idx.byPort[slot.Space][slot.Port] = key }

// Seen records a last_seen written for key.
func (idx *Index) Seen(key string, at time.Time, online bool) {
	if e, ok := idx.byKey[key]; ok {
		e.seen, e.online = at.UnixNano(), online
		idx.byKey[key] = e
	}
}

// Current describes key and slot as the index holds them, for a conflict.
func (idx *Index) Current(key string, slot store.Slot) []store.Change {
	var out []store.Change
	if r, ok := idx.Get(key); ok {
		out = append(out, store.Change{Kind: store.ChangePut, Key: key, Rec: r})
	} else {
		out = append(out, store.Change{Kind: store.ChangeDelete, Key: key})
	}
	if holder, ok := idx.Holder(slot); ok && holder != key {
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
		current := idx.Current(want.Key, want.Slot())
		if c.Victim != nil {
			if v, ok := idx.Get(c.Victim.Key); ok {
				current = append(current, store.Change{Kind: store.ChangePut, Key: v.Key, Rec: v})
			} else {
				current = append(current, store.Change{Kind: store.ChangeDelete, Key: c.Victim.Key})
			}
		}
		return &store.ConflictError{Current: current}
	}
	if why := idx.Damaged[want.Slot()]; why != "" {
		return fmt.Errorf("port %s is held back by a damaged record (%s)", want.Slot(), why)
	}
	switch {
	case c.Old == nil && has, c.Old != nil && (!has || !store.SameRecord(cur, *c.Old)):
		return conflict()
	case c.Victim != nil && (c.Old != nil || c.Victim.Slot() != want.Slot()):
		return errors.New("a claim takes a victim's slot for a new key only")
	}
	if holder, held := idx.Holder(want.Slot()); held && holder != want.Key {
		v, ok := idx.Get(holder)
		if c.Victim == nil || c.Victim.Key != holder || !ok || !store.SameRecord(v, *c.Victim) {
			return conflict()
		}
	} else if c.Victim != nil {
		return conflict()
	}
	if c.Old == nil && c.MaxKeys > 0 && idx.perUser[want.User] >= c.MaxKeys {
		return &store.ConflictError{Quota: true, Current: idx.Current(want.Key, want.Slot())}
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
	idx.byKey[want.Key] = e
	idx.hold(want.Slot(), want.Key)
	idx.perUser[want.User]++
	delete(idx.freed, want.Slot())
	return append(out, store.Change{Kind: store.ChangePut, Key: want.Key, Rec: want, At: c.At})
}

// Released records a release that reached the disk.
func (idx *Index) Released(r store.Record, at time.Time) []store.Change {
	idx.Forget(r, at)
	return []store.Change{{Kind: store.ChangeDelete, Key: r.Key, At: at}}
}

// Forget drops r from the index, its slot free as of at.
func (idx *Index) Forget(r store.Record, at time.Time) {
	if e, ok := idx.byKey[r.Key]; ok && e.rec.Slot() == r.Slot() {
		delete(idx.byKey, r.Key)
	}
	if holder, _ := idx.Holder(r.Slot()); holder == r.Key {
		idx.hold(r.Slot(), "")
		idx.freed[r.Slot()] = at
	}
	if idx.perUser[r.User]--; idx.perUser[r.User] <= 0 {
		delete(idx.perUser, r.User)
	}
}

// Snapshot is the index as load would return it.
func (idx *Index) Snapshot() store.Snapshot {
	snap := store.Snapshot{Allocations: make([]store.Record, 0, len(idx.byKey)), LastSeen: make(map[string]time.Time, len(idx.byKey)),
		Online: map[string]bool{}, Freed: maps.Clone(idx.freed)}
	for k, e := range idx.byKey {
		snap.Allocations = append(snap.Allocations, *e.rec)
		if e.seen != 0 {
			snap.LastSeen[k] = time.Unix(0, e.seen).UTC()
		}
		if e.online {
			snap.Online[k] = true
		}
	}
	slices.SortFunc(snap.Allocations, compareRecords)
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
