package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"time"
)

// stormResults: K allocations, then R sticky NewProxy requests over C
// connections against the plugin and against the baseline, runs times,
// interleaved.
type stormResults struct {
	Keys        int          `json:"keys"`
	Requests    int          `json:"requests"`
	Conns       int          `json:"conns"`
	AnswerBytes int          `json:"answer_bytes"`
	Alloc       loadResult   `json:"alloc"` // the K fresh allocations, C at a time
	Plugin      []loadResult `json:"plugin"`
	Baseline    []loadResult `json:"baseline"`
	// The paced storms: the same C connections, Requests/4 requests at
	// PacedRate requests/s (half the baseline's closed-loop median), so
	// the latency is the server's, not the queue's.
	PacedRate     float64      `json:"paced_rate"`
	PacedPlugin   []loadResult `json:"paced_plugin"`
	PacedBaseline []loadResult `json:"paced_baseline"`
}

func phaseStorm(cfg config, tmp string) (*stormResults, error) {
	dir := filepath.Join(tmp, "storm")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	pl, err := startPlugin(cfg, "storm-alloc", filepath.Join(dir, "data"), cfg.pool, filepath.Join(dir, "plugin.log"))
	if err != nil {
		return nil, err
	}
	defer pl.stop(syscall.SIGTERM)
	res := &stormResults{Keys: cfg.keys, Requests: cfg.requests, Conns: cfg.conns}

	bodies := make([][]byte, cfg.keys)
	for i := range bodies {
		bodies[i] = newProxyBody("bench", fmt.Sprintf("storm-%06d", i))
	}
	ports := make([]int, cfg.keys)
	var answer []byte
	alloc := load{url: "http://" + pl.addr + pluginQuery, bodies: bodies, total: cfg.keys, conns: cfg.conns,
		check: func(i, status int, body []byte) error {
			port, ok := answerPort(body)
			if status != http.StatusOK || !ok {
				return fmt.Errorf("allocation %d: status %d, answer %s", i, status, body)
			}
			ports[i] = port
			if i == 0 {
				answer = bytes.Clone(body)
			}
			return nil
		},
		// A store slower than the plugin's 2 s deadline makes it answer
		// "try again"; frpc would, so the load tool does too, and counts it.
		retry: func(status int, body []byte) bool {
			return status == http.StatusOK && bytes.Contains(body, []byte(`"reject":true`)) && bytes.Contains(body, []byte("try again"))
		}}
	logf("storm: allocating %d keys over %d connections", cfg.keys, cfg.conns)
	if res.Alloc, err = alloc.run(); err != nil {
		return nil, fmt.Errorf("allocating: %v", err)
	}
	seen := map[int]bool{}
	for i, p := range ports {
		if seen[p] {
			return nil, fmt.Errorf("port %d given twice (key %d)", p, i)
		}
		seen[p] = true
	}
	logf("storm: %d keys allocated, %.0f/s, p50 %.2f ms, p99 %.2f ms, %d store timeouts retried", cfg.keys, res.Alloc.RPS, res.Alloc.P50, res.Alloc.P99, res.Alloc.Retries)
	res.AnswerBytes = len(answer)
	if cfg.profileDir != "" {
		// Profiles of the sticky hits alone: restart on the same data.
		pl.stop(syscall.SIGTERM)
		if pl, err = startPlugin(cfg, "storm-hits", filepath.Join(dir, "data"), cfg.pool, filepath.Join(dir, "plugin.log")); err != nil {
			return nil, err
		}
		defer pl.stop(syscall.SIGTERM)
	}

	bl, baddr, err := startBaseline(cfg.self, dir, answer)
	if err != nil {
		return nil, err
	}
	defer bl.stop(syscall.SIGTERM)

	suffixes := make([][]byte, cfg.keys)
	for i, p := range ports {
		suffixes[i] = portSuffix(p)
	}
	pluginLoad := load{url: "http://" + pl.addr + pluginQuery, bodies: bodies, total: cfg.requests, conns: cfg.conns, warmup: 20,
		check: func(i, status int, body []byte) error {
			if status != http.StatusOK || !bytes.HasSuffix(body, suffixes[i%len(suffixes)]) {
				return fmt.Errorf("key %d: status %d, answer %s; want port %d", i%len(suffixes), status, body, ports[i%len(ports)])
			}
			return nil
		}}
	baseLoad := load{url: "http://" + baddr + pluginQuery, bodies: bodies, total: cfg.requests, conns: cfg.conns, warmup: 20,
		check: func(i, status int, body []byte) error {
			if status != http.StatusOK || len(body) != len(answer) {
				return fmt.Errorf("baseline: status %d, %d bytes", status, len(body))
			}
			return nil
		}}
	// Closed loop: as fast as the answers come, then paced at half the
	// baseline's pace. The two targets alternate which goes first.
	storms := func(kind string, pl, bl load, plugin, baseline *[]loadResult) error {
		for run := range cfg.stormRuns {
			order := []string{"baseline", "plugin"}
			if run%2 == 1 {
				order = []string{"plugin", "baseline"}
			}
			for _, target := range order {
				l, into := bl, baseline
				if target == "plugin" {
					l, into = pl, plugin
				}
				r, err := l.run()
				if err != nil {
					return fmt.Errorf("%s run %d on the %s: %v", kind, run+1, target, err)
				}
				*into = append(*into, r)
				logf("%s run %d %-8s: %7.0f req/s  p50 %.2f ms  p99 %.2f ms  max %.1f ms  (%d conns opened)",
					kind, run+1, target, r.RPS, r.P50, r.P99, r.Max, r.Dials)
			}
		}
		return nil
	}
	if err := storms("storm", pluginLoad, baseLoad, &res.Plugin, &res.Baseline); err != nil {
		return nil, err
	}
	res.PacedRate = math.Round(median(field(res.Baseline, rps)) / 2)
	pluginLoad.rate, baseLoad.rate = res.PacedRate, res.PacedRate
	pluginLoad.total, baseLoad.total = cfg.requests/4, cfg.requests/4
	if err := storms(fmt.Sprintf("paced storm (%.0f/s)", res.PacedRate), pluginLoad, baseLoad, &res.PacedPlugin, &res.PacedBaseline); err != nil {
		return nil, err
	}
	return res, nil
}

// freshResults: fresh allocations, one at a time on one connection, into
// an empty store and into one that already holds Existing allocations.
type freshResults struct {
	Keys        int          `json:"keys"`
	Existing    int          `json:"existing"`
	SeedSeconds float64      `json:"seed_seconds"` // import of Existing allocations
	Empty       []loadResult `json:"empty"`
	Full        []loadResult `json:"full"`
}

// phaseFresh leaves the full store (Existing + Keys allocations) in the
// directory it returns, for the start-up phase.
//
// Nothing is deleted or released here: each run has an empty store and a
// full store of its own, all of them imported before the first timed run,
// and they stay until the load tool ends. On an ext4 without a journal a
// deletion makes the file creations of the next minutes slow (the inode
// allocator skips recently freed inodes), and creating files is nearly
// all of a fresh allocation.
func phaseFresh(cfg config, tmp string) (*freshResults, string, error) {
	res := &freshResults{Keys: cfg.freshKeys, Existing: cfg.freshExisting}
	fullDirs := make([]string, cfg.runs)
	for run := range cfg.runs {
		fullDirs[run] = filepath.Join(tmp, fmt.Sprintf("fresh-full-%d", run+1))
		if err := os.MkdirAll(fullDirs[run], 0o700); err != nil {
			return nil, "", err
		}
		logf("fresh: importing %d allocations for run %d", cfg.freshExisting, run+1)
		took, err := seedDataDir(cfg.bin, filepath.Join(fullDirs[run], "data"), fullDirs[run], cfg.freshExisting)
		if err != nil {
			return nil, "", err
		}
		res.SeedSeconds = max(res.SeedSeconds, took.Seconds())
		logf("fresh: imported %d allocations in %v", cfg.freshExisting, took.Round(time.Millisecond))
	}
	syscall.Sync() // the imports' writeback is over before anything is measured

	sequential := func(addr, prefix string) (loadResult, []string, error) {
		keys := make([]string, cfg.freshKeys)
		bodies := make([][]byte, cfg.freshKeys)
		for i := range keys {
			keys[i] = fmt.Sprintf("%s-%06d", prefix, i)
			bodies[i] = newProxyBody("fresh", keys[i])
		}
		l := load{url: "http://" + addr + pluginQuery, bodies: bodies, total: cfg.freshKeys, conns: 1,
			check: func(i, status int, body []byte) error {
				if _, ok := answerPort(body); status != http.StatusOK || !ok {
					return fmt.Errorf("fresh %s: status %d, answer %s", keys[i], status, body)
				}
				return nil
			},
			retry: func(status int, body []byte) bool {
				return status == http.StatusOK && bytes.Contains(body, []byte("try again"))
			}}
		r, err := l.run()
		return r, keys, err
	}

	for run := range cfg.runs {
		emptyDir := filepath.Join(tmp, fmt.Sprintf("fresh-empty-%d", run+1))
		if err := os.MkdirAll(emptyDir, 0o700); err != nil {
			return nil, "", err
		}
		empty, err := startPlugin(cfg, "fresh-empty", filepath.Join(emptyDir, "data"), cfg.pool, filepath.Join(emptyDir, "plugin.log"))
		if err != nil {
			return nil, "", err
		}
		r, _, err := sequential(empty.addr, fmt.Sprintf("fresh-e%d", run+1))
		empty.stop(syscall.SIGTERM)
		if err != nil {
			return nil, "", err
		}
		res.Empty = append(res.Empty, r)
		logf("fresh run %d, empty store:      p50 %.3f ms  p99 %.3f ms  (%.0f allocations/s)", run+1, r.P50, r.P99, r.RPS)

		full, err := startPlugin(cfg, "fresh-full", filepath.Join(fullDirs[run], "data"), cfg.pool, filepath.Join(fullDirs[run], "plugin.log"))
		if err != nil {
			return nil, "", err
		}
		if n, err := loadedAllocations(full.logPath); err != nil || n != cfg.freshExisting {
			full.stop(syscall.SIGTERM)
			return nil, "", fmt.Errorf("the plugin loaded %d allocations (%v); want %d", n, err, cfg.freshExisting)
		}
		r, _, err = sequential(full.addr, fmt.Sprintf("fresh-f%d", run+1))
		full.stop(syscall.SIGTERM)
		if err != nil {
			return nil, "", err
		}
		res.Full = append(res.Full, r)
		logf("fresh run %d, %d existing: p50 %.3f ms  p99 %.3f ms  (%.0f allocations/s)", run+1, cfg.freshExisting, r.P50, r.P99, r.RPS)
	}
	return res, filepath.Join(fullDirs[cfg.runs-1], "data"), nil
}

// seedDataDir writes n allocations (ports 1024 up) into dataDir with the
// binary's import command, the fastest offline way.
func seedDataDir(bin, dataDir, scratch string, n int) (time.Duration, error) {
	type rec struct {
		Key        string `json:"key"`
		Port       int    `json:"port"`
		User       string `json:"user"`
		ProxyName  string `json:"proxy_name"`
		ProxyType  string `json:"proxy_type"`
		CreatedAt  string `json:"created_at"`
		AssignedAt string `json:"assigned_at"`
	}
	var file struct {
		Allocations []rec `json:"allocations"`
	}
	file.Allocations = make([]rec, 0, n)
	for i := range n {
		key := fmt.Sprintf("seed-%06d", i)
		file.Allocations = append(file.Allocations, rec{Key: key, Port: 1024 + i, User: "seed", ProxyName: key,
			ProxyType: "tcp", CreatedAt: "2026-01-01T00:00:00Z", AssignedAt: "2026-01-01T00:00:00Z"})
	}
	data, err := json.Marshal(file)
	if err != nil {
		return 0, err
	}
	in := filepath.Join(scratch, "import.json")
	if err := os.WriteFile(in, data, 0o600); err != nil {
		return 0, err
	}
	f, err := os.Open(in)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// An offline import works on an existing data directory (it refuses
	// to create one, so that a mistyped path imports into nothing).
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return 0, err
	}
	cmd := exec.Command(bin, "import", "-data-dir", dataDir)
	cmd.Stdin = f
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%s import: %v\n%s", bin, err, out.String())
	}
	return time.Since(start), nil
}

var allocationsRe = regexp.MustCompile(`msg=serving .* allocations=(\d+)`)

// loadedAllocations reads how many allocations the plugin loaded from its
// "serving" log line.
func loadedAllocations(logPath string) (int, error) {
	data, err := os.ReadFile(logPath)
	if err != nil {
		return 0, err
	}
	m := allocationsRe.FindAllSubmatch(data, -1)
	if len(m) == 0 {
		return 0, fmt.Errorf("no serving line in %s", logPath)
	}
	return strconv.Atoi(string(m[len(m)-1][1]))
}

// startupResults: exec to the first 200 on /ping, and memory then, on
// the full store after a clean shutdown (warm: the plugin may use what it
// saved at shutdown) and after a crash (cold: the data directory changed
// since, so every record is read), and on an empty store.
type startupResults struct {
	Allocations int          `json:"allocations"`
	Cold        []startupRun `json:"cold"`
	Warm        []startupRun `json:"warm"`
	Empty       []startupRun `json:"empty"`
	// RSSLater is VmRSS of the last cold start once it has idled
	// LaterSeconds: what the runtime gave back by then.
	RSSLater     int64   `json:"rss_later_bytes"`
	LaterSeconds float64 `json:"later_seconds"`
}

type startupRun struct {
	ReadyMS float64 `json:"ready_ms"`
	RSS     int64   `json:"rss_bytes"` // VmRSS at the first 200
	HWM     int64   `json:"hwm_bytes"` // VmHWM (peak) at the first 200
	// FromCheckpoint is the from_checkpoint field of the plugin's
	// "serving" log line: "true", "false", or "" when it has none.
	FromCheckpoint string `json:"from_checkpoint"`
}

var fromCheckpointRe = regexp.MustCompile(`msg=serving .* from_checkpoint=(\w+)`)

func phaseStartup(cfg config, tmp, fullData string, want int) (*startupResults, error) {
	res := &startupResults{Allocations: want}
	emptyData := filepath.Join(tmp, "startup-empty")
	const later = 5 * time.Second
	starts := 0
	once := func(label, dataDir string, idle bool) (startupRun, int, error) {
		starts++ // a log of its own: nothing is deleted between starts
		logPath := filepath.Join(tmp, fmt.Sprintf("startup-%02d-%s.log", starts, label))
		pl, err := startPlugin(cfg, label, dataDir, cfg.pool, logPath)
		if err != nil {
			return startupRun{}, 0, err
		}
		mem, err := readMem(pl.pid())
		if err == nil && idle {
			time.Sleep(later)
			var m memInfo
			if m, err = readMem(pl.pid()); err == nil {
				res.RSSLater, res.LaterSeconds = m.RSS, later.Seconds()
				logf("start-up: VmRSS %.1f MiB after %v idle", mib(m.RSS), later)
			}
		}
		// A clean stop: whatever the plugin saves at shutdown is there
		// for the next (warm) start.
		pl.stop(syscall.SIGTERM)
		if err != nil {
			return startupRun{}, 0, err
		}
		n, err := loadedAllocations(logPath)
		r := startupRun{ReadyMS: ms(pl.ready), RSS: mem.RSS, HWM: mem.HWM}
		if data, rerr := os.ReadFile(logPath); rerr == nil {
			if m := fromCheckpointRe.FindSubmatch(data); m != nil {
				r.FromCheckpoint = string(m[1])
			}
		}
		return r, n, err
	}
	// crash makes the data directory differ from what the last clean
	// shutdown saw, as a record written before a crash would: a new file
	// the store does not read (neither .json nor .tmp), left in place.
	crash := func(run int) error {
		return os.WriteFile(filepath.Join(fullData, fmt.Sprintf("bench-crash-marker-%d", run+1)), nil, 0o600)
	}
	for run := range cfg.startupRuns {
		if err := crash(run); err != nil {
			return nil, err
		}
		r, n, err := once("startup-cold", fullData, run == cfg.startupRuns-1)
		if err != nil {
			return nil, err
		}
		if n != want {
			return nil, fmt.Errorf("start-up: the plugin loaded %d allocations; want %d", n, want)
		}
		if r.FromCheckpoint == "true" {
			return nil, fmt.Errorf("start-up after a change to the data directory used the checkpoint")
		}
		res.Cold = append(res.Cold, r)
		logf("start-up run %d, %d allocations after a crash:         ready in %.1f ms, VmRSS %.1f MiB, VmHWM %.1f MiB",
			run+1, n, r.ReadyMS, mib(r.RSS), mib(r.HWM))

		r, n, err = once("startup-warm", fullData, false)
		if err != nil {
			return nil, err
		}
		if n != want {
			return nil, fmt.Errorf("start-up: the plugin loaded %d allocations; want %d", n, want)
		}
		res.Warm = append(res.Warm, r)
		logf("start-up run %d, %d allocations after a clean shutdown: ready in %.1f ms, VmRSS %.1f MiB, VmHWM %.1f MiB (from_checkpoint=%s)",
			run+1, n, r.ReadyMS, mib(r.RSS), mib(r.HWM), r.FromCheckpoint)

		r, _, err = once("startup-empty", emptyData, false)
		if err != nil {
			return nil, err
		}
		res.Empty = append(res.Empty, r)
		logf("start-up run %d, empty store: ready in %.1f ms, VmRSS %.1f MiB", run+1, r.ReadyMS, mib(r.RSS))
	}
	return res, nil
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
