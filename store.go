package main

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/philippgille/gokv"
)

// portStore is the seam between the allocation rules and durable storage.
// The allocator calls nothing else, so a backend that shares one namespace
// between several frps servers (etcd with atomic claims, say) fits here
// without touching the handler or the rules. Every method may block; the
// allocator bounds each call with its own deadline.
type portStore interface {
	// load returns every allocation, after repairing what a crash left behind.
	load() (loaded, error)
	// claim durably records a new allocation. prev, when not nil, is the
	// key's current allocation that the new one replaces (a move).
	claim(a record, prev *record) error
	// release forgets an allocation; its port becomes free, as of at.
	release(a record, at time.Time) error
	// touch records when a key was last seen. Losing it is harmless.
	touch(key string, seen time.Time) error
	// saveCheckpoint writes everything in one file at a clean shutdown, so
	// the next start can skip reading every record.
	saveCheckpoint(l loaded) error
	close() error
}

// record is one allocation as the store keeps it. Each allocation is
// written twice, once under its port and once under its key, so that a
// file lost or torn in a crash can be rebuilt from its twin.
type record struct {
	Key       string    `json:"key"`
	Port      int       `json:"port"`
	User      string    `json:"user"`
	ProxyName string    `json:"proxy_name"`
	ProxyType string    `json:"proxy_type"`
	Group     string    `json:"group,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// AssignedAt is when the key got this port; it tells which of two
	// port records wins when a crash interrupted a move.
	AssignedAt time.Time `json:"assigned_at"`
}

// seenRecord holds the one field that changes often, in a record of its own.
type seenRecord struct {
	Key      string    `json:"key"`
	LastSeen time.Time `json:"last_seen"`
}

// freedRecord says since when a port has been free again; it orders
// reuse. Losing it is harmless: the port then counts as never used.
type freedRecord struct {
	Port    int       `json:"port"`
	FreedAt time.Time `json:"freed_at"`
}

// loaded is what a store hands the allocator at start.
type loaded struct {
	allocations []record
	lastSeen    map[string]time.Time
	freed       map[int]time.Time
	// problems are human-readable reports of what was repaired or set aside.
	problems []string
	// fromCheckpoint says the records were not read: the shutdown
	// checkpoint still described the store.
	fromCheckpoint bool
}

// Record names. Ports are zero-padded so a directory listing sorts by port;
// keys are hashed because proxy names may hold any byte and any length,
// while file names may not.
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

// kvStore keeps records in any gokv.Store. With dir set (the gokv file
// store's directory) it lists that directory at start, which finds torn
// files of both kinds; otherwise it scans every port record and the key
// records they name.
type kvStore struct {
	kv  gokv.Store
	dir string
	// checkpoint is the checkpoint file; watch is the path whose mtime
	// changes with every record written (the file store's directory, the
	// bbolt file). Empty: no checkpoints.
	checkpoint, watch string
	// openedMtime is watch's mtime before the store was opened (gokv's
	// bbolt commits a transaction as it opens).
	openedMtime int64
}

// claim writes the port record first and the key record second, and for a
// move drops the old port record last: whatever prefix of this sequence a
// crash leaves, reconcile rebuilds one consistent allocation from it.
func (s *kvStore) claim(a record, prev *record) error {
	if err := s.kv.Set(portName(a.Port), a); err != nil {
		return fmt.Errorf("write %s: %w", portName(a.Port), err)
	}
	if prev != nil {
		// Delete before Set so the key record is created anew, never
		// truncated and rewritten in place.
		if err := s.kv.Delete(keyName(a.Key)); err != nil {
			return fmt.Errorf("delete %s: %w", keyName(a.Key), err)
		}
	}
	if err := s.kv.Set(keyName(a.Key), a); err != nil {
		return fmt.Errorf("write %s: %w", keyName(a.Key), err)
	}
	if prev != nil && prev.Port != a.Port {
		if err := s.kv.Delete(portName(prev.Port)); err != nil {
			return fmt.Errorf("delete %s: %w", portName(prev.Port), err)
		}
		// Best effort: a lost freed record only changes reuse order.
		s.kv.Set(freedName(prev.Port), freedRecord{Port: prev.Port, FreedAt: a.AssignedAt})
	}
	s.kv.Delete(freedName(a.Port))
	return nil
}

// release deletes the key record first: a crash in between leaves a port
// record without its twin, which reconcile repairs back into the allocation
// (an unacknowledged release is undone, never half done).
func (s *kvStore) release(a record, at time.Time) error {
	for _, name := range []string{keyName(a.Key), portName(a.Port), seenName(a.Key)} {
		if err := s.kv.Delete(name); err != nil {
			return fmt.Errorf("delete %s: %w", name, err)
		}
	}
	s.kv.Set(freedName(a.Port), freedRecord{Port: a.Port, FreedAt: at.UTC()})
	return nil
}

func (s *kvStore) touch(key string, seen time.Time) error {
	return s.kv.Set(seenName(key), seenRecord{Key: key, LastSeen: seen})
}

func (s *kvStore) close() error { return s.kv.Close() }

// rawRecords is the raw content of a store before reconciliation.
type rawRecords struct {
	ports    map[int]record
	keys     map[string]record // by key
	seen     map[string]time.Time
	freed    map[int]time.Time
	problems []string
	// discard sets aside a record that reconcile found to be in conflict.
	discard func(name string) error
}

func (s *kvStore) load() (loaded, error) {
	if l, ok := s.loadCheckpoint(); ok {
		return l, nil
	}
	var snap rawRecords
	var err error
	if s.dir != "" {
		snap, err = s.listDir()
	} else {
		snap, err = s.scan()
	}
	if err != nil {
		return loaded{}, err
	}
	return reconcile(snap, s.kv)
}

// scan reads every possible port record and the key and seen records they
// name: the way to load from a gokv store that cannot list its keys.
func (s *kvStore) scan() (rawRecords, error) {
	snap := newRawRecords()
	snap.discard = s.kv.Delete
	for port := 1; port <= maxPort; port++ {
		var r record
		found, err := s.kv.Get(portName(port), &r)
		if err != nil {
			snap.problems = append(snap.problems, fmt.Sprintf("%s unreadable (%v): ignored", portName(port), err))
			continue
		}
		if !found {
			var f freedRecord
			if found, err := s.kv.Get(freedName(port), &f); err == nil && found && f.Port == port {
				snap.freed[port] = f.FreedAt
			}
			continue
		}
		if !validRecord(r) || r.Port != port {
			snap.problems = append(snap.problems, fmt.Sprintf("%s holds no valid allocation: ignored", portName(port)))
			continue
		}
		snap.ports[port] = r
		var k record
		if found, err := s.kv.Get(keyName(r.Key), &k); err == nil && found && validRecord(k) && k.Key == r.Key {
			snap.keys[k.Key] = k
		}
		var seen seenRecord
		if found, err := s.kv.Get(seenName(r.Key), &seen); err == nil && found && seen.Key == r.Key {
			snap.seen[r.Key] = seen.LastSeen
		}
	}
	return snap, nil
}

func newRawRecords() rawRecords {
	return rawRecords{ports: map[int]record{}, keys: map[string]record{}, seen: map[string]time.Time{}, freed: map[int]time.Time{}}
}

func validRecord(r record) bool {
	return r.Key != "" && r.Port >= 1 && r.Port <= maxPort
}

// quarantineDir is where unreadable files are moved, inside the data directory.
const quarantineDir = "quarantine"

// checkpointDir holds the shutdown checkpoint, inside the data directory.
const checkpointDir = "checkpoint"

// listDir reads the gokv file store's directory directly (the allocator
// has not started yet, so nothing writes concurrently). Files that are
// empty, truncated or not an allocation go to the quarantine folder; their
// twins rebuild them in reconcile.
func (s *kvStore) listDir() (rawRecords, error) {
	snap := newRawRecords()
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return snap, err
	}
	snap.discard = func(name string) error {
		return s.quarantine(url.PathEscape(name)+".json", "in conflict with another record")
	}
	files := make(chan string, 256)
	results := make(chan fileResult, 256)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) * 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for file := range files {
				results <- s.readRecordFile(file)
			}
		}()
	}
	go func() {
		for _, e := range entries {
			if !e.Type().IsRegular() || !strings.HasSuffix(e.Name(), ".json") {
				continue
			}
			files <- e.Name()
		}
		close(files)
		wg.Wait()
		close(results)
	}()
	for r := range results {
		if r.problem != "" {
			snap.problems = append(snap.problems, r.problem)
			if err := s.quarantine(r.file, r.problem); err != nil {
				return snap, err
			}
			continue
		}
		switch {
		case strings.HasPrefix(r.name, portPrefix):
			snap.ports[r.rec.Port] = r.rec
		case strings.HasPrefix(r.name, keyPrefix):
			snap.keys[r.rec.Key] = r.rec
		case strings.HasPrefix(r.name, seenPrefix):
			snap.seen[r.seen.Key] = r.seen.LastSeen
		case strings.HasPrefix(r.name, freedPrefix):
			snap.freed[r.freed.Port] = r.freed.FreedAt
		}
	}
	slices.Sort(snap.problems)
	return snap, nil
}

// fileResult is what reading one file of the store directory found.
type fileResult struct {
	file    string
	name    string
	rec     record
	seen    seenRecord
	freed   freedRecord
	problem string // set when the file is damaged
}

// readRecordFile reads and checks one file of the store directory.
func (s *kvStore) readRecordFile(file string) (r fileResult) {
	r.file = file
	name, err := url.PathUnescape(strings.TrimSuffix(file, ".json"))
	if err != nil {
		return r // not a name gokv wrote; leave it alone
	}
	r.name = name
	data, err := os.ReadFile(filepath.Join(s.dir, file))
	if err != nil {
		r.problem = fmt.Sprintf("%s: unreadable: %v", file, err)
		return r
	}
	bad := func(why string) fileResult {
		r.problem = fmt.Sprintf("%s: %s", file, why)
		return r
	}
	switch {
	case strings.HasPrefix(name, portPrefix):
		port, err := strconv.Atoi(name[len(portPrefix):])
		if err != nil {
			return r // not ours
		}
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.rec); err != nil {
			return bad("not a valid record: " + err.Error())
		}
		if !validRecord(r.rec) || r.rec.Port != port {
			return bad("record does not match its name")
		}
	case strings.HasPrefix(name, keyPrefix):
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.rec); err != nil {
			return bad("not a valid record: " + err.Error())
		}
		if !validRecord(r.rec) || keyName(r.rec.Key) != name {
			return bad("record does not match its name")
		}
	case strings.HasPrefix(name, seenPrefix):
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.seen); err != nil || seenName(r.seen.Key) != name {
			return bad("not a valid last-seen record")
		}
	case strings.HasPrefix(name, freedPrefix):
		if err := json.Unmarshal(data, &r.freed); err != nil || freedName(r.freed.Port) != name {
			return bad("not a valid freed-port record")
		}
	}
	return r
}

// quarantine moves a damaged file out of the store, keeping it for a person
// to look at.
func (s *kvStore) quarantine(file, why string) error {
	qdir := filepath.Join(s.dir, quarantineDir)
	if err := os.MkdirAll(qdir, 0o700); err != nil {
		return err
	}
	dst := filepath.Join(qdir, fmt.Sprintf("%s.%s", file, time.Now().UTC().Format("20060102T150405.000000000")))
	if err := os.Rename(filepath.Join(s.dir, file), dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("quarantine %s (%s): %w", file, why, err)
	}
	return nil
}

// reconcile turns raw records into one consistent set of allocations and
// writes the repairs back. Port records decide who owns a port (so no port
// is ever handed to two keys); key records break ties and restore port
// records that were lost.
func reconcile(snap rawRecords, kv gokv.Store) (loaded, error) {
	out := loaded{lastSeen: map[string]time.Time{}, freed: map[int]time.Time{}, problems: snap.problems}
	report := func(format string, args ...any) {
		out.problems = append(out.problems, fmt.Sprintf(format, args...))
	}

	// Every port record names a key; a key named by several (an interrupted
	// move) keeps the one its key record agrees with, or else the newest.
	byKey := map[string][]record{}
	for _, r := range snap.ports {
		byKey[r.Key] = append(byKey[r.Key], r)
	}
	owner := map[int]string{}
	for key, recs := range byKey {
		slices.SortFunc(recs, func(a, b record) int {
			if c := b.AssignedAt.Compare(a.AssignedAt); c != 0 {
				return c
			}
			return cmp.Compare(a.Port, b.Port)
		})
		win := recs[0]
		if k, ok := snap.keys[key]; ok {
			for _, r := range recs {
				if r.Port == k.Port {
					win = r
				}
			}
		}
		for _, r := range recs {
			if r.Port != win.Port {
				report("%s: %q also holds port %d; dropped the stale port record", portName(r.Port), key, win.Port)
				if err := kv.Delete(portName(r.Port)); err != nil {
					return out, err
				}
			}
		}
		owner[win.Port] = key
		if k, ok := snap.keys[key]; !ok || !sameRecord(k, win) {
			report("%s: key record for %q rebuilt from %s", keyName(key), key, portName(win.Port))
			if err := kv.Set(keyName(key), win); err != nil {
				return out, err
			}
		}
		out.allocations = append(out.allocations, win)
	}

	// Key records whose port record is gone: restore the port record when the
	// port is still free, otherwise the port's own record wins.
	orphans := make([]record, 0)
	for key, k := range snap.keys {
		if _, ok := byKey[key]; !ok {
			orphans = append(orphans, k)
		}
	}
	slices.SortFunc(orphans, func(a, b record) int { return a.AssignedAt.Compare(b.AssignedAt) })
	for _, k := range orphans {
		if holder, taken := owner[k.Port]; taken {
			report("%s: %q claims port %d, which belongs to %q; set aside", keyName(k.Key), k.Key, k.Port, holder)
			if err := snap.discard(keyName(k.Key)); err != nil {
				return out, err
			}
			continue
		}
		report("%s: port record for %q rebuilt from its key record", portName(k.Port), k.Key)
		if err := kv.Set(portName(k.Port), k); err != nil {
			return out, err
		}
		owner[k.Port] = k.Key
		out.allocations = append(out.allocations, k)
	}

	for key, t := range snap.seen {
		if _, ok := byKey[key]; ok {
			out.lastSeen[key] = t
		} else if _, ok := snap.keys[key]; ok {
			out.lastSeen[key] = t
		}
	}
	for port, t := range snap.freed {
		if _, taken := owner[port]; !taken {
			out.freed[port] = t
		}
	}
	slices.SortFunc(out.allocations, func(a, b record) int { return cmp.Compare(a.Port, b.Port) })
	return out, nil
}

func sameRecord(a, b record) bool {
	return a.Key == b.Key && a.Port == b.Port && a.User == b.User && a.ProxyName == b.ProxyName &&
		a.ProxyType == b.ProxyType && a.Group == b.Group &&
		a.CreatedAt.Equal(b.CreatedAt) && a.AssignedAt.Equal(b.AssignedAt)
}

// A checkpoint holds every allocation in one file, written at a clean
// shutdown. Reading one file instead of two per allocation is what makes
// a start with tens of thousands of allocations fast. It is trusted only
// while the store has not changed since: it carries the mtime that the
// watched path (the record directory, or the bbolt file) had when it was
// written, and any record created, deleted or committed afterwards moves
// that mtime. After a crash the records themselves are read and repaired.
type checkpointHeader struct {
	Version    int   `json:"version"`
	WatchMtime int64 `json:"watch_mtime_ns"`
}

// checkpointFile is the second line of a checkpoint, after its header.
type checkpointFile struct {
	Allocations []exportRecord    `json:"allocations"`
	Freed       map[int]time.Time `json:"freed,omitempty"`
}

// checkpointQuiet is how far the clock must be past the watched mtime
// before a checkpoint is written, so a later change cannot share that mtime
// (file systems stamp with a coarse clock).
const checkpointQuiet = 20 * time.Millisecond

func (s *kvStore) watchMtime() (int64, error) { return mtimeOf(s.watch) }

func mtimeOf(path string) (int64, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.ModTime().UnixNano(), nil
}

// loadCheckpoint returns the checkpoint when it still describes the store.
func (s *kvStore) loadCheckpoint() (loaded, bool) {
	if s.checkpoint == "" || s.openedMtime == 0 {
		return loaded{}, false
	}
	data, err := os.ReadFile(s.checkpoint)
	if err != nil {
		return loaded{}, false
	}
	// The first line says what the checkpoint vouches for; after a crash
	// it no longer matches and the rest is not even decoded.
	header, body, _ := bytes.Cut(data, []byte("\n"))
	var h checkpointHeader
	if json.Unmarshal(header, &h) != nil || h.Version != 1 || h.WatchMtime != s.openedMtime {
		return loaded{}, false
	}
	var cp checkpointFile
	if json.Unmarshal(body, &cp) != nil {
		return loaded{}, false
	}
	l := loaded{lastSeen: make(map[string]time.Time, len(cp.Allocations)), freed: map[int]time.Time{}, fromCheckpoint: true}
	l.allocations = make([]record, 0, len(cp.Allocations))
	for _, r := range cp.Allocations {
		if !validRecord(r.record) {
			return loaded{}, false
		}
		l.allocations = append(l.allocations, r.record)
		if !r.LastSeen.IsZero() {
			l.lastSeen[r.Key] = r.LastSeen
		}
	}
	for port, t := range cp.Freed {
		l.freed[port] = t
	}
	return l, true
}

// saveCheckpoint writes l atomically (temporary file, fsync, rename). It
// is called when no store write can follow in this process.
func (s *kvStore) saveCheckpoint(l loaded) error {
	if s.checkpoint == "" {
		return nil
	}
	mtime, err := s.watchMtime()
	if err != nil {
		return err
	}
	if mtime%int64(time.Second) == 0 {
		// Whole seconds: a file system whose timestamps are too coarse for
		// a later change to be sure to move them.
		return errors.New("the file system's timestamps are too coarse to vouch for a checkpoint")
	}
	if wait := time.Until(time.Unix(0, mtime).Add(checkpointQuiet)); wait > 0 {
		time.Sleep(wait)
	}
	cp := checkpointFile{Allocations: make([]exportRecord, 0, len(l.allocations)), Freed: l.freed}
	for _, r := range l.allocations {
		cp.Allocations = append(cp.Allocations, exportRecord{record: r, LastSeen: l.lastSeen[r.Key]})
	}
	header, err := json.Marshal(checkpointHeader{Version: 1, WatchMtime: mtime})
	if err != nil {
		return err
	}
	body, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	data := append(append(header, '\n'), body...)
	tmp := s.checkpoint + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, s.checkpoint)
}
