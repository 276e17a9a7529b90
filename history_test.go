package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/testenv"
)

// historyAllocator is an allocator on a real store of kind whose changes
// go to the store's history through a recorder; flush waits for them.
type historyAllocator struct {
	*allocator
	store    store.Store
	log      store.HistoryLog
	recorder *history.Recorder
}

func newHistoryAllocator(t *testing.T, kind, pool string, opts allocatorOptions) *historyAllocator {
	t.Helper()
	st := openTestStore(t, kind, t.TempDir())
	h := &historyAllocator{store: st, log: st.History()}
	h.recorder = history.NewRecorder(h.log, testLogger(t), func(int) { t.Error("history write failed") }, nil)
	opts.changed = h.recorder.Record
	h.allocator = newAllocatorOn(t, st, pool, opts)
	return h
}

// all stops the recorder (writing what it holds) and reads every entry,
// oldest first.
func (h *historyAllocator) all(t *testing.T) []store.HistoryEntry {
	t.Helper()
	h.recorder.Stop()
	got, err := h.log.Entries(context.Background(), store.HistoryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	slices.Reverse(got)
	return got
}

func describeAll(es []store.HistoryEntry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%s %s port=%d old=%d victim=%s by=%s note=%q\n", e.Change, e.Key, e.Port, e.OldPort, e.Victim, e.By, e.Note)
	}
	return b.String()
}

// TestHistoryEveryChange: each kind of change leaves one entry with who
// caused it; sticky hits leave none.
func TestHistoryEveryChange(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			now, advance := fakeClock(time.Date(2026, 3, 3, 14, 0, 0, 0, time.UTC))
			pol := mustPolicy(t, "", "30000-30003", 0, time.Hour)
			h := newHistoryAllocator(t, kind, "30000-30003", allocatorOptions{policy: pol, now: now})
			r := req("alice", "alice.ssh", "tcp")
			r.ReqID = "r1"
			mustAllocate(t, h.allocator, r)
			for range 100 { // a reconnect storm: hits, not changes
				mustAllocate(t, h.allocator, r)
			}
			asks := req("alice", "alice.web", "tcp")
			asks.RemotePort, asks.ReqID = 30002, "r2"
			mustAllocate(t, h.allocator, asks)
			asks.RemotePort = 30003
			mustAllocate(t, h.allocator, asks) // moved
			note := "Bob's NAS"
			if _, err := h.assign("bob.nas", 30001, "", operatorChange{note: &note, by: "admin 127.0.0.1:1"}); err != nil {
				t.Fatal(err)
			}
			mustAllocate(t, h.allocator, req("bob", "bob.nas", "tcp")) // filled in
			if _, err := h.setNote("bob.nas", "Bob's new NAS", "admin 127.0.0.1:1"); err != nil {
				t.Fatal(err)
			}
			if err := h.release("alice.web", "admin 127.0.0.1:2"); err != nil {
				t.Fatal(err)
			}
			if _, err := h.importAll([]store.Record{{Key: "carol.x", Port: 30002, User: "carol", ProxyType: "tcp"}}, store.HistImported, "admin 127.0.0.1:3"); err != nil {
				t.Fatal(err)
			}
			advance(2 * time.Hour)
			mustAllocate(t, h.allocator, req("bob", "bob.nas", "tcp")) // alice.ssh is not seen again
			mustAllocate(t, h.allocator, req("carol", "carol.x", "tcp"))
			r = req("dave", "dave.p", "tcp")
			r.ReqID = "r9"
			mustAllocate(t, h.allocator, r)                            // the last free port
			mustAllocate(t, h.allocator, req("erin", "erin.p", "tcp")) // the pool is full: reclaims alice.ssh

			got := describeAll(h.all(t))
			want := strings.Join([]string{
				`new alice.ssh port=30000 old=0 victim= by=frps reqid=r1 note=""`,
				`requested alice.web port=30002 old=0 victim= by=frps reqid=r2 note=""`,
				`moved alice.web port=30003 old=30002 victim= by=frps reqid=r2 note=""`,
				`assigned bob.nas port=30001 old=0 victim= by=admin 127.0.0.1:1 note="Bob's NAS"`,
				`filled_in bob.nas port=30001 old=0 victim= by=frps reqid= note="Bob's NAS"`,
				`noted bob.nas port=30001 old=0 victim= by=admin 127.0.0.1:1 note="Bob's new NAS"`,
				`released alice.web port=0 old=30003 victim= by=admin 127.0.0.1:2 note=""`,
				`imported carol.x port=30002 old=0 victim= by=admin 127.0.0.1:3 note=""`,
				`new dave.p port=30003 old=0 victim= by=frps reqid=r9 note=""`,
				`reclaimed erin.p port=30000 old=0 victim=alice.ssh by=frps reqid= note=""`,
			}, "\n") + "\n"
			if got != want {
				t.Fatalf("history:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

// TestHistoryPortAt answers "who held port N at T" right at the second a
// port changed hands, and "free" after a release.
func TestHistoryPortAt(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t0 := time.Date(2026, 3, 3, 14, 0, 0, 0, time.UTC)
			now, advance := fakeClock(t0)
			h := newHistoryAllocator(t, kind, "30000-30009", allocatorOptions{now: now})
			asks := req("alice", "alice.ssh", "tcp")
			asks.RemotePort = 30005
			mustAllocate(t, h.allocator, asks) // t0: alice
			advance(time.Hour)
			if err := h.release("alice.ssh", "admin"); err != nil { // t0+1h: free
				t.Fatal(err)
			}
			advance(time.Hour)
			if _, err := h.assign("bob.nas", 30005, "", operatorChange{by: "admin"}); err != nil { // t0+2h: bob
				t.Fatal(err)
			}
			h.recorder.Stop()
			tests := []struct {
				at   time.Time
				held bool
				key  string
			}{
				{t0.Add(-time.Second), false, ""},
				{t0, true, "alice.ssh"},
				{t0.Add(time.Hour - time.Nanosecond), true, "alice.ssh"},
				{t0.Add(time.Hour), false, ""},
				{t0.Add(2*time.Hour - time.Second), false, ""},
				{t0.Add(2 * time.Hour), true, "bob.nas"},
				{t0.Add(48 * time.Hour), true, "bob.nas"},
			}
			for _, tt := range tests {
				e, held, _, err := history.HolderAt(context.Background(), h.log, store.TCPPort(30005), tt.at)
				if err != nil || held != tt.held || (held && e.Key != tt.key) {
					t.Errorf("port 30005 at %s: held %v by %q (%v); want %v by %q", tt.at.Format(time.RFC3339Nano), held, e.Key, err, tt.held, tt.key)
				}
			}
		})
	}
}

// TestHistoryFileTornLine: a crash mid-append tears only the last line; a
// read skips it, and the next append starts a line of its own.
func TestHistoryFileTornLine(t *testing.T) {
	dir := t.TempDir()
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	log := st.History()
	at := time.Date(2026, 3, 3, 14, 5, 0, 0, time.UTC)
	entry := func(i int) store.HistoryEntry {
		return store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", at.Add(time.Duration(i)*time.Second).UnixNano(), i),
			Time: at.Add(time.Duration(i) * time.Second), Key: fmt.Sprintf("k%d", i), Port: 30000 + i, Change: store.HistNew}
	}
	if err := log.Append(context.Background(), []store.HistoryEntry{entry(1), entry(2)}); err != nil {
		t.Fatal(err)
	}
	month := filepath.Join(dir, file.HistoryDir, "2026-03.jsonl")
	f, err := os.OpenFile(month, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"id":"0000000000000000003-x-000003","time":"2026-03-03T14:0`) // torn by a crash
	f.Close()

	store2 := newTestStore(t, dir)
	log = store2.History()
	if err := log.Append(context.Background(), []store.HistoryEntry{entry(4)}); err != nil {
		t.Fatal(err)
	}
	got, err := log.Entries(context.Background(), store.HistoryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, e := range got {
		keys = append(keys, e.Key)
	}
	if strings.Join(keys, ",") != "k4,k2,k1" {
		t.Fatalf("entries after a torn line: %v; want k4,k2,k1", keys)
	}
}

// watchedHistory watches what a file history does to its files: the
// lines it writes, its syncs, and how many lines each sync made durable.
// With hold set, the first open of a month file waits until hold is
// closed, so what is recorded meanwhile queues up behind that batch.
type watchedHistory struct {
	hold    chan struct{}
	mu      sync.Mutex
	written map[string]int // lines written to each file
	synced  map[string]int // lines written to each file before its last sync
	syncs   map[string]int // syncs of each file and directory
	events  []string       // "write NAME", "sync NAME", in order
}

func watchHistory(h *file.History) *watchedHistory {
	w := &watchedHistory{written: map[string]int{}, synced: map[string]int{}, syncs: map[string]int{}}
	open, held := h.OpenFile, false
	h.OpenFile = func(name string, flag int) (file.FileHandle, error) {
		if w.hold != nil && !held && strings.HasSuffix(name, ".jsonl") {
			held = true // appends are serialized: no lock needed
			<-w.hold
		}
		f, err := open(name, flag)
		if err != nil {
			return nil, err
		}
		return &watchedFile{FileHandle: f, name: name, w: w}, nil
	}
	return w
}

func (w *watchedHistory) get(read func() int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return read()
}

type watchedFile struct {
	file.FileHandle
	name string
	w    *watchedHistory
}

func (f *watchedFile) Write(p []byte) (int, error) {
	n, err := f.FileHandle.Write(p)
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	f.w.written[f.name] += bytes.Count(p[:n], []byte("\n"))
	f.w.events = append(f.w.events, "write "+f.name)
	return n, err
}

func (f *watchedFile) Sync() error {
	err := f.FileHandle.Sync()
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	if err == nil {
		f.w.synced[f.name] = f.w.written[f.name]
		f.w.syncs[f.name]++
		f.w.events = append(f.w.events, "sync "+f.name)
	}
	return err
}

// TestHistoryFileSyncsEachBatch: each batch of history is made durable by
// one fsync of its month file (and of each directory it created), so a
// burst of changes costs a few fsyncs, not one a change, and every change
// is on disk soon after it was recorded.
func TestHistoryFileSyncsEachBatch(t *testing.T) {
	dir := t.TempDir()
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	h := st.History().(*file.History)
	w := watchHistory(h)
	w.hold = make(chan struct{})
	rec := history.NewRecorder(h, testLogger(t), func(n int) { t.Errorf("%d history entries not written", n) }, nil)
	defer rec.Stop()
	at := time.Date(2026, 3, 3, 14, 5, 0, 0, time.UTC)
	const burst = 2000
	start := time.Now()
	for i := range burst {
		rec.Record(store.HistoryEntry{Time: at, Key: fmt.Sprintf("k%d", i), Port: 30000 + i%1000, Change: store.HistNew})
	}
	close(w.hold)
	month := filepath.Join(file.HistoryDir, "2026-03.jsonl")
	waitFor(t, "every entry of the burst to be synced", 10*time.Second, func() bool {
		return w.get(func() int { return w.synced[month] }) == burst
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	t.Logf("%d entries synced by %d fsyncs %v after the burst began", burst, w.syncs[month], time.Since(start))
	// At most the batch held open, then full batches of 512.
	if n := w.syncs[month]; n > 1+(burst-1+511)/512 {
		t.Errorf("%d fsyncs of %s for %d entries in a burst; want one a batch", n, month, burst)
	}
	// The new directory and the new month file are durable before the
	// first entry is written into them.
	firstWrite := slices.Index(w.events, "write "+month)
	if i := slices.Index(w.events, "sync ."); i < 0 || i > firstWrite || w.syncs["."] != 1 {
		t.Errorf("the data directory was not synced once, before the first write, after the history directory was made: %v", w.events[:firstWrite+1])
	}
	if i := slices.Index(w.events, "sync "+file.HistoryDir); i < 0 || i > firstWrite || w.syncs[file.HistoryDir] != 1 {
		t.Errorf("the history directory was not synced once, before the first write, after the month file was made: %v", w.events[:firstWrite+1])
	}
	if got, err := h.Entries(context.Background(), store.HistoryQuery{}); err != nil || len(got) != burst {
		t.Errorf("%d entries readable (%v); want %d", len(got), err, burst)
	}
}

// TestHistoryFileTornAppendOnFullDisk: an append that a full disk tears
// part-way is taken back whole and counted as lost; once space is back
// the next changes are written whole, and "who held port N at T" is right.
func TestHistoryFileTornAppendOnFullDisk(t *testing.T) {
	disk := mountTmpfs(t, "1m")
	dir := filepath.Join(disk, "data")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	log := st.History()
	var lost atomic.Int64
	record := func(es ...store.HistoryEntry) {
		rec := history.NewRecorder(log, testLogger(t), func(n int) { lost.Add(int64(n)) }, nil)
		for _, e := range es {
			rec.Record(e)
		}
		rec.Stop() // writes what it holds
	}
	t0 := time.Date(2026, 3, 3, 14, 0, 0, 0, time.UTC)
	record(store.HistoryEntry{Time: t0, Key: "k1", Port: 30001, Change: store.HistNew},
		store.HistoryEntry{Time: t0.Add(time.Second), Key: "k2", Port: 30002, Change: store.HistNew})
	month := filepath.Join(dir, file.HistoryDir, "2026-03.jsonl")
	fi, err := os.Stat(month)
	if err != nil {
		t.Fatal(err)
	}
	room := 4096 - fi.Size()%4096 // what the file's last page still holds
	fillDisk(t, disk)
	// A change whose line is longer than that room is torn part-way.
	record(store.HistoryEntry{Time: t0.Add(time.Minute), Key: "k9", Port: 30009, Change: store.HistNew, Note: strings.Repeat("x", int(room))})
	if n := lost.Load(); n != 1 {
		t.Fatalf("%d entries counted as lost on a full disk; want 1", n)
	}
	if after, _ := os.Stat(month); after.Size() != fi.Size() {
		t.Errorf("the history file is %d bytes after the torn append; want it taken back to %d", after.Size(), fi.Size())
	}
	filler, _ := filepath.Glob(filepath.Join(disk, "filler*"))
	for _, f := range filler {
		os.Remove(f)
	}
	record(store.HistoryEntry{Time: t0.Add(2 * time.Minute), Key: "k1", OldPort: 30001, Change: store.HistReleased},
		store.HistoryEntry{Time: t0.Add(3 * time.Minute), Key: "k3", Port: 30003, Change: store.HistNew})

	if n := lost.Load(); n != 1 {
		t.Errorf("%d entries counted as lost; want 1 (the torn one)", n)
	}
	got, err := log.Entries(context.Background(), store.HistoryQuery{})
	if err != nil {
		t.Fatal(err)
	}
	slices.Reverse(got)
	want := "new k1 port=30001 old=0 victim= by= note=\"\"\n" +
		"new k2 port=30002 old=0 victim= by= note=\"\"\n" +
		"released k1 port=0 old=30001 victim= by= note=\"\"\n" +
		"new k3 port=30003 old=0 victim= by= note=\"\"\n"
	if describeAll(got) != want {
		t.Errorf("history after a torn append:\n%swant every acknowledged entry:\n%s", describeAll(got), want)
	}
	for _, c := range []struct {
		port     int
		at       time.Time
		held, ok bool
		key      string
	}{
		{30001, t0.Add(90 * time.Second), true, true, "k1"},
		{30001, t0.Add(150 * time.Second), false, true, ""}, // released
		{30003, t0.Add(time.Hour), true, true, "k3"},
		{30009, t0.Add(time.Hour), false, false, ""}, // never written
	} {
		e, held, ok, err := history.HolderAt(context.Background(), log, store.TCPPort(c.port), c.at)
		if err != nil || held != c.held || ok != c.ok || (held && e.Key != c.key) {
			t.Errorf("who held %d at %s: %s held=%v known=%v (%v); want %q held=%v known=%v",
				c.port, c.at.Format(time.TimeOnly), e.Key, held, ok, err, c.key, c.held, c.ok)
		}
	}
}

// tornFile tears every write in half and cannot be truncated, as a disk
// failing part-way through an append might.
type tornFile struct{ file.FileHandle }

func (f tornFile) Write(p []byte) (int, error) {
	n, _ := f.FileHandle.Write(p[:len(p)/2])
	return n, syscall.ENOSPC
}
func (f tornFile) Truncate(int64) error { return syscall.EIO }

// TestHistoryFileTornAppendEndedNextTime: a torn append that cannot be
// taken back is ended by the next append of the same run, so that next
// entry starts a line of its own and is not lost.
func TestHistoryFileTornAppendEndedNextTime(t *testing.T) {
	dir := t.TempDir()
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	h := st.History().(*file.History)
	t0 := time.Date(2026, 3, 3, 14, 0, 0, 0, time.UTC)
	entry := func(i int, key string, port, old int, change store.HistoryChange) store.HistoryEntry {
		when := t0.Add(time.Duration(i) * time.Minute)
		return store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", when.UnixNano(), i), Time: when, Key: key, Port: port, OldPort: old, Change: change}
	}
	if err := h.Append(context.Background(), []store.HistoryEntry{entry(1, "k1", 30001, 0, store.HistNew)}); err != nil {
		t.Fatal(err)
	}
	open := h.OpenFile
	h.OpenFile = func(name string, flag int) (file.FileHandle, error) {
		f, err := open(name, flag)
		if err == nil && strings.HasSuffix(name, ".jsonl") {
			return tornFile{f}, nil
		}
		return f, err
	}
	if err := h.Append(context.Background(), []store.HistoryEntry{entry(2, "k9", 30009, 0, store.HistNew)}); !errors.Is(err, store.ErrFull) {
		t.Fatalf("a torn append returned %v; want the full disk", err)
	}
	h.OpenFile = open
	if err := h.Append(context.Background(), []store.HistoryEntry{entry(3, "k1", 0, 30001, store.HistReleased)}); err != nil {
		t.Fatal(err)
	}
	got, _ := h.Entries(context.Background(), store.HistoryQuery{})
	if len(got) != 2 || got[0].Change != store.HistReleased || got[1].Change != store.HistNew {
		t.Fatalf("history after a torn append that stayed:\n%s", describeAll(got))
	}
	if _, held, _, err := history.HolderAt(context.Background(), h, store.TCPPort(30001), t0.Add(4*time.Minute)); err != nil || held {
		t.Fatalf("port 30001 after its release: held=%v (%v); want free", held, err)
	}
}

// fullFile fails every write before writing anything.
type fullFile struct{ file.FileHandle }

func (fullFile) Write([]byte) (int, error) { return 0, syscall.ENOSPC }

// TestHistoryFileCrashTornLineEndedAfterFailure: the newline that ends a
// line torn by a crash goes with the append that failed; the next append
// ends that line again instead of gluing its entry onto it.
func TestHistoryFileCrashTornLineEndedAfterFailure(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, file.HistoryDir), 0o700); err != nil {
		t.Fatal(err)
	}
	torn := `{"id":"0000000000000000001-x-000001","time":"2026-03-03T14:0` // a crash tore it
	if err := os.WriteFile(filepath.Join(dir, file.HistoryDir, "2026-03.jsonl"), []byte(torn), 0o600); err != nil {
		t.Fatal(err)
	}
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	h := st.History().(*file.History)
	at := time.Date(2026, 3, 3, 14, 5, 0, 0, time.UTC)
	entry := store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", at.UnixNano(), 2), Time: at, Key: "k2", Port: 30002, Change: store.HistNew}
	open := h.OpenFile
	h.OpenFile = func(name string, flag int) (file.FileHandle, error) {
		f, err := open(name, flag)
		if err == nil && strings.HasSuffix(name, ".jsonl") {
			return fullFile{f}, nil
		}
		return f, err
	}
	if err := h.Append(context.Background(), []store.HistoryEntry{entry}); !errors.Is(err, store.ErrFull) {
		t.Fatalf("an append on a full disk returned %v; want the full disk", err)
	}
	h.OpenFile = open
	if err := h.Append(context.Background(), []store.HistoryEntry{entry}); err != nil {
		t.Fatal(err)
	}
	if got, _ := h.Entries(context.Background(), store.HistoryQuery{}); len(got) != 1 || got[0].Key != "k2" {
		t.Fatalf("history after a failed append behind a torn line:\n%swant k2", describeAll(got))
	}
}

// TestHistoryLostCountedExactly: a batch whose second month file cannot be
// written counts only that month's entries as lost; the first month's are
// written and readable.
func TestHistoryLostCountedExactly(t *testing.T) {
	dir := t.TempDir()
	st := newTestStore(t, dir)
	if _, err := st.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	h := st.History().(*file.History)
	w := watchHistory(h)
	w.hold = make(chan struct{})
	open := h.OpenFile
	h.OpenFile = func(name string, flag int) (file.FileHandle, error) {
		if strings.HasSuffix(name, "2026-03.jsonl") {
			return nil, syscall.EIO
		}
		return open(name, flag)
	}
	var lost atomic.Int64
	rec := history.NewRecorder(h, testLogger(t), func(n int) { lost.Add(int64(n)) }, nil)
	feb, mar := time.Date(2026, 2, 28, 23, 59, 0, 0, time.UTC), time.Date(2026, 3, 1, 0, 1, 0, 0, time.UTC)
	for i, when := range []time.Time{feb, feb, feb, mar, mar, mar} {
		rec.Record(store.HistoryEntry{Time: when.Add(time.Duration(i) * time.Second), Key: fmt.Sprintf("k%d", i), Port: 30000 + i, Change: store.HistNew})
	}
	close(w.hold) // the first batch held the others back: one batch spans both months
	rec.Stop()
	if n := lost.Load(); n != 3 {
		t.Errorf("%d entries counted as lost; want 3 (March's)", n)
	}
	if got, _ := h.Entries(context.Background(), store.HistoryQuery{}); len(got) != 3 {
		t.Errorf("readable after March failed:\n%swant February's 3", describeAll(got))
	}
}

// TestHistoryPrune: entries older than the retention go, newer stay, on
// every store (etcd's under history/ in the prefix).
func TestHistoryPrune(t *testing.T) {
	var etcdSrv *testenv.EtcdServer
	for _, kind := range append(storeKinds, "etcd") {
		t.Run(kind, func(t *testing.T) {
			var st store.Store
			if kind == "etcd" {
				etcdSrv = testenv.StartEtcd(t, nil)
				st = openTestEtcdStore(t, etcdSrv, "/history-test/")
			} else {
				st = openTestStore(t, kind, t.TempDir())
			}
			if _, err := st.Load(context.Background()); err != nil {
				t.Fatal(err)
			}
			log := st.History()
			var es []store.HistoryEntry
			for i, when := range []time.Time{
				time.Date(2025, 1, 10, 0, 0, 0, 0, time.UTC), time.Date(2025, 2, 10, 0, 0, 0, 0, time.UTC),
				time.Date(2026, 2, 10, 0, 0, 0, 0, time.UTC), time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC),
			} {
				es = append(es, store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", when.UnixNano(), i), Time: when, Key: fmt.Sprintf("k%d", i), Port: 30000, Change: store.HistNew})
			}
			if err := log.Append(context.Background(), es); err != nil {
				t.Fatal(err)
			}
			n, err := log.Prune(context.Background(), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
			if err != nil || n != 2 {
				t.Fatalf("prune = %d, %v; want 2", n, err)
			}
			got, _ := log.Entries(context.Background(), store.HistoryQuery{})
			if len(got) != 2 || got[0].Key != "k3" || got[1].Key != "k2" {
				t.Fatalf("after pruning: %s", describeAll(got))
			}
			if e, held, _, err := history.HolderAt(context.Background(), log, store.TCPPort(30000), time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)); err != nil || !held || e.Key != "k2" {
				t.Fatalf("port 30000 on 2026-03-01: %+v held %v (%v); want k2", e, held, err)
			}
			if page, _ := log.Entries(context.Background(), store.HistoryQuery{Before: got[0].ID}); len(page) != 1 || page[0].Key != "k2" {
				t.Fatalf("the page before %s: %s", got[0].ID, describeAll(page))
			}
		})
	}
}

// webhookReceiver is a real local HTTP receiver that verifies signatures,
// fails the first failFirst deliveries with 500, and records the rest.
type webhookReceiver struct {
	*httptest.Server
	mu        sync.Mutex
	got       []store.HistoryEntry
	attempts  int
	failFirst int
	badSig    int
}

func newWebhookReceiver(t *testing.T, secret string, failFirst int) *webhookReceiver {
	w := &webhookReceiver{failFirst: failFirst}
	w.Server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mac := hmac.New(sha256New(), []byte(secret))
		mac.Write(body)
		want := "sha256=" + hex.EncodeToString(mac.Sum(nil))
		w.mu.Lock()
		defer w.mu.Unlock()
		w.attempts++
		if r.Header.Get(signatureHeader) != want {
			w.badSig++
			rw.WriteHeader(http.StatusUnauthorized)
			return
		}
		if w.attempts <= w.failFirst {
			rw.WriteHeader(http.StatusInternalServerError)
			return
		}
		var e store.HistoryEntry
		json.Unmarshal(body, &e)
		w.got = append(w.got, e)
	}))
	t.Cleanup(w.Close)
	return w
}

func (w *webhookReceiver) entries() []store.HistoryEntry {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.got)
}

// TestWebhooks: every change reaches a real receiver, signed, in order,
// after the receiver's 500s; a receiver that hangs does not hold up plugin
// answers, and a full queue drops its oldest entries, counted.
func TestWebhooks(t *testing.T) {
	rcv := newWebhookReceiver(t, "s3cret", 3)
	hang := make(chan struct{})
	dead := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { <-hang }))
	t.Cleanup(func() { close(hang); dead.Close() })
	s := startInProc(t, "-data-dir", t.TempDir(), "-allow-ports", "30000-30099", "-probe=false",
		"-notify-url", rcv.URL, "-notify-url", dead.URL, "-notify-secret", "s3cret")
	var want []string
	for i := range 20 {
		name := fmt.Sprintf("u.p%d", i%5)
		extra := ""
		if i >= 5 {
			extra = fmt.Sprintf(`"remote_port":%d`, 30050+i)
		}
		start := time.Now()
		_, body := s.post(t, "NewProxy", fmt.Sprintf("r%d", i), []byte(newProxyBody("u", name, "tcp", extra)))
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("plugin answer took %v with a hanging receiver", took)
		}
		want = append(want, fmt.Sprintf("%s:%d", name, portOfRaw(t, body)))
	}
	waitFor(t, "20 deliveries", 30*time.Second, func() bool { return len(rcv.entries()) >= 20 })
	var got []string
	for _, e := range rcv.entries() {
		got = append(got, fmt.Sprintf("%s:%d", e.Key, e.Port))
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("delivered in this order:\n%v\nwant:\n%v", got, want)
	}
	rcv.mu.Lock()
	attempts, bad := rcv.attempts, rcv.badSig
	rcv.mu.Unlock()
	if bad != 0 || attempts != 23 {
		t.Fatalf("receiver saw %d attempts (%d badly signed); want 23 (3 failures retried)", attempts, bad)
	}
	metrics := s.get(t, "/metrics")
	for _, m := range []string{"frp_port_keeper_notify_delivered_total 20", "frp_port_keeper_notify_failed_total", "frp_port_keeper_notify_queue_length"} {
		if !strings.Contains(metrics, m) {
			t.Errorf("metrics lack %q", m)
		}
	}
}

// TestNotifierDropsOldest: a full queue drops its oldest entry and counts it.
func TestNotifierDropsOldest(t *testing.T) {
	dropped := 0
	n := newNotifier("http://127.0.0.1:1", "", testLogger(t), &notifyStats{delivered: func() {}, failed: func() {}, dropped: func() { dropped++ }})
	n.max = 3
	for i := range 5 {
		n.enqueue(store.HistoryEntry{ID: fmt.Sprint(i)})
	}
	if dropped != 2 || n.length() != 3 || n.queue[0].ID != "2" {
		t.Fatalf("dropped %d, queue %d from %s; want 2 dropped, 3 left from 2", dropped, n.length(), n.queue[0].ID)
	}
}

// TestWatchAndHistoryCLI: the watch command prints changes as they happen
// (from /api/events), history answers the abuse question, and notes show
// through every surface: assign -note, note, list, show, the page, export,
// import, and they survive a move.
func TestWatchAndHistoryCLI(t *testing.T) {
	dir := t.TempDir()
	s := startInProc(t, "-data-dir", dir, "-allow-ports", "30000-30099", "-probe=false")
	srv := []string{"-server", s.url}
	ctx, cancel := context.WithCancel(context.Background())
	var watchOut syncBuffer
	watched := make(chan error, 1)
	go func() {
		watched <- run(ctx, append([]string{"watch"}, srv...), func(string) string { return "" }, &watchOut, &watchOut)
	}()
	// The stream opens in the background: a change made before it did is
	// not streamed (it is in the history), so make changes until one shows.
	seenLine := ""
	waitFor(t, "watch to print a change", 10*time.Second, func() bool {
		name := fmt.Sprintf("alice.w%d", time.Now().UnixNano())
		_, body := s.post(t, "NewProxy", "r1", []byte(newProxyBody("alice", name, "tcp", "")))
		want := fmt.Sprintf("new       %s %d user=alice", name, portOfRaw(t, body))
		time.Sleep(100 * time.Millisecond)
		if strings.Contains(watchOut.String(), want) {
			seenLine = want
		}
		return seenLine != ""
	})
	cancel()
	<-watched
	_, body := s.post(t, "NewProxy", "r1", []byte(newProxyBody("alice", "alice.ssh", "tcp", "")))
	portOfRaw(t, body)

	cli := func(args ...string) string {
		t.Helper()
		stdout, stderr, err := runCLI(nil, append(args, srv...)...)
		if err != nil {
			t.Fatalf("%v: %v\n%s%s", args, err, stdout, stderr)
		}
		return stdout + stderr
	}
	out := cli("assign", "-note", "Bob's NAS", "bob.nas", "30042")
	if !strings.Contains(out, "pinned") || !strings.Contains(out, "registers again") {
		t.Fatalf("assign said %q; want it to say the pin and when it takes effect", out)
	}
	cli("note", "alice.ssh", "Alice's phone")
	asks := newProxyBody("bob", "bob.nas", "tcp", "")
	s.post(t, "NewProxy", "r2", []byte(asks))
	cli("assign", "bob.nas", "30043") // a move keeps the note
	for _, want := range []string{`"Bob's NAS"`, `"Alice's phone"`, "pinned"} {
		if out := cli("list"); !strings.Contains(out, want) {
			t.Errorf("list lacks %s:\n%s", want, out)
		}
	}
	if out := cli("show", "bob.nas"); !strings.Contains(out, `"note": "Bob's NAS"`) || !strings.Contains(out, `"port": 30043`) {
		t.Errorf("show bob.nas:\n%s", out)
	}
	if page := s.get(t, "/"); !strings.Contains(page, "Bob&#39;s NAS") {
		t.Errorf("the page lacks the note")
	}
	for path, wants := range map[string][]string{
		"/history?key=bob.nas":  {"<td>assigned</td>", "<td>filled_in</td>", "Bob&#39;s NAS", `href="/history?port=30043&amp;proto=tcp"`},
		"/history?port=30042":   {"<td>assigned</td>", "bob.nas"},
		"/":                     {`href="/history?key=bob.nas"`},
		"/history?port=70000x":  {"port must be 1-65535"},
		"/history?key=nobody.x": {"No changes recorded for nobody.x"},
	} {
		page := s.get(t, path)
		for _, want := range wants {
			if !strings.Contains(page, want) {
				t.Errorf("GET %s lacks %q", path, want)
			}
		}
	}
	export := s.get(t, "/api/export")
	if !strings.Contains(export, `"note":"Bob's NAS"`) {
		t.Fatalf("export lacks the note: %s", export)
	}
	out = cli("history", "-port", "30042", "-at", time.Now().Format(time.RFC3339Nano))
	if !strings.Contains(out, "port 30042/tcp at") || !strings.Contains(out, "free") {
		t.Errorf("history -port 30042 -at now:\n%s", out)
	}
	out = cli("history", "-port", "30043", "-at", time.Now().Add(time.Second).Format(time.RFC3339Nano))
	if !strings.Contains(out, "bob.nas (user bob)") {
		t.Errorf("history -port 30043 -at now:\n%s", out)
	}
	out = cli("history", "-key", "bob.nas")
	for _, want := range []string{"assigned  bob.nas 30042", "filled_in bob.nas 30042", "assigned  bob.nas 30042 -> 30043"} {
		if !strings.Contains(out, want) {
			t.Errorf("history -key bob.nas lacks %q:\n%s", want, out)
		}
	}
	s.stop(t)

	// The note round-trips through export and import into a new directory.
	dir2 := t.TempDir()
	var in bytes.Buffer
	in.WriteString(export)
	exportFileName := filepath.Join(t.TempDir(), "export.json")
	os.WriteFile(exportFileName, in.Bytes(), 0o600)
	if stdout, stderr, err := runCLI(nil, "import", "-data-dir", dir2, exportFileName); err != nil {
		t.Fatalf("import: %v %s%s", err, stdout, stderr)
	}
	a := newTestAllocator(t, dir2, "30000-30099", allocatorOptions{})
	if v, ok := a.find("bob.nas"); !ok || v.Note != "Bob's NAS" || v.Port != 30043 {
		t.Fatalf("imported bob.nas = %+v", v)
	}
}

// get fetches path from the server (from loopback, so admin routes answer).
func (s *inProcServer) get(t testing.TB, path string) string {
	t.Helper()
	resp, err := s.client.Get(s.url + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

func sha256New() func() hash.Hash { return sha256.New }
