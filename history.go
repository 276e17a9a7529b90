package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// historyEntry is one change of an allocation, as the history keeps it and
// as webhooks and /api/events deliver it. A sticky hit is not a change.
type historyEntry struct {
	// ID orders entries: the time in nanoseconds, zero-padded, then the
	// writing instance and a sequence number, so IDs sort as time does.
	ID        string        `json:"id"`
	Time      time.Time     `json:"time"`
	Key       string        `json:"key"`
	User      string        `json:"user,omitempty"`
	ProxyType string        `json:"proxy_type,omitempty"`
	Port      int           `json:"port,omitempty"`     // the key's port after the change; 0: none
	OldPort   int           `json:"old_port,omitempty"` // its port before; 0: none
	Change    historyChange `json:"change"`
	// By says who caused it: "frps reqid=…", "admin 127.0.0.1:5555",
	// "import", "adopt".
	By     string `json:"by"`
	Reason string `json:"reason,omitempty"`
	// Victim is the key whose port a reclaim took.
	Victim string `json:"victim,omitempty"`
	Note   string `json:"note,omitempty"`
}

// historyChange names a kind of change.
type historyChange string

const (
	histNew       historyChange = "new"       // a fresh port from the pool
	histRequested historyChange = "requested" // the port the device asked for
	histFilledIn  historyChange = "filled_in" // an assigned key's first registration
	histMoved     historyChange = "moved"     // the device asked for another port
	histAssigned  historyChange = "assigned"  // an operator's assign
	histReleased  historyChange = "released"  // an operator's release
	histReclaimed historyChange = "reclaimed" // taken from an abandoned key (Victim)
	histImported  historyChange = "imported"
	histAdopted   historyChange = "adopted"
	histNoted     historyChange = "noted" // an operator's note changed
)

// holds says whether e leaves its key on port.
func (e historyEntry) holds(port int) bool { return e.Port == port }

// involves says whether e concerns port, as holder before or after.
func (e historyEntry) involves(port int) bool { return e.Port == port || e.OldPort == port }

// historyLog is where a store keeps the history, beside its allocations.
type historyLog interface {
	appendEntries(ctx context.Context, entries []historyEntry) error
	// entries returns the entries q selects, newest first.
	entries(ctx context.Context, q historyQuery) ([]historyEntry, error)
	// prune deletes entries older than before and says how many.
	prune(ctx context.Context, before time.Time) (int, error)
}

// historyAppendError is an append that failed after the first written of
// its entries were written (and made durable); the rest are lost.
type historyAppendError struct {
	written int
	err     error
}

func (e *historyAppendError) Error() string { return e.err.Error() }
func (e *historyAppendError) Unwrap() error { return e.err }

// historyOf returns the store's history log, if it keeps one.
func historyOf(store portStore) historyLog {
	if h, ok := store.(interface{ history() historyLog }); ok {
		return h.history()
	}
	return nil
}

// historyQuery selects entries; zero fields select everything.
type historyQuery struct {
	port         int
	key, user    string
	since, until time.Time // inclusive
	before       string    // only entries with an ID below this (paging)
	limit        int       // 0: no limit
}

func (q historyQuery) match(e historyEntry) bool {
	switch {
	case q.port != 0 && !e.involves(q.port),
		q.key != "" && e.Key != q.key && e.Victim != q.key,
		q.user != "" && e.User != q.user,
		!q.since.IsZero() && e.Time.Before(q.since),
		!q.until.IsZero() && e.Time.After(q.until),
		q.before != "" && e.ID >= q.before:
		return false
	}
	return true
}

// historyRecorder stamps each change with an ID and writes it to the
// history in the background, in batches: a plugin answer never waits for
// it, and an entry that cannot be written is counted and logged while the
// allocation stands. It also hands every entry to publish (events). A
// batch is what queued while the one before it was written, and is written
// at once: an entry waits for at most one append (and its fsync) besides
// its own, so the history is on disk well within a second of a change.
type historyRecorder struct {
	log      historyLog // nil: no history kept
	logger   *slog.Logger
	instance string
	seq      atomic.Uint64
	queue    chan historyEntry
	failed   func(n int)
	publish  func(historyEntry)
	done     chan struct{}
	stopOnce sync.Once
}

// historyQueue bounds what waits to be written; beyond it entries are
// dropped (and counted) rather than memory grown.
const historyQueue = 8192

func newHistoryRecorder(log historyLog, logger *slog.Logger, failed func(int), publish func(historyEntry)) *historyRecorder {
	var b [4]byte
	rand.Read(b[:])
	r := &historyRecorder{log: log, logger: logger, instance: hex.EncodeToString(b[:]), queue: make(chan historyEntry, historyQueue),
		failed: failed, publish: publish, done: make(chan struct{})}
	if r.failed == nil {
		r.failed = func(int) {}
	}
	if r.publish == nil {
		r.publish = func(historyEntry) {}
	}
	go r.run()
	return r
}

// record takes one change; it never blocks.
func (r *historyRecorder) record(e historyEntry) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC()
	e.ID = fmt.Sprintf("%019d-%s-%06d", e.Time.UnixNano(), r.instance, r.seq.Add(1)%1000000)
	r.publish(e)
	if r.log == nil {
		return
	}
	select {
	case r.queue <- e:
	default:
		r.failed(1)
		r.logger.Warn("history entry dropped: the history cannot keep up", "key", e.Key, "change", e.Change)
	}
}

func (r *historyRecorder) run() {
	defer close(r.done)
	for e := range r.queue {
		batch := []historyEntry{e}
	more:
		for len(batch) < 512 {
			select {
			case e, ok := <-r.queue:
				if !ok {
					break more
				}
				batch = append(batch, e)
			default:
				break more
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := r.log.appendEntries(ctx, batch)
		cancel()
		if err != nil {
			lost := len(batch)
			var partial *historyAppendError
			if errors.As(err, &partial) {
				lost -= partial.written
			}
			r.failed(lost)
			r.logger.Warn("history entries lost: not written; the allocations stand", "entries", lost, "err", err)
		}
	}
}

// stop writes what is queued and returns.
func (r *historyRecorder) stop() {
	r.stopOnce.Do(func() { close(r.queue) })
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
	}
}

// holderAt answers "who held port at t": the key (and user) of the last
// change of port at or before t that left a key on it, or "" when the
// last such change freed it. ok is false when the history knows nothing of
// port before t.
func holderAt(ctx context.Context, log historyLog, port int, t time.Time) (e historyEntry, held, ok bool, err error) {
	found, err := log.entries(ctx, historyQuery{port: port, until: t, limit: 1})
	if err != nil || len(found) == 0 {
		return historyEntry{}, false, false, err
	}
	return found[0], found[0].holds(port), true, nil
}

// describeHistory is one line of an entry, for the CLI and logs.
func describeHistory(e historyEntry) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %-9s %s", e.Time.Local().Format("2006-01-02 15:04:05"), e.Change, e.Key)
	switch {
	case e.Port != 0 && e.OldPort != 0 && e.Port != e.OldPort:
		fmt.Fprintf(&b, " %d -> %d", e.OldPort, e.Port)
	case e.Port != 0:
		fmt.Fprintf(&b, " %d", e.Port)
	case e.OldPort != 0:
		fmt.Fprintf(&b, " (was %d)", e.OldPort)
	}
	if e.User != "" {
		fmt.Fprintf(&b, " user=%s", e.User)
	}
	if e.Victim != "" {
		fmt.Fprintf(&b, " from=%s", e.Victim)
	}
	if e.By != "" {
		fmt.Fprintf(&b, " by=%q", e.By)
	}
	if e.Reason != "" {
		fmt.Fprintf(&b, " reason=%q", e.Reason)
	}
	if e.Note != "" {
		fmt.Fprintf(&b, " note=%q", e.Note)
	}
	return b.String()
}
