package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"
)

// memStore is a portStore in memory: load hands back the records it was
// made with, and every write succeeds at once. It gives a test tens of
// thousands of allocations without creating a file for each.
type memStore struct {
	mu   sync.Mutex
	recs map[string]record
}

func newMemStore(recs []record) *memStore {
	s := &memStore{recs: make(map[string]record, len(recs))}
	for _, r := range recs {
		s.recs[r.Key] = r
	}
	return s
}

func (s *memStore) load() (loaded, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := loaded{lastSeen: map[string]time.Time{}, freed: map[int]time.Time{}}
	for _, r := range s.recs {
		l.allocations = append(l.allocations, r)
	}
	return l, nil
}

func (s *memStore) claim(r record, prev *record) error {
	s.mu.Lock()
	s.recs[r.Key] = r
	s.mu.Unlock()
	return nil
}

func (s *memStore) release(r record, _ time.Time) error {
	s.mu.Lock()
	delete(s.recs, r.Key)
	s.mu.Unlock()
	return nil
}

func (s *memStore) touch(string, time.Time) error { return nil }
func (s *memStore) saveCheckpoint(loaded) error   { return nil }
func (s *memStore) close() error                  { return nil }

// bigAllocator is an allocator over a memStore holding n allocations,
// key list-NNNNNN of user u<i%users> on port 1024+i, logging nowhere.
func bigAllocator(t testing.TB, n, users int) *allocator {
	t.Helper()
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	recs := make([]record, n)
	for i := range recs {
		key := fmt.Sprintf("list-%06d", i)
		recs[i] = record{Key: key, Port: 1024 + i, User: fmt.Sprintf("u%d", i%users), ProxyName: key,
			ProxyType: "tcp", CreatedAt: created, AssignedAt: created}
	}
	return newAllocatorOn(t, newMemStore(recs), "1024-65535", allocatorOptions{log: slog.New(slog.DiscardHandler)})
}

// streamWriter is a ResponseWriter that keeps nothing: it hands the body
// to a JSON decoder as it comes, and samples the heap at every write.
type streamWriter struct {
	header http.Header
	status int
	pw     *io.PipeWriter
	peak   *peakHeap
}

func (w *streamWriter) Header() http.Header { return w.header }
func (w *streamWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}
func (w *streamWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	w.peak.sample()
	return w.pw.Write(p)
}

// peakHeap remembers the highest HeapAlloc it was shown.
type peakHeap struct {
	mu  sync.Mutex
	max uint64
}

func (p *peakHeap) sample() {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	p.mu.Lock()
	p.max = max(p.max, m.HeapAlloc)
	p.mu.Unlock()
}

// TestListStreamsBoundedMemory: listing 64,000 allocations without a limit
// returns every one, in port order, while the heap grows by far less than
// the answer's size (about 13 MB): the answer is encoded and written chunk
// by chunk, never built whole. The heap is sampled every millisecond and at
// every write, with the collector running often, so garbage does not count
// as growth; the old handler, which built the list and the body, peaked at
// about 40 MiB over the base.
func TestListStreamsBoundedMemory(t *testing.T) {
	const n = 64000
	a := bigAllocator(t, n, 16)
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})

	defer debug.SetGCPercent(debug.SetGCPercent(10))
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	peak := &peakHeap{max: base.HeapAlloc}
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				peak.sample()
			}
		}
	}()

	pr, pw := io.Pipe()
	w := &streamWriter{header: http.Header{}, pw: pw, peak: peak}
	type result struct {
		rows, lastPort int
		err            error
	}
	got := make(chan result, 1)
	go func() { // decode as it streams, one row at a time
		var res result
		defer func() { io.Copy(io.Discard, pr); got <- res }()
		dec := json.NewDecoder(pr)
		for _, want := range []json.Token{json.Delim('{'), "allocations", json.Delim('[')} {
			if tok, err := dec.Token(); err != nil || tok != want {
				res.err = fmt.Errorf("token %v (%v); want %v", tok, err, want)
				return
			}
		}
		var row apiAllocation
		for dec.More() {
			if err := dec.Decode(&row); err != nil {
				res.err = err
				return
			}
			if row.Port <= res.lastPort {
				res.err = fmt.Errorf("row %d: port %d after %d", res.rows, row.Port, res.lastPort)
				return
			}
			res.rows, res.lastPort = res.rows+1, row.Port
		}
		var rest struct {
			Pool poolStats `json:"pool"`
		}
		dec.Token() // ]
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				res.err = err
				return
			}
			if tok == "pool" {
				if err := dec.Decode(&rest.Pool); err != nil {
					res.err = err
					return
				}
				if rest.Pool.Used != n {
					res.err = fmt.Errorf("pool %+v; want %d used", rest.Pool, n)
				}
			}
		}
	}()
	req := newAdminRequest("GET", "/api/allocations")
	h.ServeHTTP(w, req)
	pw.Close()
	res := <-got
	close(stop)
	<-sampled
	if w.status != http.StatusOK || res.err != nil || res.rows != n {
		t.Fatalf("GET /api/allocations: status %d, %d rows, %v; want 200 and %d rows", w.status, res.rows, res.err, n)
	}
	growth := float64(peak.max-base.HeapAlloc) / (1 << 20)
	t.Logf("heap: base %.1f MiB, peak %.1f MiB during the list (growth %.1f MiB)", float64(base.HeapAlloc)/(1<<20), float64(peak.max)/(1<<20), growth)
	if growth >= 16 {
		t.Fatalf("listing %d allocations grew the heap by %.1f MiB; want < 16 MiB", n, growth)
	}
}

// newAdminRequest is a request from a loopback peer, as the admin routes want.
func newAdminRequest(method, target string) *http.Request {
	req, _ := http.NewRequest(method, target, nil)
	req.RemoteAddr = "127.0.0.1:5555"
	req.RequestURI = target
	return req
}
