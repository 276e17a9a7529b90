package main

// Micro-benchmarks of issue 6: the sticky-hit path of the HTTP handler, and
// the allocator's hit and fresh paths with 0, 10,000 and 50,000 existing
// allocations in a file store; and of issue 9: one admin listing of 64,000
// allocations. Run them with
//
//	go test -run XXX -bench . -benchmem
//
// or with everything else through `make bench` (bench/run.sh), which also
// runs the load tool and writes BENCHMARKS.md. Every helper here starts with
// "bench" so it cannot collide with the helpers of the other test files.

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
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
	a := newTestAllocator(b, b.TempDir(), benchPool, allocatorOptions{log: benchLogger()})
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
	a := newTestAllocator(b, b.TempDir(), benchPool, allocatorOptions{log: benchLogger()})
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
				r := record{Key: key, Port: 1024 + i, User: "seed", ProxyName: key, ProxyType: "tcp",
					CreatedAt: created, AssignedAt: created}
				// A committed allocation as the file store writes it.
				if err := kv.Set(portName(r.Port), r); err != nil {
					errs <- err
					return
				}
				if err := kv.Set(keyName(r.Key), r); err != nil {
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

// benchFreshBatch is how many fresh keys a fresh benchmark adds before it
// releases them again (outside the timer), so the store keeps its size
// whatever b.N is, and the pool never runs dry.
const benchFreshBatch = 1000

// benchFreshKeys numbers fresh keys across sub-benchmarks and -count runs.
var benchFreshKeys atomic.Int64

// BenchmarkAllocator measures, over a file store that already holds 0,
// 10,000 and 50,000 allocations: load, what the server does at start
// (newAllocator: read and check every record file, build the maps);
// allocate() for a key that has its port (hit); and allocate() for a key
// that has none (fresh: port search, two record files written before the
// answer). The store grows in place from one size to the next.
func BenchmarkAllocator(b *testing.B) {
	dir := b.TempDir()
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
			reqs := make([]proxyRequest, 0, max(n, 1))
			for i := range n {
				reqs = append(reqs, proxyRequest{User: "seed", ProxyName: benchSeedKey(i), ProxyType: "tcp"})
			}
			if n == 0 { // a hit needs one allocation: make it, and drop it after
				r := proxyRequest{User: "u", ProxyName: "bench-hit", ProxyType: "tcp"}
				if _, _, err := a.allocate(r); err != nil {
					b.Fatal(err)
				}
				defer a.release(r.ProxyName, "bench")
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
			var added []string
			releaseAdded := func() {
				for _, key := range added {
					if err := a.release(key, "bench"); err != nil {
						b.Fatalf("release %s: %v", key, err)
					}
				}
				added = added[:0]
			}
			b.ReportAllocs()
			for b.Loop() {
				key := fmt.Sprintf("bench-fresh-%07d", benchFreshKeys.Add(1))
				_, how, err := a.allocate(proxyRequest{User: "u", ProxyName: key, ProxyType: "tcp"})
				if err != nil || how != outcomeNew {
					b.Fatalf("allocate(%s) = %s, %v; want a new port", key, how, err)
				}
				added = append(added, key)
				if len(added) == benchFreshBatch {
					b.StopTimer()
					releaseAdded()
					b.StartTimer()
				}
			}
			releaseAdded()
			if got := len(a.byKey); got != n {
				b.Fatalf("after releasing: %d allocations; want %d", got, n)
			}
		})
		a.store.close()
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
		store := newTestStore(b, dir)
		a, got, err := newAllocator(store, pool, opts)
		if err != nil {
			b.Fatal(err)
		}
		store.root.Close() // no close(): that would write a checkpoint
		if len(got.allocations) != n || len(got.problems) != 0 {
			b.Fatalf("loaded %d allocations, problems %q; want %d and none", len(got.allocations), got.problems, n)
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
