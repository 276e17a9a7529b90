// Package history records every change of an allocation in the background,
// in batches, to the history log its store keeps, and answers who held a
// port at a given time.
package history

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

	"frp-port-keeper/internal/store"
)

// Recorder stamps each change with an ID and writes it to the
// history in the background, in batches: a plugin answer never waits for
// it, and an entry that cannot be written is counted and logged while the
// allocation stands. It also hands every entry to publish (events). A
// batch is what queued while the one before it was written, and is written
// at once: an entry waits for at most one append (and its fsync) besides
// its own, so the history is on disk well within a second of a change.
type Recorder struct {
	log      store.HistoryLog // nil: no history kept
	logger   *slog.Logger
	instance string
	seq      atomic.Uint64
	queue    chan store.HistoryEntry
	failed   func(n int)
	publish  func(store.HistoryEntry)
	done     chan struct{}
	stopOnce sync.Once
}

// queueSize bounds what waits to be written; beyond it entries are
// dropped (and counted) rather than memory grown.
const queueSize = 8192

func NewRecorder(log store.HistoryLog, logger *slog.Logger, failed func(int), publish func(store.HistoryEntry)) *Recorder {
	var b [4]byte
	rand.Read(b[:])
	r := &Recorder{log: log, logger: logger, instance: hex.EncodeToString(b[:]), queue: make(chan store.HistoryEntry, queueSize),
		failed: failed, publish: publish, done: make(chan struct{})}
	if r.failed == nil {
		r.failed = func(int) {}
	}
	if r.publish == nil {
		r.publish = func(store.HistoryEntry) {}
	}
	go r.run()
	return r
}

// Record takes one change; it never blocks.
func (r *Recorder) Record(e store.HistoryEntry) {
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

func (r *Recorder) run() {
	defer close(r.done)
	for e := range r.queue {
		batch := []store.HistoryEntry{e}
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
		err := r.log.Append(ctx, batch)
		cancel()
		if err != nil {
			lost := len(batch)
			var partial *store.HistoryAppendError
			if errors.As(err, &partial) {
				lost -= partial.Written
			}
			r.failed(lost)
			r.logger.Warn("history entries lost: not written; the allocations stand", "entries", lost, "err", err)
		}
	}
}

// Stop writes what is queued and returns.
func (r *Recorder) Stop() {
	r.stopOnce.Do(func() { close(r.queue) })
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
	}
}

// HolderAt answers "who held slot at t": the key (and user) of the last
// change of slot at or before t that left a key on it, or "" when the
// last such change freed it. ok is false when the history knows nothing of
// slot before t.
func HolderAt(ctx context.Context, log store.HistoryLog, slot store.Slot, t time.Time) (e store.HistoryEntry, held, ok bool, err error) {
	found, err := log.Entries(ctx, store.HistoryQuery{Port: slot.Port, Space: slot.Space, Until: t, Limit: 1})
	if err != nil || len(found) == 0 {
		return store.HistoryEntry{}, false, false, err
	}
	return found[0], found[0].Holds(slot), true, nil
}

// Describe is one line of an entry, for the CLI and logs.
func Describe(e store.HistoryEntry) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %-9s %s", e.Time.Local().Format("2006-01-02 15:04:05"), e.Change, e.Key)
	port := func(n int, space store.Space) string {
		if space == store.UDP {
			return store.UDPPort(n).String()
		}
		return fmt.Sprint(n)
	}
	switch {
	case e.Port != 0 && e.OldPort != 0 && (e.Port != e.OldPort || e.Space() != e.OldSpace()):
		fmt.Fprintf(&b, " %s -> %s", port(e.OldPort, e.OldSpace()), port(e.Port, e.Space()))
	case e.Port != 0:
		fmt.Fprintf(&b, " %s", port(e.Port, e.Space()))
	case e.OldPort != 0:
		fmt.Fprintf(&b, " (was %s)", port(e.OldPort, e.OldSpace()))
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
