package main

// Micro-benchmarks of issue 6: the sticky-hit path of the HTTP handler, and
// the allocator's hit and fresh paths with 0, 10,000 and 50,000 existing
// allocations in a file store; of issue 9: one admin listing of 64,000
// allocations; and of issue 15: fresh claims into a durable file store,
// the same without fsyncs, and bbolt. Run them with
//
//	go test -run XXX -bench . -benchmem
//
// or with everything else through `make bench` (bench/run.sh), which also
// runs the load tool and writes BENCHMARKS.md. Every helper here starts with
// "bench" so it cannot collide with the helpers of the other test files.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store/bolt"
	"frp-port-keeper/internal/store/file"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"

	"go.etcd.io/bbolt"
)

// benchPool is the widest pool a server can have: 64,512 ports.
const benchPool = "1024-65535"

// benchLogger formats every line like the real server does, then drops it:
// the cost of the per-decision log line is part of what is measured.
func benchLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// benchRequest is a reusable plugin request: serve rewinds its body and
// sends it again.
type benchRequest struct {
	req  *http.Request
	body []byte
	rd   *bytes.Reader
}

func newBenchRequest(body []byte) *benchRequest {
	rd := bytes.NewReader(body)
	req := httptest.NewRequest("POST", pluginPath+"?version=0.1.0&op=NewProxy", rd)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Frp-Reqid", "bench")
	return &benchRequest{req: req, body: body, rd: rd}
}

func (r *benchRequest) serve(h http.Handler) (*httptest.ResponseRecorder, error) {
	r.rd.Reset(r.body)
	r.req.Body = io.NopCloser(r.rd)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r.req)
	if rec.Code != http.StatusOK {
		return rec, fmt.Errorf("status %d: %s", rec.Code, rec.Body.String())
	}
	return rec, nil
}

// mustServe is serve for the benchmark's own goroutine.
func (r *benchRequest) mustServe(b *testing.B, h http.Handler) *httptest.ResponseRecorder {
	b.Helper()
	rec, err := r.serve(h)
	if err != nil {
		b.Fatal(err)
	}
	return rec
}

// BenchmarkHandlerStickyHit is one frps NewProxy for a key that already has
// its port: body read, request decoded, allocator hit, answer patched and
// written, log line formatted, metrics counted.
func BenchmarkHandlerStickyHit(b *testing.B) {
	a := newTestAllocator(b, benchDataRoot(b), benchPool, allocatorOptions{log: benchLogger()})
	h := newServer(a, benchLogger(), serverOptions{})
	r := newBenchRequest([]byte(newProxyBody("alice", "alice.ssh", "tcp", "")))
	port := portOf(b, r.mustServe(b, h).Body.String()) // the first request allocates
	want := fmt.Appendf(nil, `"remote_port":%d}}`, port)
	if body := r.mustServe(b, h).Body.Bytes(); !bytes.HasSuffix(body, want) {
		b.Fatalf("sticky answer %s: want it to end in %s", body, want)
	}
	b.ReportAllocs()
	for b.Loop() {
		r.mustServe(b, h)
	}
}

// BenchmarkHandlerStickyHitParallel is the same with every core busy, each
// goroutine on a key of its own (the RWMutex read path under contention).
func BenchmarkHandlerStickyHitParallel(b *testing.B) {
	a := newTestAllocator(b, benchDataRoot(b), benchPool, allocatorOptions{log: benchLogger()})
	h := newServer(a, benchLogger(), serverOptions{})
	const keys = 256
	bodies := make([][]byte, keys)
	for i := range bodies {
		bodies[i] = []byte(newProxyBody("alice", fmt.Sprintf("alice.p%03d", i), "tcp", ""))
		newBenchRequest(bodies[i]).mustServe(b, h) // allocate outside the timer
	}
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := newBenchRequest(bodies[int(next.Add(1)-1)%keys])
		for pb.Next() {
			if _, err := r.serve(h); err != nil {
				b.Error(err) // not Fatal: this is not the benchmark's goroutine
				return
			}
		}
	})
}

// benchSeed writes the allocations bench-seed-<i> on port 1024+i for i in
// [from, to) straight through the store, as the import command does, with a
// few writers at once: seeding is setup, not what is measured.
func benchSeed(b *testing.B, dir string, from, to int) {
	b.Helper()
	if to <= from {
		return
	}
	start := time.Now()
	kv := newFileKV(b, dir)
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const writers = 4
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := from + w; i < to; i += writers {
				key := benchSeedKey(i)
				r := store.Record{Key: key, Port: 1024 + i, User: "seed", ProxyName: key, ProxyType: "tcp",
					CreatedAt: created, AssignedAt: created}
				// A committed allocation as the file store writes it.
				if err := kv.Set(local.PortName(store.TCPPort(r.Port)), r); err != nil {
					errs <- err
					return
				}
				if err := kv.Set(local.KeyName(r.Key), r); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatalf("seeding: %v", err)
	}
	b.Logf("seeded allocations %d-%d in %v", from, to-1, time.Since(start).Round(time.Millisecond))
}

func benchSeedKey(i int) string { return fmt.Sprintf("bench-seed-%06d", i) }

// benchFreshBatch is how many fresh keys a fresh benchmark adds to one
// copy of the store before it goes on in a new copy (outside the timer),
// so the store keeps its size whatever b.N is, and the pool never runs
// dry. Nothing is released: a deletion makes the next file creations slow
// on an ext4 without a journal (see bench/misses.md).
const benchFreshBatch = 1000

// benchFreshKeys numbers fresh keys across sub-benchmarks and -count runs.
var benchFreshKeys atomic.Int64

// BenchmarkAllocator measures, over a file store that already holds 0,
// 10,000 and 50,000 allocations: load, what the server does at start
// (newAllocator: read and check every record file, build the maps);
// allocate() for a key that has its port (hit); and allocate() for a key
// that has none (fresh: port search, two record files written before the
// answer, into a hard-linked copy of the store). The store grows in place
// from one size to the next.
func BenchmarkAllocator(b *testing.B) {
	dir := benchDataRoot(b)
	seeded := 0
	for _, n := range []int{0, 10000, 50000} {
		benchSeed(b, dir, seeded, n)
		seeded = n
		b.Run(fmt.Sprintf("existing=%d/load", n), func(b *testing.B) { benchLoad(b, dir, n) })
		a := newTestAllocator(b, dir, benchPool, allocatorOptions{log: benchLogger()})
		if got := len(a.byKey); got != n {
			b.Fatalf("allocator loaded %d allocations; want %d", got, n)
		}

		b.Run(fmt.Sprintf("existing=%d/hit", n), func(b *testing.B) {
			reqs := make([]frpplugin.Proxy, 0, max(n, 1))
			for i := range n {
				reqs = append(reqs, frpplugin.Proxy{User: "seed", ProxyName: benchSeedKey(i), ProxyType: "tcp"})
			}
			a := a
			if n == 0 { // a hit needs one allocation: in a store of its own, never released
				a = newTestAllocator(b, benchDataRoot(b), benchPool, allocatorOptions{log: benchLogger()})
				r := frpplugin.Proxy{User: "u", ProxyName: "bench-hit", ProxyType: "tcp"}
				if _, _, err := a.allocate(r); err != nil {
					b.Fatal(err)
				}
				reqs = append(reqs, r)
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				_, how, err := a.allocate(reqs[i])
				if err != nil || how != outcomeHit {
					b.Fatalf("allocate(%s) = %s, %v; want a hit", reqs[i].ProxyName, how, err)
				}
				if i++; i == len(reqs) {
					i = 0
				}
			}
		})

		b.Run(fmt.Sprintf("existing=%d/fresh", n), func(b *testing.B) {
			var fa *allocator
			added := 0
			next := func() { // a new copy of the store of n, its writes on disk
				if fa != nil {
					fa.store.Close()
				}
				cp := benchDataRoot(b)
				benchCopyStore(b, dir, cp)
				fa = newTestAllocator(b, cp, benchPool, allocatorOptions{log: benchLogger()})
				if got := len(fa.byKey); got != n {
					b.Fatalf("the copy holds %d allocations; want %d", got, n)
				}
				added = 0
				syscall.Sync()
			}
			next()
			b.ReportAllocs()
			for b.Loop() {
				key := fmt.Sprintf("bench-fresh-%07d", benchFreshKeys.Add(1))
				_, how, err := fa.allocate(frpplugin.Proxy{User: "u", ProxyName: key, ProxyType: "tcp"})
				if err != nil || how != outcomeNew {
					b.Fatalf("allocate(%s) = %s, %v; want a new port", key, how, err)
				}
				if added++; added == benchFreshBatch {
					b.StopTimer()
					next()
					b.StartTimer()
				}
			}
			fa.store.Close()
		})
		a.store.Close()
	}
}

// benchLoad measures newAllocator over the store in dir, as the server's
// start does, and reports the heap the loaded allocator keeps.
func benchLoad(b *testing.B, dir string, n int) {
	pool, err := parsePorts(benchPool)
	if err != nil {
		b.Fatal(err)
	}
	opts := allocatorOptions{log: benchLogger()}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var keep *allocator
	b.ReportAllocs()
	for b.Loop() {
		st := newTestStore(b, dir)
		a, got, err := newAllocator(st, pool, opts)
		if err != nil {
			b.Fatal(err)
		}
		st.Crash() // no Close(): that would write a checkpoint
		if len(got.Allocations) != n || len(got.Problems) != 0 {
			b.Fatalf("loaded %d allocations, problems %q; want %d and none", len(got.Allocations), got.Problems, n)
		}
		keep = a
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.HeapAlloc-min(after.HeapAlloc, before.HeapAlloc))/(1<<20), "heap-MiB")
	runtime.KeepAlive(keep)
}

// benchDiscard is a ResponseWriter that drops the body, so a benchmark
// counts only what the handler itself allocates.
type benchDiscard struct {
	header http.Header
	status int
	bytes  int
}

func (w *benchDiscard) Header() http.Header { return w.header }
func (w *benchDiscard) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}
func (w *benchDiscard) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	w.bytes += len(p)
	return len(p), nil
}

// BenchmarkAdminList is one GET /api/allocations of 64,000 allocations
// without a limit (the whole list, streamed; paced as the server paces it,
// and flat out, which is its CPU cost), and one page of 1,000 with a
// limit: B/op is what one listing allocates.
func BenchmarkAdminList(b *testing.B) {
	const n = 64000
	a := bigAllocator(b, n, 16)
	for _, c := range []struct {
		name, target string
		unpaced      bool
	}{
		{"all", "/api/allocations", false},
		{"all-unpaced", "/api/allocations", true},
		{"limit=1000", "/api/allocations?limit=1000&after=30000", false},
	} {
		h := newServer(a, benchLogger(), serverOptions{unpaced: c.unpaced})
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", c.target, nil)
			req.RemoteAddr = "127.0.0.1:5555"
			b.ReportAllocs()
			var size int
			for b.Loop() {
				w := &benchDiscard{header: http.Header{}}
				h.ServeHTTP(w, req)
				if w.status != http.StatusOK {
					b.Fatalf("GET %s: status %d", c.target, w.status)
				}
				size = w.bytes
			}
			b.ReportMetric(float64(size), "body-bytes")
		})
	}
}

// BenchmarkFreshClaims measures what durable commits cost (issue 15):
// allocate() of fresh keys (probe off), one client at a time and from 16
// concurrent clients, into a store holding 0 or 50,000 allocations, for
// the file store (every claim fsync'd, concurrent claims group-committed),
// the file store without its fsyncs (the old undurable store, for
// comparison only) and bbolt (one fsync'd transaction per claim). It
// reports claims/s and the latency of one claim (p50-ms, p99-ms).
//
// The data directories are on the disk BENCH_TMP names, else the system's
// temporary directory: on tmpfs an fsync costs nothing, so put them on
// the disk a server would use. Setting up a store (seeding, opening,
// loading) stays outside the timer, and the disk is synced before the
// timer starts, so the writeback of the set-up does not land on the timed
// claims. Nothing is deleted while the benchmark runs: when the pool is
// about to run dry, the claims go on in a fresh copy of the store, and
// every copy stays until benchDataRoot's directory goes.
func BenchmarkFreshClaims(b *testing.B) {
	root := benchDataRoot(b)
	templates := map[string]string{} // seeded stores of 50,000 to copy, by format
	template := func(b *testing.B, format string, n int) string {
		if dir, ok := templates[format]; ok {
			return dir
		}
		dir, err := os.MkdirTemp(root, "template-"+format+"-")
		if err != nil {
			b.Fatal(err)
		}
		if format == "bbolt" {
			benchSeedBolt(b, filepath.Join(dir, benchBoltFile), n)
		} else {
			benchSeed(b, dir, 0, n)
		}
		templates[format] = dir
		return dir
	}
	pool, err := parsePorts(benchPool)
	if err != nil {
		b.Fatal(err)
	}
	for _, kind := range []string{"file", "file-nosync", "bbolt"} {
		format := strings.TrimSuffix(kind, "-nosync")
		for _, existing := range []int{0, 50000} {
			for _, clients := range []int{1, 16} {
				b.Run(fmt.Sprintf("store=%s/existing=%d/clients=%d", kind, existing, clients), func(b *testing.B) {
					var from string
					if existing > 0 {
						from = template(b, format, existing)
					}
					open := func() *allocator {
						dir, err := os.MkdirTemp(root, "claims-")
						if err != nil {
							b.Fatal(err)
						}
						if from != "" {
							benchCopyStore(b, from, dir)
						}
						var st store.Store
						if format == "bbolt" {
							st, err = bolt.Open(dir, benchLogger())
						} else {
							var fs *file.Store
							fs, err = file.Open(dir, benchLogger())
							if err == nil && kind == "file-nosync" {
								fs.WrapOps(skipSyncs)
							}
							st = fs
						}
						if err != nil {
							b.Fatal(err)
						}
						a, _, err := newAllocator(st, pool, allocatorOptions{log: benchLogger()})
						if err != nil {
							b.Fatal(err)
						}
						if got := len(a.byKey); got != existing {
							b.Fatalf("the store holds %d allocations; want %d", got, existing)
						}
						syscall.Sync() // the set-up's writes reach the disk before the timer starts
						return a
					}
					benchClaims(b, open, pool.len()-existing, clients)
				})
			}
		}
	}
}

// benchBoltFile is the bbolt store's file in its data directory (see openStore).
const benchBoltFile = bolt.FileName

// benchClaims drives allocate() of fresh keys from clients goroutines, one
// b.Loop iteration a claim, in a store open makes; each store takes at most
// room claims before the next one is opened (with the timer stopped).
func benchClaims(b *testing.B, open func() *allocator, room, clients int) {
	var (
		a       *allocator
		keys    chan string
		workers sync.WaitGroup
		mu      sync.Mutex
		lat     []time.Duration
		failed  atomic.Bool
	)
	start := func() {
		a = open()
		keys = make(chan string)
		for range clients {
			workers.Go(func() {
				var mine []time.Duration
				for key := range keys {
					if failed.Load() {
						continue // drain, so the loop never blocks
					}
					t0 := time.Now()
					_, how, err := a.allocate(frpplugin.Proxy{User: "u", ProxyName: key, ProxyType: "tcp"})
					if err != nil || how != outcomeNew {
						failed.Store(true)
						b.Errorf("allocate(%s) = %s, %v; want a new port", key, how, err)
						continue
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
		}
	}
	stop := func() {
		close(keys)
		workers.Wait()
		a.store.Close()
	}
	start()
	left := room
	var timed time.Duration
	t0 := time.Now()
	for b.Loop() {
		if left == 0 {
			stop()
			timed += time.Since(t0)
			b.StopTimer()
			start()
			left = room
			b.StartTimer()
			t0 = time.Now()
		}
		keys <- fmt.Sprintf("bench-claim-%08d", benchFreshKeys.Add(1))
		left--
	}
	// The claims still in flight when b.Loop stopped the timer count in
	// claims/s and the latencies, not in ns/op.
	close(keys)
	workers.Wait()
	timed += time.Since(t0)
	a.store.Close()
	if b.Failed() {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(len(lat))/timed.Seconds(), "claims/s")
	b.ReportMetric(percentile(lat, 0.50), "p50-ms")
	b.ReportMetric(percentile(lat, 0.99), "p99-ms")
}

// benchDataRoot is a new directory for a benchmark's stores: under
// BENCH_TMP when set, else b.TempDir(). Under BENCH_TMP it is not removed:
// bench/run.sh sets BENCH_TMP to a directory of its own and removes it
// after the last timed phase, because on an ext4 without a journal the
// file creations of the next minutes are slow after a deletion.
func benchDataRoot(b *testing.B) string {
	parent := os.Getenv("BENCH_TMP")
	if parent == "" {
		return b.TempDir()
	}
	dir, err := os.MkdirTemp(parent, "frp-port-keeper-bench-")
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

// benchCopyStore makes dst a copy of the seeded store in src. Record files
// are hard-linked: a fresh claim only creates files and renames over new
// names, so it never writes to a seeded record, and the store's directory
// holds the same entries as a copy's without 100,000 files written (and
// later freed) per set-up. The bbolt file is written to, so it is copied.
func benchCopyStore(b *testing.B, src, dst string) {
	b.Helper()
	entries, err := os.ReadDir(src)
	if err != nil {
		b.Fatal(err)
	}
	for _, e := range entries {
		from, to := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		if e.Name() == benchBoltFile {
			data, err := os.ReadFile(from)
			if err == nil {
				err = os.WriteFile(to, data, 0o600)
			}
			if err != nil {
				b.Fatal(err)
			}
			continue
		}
		if e.IsDir() && e.Name() == file.CheckpointDir {
			continue // what the last close saved: a copy reads every record
		}
		if !e.Type().IsRegular() {
			b.Fatalf("seeded store %s holds %s, not a record file", src, e.Name())
		}
		if err := os.Link(from, to); err != nil {
			b.Fatal(err)
		}
	}
}

// benchSeedBolt writes the allocations bench-seed-<i> on port 1024+i for
// i in [0, n) into a new bbolt store at path, in one transaction, laid out
// as the bbolt store lays them out (gokv's bucket, JSON values).
func benchSeedBolt(b *testing.B, path string, n int) {
	b.Helper()
	start := time.Now()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	err = db.Update(func(tx *bbolt.Tx) error {
		bk, err := tx.CreateBucketIfNotExists([]byte("default"))
		if err != nil {
			return err
		}
		put := func(name string, r store.Record) error {
			data, err := json.Marshal(r)
			if err != nil {
				return err
			}
			return bk.Put([]byte(name), data)
		}
		for i := range n {
			key := benchSeedKey(i)
			r := store.Record{Key: key, Port: 1024 + i, User: "seed", ProxyName: key, ProxyType: "tcp", CreatedAt: created, AssignedAt: created}
			if err := put(local.PortName(store.TCPPort(r.Port)), r); err != nil {
				return err
			}
			if err := put(local.KeyName(r.Key), r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatalf("seeding bbolt: %v", err)
	}
	b.Logf("seeded %d allocations into bbolt in %v", n, time.Since(start).Round(time.Millisecond))
}

// TestBenchClaimsOpensAFreshStoreWhenThePoolRunsDry runs benchClaims on a
// pool of 10 ports for a second: every claim must find a port, because a
// store that has given out room ports is replaced by a fresh one.
func TestBenchClaimsOpensAFreshStoreWhenThePoolRunsDry(t *testing.T) {
	var opened atomic.Int64
	res := testing.Benchmark(func(b *testing.B) {
		open := func() *allocator {
			opened.Add(1)
			s := newTestStore(b, t.TempDir())
			s.WrapOps(skipSyncs)
			return newAllocatorOn(b, s, "20000-20009", allocatorOptions{log: benchLogger()})
		}
		benchClaims(b, open, 10, 4)
	})
	if res.N == 0 {
		t.Fatal("the benchmark failed: a claim found no port")
	}
	if want := int64(res.N+9) / 10; opened.Load() < want {
		t.Errorf("%d claims in %d stores of 10 ports; want at least %d stores", res.N, opened.Load(), want)
	}
	if res.Extra["claims/s"] <= 0 || res.Extra["p50-ms"] <= 0 || res.Extra["p99-ms"] < res.Extra["p50-ms"] {
		t.Errorf("metrics %v; want claims/s, p50-ms and p99-ms", res.Extra)
	}
}

// skipSyncs makes a file store skip every fsync: the old, undurable store,
// kept only to measure what durability costs.
func skipSyncs(ops file.Ops) file.Ops { return noSyncOps{ops} }

type noSyncOps struct{ file.Ops }

func (noSyncOps) SyncFile(string) error { return nil }
func (noSyncOps) SyncDir(string) error  { return nil }
