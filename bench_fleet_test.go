package main

// Fleet figures of issue 10 and the history figure of issue 12, for
// `make bench` (bench/run.sh): claims through one and three instances on
// one real etcd, sticky hits at an etcd-backed instance against the file
// store (the same in-memory path), how long a change at one instance
// takes to be seen at another, and a reconnect storm of sticky hits with
// history and webhooks on.

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store/etcd"
	"frp-port-keeper/internal/testenv"
)

// benchEtcd is one etcd shared by the fleet benchmarks of a run.
var benchEtcd struct {
	once sync.Once
	srv  *testenv.EtcdServer
}

var benchPrefixes atomic.Int64

// benchFleet opens n allocators on one fresh prefix of the shared etcd,
// each following the others through its watch.
func benchFleet(b *testing.B, n int) []*allocator {
	b.Helper()
	benchEtcd.once.Do(func() { benchEtcd.srv = startEtcdFor(b) })
	prefix := fmt.Sprintf("/bench-%d/", benchPrefixes.Add(1))
	set, _ := parsePorts(benchPool)
	var out []*allocator
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := etcd.Open(ctx, etcdOptions(b, benchEtcd.srv, prefix))
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		a, _, err := newAllocator(st, set, allocatorOptions{log: benchLogger()})
		if err != nil {
			b.Fatal(err)
		}
		fctx, stop := context.WithCancel(context.Background())
		go a.follow(fctx)
		b.Cleanup(func() { stop(); st.Close() })
		out = append(out, a)
	}
	return out
}

// startEtcdFor starts the benchmarks' etcd; it lives as long as the test
// binary, not just the benchmark that first asked for it.
func startEtcdFor(b *testing.B) *testenv.EtcdServer {
	fullTier(b, "a real etcd")
	return testenv.StartEtcd(&keepTB{TB: b}, nil)
}

// keepTB is a testing.TB whose cleanups never run and whose temporary
// directories outlive the benchmark that made them: the shared etcd stays
// up for every benchmark of the run and ends with the process.
type keepTB struct{ testing.TB }

func (keepTB) Cleanup(func()) {}

func (k keepTB) TempDir() string {
	dir, err := os.MkdirTemp("", "frp-port-keeper-bench-etcd-")
	if err != nil {
		k.Fatal(err)
	}
	return dir
}

// percentile returns the p-th percentile of sorted durations, in ms.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := min(len(sorted)-1, int(float64(len(sorted))*p))
	return float64(sorted[i]) / float64(time.Millisecond)
}

// BenchmarkFleetClaims: fresh allocations from 16 concurrent clients,
// spread over 1 or 3 instances on one etcd: claims/s and the latency of
// one claim (p50, p99).
func BenchmarkFleetClaims(b *testing.B) {
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("instances=%d", n), func(b *testing.B) {
			fleet := benchFleet(b, n)
			var next atomic.Int64
			lat := make([]time.Duration, 0, b.N)
			var mu sync.Mutex
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			for w := range 16 {
				wg.Go(func() {
					var mine []time.Duration
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							break
						}
						t0 := time.Now()
						_, _, err := fleet[w%n].allocate(frpplugin.Proxy{User: "u", ProxyName: fmt.Sprintf("k%d-%d", w, i), ProxyType: "tcp"})
						if err != nil {
							b.Error(err)
							return
						}
						mine = append(mine, time.Since(t0))
					}
					mu.Lock()
					lat = append(lat, mine...)
					mu.Unlock()
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "claims/s")
			b.ReportMetric(percentile(lat, 0.50), "p50-ms")
			b.ReportMetric(percentile(lat, 0.99), "p99-ms")
		})
	}
}

// BenchmarkStickyHitByStore: allocate() for keys that have their port, at
// a file store and at an etcd-backed instance: the same in-memory path.
func BenchmarkStickyHitByStore(b *testing.B) {
	for _, kind := range []string{"file", "etcd"} {
		b.Run("store="+kind, func(b *testing.B) {
			var a *allocator
			if kind == "etcd" {
				a = benchFleet(b, 1)[0]
			} else {
				a = newTestAllocator(b, b.TempDir(), benchPool, allocatorOptions{log: benchLogger()})
			}
			reqs := make([]frpplugin.Proxy, 256)
			for i := range reqs {
				reqs[i] = frpplugin.Proxy{User: "u", ProxyName: fmt.Sprintf("hit-%03d", i), ProxyType: "tcp"}
				if _, _, err := a.allocate(reqs[i]); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, how, err := a.allocate(reqs[i%len(reqs)]); err != nil || how != outcomeHit {
					b.Fatalf("%s %v", how, err)
				}
				i++
			}
		})
	}
}

// BenchmarkFleetVisibility: the time from the start of a new key's claim
// at one instance until another instance holds it in memory (p50, p99):
// the claim's own round trip and the watch's.
func BenchmarkFleetVisibility(b *testing.B) {
	fleet := benchFleet(b, 2)
	lat := make([]time.Duration, 0, b.N)
	i := 0
	for b.Loop() {
		key := fmt.Sprintf("vis-%d", i)
		i++
		t0 := time.Now()
		port, _, err := fleet[0].allocate(frpplugin.Proxy{User: "u", ProxyName: key, ProxyType: "tcp"})
		if err != nil {
			b.Fatal(err)
		}
		for {
			if r, _, ok := fleet[1].lookup(key); ok && r.Port == port {
				break
			}
			if time.Since(t0) > 10*time.Second {
				b.Fatalf("%s not seen at the other instance in 10s", key)
			}
			time.Sleep(50 * time.Microsecond)
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	b.ReportMetric(percentile(lat, 0.50), "p50-ms")
	b.ReportMetric(percentile(lat, 0.99), "p99-ms")
}

// BenchmarkHandlerStickyHitHistoryOn is BenchmarkHandlerStickyHit with
// history and events on (a file store's history, an event stream and a
// webhook whose receiver never answers): a sticky hit is not a change, so
// it should cost the same.
func BenchmarkHandlerStickyHitHistoryOn(b *testing.B) {
	dir := b.TempDir()
	st := newTestStore(b, dir)
	dead := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { time.Sleep(time.Hour) }))
	b.Cleanup(dead.CloseClientConnections)
	m := newMetrics(func() poolStats { return poolStats{} })
	n := newNotifier(dead.URL, "secret", benchLogger(), m.notify)
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	go n.run(ctx)
	events := newEventHub([]*notifier{n})
	rec := history.NewRecorder(st.History(), benchLogger(), nil, events.publish)
	b.Cleanup(rec.Stop)
	set, _ := parsePorts(benchPool)
	a, _, err := newAllocator(st, set, allocatorOptions{log: benchLogger(), changed: rec.Record})
	if err != nil {
		b.Fatal(err)
	}
	h := newServer(a, benchLogger(), serverOptions{metrics: m, history: st.History(), events: events})
	r := newBenchRequest([]byte(newProxyBody("alice", "alice.ssh", "tcp", "")))
	r.mustServe(b, h) // the first request allocates: one change, one entry
	b.ReportAllocs()
	for b.Loop() {
		r.mustServe(b, h)
	}
}
