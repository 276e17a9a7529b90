package main

import (
	"bufio"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// median of xs (the mean of the middle two for an even count).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// pairedRatio is the median over runs of f(a[i]) / f(b[i]): each run
// measured a and b back to back, so the pairing cancels what drifts on the
// machine between runs.
func pairedRatio[T any](a, b []T, f func(T) float64) float64 {
	var rs []float64
	for i := range min(len(a), len(b)) {
		rs = append(rs, f(a[i])/f(b[i]))
	}
	return median(rs)
}

func field[T any](xs []T, f func(T) float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

// ---------------------------------------------------------------------------
// Micro-benchmarks: `go test -bench` output, several counts per benchmark.

type microResult struct {
	Name   string
	Runs   int
	NsOp   []float64
	BOp    float64 // median
	Allocs float64 // median
	Other  map[string]float64
	// OtherRuns holds every count's value of each metric of Other.
	OtherRuns map[string][]float64
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.+)$`)

func readMicro(path string) ([]microResult, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	byName := map[string]*microResult{}
	var order []string
	bops, allocs, others := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(strings.TrimSpace(sc.Text()))
		if m == nil {
			continue
		}
		name := m[1]
		r := byName[name]
		if r == nil {
			r = &microResult{Name: name, Other: map[string]float64{}, OtherRuns: map[string][]float64{}}
			byName[name] = r
			order = append(order, name)
		}
		r.Runs++
		f := strings.Fields(m[3])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			switch f[i+1] {
			case "ns/op":
				r.NsOp = append(r.NsOp, v)
			case "B/op":
				bops[name] = append(bops[name], v)
			case "allocs/op":
				allocs[name] = append(allocs[name], v)
			default:
				others[name+"\x00"+f[i+1]] = append(others[name+"\x00"+f[i+1]], v)
			}
		}
	}
	out := make([]microResult, 0, len(order))
	for _, name := range order {
		r := byName[name]
		r.BOp, r.Allocs = median(bops[name]), median(allocs[name])
		for k, v := range others {
			if metric, ok := strings.CutPrefix(k, name+"\x00"); ok {
				r.Other[metric] = median(v)
				r.OtherRuns[metric] = v
			}
		}
		out = append(out, *r)
	}
	return out, sc.Err()
}

// n formats a count with thousands separators: 60,000.
func n(v int) string {
	s := strconv.Itoa(v)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// rate formats requests per second.
func rate(v float64) string { return n(int(math.Round(v))) }

func fmtNs(ns float64) string {
	switch {
	case math.IsNaN(ns):
		return "–"
	case ns >= 1e9:
		return fmt.Sprintf("%.2f s", ns/1e9)
	case ns >= 1e6:
		return fmt.Sprintf("%.2f ms", ns/1e6)
	case ns >= 1e3:
		return fmt.Sprintf("%.1f µs", ns/1e3)
	default:
		return fmt.Sprintf("%.0f ns", ns)
	}
}

// ---------------------------------------------------------------------------
// Targets.

type target struct {
	What     string
	Measured string
	Pass     bool
	Missing  bool // the phase did not run
}

func status(t target) string {
	switch {
	case t.Missing:
		return "not measured"
	case t.Pass:
		return "**pass**"
	default:
		return "**MISS**"
	}
}

func targets(res *results) []target {
	var ts []target
	if s := res.Storm; s != nil {
		prps, brps := median(field(s.Plugin, rps)), median(field(s.Baseline, rps))
		pl99, bl99 := median(field(s.Plugin, p99)), median(field(s.Baseline, p99))
		ratio := pairedRatio(s.Plugin, s.Baseline, rps)
		ts = append(ts,
			target{What: "Sticky hits: ≥ 0.8× the baseline's requests/s",
				Measured: fmt.Sprintf("%.3f× (median of %d paired runs; medians %s vs %s req/s)", ratio, len(s.Plugin), rate(prps), rate(brps)), Pass: ratio >= 0.8},
			target{What: fmt.Sprintf("Sticky hits: p99 < 2 ms at C = %d", s.Conns),
				Measured: fmt.Sprintf("p99 %.2f ms (baseline %.2f ms)", pl99, bl99), Pass: pl99 < 2})
	} else {
		ts = append(ts, target{What: "Sticky hits: ≥ 0.8× baseline req/s, p99 < 2 ms", Missing: true})
	}
	if f := res.Fresh; f != nil {
		e, full := median(field(f.Empty, p50)), median(field(f.Full, p50))
		ratio := pairedRatio(f.Full, f.Empty, p50)
		ts = append(ts, target{What: fmt.Sprintf("Fresh allocation: p50 at %s existing ≤ 1.5× p50 at 0", n(f.Existing)),
			Measured: fmt.Sprintf("%.3f× (median of %d paired runs; medians %.3f ms vs %.3f ms)", ratio, len(f.Full), full, e), Pass: ratio <= 1.5})
	} else {
		ts = append(ts, target{What: "Fresh allocation: p50 at 50,000 ≤ 1.5× p50 at 0", Missing: true})
	}
	if s := res.Startup; s != nil {
		for _, c := range []struct {
			when string
			runs []startupRun
		}{{"after a crash (every record read)", s.Cold}, {"after a clean shutdown", s.Warm}} {
			ready := median(field(c.runs, readyMS))
			rss := median(field(c.runs, func(r startupRun) float64 { return float64(r.RSS) }))
			ts = append(ts,
				target{What: fmt.Sprintf("Start-up with %s allocations < 1 s, %s", n(s.Allocations), c.when),
					Measured: fmt.Sprintf("%.0f ms", ready), Pass: ready < 1000},
				target{What: fmt.Sprintf("Resident memory after start < 64 MiB, %s", c.when),
					Measured: fmt.Sprintf("%.1f MiB VmRSS", rss/(1<<20)), Pass: rss < 64<<20})
		}
	} else {
		ts = append(ts, target{What: "Start-up < 1 s, VmRSS < 64 MiB with 60,000 allocations", Missing: true})
	}
	if e := res.E2E; e != nil {
		a, p := median(field(e.Alone, firstMS)), median(field(e.Plugin, firstMS))
		ratio := pairedRatio(e.Plugin, e.Alone, firstMS)
		ts = append(ts, target{What: fmt.Sprintf("Registration of %s proxies through frps with the plugin ≤ 1.1× frps alone", n(e.Proxies)),
			Measured: fmt.Sprintf("%.3f× (median of %d paired runs; medians %.0f ms vs %.0f ms; a no-op plugin: %.2f×)", ratio, len(e.Plugin), p, a,
				pairedRatio(e.Noop, e.Alone, firstMS)), Pass: ratio <= 1.1})
	} else {
		ts = append(ts, target{What: "Registration through frps with the plugin ≤ 1.1× frps alone", Missing: true})
	}
	if a := res.Admin; a != nil {
		ratio := pairedRatio(a.Storm, a.Alone, p99)
		ts = append(ts, target{What: fmt.Sprintf("Sticky hits while %d admin clients list %s allocations: p99 ≤ 2× alone", a.Clients, n(a.Allocations)),
			Measured: fmt.Sprintf("%.2f× (median of %d paired runs; p99 medians %.2f ms vs %.2f ms alone; peak VmRSS of the runs %.1f MiB)",
				ratio, len(a.Storm), median(field(a.Storm, p99)), median(field(a.Alone, p99)), mib(a.HWM)), Pass: ratio <= 2})
	} else {
		ts = append(ts, target{What: "Sticky hits while 100 admin clients list 64,000 allocations: p99 ≤ 2× alone", Missing: true})
	}
	return ts
}

// printSummary is the short report on stdout.
func printSummary(w io.Writer, cfg config, res *results) {
	fmt.Fprintf(w, "\n== frp-port-keeper benchmarks (%d cores, %s, %s) ==\n", res.Machine.Cores, res.Machine.CPU, res.Machine.Go)
	if s := res.Storm; s != nil {
		p, b := s.Plugin, s.Baseline
		fmt.Fprintf(w, "storm (K=%d R=%d C=%d, median of %d):\n", s.Keys, s.Requests, s.Conns, len(p))
		fmt.Fprintf(w, "  plugin   %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms\n", median(field(p, rps)), median(field(p, p50)), median(field(p, p99)))
		fmt.Fprintf(w, "  baseline %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms\n", median(field(b, rps)), median(field(b, p50)), median(field(b, p99)))
		fmt.Fprintf(w, "  plugin/baseline req/s: %.2f (median of the per-run ratios)\n", pairedRatio(p, b, rps))
	}
	if f := res.Fresh; f != nil {
		fmt.Fprintf(w, "fresh (%d keys, one at a time, median of %d):\n", f.Keys, len(f.Empty))
		fmt.Fprintf(w, "  empty store     p50 %.3f ms  p99 %.3f ms\n", median(field(f.Empty, p50)), median(field(f.Empty, p99)))
		fmt.Fprintf(w, "  %6d existing p50 %.3f ms  p99 %.3f ms\n", f.Existing, median(field(f.Full, p50)), median(field(f.Full, p99)))
		fmt.Fprintf(w, "  ratio p50 %.2f, p99 %.2f\n", median(field(f.Full, p50))/median(field(f.Empty, p50)), median(field(f.Full, p99))/median(field(f.Empty, p99)))
	}
	if s := res.Startup; s != nil {
		fmt.Fprintf(w, "start-up with %d allocations (median of %d): after a crash %.0f ms, VmRSS %.1f MiB; after a clean shutdown %.0f ms, VmRSS %.1f MiB; empty store %.0f ms, %.1f MiB\n",
			s.Allocations, len(s.Cold), median(field(s.Cold, readyMS)), median(field(s.Cold, rssMiB)),
			median(field(s.Warm, readyMS)), median(field(s.Warm, rssMiB)), median(field(s.Empty, readyMS)), median(field(s.Empty, rssMiB)))
	}
	if e := res.E2E; e != nil {
		a, p := median(field(e.Alone, firstMS)), median(field(e.Plugin, firstMS))
		fmt.Fprintf(w, "e2e, %d tcp proxies (median of %d): frps alone %.0f ms, with the plugin %.0f ms, ratio %.2f, no-op plugin %.0f ms; again after a client crash: %.0f ms vs %.0f ms (no-op %.0f ms)\n",
			e.Proxies, len(e.Alone), a, p, p/a, median(field(e.Noop, firstMS)), median(field(e.Alone, reconnectMS)), median(field(e.Plugin, reconnectMS)), median(field(e.Noop, reconnectMS)))
	}
	if a := res.Admin; a != nil {
		fmt.Fprintf(w, "admin storm, %d allocations, %d listers (median of %d): sticky-hit p50 %.2f / p99 %.2f ms alone, %.2f / %.2f ms with the listers (p99 ratio %.2f); peak VmRSS of the runs %.1f MiB\n",
			a.Allocations, a.Clients, len(a.Alone), median(field(a.Alone, p50)), median(field(a.Alone, p99)),
			median(field(a.Storm, p50)), median(field(a.Storm, p99)), pairedRatio(a.Storm, a.Alone, p99), mib(a.HWM))
	}
	fmt.Fprintln(w, "targets:")
	for _, t := range targets(res) {
		fmt.Fprintf(w, "  %-12s %s: %s\n", strings.Trim(status(t), "*"), t.What, t.Measured)
	}
	fmt.Fprintf(w, "load average: %s at the start, %s at the end\n", res.Machine.LoadStart, res.Machine.LoadEnd)
}

func rps(r loadResult) float64     { return r.RPS }
func p50(r loadResult) float64     { return r.P50 }
func p99(r loadResult) float64     { return r.P99 }
func readyMS(r startupRun) float64 { return r.ReadyMS }
func rssMiB(r startupRun) float64  { return mib(r.RSS) }
func hwmMiB(r startupRun) float64  { return mib(r.HWM) }
func firstMS(r e2eRun) float64     { return r.FirstMS }
func reconnectMS(r e2eRun) float64 { return r.ReconnectMS }

// ---------------------------------------------------------------------------
// BENCHMARKS.md

func markdown(cfg config, res *results, micro []microResult) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	m := res.Machine

	p("# Benchmarks\n\n")
	p("Written by `make bench` (bench/run.sh) on %s; every figure below is from that run. Do not edit by hand: run it again.\n\n",
		res.Started.UTC().Format("2006-01-02 15:04 MST"))

	p("## How to run\n\n")
	p("```sh\nmake bench            # bench/run.sh: micro-benchmarks, then the load tool; rewrites this file\n")
	p("bench/run.sh profile  # the same loads against a CPU-profiled copy of the server; profiles in bench/out/profiles\n```\n\n")
	p("`make bench` is not part of `make test`. On this machine it took %s from start to writing this file (load tool phases: %s).\n\n",
		suiteDuration(res), phaseTimes(res))
	p("The exact commands it ran:\n\n```sh\n")
	if cfg.command != "" {
		p("%s\n", cfg.command)
	}
	if cfg.microCmd != "" {
		p("%s\n", cfg.microCmd)
	}
	p("%s\n```\n\n", strings.Join(quoteArgs(os.Args), " "))
	p("Parts run alone too, e.g. `go test -run XXX -bench HandlerStickyHit -benchmem .` or ")
	p("`go run ./bench/loadtest -bin bin/frp-port-keeper -phases storm -storm-runs 1` (`-keep` keeps the data directories and logs; `-h` lists the knobs).\n\n")

	p("## Machine\n\n| | |\n|---|---|\n")
	p("| Cores | %d (GOMAXPROCS %d) |\n| CPU | %s |\n| Memory | %s |\n| Kernel | Linux %s |\n| Go | %s |\n",
		m.Cores, m.GOMAXPROCS, m.CPU, memTotal(m.MemTotal), m.Kernel, m.Go)
	fsRows(p, m)
	p("| Load average (1, 5, 15 min) | %s at the start, %s at the end |\n\n", m.LoadStart, m.LoadEnd)
	p("Everything shares these cores: the load generator, the plugin or the baseline, frps and frpc. ")
	p("Other work on the machine shows in the load average above. Figures that swing from run to run are the median of several runs, and every run is listed.\n\n")
	p("**Nothing is deleted while anything is timed.** Every data directory of the run (micro-benchmarks and load tool) lives under one directory that ")
	p("bench/run.sh removes when it exits, after the last timed phase; between phases and runs nothing is released, removed or overwritten by the suite: ")
	p("each run gets a store of its own, imported or copied (hard links) before the timer starts, and the disk is synced before timing. ")
	p("The reason is the data disk: on an ext4 without a journal the kernel's inode allocator passes over every inode freed in the last 60 s ")
	p("(360 s while its inode table block is still dirty; `recently_deleted()` in fs/ext4/ialloc.c, checked only when there is no journal), ")
	p("looking each one up in the buffer cache. After thousands of deletions every file creation walks past them, and creating files is nearly all of a fresh allocation. ")
	p("In the BENCHMARKS.md of 2026-11-26, deleting each run's data directory before the next timed run made fresh allocations at 50,000 existing look 2.7× slower than into an empty store, ")
	p("and registration through frps 6.6× frps alone, where by hand without the deletions they were 0.85–1.18× and about 3.5×. ")
	p("What the suite cannot keep out: the product's own deletions (the store's write probe at each start and a used checkpoint), ")
	p("the go tool's temporary build files before the micro-benchmarks, and whatever else runs on the machine and deletes files on the same disk.\n\n")

	p("## Targets\n\n| Target | Measured (medians) | Status |\n|---|---|---|\n")
	for _, t := range append(targets(res), durableTargets(micro)...) {
		p("| %s | %s | %s |\n", t.What, t.Measured, status(t))
	}
	p("\n")

	p("## 1. Micro-benchmarks\n\n")
	if len(micro) == 0 {
		p("Not run.\n\n")
	} else {
		runs := micro[0].Runs
		p("`go test -run XXX -bench . -benchmem -count %d` (bench_test.go). The median of the %d counts, and their range.\n\n", runs, runs)
		p("| Benchmark | time/op | range | B/op | allocs/op | heap kept | other |\n|---|---|---|---|---|---|---|\n")
		for _, r := range micro {
			lo, hi := slices.Min(r.NsOp), slices.Max(r.NsOp)
			heap := ""
			if v, ok := r.Other["heap-MiB"]; ok {
				heap = fmt.Sprintf("%.1f MiB", v)
			}
			var other []string
			for _, k := range slices.Sorted(maps.Keys(r.Other)) {
				if k != "heap-MiB" {
					other = append(other, fmt.Sprintf("%s %.3g", k, r.Other[k]))
				}
			}
			p("| %s | %s | %s – %s | %s | %s | %s | %s |\n", strings.TrimPrefix(r.Name, "Benchmark"), fmtNs(median(r.NsOp)), fmtNs(lo), fmtNs(hi),
				n(int(r.BOp)), n(int(r.Allocs)), heap, strings.Join(other, ", "))
		}
		p("\n- **HandlerStickyHit**: `newServer(...).ServeHTTP` with an httptest recorder, for a key that has its port; the request body is reused. ")
		p("The log line is formatted by a slog TextHandler into io.Discard, so its cost counts. *Parallel*: the same on every core, one key per goroutine.\n")
		p("- **Allocator/existing=N/load**: `newAllocator` over the file store holding N allocations, which is the server's start: every record file read and checked, the maps built. ")
		p("*heap kept* is the live heap of one loaded allocator.\n")
		p("- **Allocator/existing=N/hit**: `allocate()` of keys that have their port, cycling through the N seeded keys (one key when N = 0).\n")
		p("- **Allocator/existing=N/fresh**: `allocate()` of new keys: port search, then the two record files written before the answer. ")
		p("The store is seeded through `kvStore.claim` outside the timer, and the fresh keys go into a copy of it (hard links, loaded and synced outside the timer). ")
		p("After every 1,000 fresh keys the timer stops and they go on in a new copy, so the store keeps its size and the pool never runs dry; ")
		p("nothing is released (see *Nothing is deleted* above). ")
		p("Nearly all of a fresh allocation is the kernel creating the two files (openat with O_CREAT in the data directory). ")
		p("What that costs depends on the filesystem, the directory's size and other disk activity, and on this shared machine it swings between runs. ")
		p("So the store sizes are compared in section 3, where they are interleaved.\n")
		p("- **FleetClaims/instances=N**: fresh allocations from 16 concurrent clients spread over N allocators sharing one real etcd (one transaction per claim, user counts compared): *claims/s* and the latency of one claim, *p50-ms*/*p99-ms* (issue 10).\n")
		p("- **StickyHitByStore/store=S**: `allocate()` of keys that have their port at a file store and at an etcd-backed instance: the same in-memory path, no etcd round trip (target: etcd ≥ 0.95× file).\n")
		p("- **FleetVisibility**: from the start of a claim at one instance until another instance holds it in memory: the claim's round trip plus the watch's (*p50-ms*, *p99-ms*).\n")
		p("- **HandlerStickyHitHistoryOn**: HandlerStickyHit with the history, the event stream and a webhook whose receiver never answers: a sticky hit is not a change, so it should cost what HandlerStickyHit costs (issue 12).\n")
		p("- **FreshClaims/store=S/existing=N/clients=C**: fresh allocations into a durable file store, the same without fsyncs, and bbolt: see section 7.\n\n")
	}

	if s := res.Storm; s != nil {
		p("## 2. Reconnect storm: sticky hits against a bare net/http baseline\n\n")
		p("The real binary (`-probe=false -allow-ports %s`, log lines to a file) starts on an empty data directory and gets K = %s allocations: ", cfg.pool, n(s.Keys))
		p("K NewProxy requests for new keys over %d connections (%s allocations/s, p50 %.2f ms, p99 %.2f ms", s.Conns, rate(s.Alloc.RPS), s.Alloc.P50, s.Alloc.P99)
		if s.Alloc.Retries > 0 {
			p("; **%d answers were \"the port store did not answer in time; try again\"** (the plugin's 2 s store deadline) and were sent again, as frpc would", s.Alloc.Retries)
		} else {
			p("; no store timeouts")
		}
		p("). ")
		p("Then the storm: R = %s NewProxy requests for those keys over C = %d keep-alive connections, one goroutine and one `http.Transport` each. ", n(s.Requests), s.Conns)
		p("Every answer is checked for the key's port. ")
		p("The baseline is a separate process (`loadtest baseline`): a bare net/http server that reads the body and answers a fixed JSON of the plugin's answer size (%d bytes). ", s.AnswerBytes)
		p("Each storm starts after 20 untimed requests per connection, and the two alternate which goes first.\n\n")
		stormTable(p, s.Baseline, s.Plugin, true)
		p("Connections opened per storm, warm-up included: %d for the plugin, %d for the baseline. So every request after the first on a connection reused it.\n\n",
			s.Plugin[0].Dials, s.Baseline[0].Dials)
		bRPS := median(field(s.Baseline, rps))
		p("This is a closed loop: %d requests are always outstanding. By Little's law the mean latency is then C / throughput ", s.Conns)
		p("(%d / %s req/s = %.2f ms for the baseline), whatever the server does per request.\n\n", s.Conns, rate(bRPS), float64(s.Conns)/bRPS*1000)
		if len(s.PacedPlugin) > 0 {
			p("**Paced storm.** The same %d connections, %s requests sent at %s requests/s in total (half the baseline's closed-loop median), so requests do not queue behind each other:\n\n",
				s.Conns, n(s.Requests/4), rate(s.PacedRate))
			stormTable(p, s.PacedBaseline, s.PacedPlugin, false)
		}
	}

	if f := res.Fresh; f != nil {
		p("## 3. Fresh allocations\n\n")
		p("%s NewProxy requests for new keys, one at a time over one keep-alive connection. So each latency is one allocation: ", n(f.Keys))
		p("HTTP round trip, port search, two record files written. They go into an empty store and into a store that already holds %s allocations ", n(f.Existing))
		p("(imported with `frp-port-keeper import`, at most %.1f s). Each run has an empty store and a full store of its own, all imported and synced before the first run, so every run starts from %s and nothing is deleted or released between runs.\n\n", f.SeedSeconds, n(f.Existing))
		p("| Run | Empty: p50 | p99 | allocations/s | %s existing: p50 | p99 | allocations/s | p50 ratio |\n|---|---|---|---|---|---|---|---|\n", n(f.Existing))
		for i := range f.Empty {
			e, full := f.Empty[i], f.Full[i]
			p("| %d | %.3f ms | %.3f ms | %s | %.3f ms | %.3f ms | %s | %.2f |\n", i+1, e.P50, e.P99, rate(e.RPS), full.P50, full.P99, rate(full.RPS), full.P50/e.P50)
		}
		e50, f50 := median(field(f.Empty, p50)), median(field(f.Full, p50))
		e99, f99 := median(field(f.Empty, p99)), median(field(f.Full, p99))
		p("| **median** | **%.3f ms** | **%.3f ms** | | **%.3f ms** | **%.3f ms** | | **%.2f** |\n\n", e50, e99, f50, f99, pairedRatio(f.Full, f.Empty, p50))
		p("Ratio %s existing / empty: p50 **%.2f** (median of the per-run ratios; of the medians: %.2f), p99 **%.2f** (of the medians).\n\n",
			n(f.Existing), pairedRatio(f.Full, f.Empty, p50), f50/e50, f99/e99)
	}

	if s := res.Startup; s != nil {
		p("## 4. Start-up\n\n")
		p("The binary on a data directory holding %s allocations (the last run's full store of section 3) with the pool %s. ", n(s.Allocations), cfg.pool)
		p("Measured: the time from exec to the first 200 on `GET /ping` (polled every millisecond), and VmRSS and VmHWM from /proc/PID/status at that moment. Three starts per run:\n\n")
		p("- **after a crash**: a file the store does not read is created in the data directory before the start (and left there), as a record written before a crash would. ")
		p("Whatever the plugin saved at its last clean shutdown no longer describes the store, so it must read every record.\n")
		p("- **after a clean shutdown**: the previous instance stopped on SIGTERM and nothing changed since.\n")
		p("- **empty store**, for comparison.\n\n")
		p("*checkpoint* is the `from_checkpoint` field of the plugin's start-up log line (– when it has none).\n\n")
		p("| Run | After a crash: ready | VmRSS | VmHWM | checkpoint | After a clean shutdown: ready | VmRSS | VmHWM | checkpoint | Empty store: ready | VmRSS |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
		dash := func(s string) string {
			if s == "" {
				return "–"
			}
			return s
		}
		for i := range s.Cold {
			c, w, e := s.Cold[i], s.Warm[i], s.Empty[i]
			p("| %d | %.0f ms | %.1f MiB | %.1f MiB | %s | %.0f ms | %.1f MiB | %.1f MiB | %s | %.0f ms | %.1f MiB |\n", i+1,
				c.ReadyMS, mib(c.RSS), mib(c.HWM), dash(c.FromCheckpoint), w.ReadyMS, mib(w.RSS), mib(w.HWM), dash(w.FromCheckpoint), e.ReadyMS, mib(e.RSS))
		}
		p("| **median** | **%.0f ms** | **%.1f MiB** | **%.1f MiB** | | **%.0f ms** | **%.1f MiB** | **%.1f MiB** | | **%.0f ms** | **%.1f MiB** |\n\n",
			median(field(s.Cold, readyMS)), median(field(s.Cold, rssMiB)), median(field(s.Cold, hwmMiB)),
			median(field(s.Warm, readyMS)), median(field(s.Warm, rssMiB)), median(field(s.Warm, hwmMiB)),
			median(field(s.Empty, readyMS)), median(field(s.Empty, rssMiB)))
		if s.LaterSeconds > 0 {
			p("After the last start after a crash the plugin idled %.0f s: VmRSS was then **%.1f MiB**. ", s.LaterSeconds, mib(s.RSSLater))
			p("Compare the live heap of a loaded allocator in section 1 (*Allocator/existing=50000/load*, heap kept).\n\n")
		}
		p("The data directory was written moments before, so its files are in the page cache: these are warm-cache starts.\n\n")
	}

	if e := res.E2E; e != nil {
		p("## 5. End to end with frps and frpc v0.65.0\n\n")
		p("One frpc with %s tcp proxies without `remotePort` logs in to frps, which has `allowPorts` %s and `maxPortsPerClient = 0` (no limit). Three set-ups, in turn:\n\n", n(e.Proxies), e.Pool)
		p("- **frps alone**: frps picks its own random ports.\n")
		p("- **with the plugin**: frps calls it for every NewProxy. The plugin runs with `-allow-ports %s -probe=false` on an empty data directory of its own (each run's stays until the end), so every proxy is a fresh allocation.\n", e.Pool)
		p("- **with a no-op plugin** (reference): the bare baseline server of section 2 as frps's plugin, answering `{\"reject\":false,\"unchange\":true}` at once. It shows what any HTTP plugin call costs frps.\n\n")
		p("The time runs from frpc's exec until frps's dashboard (`GET /api/proxy/tcp`, polled every %.0f ms) lists all %s online. ", e.PollInterval, n(e.Proxies))
		p("Then frpc is killed, the proxies go offline, and a new frpc registers them again (\"again\"). With the plugin those are %s sticky hits.\n\n", n(e.Proxies))
		p("| Run | frps alone | with the plugin | ratio | no-op plugin | again: frps alone | again: with the plugin | ratio | again: no-op plugin |\n|---|---|---|---|---|---|---|---|---|\n")
		for i := range e.Alone {
			a, pl := e.Alone[i], e.Plugin[i]
			noop, noopAgain := "–", "–"
			if i < len(e.Noop) {
				noop, noopAgain = fmt.Sprintf("%.0f ms", e.Noop[i].FirstMS), fmt.Sprintf("%.0f ms", e.Noop[i].ReconnectMS)
			}
			p("| %d | %.0f ms | %.0f ms | %.2f | %s | %.0f ms | %.0f ms | %.2f | %s |\n", i+1, a.FirstMS, pl.FirstMS, pl.FirstMS/a.FirstMS, noop,
				a.ReconnectMS, pl.ReconnectMS, pl.ReconnectMS/a.ReconnectMS, noopAgain)
		}
		a1, p1, n1 := median(field(e.Alone, firstMS)), median(field(e.Plugin, firstMS)), median(field(e.Noop, firstMS))
		a2, p2, n2 := median(field(e.Alone, reconnectMS)), median(field(e.Plugin, reconnectMS)), median(field(e.Noop, reconnectMS))
		p("| **median** | **%.0f ms** | **%.0f ms** | **%.2f** | **%.0f ms** | **%.0f ms** | **%.0f ms** | **%.2f** | **%.0f ms** |\n\n",
			a1, p1, pairedRatio(e.Plugin, e.Alone, firstMS), n1, a2, p2, pairedRatio(e.Plugin, e.Alone, reconnectMS), n2)
		p("Ratios in the median row are medians of the per-run ratios.\n\n")
		pf, pr := median(field(e.Plugin, func(r e2eRun) float64 { return r.PluginFirstMS })), median(field(e.Plugin, func(r e2eRun) float64 { return r.PluginReconnectMS }))
		p("frps sends one client's NewProxy requests to its plugin one after another, so whatever a plugin adds per request adds up %s times. ", n(e.Proxies))
		p("The no-op plugin's column is that floor: %.2f× frps alone for the first registration, %.2f× for the second (medians of the per-run ratios). ",
			pairedRatio(e.Noop, e.Alone, firstMS), pairedRatio(e.Noop, e.Alone, reconnectMS))
		p("The plugin's own handler time for the %s requests (the sum of its `frp_port_keeper_request_duration_seconds` histogram, median over the runs) was ", n(e.Proxies))
		p("**%.0f ms** for the first registration (%.2f ms per fresh allocation) of the %.0f ms it added to frps alone, ", pf, pf/float64(e.Proxies), p1-a1)
		p("and **%.0f ms** for the second (%.3f ms per sticky hit) of the %.0f ms added. ", pr, pr/float64(e.Proxies), p2-a2)
		p("The rest is outside the plugin's handler: frps's plugin call (request built, sent over loopback HTTP, answer read) and the switching between the processes.\n\n")
		p("With the plugin every proxy got its first port back on the second registration (checked).\n\n")
	}
	if a := res.Admin; a != nil {
		adminMarkdown(p, cfg, a)
	}
	durableMarkdown(p, res.Machine, micro)
	return b.String()
}

// adminMarkdown is section 6, the admin storm.
func adminMarkdown(p func(string, ...any), cfg config, a *adminResults) {
	p("## 6. Admin storm: sticky hits while %d clients list every allocation\n\n", a.Clients)
	p("The binary (`-probe=false -allow-ports %s`) on a data directory holding %s allocations (imported in %.1f s). ", cfg.pool, n(a.Allocations), a.SeedSeconds)
	p("One `GET /api/allocations` (no limit: every allocation, streamed) with nothing else running: %.1f MiB in %.0f ms.\n\n", mib(a.ListBytes), a.ListMS)
	p("Sticky hits, paced: %s NewProxy requests for the imported keys at %s requests/s over %d keep-alive connections, every answer checked for the key's port. ", n(a.Requests), rate(a.Rate), a.Conns)
	p("Each run measures them alone, then while %d admin clients, each on a connection of its own, list every allocation in a loop ", a.Clients)
	p("(the whole answer read and its allocations counted; a 503 is asked again at once, so every client always has a listing in flight). ")
	p("The storm runs for a second before the hits start. *Listings* counts complete answers of all %s allocations during the storm, *busy* the 503s; ", n(a.Allocations))
	p("*VmRSS* is the plugin's, sampled every 50 ms during the storm.\n\n")
	p("| Run | Alone: p50 | p99 | max | With %d listers: p50 | p99 | max | p99 ratio | Listings | MiB/s listed | Busy (503) | VmRSS max |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n", a.Clients)
	for i := range a.Storm {
		al, st, l := a.Alone[i], a.Storm[i], a.Listers[i]
		p("| %d | %.2f ms | %.2f ms | %.1f ms | %.2f ms | %.2f ms | %.1f ms | %.2f | %s | %.0f | %s | %.1f MiB |\n", i+1,
			al.P50, al.P99, al.Max, st.P50, st.P99, st.Max, st.P99/al.P99, n(int(l.Lists)), mib(l.Bytes)/l.Seconds, n(int(l.Busy)), mib(l.RSSMax))
	}
	p("| **median** | **%.2f ms** | **%.2f ms** | | **%.2f ms** | **%.2f ms** | | **%.2f** | | | | |\n\n",
		median(field(a.Alone, p50)), median(field(a.Alone, p99)), median(field(a.Storm, p50)), median(field(a.Storm, p99)), pairedRatio(a.Storm, a.Alone, p99))
	p("The p99 ratio in the median row is the median of the per-run ratios. ")
	p("Plugin memory: VmRSS %.1f MiB before the first run; the peak of all the runs (VmHWM, reset before the first) **%.1f MiB**. ", mib(a.RSSIdle), mib(a.HWM))
	p("For comparison, the peak of the start before (reading every record): %.1f MiB.\n\n", mib(a.StartHWM))
}

// stormTable lists storms against the baseline and the plugin, run by run.
func stormTable(p func(string, ...any), base, plug []loadResult, closed bool) {
	p("| Run | Baseline req/s | p50 | p99 | max | Plugin req/s | p50 | p99 | max | Plugin/baseline req/s |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for i := range plug {
		bl, pl := base[i], plug[i]
		p("| %d | %s | %.2f ms | %.2f ms | %.1f ms | %s | %.2f ms | %.2f ms | %.1f ms | %.2f |\n", i+1,
			rate(bl.RPS), bl.P50, bl.P99, bl.Max, rate(pl.RPS), pl.P50, pl.P99, pl.Max, pl.RPS/bl.RPS)
	}
	bRPS, pRPS := median(field(base, rps)), median(field(plug, rps))
	p("| **median** | **%s** | **%.2f ms** | **%.2f ms** | | **%s** | **%.2f ms** | **%.2f ms** | | **%.2f** |\n\n",
		rate(bRPS), median(field(base, p50)), median(field(base, p99)), rate(pRPS), median(field(plug, p50)), median(field(plug, p99)), pairedRatio(plug, base, rps))
	if closed {
		p("The last column's median is the median of the per-run ratios (each run pairs the two storms back to back); the ratio of the two median throughputs is %.2f.\n\n", pRPS/bRPS)
	}
}

// fsRows are the machine table's rows about the data directories' file
// system.
func fsRows(p func(string, ...any), m machine) {
	d := m.Disk
	if d.Type == "" {
		p("| Data directories on | %s |\n", m.FS)
		return
	}
	p("| Data directories on | %s on %s, mounted on %s (the run's directories under %s) |\n", d.Type, d.Device, d.MountPoint, filepath.Dir(filepath.Dir(d.Dir)))
	p("| Mount options | `%s` (/proc/mounts) |\n", d.Options)
	if d.Type == "ext4" {
		j := "unknown"
		switch d.Journal {
		case "yes":
			j = "yes"
		case "no":
			j = "**none**"
		}
		if d.JournalWhy != "" {
			j += " (" + d.JournalWhy + ")"
		}
		p("| Journal | %s |\n", j)
		if d.Features != "" {
			p("| ext4 features | %s (`tune2fs -l`) |\n", d.Features)
		} else if d.NoFeatures != "" {
			p("| ext4 features | not known: %s |\n", d.NoFeatures)
		}
	}
	if d.WriteCache != "" {
		note := ""
		if d.WriteCache == "write back" {
			note = ": every fsync ends in a cache flush"
		}
		p("| Device write cache | %s%s |\n", d.WriteCache, note)
	}
	if d.Size != "" {
		p("| File system size | %s |\n", d.Size)
	}
}

// memTotal turns /proc/meminfo's "24684092 kB" into GiB.
func memTotal(s string) string {
	f := strings.Fields(s)
	if len(f) != 2 || f[1] != "kB" {
		return s
	}
	kb, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return s
	}
	return fmt.Sprintf("%.1f GiB", kb/(1<<20))
}

func phaseTimes(res *results) string {
	var parts []string
	for _, name := range []string{"storm", "fresh", "startup", "e2e", "admin"} {
		if s, ok := res.Phases[name]; ok {
			parts = append(parts, fmt.Sprintf("%s %.0f s", name, s))
		}
	}
	return strings.Join(parts, ", ")
}

// suiteDuration is the time since bench/run.sh started (BENCH_START, unix
// seconds), else the load tool's own run time.
func suiteDuration(res *results) string {
	d := res.Finished.Sub(res.Started)
	if s, err := strconv.ParseInt(os.Getenv("BENCH_START"), 10, 64); err == nil {
		d = time.Since(time.Unix(s, 0))
	}
	return fmt.Sprintf("%.1f minutes", d.Minutes())
}

func quoteArgs(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\"'$`\\|&;<>()*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return out
}

// ---------------------------------------------------------------------------
// Durable commits (issue 15): BenchmarkFreshClaims in the micro-benchmarks.

type claimsCase struct {
	store             string
	existing, clients int
}

// claimsStores are BenchmarkFreshClaims's stores, in its order.
var claimsStores = []string{"file", "file-nosync", "bbolt"}

// freshClaims picks the BenchmarkFreshClaims results out of micro.
func freshClaims(micro []microResult) (map[claimsCase]microResult, []claimsCase) {
	byCase := map[claimsCase]microResult{}
	var order []claimsCase
	for _, r := range micro {
		rest, ok := strings.CutPrefix(r.Name, "BenchmarkFreshClaims/")
		if !ok {
			continue
		}
		var c claimsCase
		var existing, clients string
		for _, part := range strings.Split(rest, "/") {
			k, v, _ := strings.Cut(part, "=")
			switch k {
			case "store":
				c.store = v
			case "existing":
				existing = v
			case "clients":
				clients = v
			}
		}
		var err1, err2 error
		c.existing, err1 = strconv.Atoi(existing)
		c.clients, err2 = strconv.Atoi(clients)
		if c.store == "" || err1 != nil || err2 != nil {
			continue
		}
		byCase[c] = r
		order = append(order, c)
	}
	return byCase, order
}

// durableTargets are issue 15's speed targets: group commit keeps 16
// concurrent clients' durable claims/s at ≥ 0.5× the undurable store's,
// and one client's durable p50 is within 1.5× of bbolt's.
func durableTargets(micro []microResult) []target {
	byCase, order := freshClaims(micro)
	groupWhat := "Durable commits, 16 concurrent clients: file store claims/s ≥ 0.5× the undurable file store's"
	seqWhat := "Durable commits, one client: file store p50 ≤ 1.5× bbolt's"
	var sizes []int
	for _, c := range order {
		if !slices.Contains(sizes, c.existing) {
			sizes = append(sizes, c.existing)
		}
	}
	ratioTarget := func(what string, a, b claimsCase, metric string, format func(float64) string, ok func(float64) bool) target {
		t := target{What: what, Pass: len(sizes) > 0, Missing: len(sizes) == 0}
		var parts []string
		for _, size := range sizes {
			a.existing, b.existing = size, size
			ra, okA := byCase[a]
			rb, okB := byCase[b]
			if !okA || !okB {
				t.Missing = true
				continue
			}
			va, vb := ra.Other[metric], rb.Other[metric]
			t.Pass = t.Pass && ok(va/vb)
			parts = append(parts, fmt.Sprintf("%.2f× at %s existing (%s vs %s)", va/vb, n(size), format(va), format(vb)))
		}
		t.Measured = strings.Join(parts, "; ")
		return t
	}
	return []target{
		ratioTarget(groupWhat, claimsCase{store: "file", clients: 16}, claimsCase{store: "file-nosync", clients: 16}, "claims/s",
			func(v float64) string { return rate(v) + " claims/s" }, func(r float64) bool { return r >= 0.5 }),
		ratioTarget(seqWhat, claimsCase{store: "file", clients: 1}, claimsCase{store: "bbolt", clients: 1}, "p50-ms",
			func(v float64) string { return fmt.Sprintf("%.3f ms", v) }, func(r float64) bool { return r <= 1.5 }),
	}
}

// durableMarkdown is section 7, from BenchmarkFreshClaims; nothing when it
// did not run.
func durableMarkdown(p func(string, ...any), m machine, micro []microResult) {
	byCase, order := freshClaims(micro)
	if len(order) == 0 {
		return
	}
	runs := byCase[order[0]].Runs
	p("## 7. Durable commits\n\n")
	p("`BenchmarkFreshClaims` (bench_test.go, issue 15): `allocate()` of fresh keys, bind test off, from one client and from 16 concurrent clients, ")
	p("into a store already holding 0 or 50,000 allocations. Stores:\n\n")
	p("- **file**: the file store as it ships. Before a fresh claim (a new key) is answered, its port record, its key record (created under its own name) and the directory are fsync'd, ")
	p("all three in parallel (a move or a reclaim instead fsyncs a temporary key record, renames it into place, then fsyncs the directory). The claims that queue while one batch waits for the disk are committed together in the next (group commit).\n")
	p("- **file-nosync**: the same store with every fsync skipped: the old, undurable file store, kept only to measure what durability costs.\n")
	p("- **bbolt**: one fsync'd bbolt transaction per claim.\n\n")
	p("Set-up (seeding 50,000 allocations, copying the seeded store, opening and loading it) is outside the timer, and the disk is synced before the timer starts. ")
	p("Nothing is deleted while the benchmarks run: each count's stores stay until bench/run.sh exits. *claims/s* counts the claims over the timed wall time; *p50*/*p99* are the latencies of single claims. ")
	p("Medians of %d counts, and the range of claims/s over the counts. Data directories on %s.\n\n", runs, m.FS)
	p("| Store | Existing | Clients | p50 | p99 | claims/s | claims/s range |\n|---|---|---|---|---|---|---|\n")
	for _, store := range claimsStores {
		for _, c := range order {
			if c.store != store {
				continue
			}
			r := byCase[c]
			cs := r.OtherRuns["claims/s"]
			rng := ""
			if len(cs) > 0 {
				rng = fmt.Sprintf("%s – %s", rate(slices.Min(cs)), rate(slices.Max(cs)))
			}
			p("| %s | %s | %d | %.3f ms | %.2f ms | %s | %s |\n", c.store, n(c.existing), c.clients, r.Other["p50-ms"], r.Other["p99-ms"], rate(r.Other["claims/s"]), rng)
		}
	}
	p("\n")
	for _, t := range durableTargets(micro) {
		p("- %s: %s (%s).\n", t.What, t.Measured, strings.Trim(status(t), "*"))
	}
	p("\nSticky hits write nothing, durable or not: the reconnect storm of section 2 runs against the durable file store.\n\n")
}
