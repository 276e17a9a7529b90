package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
)

// newMemStore is the fake store (storetest.Fake) holding recs: tens of
// thousands of allocations without creating a file for each.
func newMemStore(recs []store.Record) *storetest.Fake { return storetest.NewFake(recs...) }

// bigAllocator is an allocator over a memStore holding n allocations,
// key list-NNNNNN of user u<i%users> on port 1024+i, logging nowhere.
func bigAllocator(t testing.TB, n, users int) *allocator {
	return spreadAllocator(t, n, users, 1)
}

// spreadAllocator is bigAllocator with the allocations on every step-th
// port from 1024, so there are free ports between them.
func spreadAllocator(t testing.TB, n, users, step int) *allocator {
	t.Helper()
	created := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	recs := make([]store.Record, n)
	for i := range recs {
		key := fmt.Sprintf("list-%06d", i)
		recs[i] = store.Record{Key: key, Port: 1024 + i*step, User: fmt.Sprintf("u%d", i%users), ProxyName: key,
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
// by chunk, never built whole. The heap is sampled every 5 ms and at
// every write, with the collector running often, so garbage does not count
// as growth; the old handler, which built the list and the body, peaked at
// about 40 MiB over the base.
func TestListStreamsBoundedMemory(t *testing.T) {
	const n = 64000
	a := bigAllocator(t, n, 16)
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{unpaced: true}) // pacing is TestAdminPacing's

	defer debug.SetGCPercent(debug.SetGCPercent(10))
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	peak := &peakHeap{max: base.HeapAlloc}
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(5 * time.Millisecond)
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

// adminDo serves one admin request from loopback and returns the answer.
func adminDo(t testing.TB, h http.Handler, method, target string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, newAdminRequest(method, target))
	return rec
}

// listOnce GETs target and decodes the listing, failing on anything but 200.
func listOnce(t testing.TB, h http.Handler, target string) allocationList {
	t.Helper()
	rec := adminDo(t, h, "GET", target)
	var l allocationList
	if rec.Code != http.StatusOK {
		t.Fatalf("GET %s = %d %s; want 200", target, rec.Code, rec.Body)
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &l); err != nil {
		t.Fatalf("GET %s: %v\n%s", target, err, rec.Body)
	}
	return l
}

// listAll follows the cursor from query (which has a limit) to the end and
// calls between after each page; it returns every row in order.
func listAll(t testing.TB, h http.Handler, query string, between func(page int, next int)) []apiAllocation {
	t.Helper()
	var rows []apiAllocation
	after := 0
	for page := 1; ; page++ {
		target := "/api/allocations?" + query
		if after > 0 {
			target += "&after=" + strconv.Itoa(after)
		}
		l := listOnce(t, h, target)
		rows = append(rows, l.Allocations...)
		if l.Next == 0 {
			return rows
		}
		if n := len(l.Allocations); n == 0 || l.Next != l.Allocations[n-1].Port {
			t.Fatalf("GET %s: next %d; want the last port of a non-empty page", target, l.Next)
		}
		if page > 10000 {
			t.Fatal("the cursor never ends")
		}
		after = l.Next
		if between != nil {
			between(page, after)
		}
	}
}

// TestListPaging follows the cursor through 3,000 allocations (on every
// other port) while allocations are added between pages, before and after
// the cursor: every allocation there from the start comes exactly once, in
// port order, and so does every one added ahead of the cursor; none added
// behind it does.
func TestListPaging(t *testing.T) {
	tests := []struct {
		name  string
		limit int
	}{{"limit 1", 1}, {"limit 7", 7}, {"limit 500", 500}, {"limit 2000", 2000}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const n, step = 3000, 2
			a := spreadAllocator(t, n, 4, step)
			h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
			want := map[int]string{}
			for i := range n {
				want[1024+i*step] = fmt.Sprintf("list-%06d", i)
			}
			behind := map[int]bool{}
			added := 0
			rows := listAll(t, h, "limit="+strconv.Itoa(tt.limit), func(page, next int) {
				if page%(max(1, 300/tt.limit)) != 0 {
					return
				}
				// A free port just ahead of the cursor, one far ahead, and one behind it.
				for _, p := range []int{next + 1, 1024 + n*step + added, next - 1} {
					if a.tcp.held.has(p) || p < 1024 {
						continue
					}
					key := fmt.Sprintf("added-%d", p)
					if _, err := a.assign(key, p, "", operatorChange{}); err != nil {
						t.Fatalf("assign %s %d: %v", key, p, err)
					}
					if p < next {
						behind[p] = true
					} else {
						want[p] = key
					}
				}
				added++
			})
			seen := map[int]bool{}
			last := 0
			for _, r := range rows {
				if r.Port <= last {
					t.Fatalf("port %d after %d: not in port order", r.Port, last)
				}
				last = r.Port
				if behind[r.Port] {
					t.Errorf("port %d was added behind the cursor but listed", r.Port)
					continue
				}
				if want[r.Port] != r.Key {
					t.Errorf("port %d listed as %q; want %q", r.Port, r.Key, want[r.Port])
				}
				seen[r.Port] = true
			}
			for p, key := range want {
				if !seen[p] {
					t.Errorf("%s on port %d was never listed", key, p)
				}
			}
			if added == 0 || len(behind) == 0 {
				t.Fatalf("the test added %d times, %d behind the cursor; want both", added, len(behind))
			}
		})
	}
}

// TestListLimitAndCursor: next is there exactly when more may follow, and
// the last page of a listing has none.
func TestListLimitAndCursor(t *testing.T) {
	a := bigAllocator(t, 10, 2) // ports 1024-1033
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	tests := []struct {
		query     string
		wantPorts []int
		wantNext  int
	}{
		{"limit=4", []int{1024, 1025, 1026, 1027}, 1027},
		{"limit=4&after=1027", []int{1028, 1029, 1030, 1031}, 1031},
		{"limit=4&after=1031", []int{1032, 1033}, 0},
		{"limit=10", []int{1024, 1025, 1026, 1027, 1028, 1029, 1030, 1031, 1032, 1033}, 0},
		{"limit=9", []int{1024, 1025, 1026, 1027, 1028, 1029, 1030, 1031, 1032}, 1032},
		{"limit=1&after=1033", nil, 0},
		{"after=1030", []int{1031, 1032, 1033}, 0}, // no limit: the rest, streamed
		{"limit=2&user=u1", []int{1025, 1027}, 1027},
		{"limit=2&user=u1&after=1031", []int{1033}, 0},
	}
	for _, tt := range tests {
		l := listOnce(t, h, "/api/allocations?"+tt.query)
		var ports []int
		for _, r := range l.Allocations {
			ports = append(ports, r.Port)
		}
		if fmt.Sprint(ports) != fmt.Sprint(tt.wantPorts) || l.Next != tt.wantNext || l.Pool.Used != 10 {
			t.Errorf("?%s: ports %v, next %d, pool %+v; want %v, next %d, 10 used", tt.query, ports, l.Next, l.Pool, tt.wantPorts, tt.wantNext)
		}
	}
	// The JSON names next only when there is one.
	if body := adminDo(t, h, "GET", "/api/allocations?limit=10").Body.String(); strings.Contains(body, "next") {
		t.Errorf("last page names next: %s", body)
	}
}

// TestListQueryValidation: a bad limit, cursor or port is a 400 with a
// JSON error that says what is wanted.
func TestListQueryValidation(t *testing.T) {
	a := bigAllocator(t, 3, 1)
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	tests := []struct {
		query    string
		wantCode int
		wantBody string
	}{
		{"limit=0", 400, "limit must be a number from 1 to 5000"},
		{"limit=5001", 400, "limit must be a number from 1 to 5000"},
		{"limit=-3", 400, "limit must be"},
		{"limit=ten", 400, "limit must be"},
		{"limit=", 400, "limit must be"},
		{"limit=1e3", 400, "limit must be"},
		{"after=-1", 400, "after must be a number from 0 to 65535"},
		{"after=65536", 400, "after must be"},
		{"after=x", 400, "after must be"},
		{"port=0", 400, "port must be a number from 1 to 65535"},
		{"port=65536", 400, "port must be"},
		{"port=ssh", 400, "port must be"},
		{"limit=0&after=x", 400, "after must be"}, // every problem is named
		{"limit=5000", 200, `"port":1026`},
		{"limit=1", 200, `"next":1024`},
		{"after=0", 200, `"port":1024`},
		{"after=65535", 200, `"allocations":[]`},
		{"port=65535", 200, `"allocations":[]`},
	}
	for _, tt := range tests {
		rec := adminDo(t, h, "GET", "/api/allocations?"+tt.query)
		if rec.Code != tt.wantCode || !strings.Contains(rec.Body.String(), tt.wantBody) || !json.Valid(rec.Body.Bytes()) {
			t.Errorf("?%s = %d %s; want %d with %q", tt.query, rec.Code, rec.Body, tt.wantCode, tt.wantBody)
		}
		if rec.Code == 400 && !strings.HasPrefix(rec.Body.String(), `{"error":`) {
			t.Errorf("?%s: 400 body %s; want a JSON error", tt.query, rec.Body)
		}
	}
}

// TestListLookup: ?port= and ?key= find one allocation, or answer an
// empty list (200) when there is none; other filters narrow them.
func TestListLookup(t *testing.T) {
	a := bigAllocator(t, 5, 2) // list-000000..4 on 1024-1028, users u0 u1
	if _, err := a.assign("group:a/b", 2000, "", operatorChange{}); err != nil {
		t.Fatal(err)
	}
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	tests := []struct {
		query    string
		wantKeys []string
	}{
		{"port=1026", []string{"list-000002"}},
		{"port=1029", nil},
		{"port=1023", nil},
		{"port=2000", []string{"group:a/b"}},
		{"key=list-000003", []string{"list-000003"}},
		{"key=list-9", nil},
		{"key=", nil},
		{"key=group%3Aa%2Fb", []string{"group:a/b"}},
		{"key=list-000003&user=u1", []string{"list-000003"}},
		{"key=list-000003&user=u0", nil},
		{"port=1026&key=list-000002", []string{"list-000002"}},
		{"port=1026&key=list-000001", nil},
		{"port=1026&user=u1", nil},
		{"port=1026&after=1026", nil},
		{"key=list-000004&limit=1", []string{"list-000004"}},
	}
	for _, tt := range tests {
		l := listOnce(t, h, "/api/allocations?"+tt.query)
		var keys []string
		for _, r := range l.Allocations {
			keys = append(keys, r.Key)
		}
		if fmt.Sprint(keys) != fmt.Sprint(tt.wantKeys) || l.Next != 0 || l.Pool.Used != 6 {
			t.Errorf("?%s: keys %q, next %d, pool %+v; want %q, no next, 6 used", tt.query, keys, l.Next, l.Pool, tt.wantKeys)
		}
	}
}

// TestListUserPaging pages through one user's allocations of 4,000 (of 16
// users): each of theirs exactly once, in order, and nobody else's.
func TestListUserPaging(t *testing.T) {
	a := bigAllocator(t, 4000, 16)
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	for _, limit := range []int{1, 33, 250, 5000} {
		rows := listAll(t, h, fmt.Sprintf("user=u3&limit=%d", limit), nil)
		if len(rows) != 250 {
			t.Errorf("limit %d: %d rows; want u3's 250", limit, len(rows))
		}
		for i, r := range rows {
			if want := 1024 + 3 + 16*i; r.User != "u3" || r.Port != want {
				t.Fatalf("limit %d: row %d is %s of %s on %d; want u3 on %d", limit, i, r.Key, r.User, r.Port, want)
			}
		}
	}
	// Without a limit: every one of u3's, streamed.
	if l := listOnce(t, h, "/api/allocations?user=u3"); len(l.Allocations) != 250 || l.Next != 0 {
		t.Errorf("?user=u3: %d rows, next %d; want 250 and none", len(l.Allocations), l.Next)
	}
}

// TestListStreamMatchesMarshal: the hand-written encoder of a streamed
// listing writes exactly what encoding/json writes, whatever the names hold.
func TestListStreamMatchesMarshal(t *testing.T) {
	names := []string{"", "plain.ssh", `quote"back\slash`, "<script>&amp;", "tab\tnl\ncr\rbs\bff\f", "\x00\x01\x1f\x7f",
		"é ü 中文 🎉", "\u2028\u2029", "bad\xffutf8\xc3", "\xed\xa0\x80", strings.Repeat("long", 1000)}
	when := time.Date(2026, 3, 1, 12, 30, 45, 123456789, time.UTC)
	for _, s := range names {
		for _, a := range []apiAllocation{
			{Key: s, ProxyName: s, User: s, ProxyType: s, Group: s, Port: 65535, CreatedAt: when, LastSeen: when.Add(time.Second), OutsidePolicy: true},
			{Key: s, Port: 1, CreatedAt: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)},
		} {
			want, err := json.Marshal(a)
			if err != nil {
				t.Fatal(err)
			}
			if got := appendAPIAllocation(nil, a); string(got) != string(want) {
				t.Errorf("%q:\ngot  %s\nwant %s", s, got, want)
			}
		}
	}
	// A whole streamed answer is what encoding/json made of the list
	// before: the same bytes, hostile names included.
	a := bigAllocator(t, 3, 1)
	for i, name := range names[1:6] {
		if _, err := a.assign(name, 2000+i, "", operatorChange{}); err != nil {
			t.Fatal(err)
		}
	}
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	for _, target := range []string{"/api/allocations", "/api/allocations?user=u0", "/api/allocations?user=nobody"} {
		body := adminDo(t, h, "GET", target).Body.String()
		var l allocationList
		if err := json.Unmarshal([]byte(body), &l); err != nil {
			t.Fatalf("GET %s: %v", target, err)
		}
		if l.Allocations == nil {
			l.Allocations = []apiAllocation{}
		}
		want, _ := json.Marshal(l)
		if body != string(want)+"\n" {
			t.Errorf("GET %s:\ngot  %s\nwant %s", target, body, want)
		}
	}
}

// blockingWriter is a client that stops reading: its first Write blocks
// until release is closed, then fails or succeeds as told.
type blockingWriter struct {
	header   http.Header
	started  chan struct{} // closed at the first Write
	release  chan struct{}
	fail     bool
	once     sync.Once
	finished chan struct{} // closed when the handler returned
}

func newBlockingWriter(fail bool) *blockingWriter {
	return &blockingWriter{header: http.Header{}, started: make(chan struct{}), release: make(chan struct{}), fail: fail, finished: make(chan struct{})}
}

func (w *blockingWriter) Header() http.Header { return w.header }
func (w *blockingWriter) WriteHeader(int)     {}
func (w *blockingWriter) Write(p []byte) (int, error) {
	w.once.Do(func() { close(w.started) })
	<-w.release
	if w.fail {
		return 0, io.ErrClosedPipe
	}
	return len(p), nil
}

// TestAdminSlots: listings and the page share a few slots. With every slot
// held by a client that stopped reading, another listing or page is
// answered 503 with Retry-After after the short wait, while frps's plugin
// requests (sticky and fresh) and lookups are answered as usual; a slot
// frees up when its client goes away, and a listing waiting for a slot
// gets it when one frees up in time.
func TestAdminSlots(t *testing.T) {
	a := bigAllocator(t, 2000, 2) // a listing of 2,000 rows writes more than once
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{heavySlots: 2, heavyWait: 50 * time.Millisecond})
	if code, body := post(t, h, "NewProxy", newProxyBody("alice", "alice.ssh", "tcp", "")); code != 200 {
		t.Fatalf("first NewProxy = %d %s", code, body)
	}
	hold := func(target string, fail bool) *blockingWriter {
		w := newBlockingWriter(fail)
		go func() { defer close(w.finished); h.ServeHTTP(w, newAdminRequest("GET", target)) }()
		select {
		case <-w.started:
		case <-time.After(10 * time.Second):
			t.Fatalf("GET %s never wrote", target)
		}
		return w
	}
	stuck := hold("/api/allocations", false)
	gone := hold("/", true) // the page takes a slot too

	for _, target := range []string{"/api/allocations", "/api/allocations?limit=10", "/"} {
		start := time.Now()
		rec := adminDo(t, h, "GET", target)
		if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") != "1" || !strings.Contains(rec.Body.String(), "busy") {
			t.Errorf("GET %s with every slot held = %d (Retry-After %q) %s; want 503, Retry-After 1", target, rec.Code, rec.Header().Get("Retry-After"), rec.Body)
		}
		if d := time.Since(start); d < 50*time.Millisecond || d > 5*time.Second {
			t.Errorf("GET %s: refused after %v; want after the 50ms wait", target, d)
		}
	}
	if rec := adminDo(t, h, "GET", "/api/allocations"); !strings.HasPrefix(rec.Body.String(), `{"error":`) {
		t.Errorf("503 of the API: %s; want a JSON error", rec.Body)
	}
	// frps is answered meanwhile, a fresh allocation (write lock) included:
	// no listing holds the allocator's lock while its client dawdles.
	for _, name := range []string{"alice.ssh", "bob.new"} {
		done := make(chan string, 1)
		go func() {
			code, body := post(t, h, "NewProxy", newProxyBody("alice", name, "tcp", ""))
			done <- fmt.Sprintf("%d %s", code, body)
		}()
		select {
		case got := <-done:
			if !strings.HasPrefix(got, "200 ") || !strings.Contains(got, `"remote_port":`) {
				t.Errorf("NewProxy %s with every slot held = %s; want 200 and a port", name, got)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("NewProxy %s waited over 5s while listings were stuck", name)
		}
	}
	for _, target := range []string{"/api/allocations?port=1024", "/api/allocations?key=alice.ssh", "/api/allocations/alice.ssh", "/ping"} {
		if rec := adminDo(t, h, "GET", target); rec.Code != 200 {
			t.Errorf("GET %s with every slot held = %d; want 200", target, rec.Code)
		}
	}

	// The page's client goes away: its slot is free again.
	close(gone.release)
	<-gone.finished
	if rec := adminDo(t, h, "GET", "/api/allocations?limit=5"); rec.Code != 200 {
		t.Errorf("after a client went away: %d; want 200", rec.Code)
	}

	// A listing that waits gets the slot when it frees up within the wait.
	slow := newServer(a, slog.New(slog.DiscardHandler), serverOptions{heavySlots: 1, heavyWait: 10 * time.Second})
	w := newBlockingWriter(false)
	go func() { defer close(w.finished); slow.ServeHTTP(w, newAdminRequest("GET", "/api/allocations")) }()
	<-w.started
	time.AfterFunc(100*time.Millisecond, func() { close(w.release) })
	if rec := adminDo(t, slow, "GET", "/api/allocations?limit=3"); rec.Code != 200 {
		t.Errorf("waiting listing = %d; want 200 once the slot freed", rec.Code)
	}
	close(stuck.release)
	<-stuck.finished
	<-w.finished
}

// TestAdminPagePaging: the page shows 200 rows at a time with previous
// and next links along the cursor, the filter applied while paging, and
// the counts.
func TestAdminPagePaging(t *testing.T) {
	a := bigAllocator(t, 4000, 16) // ports 1024-5023
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	tests := []struct {
		target             string
		firstPort, rows    int
		prev, next, counts string // "" for prev/next: no such link
	}{
		{"/", 1024, 200, "", "/?after=1223", "Rows 1–200 of 4000 (4000 allocations)"},
		{"/?after=1223", 1224, 200, "/", "/?after=1423", "Rows 201–400 of 4000"},
		{"/?after=1423", 1424, 200, "/?after=1223", "/?after=1623", "Rows 401–600 of 4000"},
		{"/?after=4823", 4824, 200, "/?after=4623", "", "Rows 3801–4000 of 4000"}, // the last 200: no next
		{"/?after=5000", 5001, 23, "/?after=4800", "", "Rows 3978–4000 of 4000"},
		{"/?after=6000", 0, 0, "/?after=4823", "", "4000 rows (4000 allocations)"},
		{"/?q=u3", 1027, 200, "", "/?after=4211&amp;q=u3", "Rows 1–200 of 250 matching “u3” (4000 allocations)"},
		{"/?q=u3&after=4211", 4227, 50, "/?q=u3", "", "Rows 201–250 of 250 matching “u3”"},
		{"/?q=list-000007", 1031, 1, "", "", "Rows 1–1 of 1 matching"},
		{"/?q=4000", 4000, 1, "", "", "Rows 1–1 of 1"}, // a port
		{"/?q=nobody", 0, 0, "", "", "0 rows matching “nobody”"},
	}
	for _, tt := range tests {
		rec := adminDo(t, h, "GET", tt.target)
		body := rec.Body.String()
		rows := pageRows(body)
		if rec.Code != 200 || len(rows) != tt.rows {
			t.Errorf("GET %s = %d with %d rows; want 200 with %d", tt.target, rec.Code, len(rows), tt.rows)
			continue
		}
		if tt.rows > 0 && !strings.HasPrefix(rows[0], strconv.Itoa(tt.firstPort)+" ") {
			t.Errorf("GET %s: first row %q; want port %d", tt.target, rows[0], tt.firstPort)
		}
		for rel, want := range map[string]string{"prev": tt.prev, "next": tt.next} {
			link := `rel="` + rel + `" href="` + want + `"`
			if has := strings.Contains(body, `rel="`+rel+`"`); has != (want != "") || (want != "" && !strings.Contains(body, link)) {
				t.Errorf("GET %s: %s link wrong; want %q", tt.target, rel, want)
			}
		}
		if !strings.Contains(body, tt.counts) {
			t.Errorf("GET %s: no %q in the page", tt.target, tt.counts)
		}
	}
	for _, target := range []string{"/?after=x", "/?after=-1", "/?after=70000"} {
		if rec := adminDo(t, h, "GET", target); rec.Code != http.StatusBadRequest {
			t.Errorf("GET %s = %d; want 400", target, rec.Code)
		}
	}
}

// TestCLIListPages: list follows the cursor a page of 1,000 at a time,
// prints every allocation once, in order, in the same table and JSON as
// before, passes -user, -port and -key on, and waits out a busy server.
func TestCLIListPages(t *testing.T) {
	a := bigAllocator(t, 2500, 2) // ports 1024-3523
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})
	var mu sync.Mutex
	var queries []string
	busyOnce := true
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		queries = append(queries, r.URL.RawQuery)
		busy := busyOnce && r.URL.Query().Get("user") == "u1"
		busyOnce = busyOnce && !busy
		mu.Unlock()
		if busy { // as the server answers when every listing slot is taken
			w.Header().Set("Retry-After", "1")
			writeBusyJSON(w)
			return
		}
		h.ServeHTTP(w, r)
	}))
	defer srv.Close()
	list := func(args ...string) (string, []string) {
		t.Helper()
		mu.Lock()
		queries = nil
		mu.Unlock()
		out, errOut, err := runCLI(nil, append([]string{"list", "-server", srv.URL}, args...)...)
		if err != nil {
			t.Fatalf("list %v: %v\n%s", args, err, errOut)
		}
		mu.Lock()
		defer mu.Unlock()
		return out, queries
	}

	out, qs := list()
	if want := []string{"limit=1000", "after=2023&limit=1000", "after=3023&limit=1000"}; fmt.Sprint(qs) != fmt.Sprint(want) {
		t.Errorf("list asked %q; want %q", qs, want)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1+2500+2 || !strings.HasPrefix(lines[0], "PORT") || lines[2502] != "pool: 2500 used, 126524 free, 129024 ports (tcp 2500 used of 64512, udp 0 used of 64512)" {
		t.Fatalf("list: %d lines, header %q, last %q; want 2503 lines ending in the pool", len(lines), lines[0], lines[len(lines)-1])
	}
	for i, line := range lines[1:2501] {
		if f := strings.Fields(line); len(f) < 5 || f[0] != strconv.Itoa(1024+i) || f[1] != "tcp" || f[2] != fmt.Sprintf("list-%06d", i) {
			t.Fatalf("line %d = %q; want port %d", i+1, line, 1024+i)
		}
	}

	for _, tt := range []struct {
		args []string
		want int
	}{{[]string{"-json"}, 2500}, {[]string{"-json", "-user", "u1"}, 1250}, {[]string{"-json", "-user", "nobody"}, 0}} {
		args, want := tt.args, tt.want
		out, _ := list(args...)
		var got allocationList
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("list %v: %v\n%s", args, err, out)
		}
		var again strings.Builder
		printJSON(&again, got)
		if again.String() != out {
			t.Errorf("list %v prints other JSON than printJSON would:\n%.300s\nwant\n%.300s", args, out, again.String())
		}
		if len(got.Allocations) != want || got.Pool.Used != 2500 {
			t.Errorf("list %v: %d allocations, pool %+v; want %d", args, len(got.Allocations), got.Pool, want)
		}
	}
	if busyOnce {
		t.Error("the busy answer was never sent")
	}

	for _, tt := range []struct {
		args []string
		want string
	}{{[]string{"-port", "1030"}, "list-000006"}, {[]string{"-key", "list-000042"}, "1066"}, {[]string{"-key", "nope"}, ""}} {
		out, qs := list(tt.args...)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		n := 0
		if tt.want != "" {
			n = 1
		}
		if len(qs) != 1 || len(lines) != 1+n+2 || (n == 1 && !strings.Contains(lines[1], tt.want)) {
			t.Errorf("list %v (asked %q):\n%s\nwant %d row with %q", tt.args, qs, out, n, tt.want)
		}
	}
}

// TestAdminPacing: heavy work rests heavyRest times as long as it worked,
// and longer while other heavy work runs, so that all of it together keeps
// to 1/(1+heavyRest) of a core; a paced listing takes accordingly longer
// than one running flat out.
func TestAdminPacing(t *testing.T) {
	tests := []struct {
		worked time.Duration
		active int
		want   time.Duration
	}{
		{time.Millisecond, 1, heavyRest * time.Millisecond},
		{time.Millisecond, 0, heavyRest * time.Millisecond},
		{time.Millisecond, 2, (2*(1+heavyRest) - 1) * time.Millisecond},
		{300 * time.Microsecond, 4, (4*(1+heavyRest) - 1) * 300 * time.Microsecond},
	}
	for _, tt := range tests {
		if got := restAfter(tt.worked, tt.active); got != tt.want {
			t.Errorf("restAfter(%v, %d) = %v; want %v", tt.worked, tt.active, got, tt.want)
		}
		busy := float64(max(1, tt.active)) * float64(tt.worked) / float64(tt.worked+restAfter(tt.worked, tt.active))
		if want := 1.0 / (1 + heavyRest); busy < want*0.999 || busy > want*1.001 {
			t.Errorf("%d pieces working %v keep %.3f of a core busy; want %.3f", tt.active, tt.worked, busy, want)
		}
	}

	// A listing that keeps few (here only the last of 5,001, which an
	// operator pinned: its user is "") pauses as often as one that keeps
	// all, and so does the page.
	a := bigAllocator(t, 5000, 50)
	if _, err := a.assign("pinned.rare", 60000, "", operatorChange{}); err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"/api/allocations", "/api/allocations?user=", "/?q=pinned.rare"} {
		took := func(opts serverOptions) time.Duration {
			h := newServer(a, slog.New(slog.DiscardHandler), opts)
			best := time.Hour
			for range 3 {
				start := time.Now()
				if rec := adminDo(t, h, "GET", target); rec.Code != 200 {
					t.Fatalf("GET %s: %d", target, rec.Code)
				}
				best = min(best, time.Since(start))
			}
			return best
		}
		flat, paced := took(serverOptions{unpaced: true}), took(serverOptions{})
		t.Logf("GET %s over 5,000 allocations: %v flat out, %v paced", target, flat, paced)
		if paced < 2*flat {
			t.Errorf("GET %s: paced %v, flat out %v; want the paced one at least twice as long (rest %d× the work)", target, paced, flat, heavyRest)
		}
	}
}
