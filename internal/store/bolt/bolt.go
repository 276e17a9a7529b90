// Package bolt is the bbolt store: one fsync'd bbolt transaction a change, in
// gokv's bucket layout.
package bolt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"

	"go.etcd.io/bbolt"
)

// Store keeps the records in one bbolt file, in the layout gokv's
// bbolt store uses (bucket "default", JSON values), so data directories
// written by earlier versions open unchanged. It talks to bbolt directly
// rather than through gokv because a claim must retire the old record and
// write the new one in one transaction: each change is one fsync'd commit,
// so there is no half-written state for a crash to leave. Records are
// named as the file store names its files (local.PortName and the rest);
// the udp records that versions with one port space kept under tcp names
// are moved to their udp names by the load's repair transaction.
type Store struct {
	db     *bbolt.DB
	path   string
	unlock func() // the directory's lock
	log    *slog.Logger

	mu     sync.Mutex
	idx    local.Index
	loaded bool
}

// boltBucket is gokv's default bucket name.
var boltBucket = []byte("default")

// FileName is the bbolt store's file in its data directory.
const FileName = "allocations.bbolt"

// Open opens the bbolt store in dir (its file, FileName), creating dir if
// need be, and locks the directory until Close, as the file store does.
// It opens read-only when the file or its directory cannot be written
// (the store then serves what it holds).
func Open(dir string, log *slog.Logger) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("-data-dir: %v", err)
	}
	unlock, err := local.LockDir(dir)
	if err != nil {
		return nil, err
	}
	s, err := openFile(filepath.Join(dir, FileName), log)
	if err != nil {
		unlock()
		return nil, err
	}
	s.unlock = unlock
	return s, nil
}

// openFile opens the bbolt file at path.
func openFile(path string, log *slog.Logger) (*Store, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil && (errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EACCES)) {
		if _, serr := os.Stat(path); serr == nil {
			db, err = bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second, ReadOnly: true})
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open bbolt store: %v", err)
	}
	if !db.IsReadOnly() {
		if err := db.Update(func(tx *bbolt.Tx) error { _, err := tx.CreateBucketIfNotExists(boltBucket); return err }); err != nil {
			log.Warn("bbolt store: cannot create its bucket", "err", err)
		}
	}
	return &Store{db: db, path: path, log: log, unlock: func() {}}, nil
}

func (s *Store) Load(ctx context.Context) (store.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	raw := local.NewRawRecords()
	var problems, damaged []string
	err := s.db.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket(boltBucket)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			name := string(k)
			bad := func(why string) {
				problems = append(problems, fmt.Sprintf("%s: %s", name, why))
				damaged = append(damaged, name)
				if strings.HasPrefix(name, local.KeyPrefix) {
					raw.DamagedKeys[name] = true
				}
			}
			switch {
			case strings.HasPrefix(name, local.PortPrefix):
				slot, ok := local.ParseSlotName(local.PortPrefix, name)
				if !ok {
					return nil
				}
				var r store.Record
				if json.Unmarshal(v, &r) != nil || !store.ValidRecord(r) || r.Port != slot.Port ||
					(r.Space() != slot.Space && slot.Space != store.TCP) {
					// Kept: it holds its slot back (see local.Resolve).
					problems = append(problems, fmt.Sprintf("%s: not a valid port record", name))
					raw.DamagedPorts[slot] = fmt.Sprintf("%s: not a valid port record", name)
					return nil
				}
				if r.Space() != slot.Space {
					raw.LegacyUDP[slot.Port] = r
					return nil
				}
				raw.Ports[slot] = r
			case strings.HasPrefix(name, local.KeyPrefix):
				var r store.Record
				if json.Unmarshal(v, &r) != nil || !store.ValidRecord(r) || local.KeyName(r.Key) != name {
					bad("not a valid key record")
					return nil
				}
				raw.Keys[r.Key] = r
			case strings.HasPrefix(name, local.SeenPrefix):
				var sr local.SeenRecord
				if json.Unmarshal(v, &sr) != nil || local.SeenName(sr.Key) != name {
					bad("not a valid last-seen record")
					return nil
				}
				raw.Seen[sr.Key] = sr
			case strings.HasPrefix(name, local.FreedPrefix):
				var f local.FreedRecord
				if json.Unmarshal(v, &f) != nil || local.FreedName(f.Slot()) != name {
					bad("not a valid freed-port record")
					return nil
				}
				raw.Freed[f.Slot()] = f.FreedAt
			}
			return nil
		})
	})
	if err != nil {
		return store.Snapshot{}, fmt.Errorf("read bbolt store: %v", err)
	}
	res := local.Resolve(raw)
	snap := res.Snapshot(raw)
	snap.Damaged = len(problems)
	snap.Problems = append(problems, snap.Problems...)
	if len(res.Rewrite)+len(res.RewriteKeys)+len(res.Drop)+len(res.SetAside)+len(res.Legacy)+len(damaged) > 0 {
		if err := s.update(func(b *bbolt.Bucket) error {
			for _, name := range damaged {
				if err := b.Delete([]byte(name)); err != nil {
					return err
				}
			}
			for _, r := range res.Rewrite {
				if err := putJSON(b, local.PortName(r.Slot()), r); err != nil {
					return err
				}
			}
			for _, r := range res.RewriteKeys {
				if err := putJSON(b, local.KeyName(r.Key), r); err != nil {
					return err
				}
			}
			for _, slot := range res.Drop {
				if err := b.Delete([]byte(local.PortName(slot))); err != nil {
					return err
				}
			}
			for _, port := range res.Legacy {
				if err := removeLegacy(b, port); err != nil {
					return err
				}
			}
			for _, key := range res.SetAside {
				if err := b.Delete([]byte(local.KeyName(key))); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			snap.Problems = append(snap.Problems, fmt.Sprintf("could not write the repairs: %v", err))
		}
	}
	if s.db.IsReadOnly() {
		snap.Degraded = store.ErrReadOnly.Error()
	}
	snap.From = "records"
	s.idx, s.loaded = local.NewIndex(snap), true
	return snap, nil
}

// update runs fn in one read-write transaction on the bucket.
func (s *Store) update(fn func(b *bbolt.Bucket) error) error {
	if s.db.IsReadOnly() {
		return store.ErrReadOnly
	}
	return local.Classify(s.db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(boltBucket)
		if err != nil {
			return err
		}
		return fn(b)
	}))
}

// removeLegacy deletes the udp record under port's tcp name, unless a
// rewrite of the tcp slot has put its own record there.
func removeLegacy(b *bbolt.Bucket, port int) error {
	name := []byte(local.PortName(store.TCPPort(port)))
	var r store.Record
	if json.Unmarshal(b.Get(name), &r) != nil || r.Slot() != store.UDPPort(port) {
		return nil
	}
	return b.Delete(name)
}

func putJSON(b *bbolt.Bucket, name string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(name), data)
}

func (s *Store) Claim(_ context.Context, c store.Claim) ([]store.Change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.loaded {
		return nil, errors.New("store not loaded")
	}
	if err := s.idx.Check(c); err != nil {
		return nil, err
	}
	want := c.Want
	err := s.update(func(b *bbolt.Bucket) error {
		if c.Victim != nil {
			if err := b.Delete([]byte(local.KeyName(c.Victim.Key))); err != nil {
				return err
			}
			if err := b.Delete([]byte(local.SeenName(c.Victim.Key))); err != nil {
				return err
			}
		}
		if old := c.Old; old != nil && old.Slot() != want.Slot() {
			if err := b.Delete([]byte(local.PortName(old.Slot()))); err != nil {
				return err
			}
			if err := putJSON(b, local.FreedName(old.Slot()), local.NewFreedRecord(old.Slot(), c.At)); err != nil {
				return err
			}
		}
		if err := b.Delete([]byte(local.FreedName(want.Slot()))); err != nil {
			return err
		}
		if err := putJSON(b, local.PortName(want.Slot()), want); err != nil {
			return err
		}
		return putJSON(b, local.KeyName(want.Key), want)
	})
	if err != nil {
		return nil, err
	}
	return s.idx.Claimed(c), nil
}

func (s *Store) Release(_ context.Context, r store.Record, at time.Time) ([]store.Change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.loaded {
		return nil, errors.New("store not loaded")
	}
	if cur, ok := s.idx.Get(r.Key); !ok || !store.SameRecord(cur, r) {
		return nil, &store.ConflictError{Current: s.idx.Current(r.Key, r.Slot())}
	}
	err := s.update(func(b *bbolt.Bucket) error {
		for _, name := range []string{local.KeyName(r.Key), local.PortName(r.Slot()), local.SeenName(r.Key)} {
			if err := b.Delete([]byte(name)); err != nil {
				return err
			}
		}
		return putJSON(b, local.FreedName(r.Slot()), local.NewFreedRecord(r.Slot(), at))
	})
	if err != nil {
		return nil, err
	}
	return s.idx.Released(r, at), nil
}

func (s *Store) ReleaseDamaged(_ context.Context, slot store.Slot) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.idx.Damaged[slot]; !ok {
		return store.ErrNotHeldBack
	}
	if err := s.update(func(b *bbolt.Bucket) error { return b.Delete([]byte(local.PortName(slot))) }); err != nil {
		return err
	}
	delete(s.idx.Damaged, slot)
	return nil
}

func (s *Store) Touch(_ context.Context, marks []store.SeenMark) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var written []local.SeenRecord
	err := s.update(func(b *bbolt.Bucket) error {
		written = written[:0]
		for _, m := range marks {
			if _, ok := s.idx.Get(m.Key); !ok {
				continue
			}
			rec := local.SeenRecord{Key: m.Key, LastSeen: m.Seen.UTC(), Online: m.Online}
			if err := putJSON(b, local.SeenName(m.Key), rec); err != nil {
				return err
			}
			written = append(written, rec)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, rec := range written {
		s.idx.Seen(rec.Key, rec.LastSeen, rec.Online)
	}
	return nil
}

// Watch has nothing to deliver: only this process writes the file.
func (s *Store) Watch(ctx context.Context, _ int64, _ func(store.Change)) error {
	<-ctx.Done()
	return ctx.Err()
}

func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = false
	defer s.unlock()
	return s.db.Close()
}

// historyBucket holds the history, keyed by entry ID (time order).
var historyBucket = []byte("history")

// History is the bbolt store's history log.
type History struct{ s *Store }

func (s *Store) History() store.HistoryLog { return History{s} }

func (h History) Append(_ context.Context, entries []store.HistoryEntry) error {
	if h.s.db.IsReadOnly() {
		return store.ErrReadOnly
	}
	return local.Classify(h.s.db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(historyBucket)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := putJSON(b, e.ID, e); err != nil {
				return err
			}
		}
		return nil
	}))
}

func (h History) Entries(_ context.Context, q store.HistoryQuery) ([]store.HistoryEntry, error) {
	var out []store.HistoryEntry
	err := h.s.db.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket(historyBucket)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		var k, v []byte
		if q.Before != "" {
			k, v = c.Seek([]byte(q.Before))
			if k == nil {
				k, v = c.Last()
			}
		} else {
			k, v = c.Last()
		}
		for ; k != nil; k, v = c.Prev() {
			var e store.HistoryEntry
			if json.Unmarshal(v, &e) != nil {
				continue
			}
			if !q.Since.IsZero() && e.Time.Before(q.Since) {
				break
			}
			if q.Match(e) {
				out = append(out, e)
				if q.Limit > 0 && len(out) >= q.Limit {
					break
				}
			}
		}
		return nil
	})
	return out, err
}

func (h History) Prune(_ context.Context, before time.Time) (int, error) {
	if h.s.db.IsReadOnly() {
		return 0, store.ErrReadOnly
	}
	cutoff := []byte(fmt.Sprintf("%019d", before.UnixNano()))
	pruned := 0
	err := h.s.db.Update(func(tx *bbolt.Tx) error {
		b := tx.Bucket(historyBucket)
		if b == nil {
			return nil
		}
		// Collected first: deleting under a cursor skips entries.
		var old [][]byte
		c := b.Cursor()
		for k, _ := c.First(); k != nil && bytes.Compare(k, cutoff) < 0; k, _ = c.Next() {
			old = append(old, slices.Clone(k))
		}
		for _, k := range old {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		pruned = len(old)
		return nil
	})
	return pruned, err
}
