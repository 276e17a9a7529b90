package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
)

// boltStore keeps the records in one bbolt file, in the layout gokv's
// bbolt store uses (bucket "default", JSON values), so data directories
// written by earlier versions open unchanged. It talks to bbolt directly
// rather than through gokv because a claim must retire the old record and
// write the new one in one transaction: each change is one fsync'd commit,
// so there is no half-written state for a crash to leave.
type boltStore struct {
	db   *bolt.DB
	path string
	log  *slog.Logger

	mu     sync.Mutex
	idx    localIndex
	loaded bool
}

// boltBucket is gokv's default bucket name.
var boltBucket = []byte("default")

// openBoltStore opens path, read-only when the file or its directory
// cannot be written (the store then serves what it holds).
func openBoltStore(path string, log *slog.Logger) (*boltStore, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil && (errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EACCES)) {
		if _, serr := os.Stat(path); serr == nil {
			db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open bbolt store: %v", err)
	}
	if !db.IsReadOnly() {
		if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucketIfNotExists(boltBucket); return err }); err != nil {
			log.Warn("bbolt store: cannot create its bucket", "err", err)
		}
	}
	return &boltStore{db: db, path: path, log: log}, nil
}

func (s *boltStore) load(ctx context.Context) (snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	raw := newRawRecords()
	var problems, damaged []string
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(boltBucket)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			name := string(k)
			bad := func(why string) {
				problems = append(problems, fmt.Sprintf("%s: %s", name, why))
				damaged = append(damaged, name)
				if strings.HasPrefix(name, keyPrefix) {
					raw.damagedKeys[name] = true
				}
			}
			switch {
			case strings.HasPrefix(name, portPrefix):
				var r record
				port, perr := strconv.Atoi(name[len(portPrefix):])
				if perr != nil {
					return nil
				}
				if json.Unmarshal(v, &r) != nil || !validRecord(r) || r.Port != port {
					// Kept: it holds the port back (see resolve).
					problems = append(problems, fmt.Sprintf("%s: not a valid port record", name))
					raw.damagedPorts[port] = fmt.Sprintf("%s: not a valid port record", name)
					return nil
				}
				raw.ports[port] = r
			case strings.HasPrefix(name, keyPrefix):
				var r record
				if json.Unmarshal(v, &r) != nil || !validRecord(r) || keyName(r.Key) != name {
					bad("not a valid key record")
					return nil
				}
				raw.keys[r.Key] = r
			case strings.HasPrefix(name, seenPrefix):
				var sr seenRecord
				if json.Unmarshal(v, &sr) != nil || seenName(sr.Key) != name {
					bad("not a valid last-seen record")
					return nil
				}
				raw.seen[sr.Key] = sr
			case strings.HasPrefix(name, freedPrefix):
				var f freedRecord
				if json.Unmarshal(v, &f) != nil || freedName(f.Port) != name {
					bad("not a valid freed-port record")
					return nil
				}
				raw.freed[f.Port] = f.FreedAt
			}
			return nil
		})
	})
	if err != nil {
		return snapshot{}, fmt.Errorf("read bbolt store: %v", err)
	}
	res := resolve(raw)
	snap := res.snapshot(raw)
	snap.damaged = len(problems)
	snap.problems = append(problems, snap.problems...)
	if len(res.rewrite)+len(res.rewriteKeys)+len(res.drop)+len(res.setAside)+len(damaged) > 0 {
		if err := s.update(func(b *bolt.Bucket) error {
			for _, name := range damaged {
				if err := b.Delete([]byte(name)); err != nil {
					return err
				}
			}
			for _, r := range res.rewrite {
				if err := putJSON(b, portName(r.Port), r); err != nil {
					return err
				}
			}
			for _, r := range res.rewriteKeys {
				if err := putJSON(b, keyName(r.Key), r); err != nil {
					return err
				}
			}
			for _, port := range res.drop {
				if err := b.Delete([]byte(portName(port))); err != nil {
					return err
				}
			}
			for _, key := range res.setAside {
				if err := b.Delete([]byte(keyName(key))); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			snap.problems = append(snap.problems, fmt.Sprintf("could not write the repairs: %v", err))
		}
	}
	if s.db.IsReadOnly() {
		snap.degraded = errStoreReadOnly.Error()
	}
	snap.from = "records"
	s.idx, s.loaded = newLocalIndex(snap), true
	return snap, nil
}

// update runs fn in one read-write transaction on the bucket.
func (s *boltStore) update(fn func(b *bolt.Bucket) error) error {
	if s.db.IsReadOnly() {
		return errStoreReadOnly
	}
	return classify(s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(boltBucket)
		if err != nil {
			return err
		}
		return fn(b)
	}))
}

func putJSON(b *bolt.Bucket, name string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(name), data)
}

func (s *boltStore) claim(_ context.Context, c claim) ([]change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.loaded {
		return nil, errors.New("store not loaded")
	}
	if err := s.idx.check(c); err != nil {
		return nil, err
	}
	want := c.want
	err := s.update(func(b *bolt.Bucket) error {
		if c.victim != nil {
			if err := b.Delete([]byte(keyName(c.victim.Key))); err != nil {
				return err
			}
			if err := b.Delete([]byte(seenName(c.victim.Key))); err != nil {
				return err
			}
		}
		if c.old != nil && c.old.Port != want.Port {
			if err := b.Delete([]byte(portName(c.old.Port))); err != nil {
				return err
			}
			if err := putJSON(b, freedName(c.old.Port), freedRecord{Port: c.old.Port, FreedAt: c.at.UTC()}); err != nil {
				return err
			}
		}
		if err := b.Delete([]byte(freedName(want.Port))); err != nil {
			return err
		}
		if err := putJSON(b, portName(want.Port), want); err != nil {
			return err
		}
		return putJSON(b, keyName(want.Key), want)
	})
	if err != nil {
		return nil, err
	}
	return s.idx.claimed(c), nil
}

func (s *boltStore) release(_ context.Context, r record, at time.Time) ([]change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.loaded {
		return nil, errors.New("store not loaded")
	}
	if cur, ok := s.idx.get(r.Key); !ok || !sameRecord(cur, r) {
		return nil, &conflictError{current: s.idx.current(r.Key, r.Port)}
	}
	err := s.update(func(b *bolt.Bucket) error {
		for _, name := range []string{keyName(r.Key), portName(r.Port), seenName(r.Key)} {
			if err := b.Delete([]byte(name)); err != nil {
				return err
			}
		}
		return putJSON(b, freedName(r.Port), freedRecord{Port: r.Port, FreedAt: at.UTC()})
	})
	if err != nil {
		return nil, err
	}
	return s.idx.released(r, at), nil
}

func (s *boltStore) releaseDamaged(_ context.Context, port int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.idx.damaged[port]; !ok {
		return errNotHeldBack
	}
	if err := s.update(func(b *bolt.Bucket) error { return b.Delete([]byte(portName(port))) }); err != nil {
		return err
	}
	delete(s.idx.damaged, port)
	return nil
}

func (s *boltStore) touch(_ context.Context, marks []seenMark) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var written []seenRecord
	err := s.update(func(b *bolt.Bucket) error {
		written = written[:0]
		for _, m := range marks {
			if _, ok := s.idx.get(m.key); !ok {
				continue
			}
			rec := seenRecord{Key: m.key, LastSeen: m.seen.UTC(), Online: m.online}
			if err := putJSON(b, seenName(m.key), rec); err != nil {
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
		s.idx.seen(rec.Key, rec.LastSeen, rec.Online)
	}
	return nil
}

// watch has nothing to deliver: only this process writes the file.
func (s *boltStore) watch(ctx context.Context, _ int64, _ func(change)) error {
	<-ctx.Done()
	return nil
}

func (s *boltStore) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = false
	return s.db.Close()
}

// historyBucket holds the history, keyed by entry ID (time order).
var historyBucket = []byte("history")

// boltHistory is the bbolt store's history log.
type boltHistory struct{ s *boltStore }

func (s *boltStore) history() historyLog { return boltHistory{s} }

func (h boltHistory) appendEntries(_ context.Context, entries []historyEntry) error {
	if h.s.db.IsReadOnly() {
		return errStoreReadOnly
	}
	return classify(h.s.db.Update(func(tx *bolt.Tx) error {
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

func (h boltHistory) entries(_ context.Context, q historyQuery) ([]historyEntry, error) {
	var out []historyEntry
	err := h.s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(historyBucket)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		var k, v []byte
		if q.before != "" {
			k, v = c.Seek([]byte(q.before))
			if k == nil {
				k, v = c.Last()
			}
		} else {
			k, v = c.Last()
		}
		for ; k != nil; k, v = c.Prev() {
			var e historyEntry
			if json.Unmarshal(v, &e) != nil {
				continue
			}
			if !q.since.IsZero() && e.Time.Before(q.since) {
				break
			}
			if q.match(e) {
				out = append(out, e)
				if q.limit > 0 && len(out) >= q.limit {
					break
				}
			}
		}
		return nil
	})
	return out, err
}

func (h boltHistory) prune(_ context.Context, before time.Time) (int, error) {
	if h.s.db.IsReadOnly() {
		return 0, errStoreReadOnly
	}
	cutoff := []byte(fmt.Sprintf("%019d", before.UnixNano()))
	pruned := 0
	err := h.s.db.Update(func(tx *bolt.Tx) error {
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
