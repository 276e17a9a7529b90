package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// adminResults: the admin storm of issue 9. A plugin holding Allocations
// answers paced sticky hits alone, then while Clients admin clients list
// every allocation (GET /api/allocations, no limit) in a loop, runs times,
// in turn. The plugin's answers should stay within 2× their p99.
type adminResults struct {
	Allocations int     `json:"allocations"`
	Clients     int     `json:"clients"`
	Conns       int     `json:"conns"`
	Rate        float64 `json:"rate"`
	Requests    int     `json:"requests"`
	SeedSeconds float64 `json:"seed_seconds"`
	// One listing with nothing else running: its size and time.
	ListBytes int64           `json:"list_bytes"`
	ListMS    float64         `json:"list_ms"`
	Alone     []loadResult    `json:"alone"`
	Storm     []loadResult    `json:"storm"`
	Listers   []adminStormRun `json:"listers"`
	RSSIdle   int64           `json:"rss_idle_bytes"` // VmRSS before the first run
	// HWM is VmHWM after the last run, reset before the first: the peak
	// of the runs. StartHWM is VmHWM before that reset: the start's peak
	// (every record read), for comparison.
	HWM      int64 `json:"hwm_bytes"`
	StartHWM int64 `json:"start_hwm_bytes"`
}

// adminStormRun is what the admin clients got during one storm.
type adminStormRun struct {
	Seconds float64 `json:"seconds"`
	Lists   int64   `json:"lists"` // complete listings received (every allocation in each)
	Busy    int64   `json:"busy"`  // 503 answers (every listing slot taken)
	Bytes   int64   `json:"bytes"`
	RSSMax  int64   `json:"rss_max_bytes"` // VmRSS sampled every 50 ms
}

func phaseAdmin(cfg config, tmp string) (*adminResults, error) {
	dir := filepath.Join(tmp, "admin")
	dataDir := filepath.Join(dir, "data")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	res := &adminResults{Allocations: cfg.adminKeys, Clients: cfg.adminClients, Conns: cfg.adminConns,
		Rate: cfg.adminRate, Requests: cfg.adminRequests}
	logf("admin: importing %d allocations", cfg.adminKeys)
	took, err := seedDataDir(cfg.bin, dataDir, dir, cfg.adminKeys)
	if err != nil {
		return nil, err
	}
	res.SeedSeconds = took.Seconds()
	syscall.Sync() // the import's writeback is over before anything is measured
	pl, err := startPlugin(cfg, "admin", dataDir, cfg.pool, filepath.Join(dir, "plugin.log"))
	if err != nil {
		return nil, err
	}
	defer pl.stop(syscall.SIGTERM)
	if n, err := loadedAllocations(pl.logPath); err != nil || n != cfg.adminKeys {
		return nil, fmt.Errorf("the plugin loaded %d allocations (%v); want %d", n, err, cfg.adminKeys)
	}
	listURL := "http://" + pl.addr + "/api/allocations"
	start := time.Now()
	rows, size, err := fetchList(http.DefaultClient, listURL, make([]byte, 64<<10))
	if err != nil || rows != cfg.adminKeys {
		return nil, fmt.Errorf("one listing: %d rows, %v; want %d", rows, err, cfg.adminKeys)
	}
	res.ListMS, res.ListBytes = ms(time.Since(start)), size
	logf("admin: one listing alone: %d allocations, %.1f MiB in %.0f ms", rows, mib(size), res.ListMS)

	bodies := make([][]byte, cfg.adminKeys)
	suffixes := make([][]byte, cfg.adminKeys)
	for i := range bodies {
		bodies[i] = newProxyBody("seed", fmt.Sprintf("seed-%06d", i)) // seedDataDir's keys
		suffixes[i] = portSuffix(1024 + i)
	}
	hits := load{url: "http://" + pl.addr + pluginQuery, bodies: bodies, total: cfg.adminRequests, conns: cfg.adminConns,
		warmup: 20, rate: cfg.adminRate,
		check: func(i, status int, body []byte) error {
			if status != http.StatusOK || !bytes.HasSuffix(body, suffixes[i%len(suffixes)]) {
				return fmt.Errorf("key %d: status %d, answer %s; want port %d", i%len(bodies), status, body, 1024+i%len(bodies))
			}
			return nil
		}}
	// Every key the hits use is hit once, untimed, and the plugin's
	// minute tick writes their last_seen (a file each, once an hour per
	// key): that burst of writes would otherwise land in one of the runs.
	keys := min(cfg.adminRequests, cfg.adminKeys)
	warm := hits
	warm.total, warm.rate, warm.warmup = keys, 0, 0
	if _, err := warm.run(); err != nil {
		return nil, fmt.Errorf("warming the keys: %v", err)
	}
	logf("admin: waiting for the plugin to store last_seen of the %d keys hit (once a minute)", keys)
	if err := waitSeenFiles(dataDir, keys, 3*time.Minute); err != nil {
		return nil, err
	}
	syscall.Sync()
	if m, err := readMem(pl.pid()); err == nil {
		res.RSSIdle, res.StartHWM = m.RSS, m.HWM
	}
	if err := resetPeak(pl.pid()); err != nil {
		return nil, err
	}
	for run := range cfg.adminRuns {
		alone, err := hits.run()
		if err != nil {
			return nil, fmt.Errorf("run %d, sticky hits alone: %v", run+1, err)
		}
		res.Alone = append(res.Alone, alone)
		logf("admin run %d, sticky hits alone:             p50 %.2f ms  p99 %.2f ms  max %.1f ms", run+1, alone.P50, alone.P99, alone.Max)

		storm, err := startAdminStorm(cfg, dir, listURL, cfg.adminClients, cfg.adminKeys, pl.pid())
		if err != nil {
			return nil, err
		}
		time.Sleep(time.Second) // every client has a listing in flight
		during, err := hits.run()
		lists, serr := storm.stop()
		if err != nil {
			return nil, fmt.Errorf("run %d, sticky hits during the storm: %v", run+1, err)
		}
		if serr != nil {
			return nil, fmt.Errorf("run %d, admin clients: %v", run+1, serr)
		}
		res.Storm = append(res.Storm, during)
		res.Listers = append(res.Listers, lists)
		logf("admin run %d, sticky hits with %d listers: p50 %.2f ms  p99 %.2f ms  max %.1f ms (p99 %.2f× alone); %d listings (%.0f MiB/s), %d busy answers, VmRSS up to %.1f MiB",
			run+1, cfg.adminClients, during.P50, during.P99, during.Max, during.P99/alone.P99, lists.Lists,
			mib(lists.Bytes)/lists.Seconds, lists.Busy, mib(lists.RSSMax))
	}
	m, err := readMem(pl.pid())
	if err != nil {
		return nil, err
	}
	res.HWM = m.HWM
	return res, nil
}

// waitSeenFiles waits until dataDir holds want last_seen records.
func waitSeenFiles(dataDir string, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		d, err := os.Open(dataDir)
		if err != nil {
			return err
		}
		names, err := d.Readdirnames(-1)
		d.Close()
		if err != nil {
			return err
		}
		n := 0
		for _, name := range names {
			if strings.HasPrefix(name, "seen-") {
				n++
			}
		}
		if n >= want {
			time.Sleep(time.Second) // the last writes of the flush settle
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d last_seen records after %v", n, want, timeout)
		}
		time.Sleep(2 * time.Second)
	}
}

// The admin clients run in a process of their own (`loadtest listers`),
// as operators' scripts would: their reading must not slow down the load
// tool's own sticky-hit goroutines and so count against the plugin.

// adminStorm is a running listers process and the sampling of the
// plugin's memory meanwhile.
type adminStorm struct {
	p       *proc
	out     string
	quit    chan struct{}
	sampled chan struct{}
	started time.Time
	rssMax  int64
}

// stormN numbers the admin storms of a run.
var stormN int

func startAdminStorm(cfg config, dir, url string, clients, wantRows, pid int) (*adminStorm, error) {
	// A file of its own per storm: nothing is deleted between runs.
	stormN++
	s := &adminStorm{out: filepath.Join(dir, fmt.Sprintf("listers-%d.json", stormN)), quit: make(chan struct{}), sampled: make(chan struct{}), started: time.Now()}
	p, err := startProc("loadtest listers", filepath.Join(dir, fmt.Sprintf("listers-%d.log", stormN)), cfg.self, "listers", "-url", url,
		"-clients", strconv.Itoa(clients), "-rows", strconv.Itoa(wantRows), "-out", s.out)
	if err != nil {
		return nil, err
	}
	s.p = p
	go func() { // the plugin's memory while it lasts
		defer close(s.sampled)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.quit:
				return
			case <-tick.C:
				if m, err := readMem(pid); err == nil && m.RSS > s.rssMax {
					s.rssMax = m.RSS
				}
			}
		}
	}()
	return s, nil
}

// stop ends the listers (SIGTERM: each finishes the listing in flight)
// and reads what they got.
func (s *adminStorm) stop() (adminStormRun, error) {
	s.p.stop(syscall.SIGTERM)
	close(s.quit)
	<-s.sampled
	var r listersResult
	data, err := os.ReadFile(s.out)
	if err == nil {
		err = json.Unmarshal(data, &r)
	}
	if err != nil {
		return adminStormRun{}, fmt.Errorf("listers: %v (log: %s)", err, s.p.logPath)
	}
	if r.Errors > 0 {
		return adminStormRun{}, fmt.Errorf("listers: %d errors, the first: %s", r.Errors, r.FirstError)
	}
	return adminStormRun{Seconds: r.Seconds, Lists: r.Lists, Busy: r.Busy, Bytes: r.Bytes, RSSMax: s.rssMax}, nil
}

// listersResult is what `loadtest listers` writes when it stops.
type listersResult struct {
	Seconds    float64 `json:"seconds"`
	Lists      int64   `json:"lists"`
	Busy       int64   `json:"busy"`
	Bytes      int64   `json:"bytes"`
	Errors     int64   `json:"errors"`
	FirstError string  `json:"first_error,omitempty"`
}

// runListers is `loadtest listers`: clients goroutines, each with a
// connection of its own, list every allocation in a loop as fast as the
// answers come, until SIGTERM. A 503 is asked again at once: every client
// always has a listing in flight at the server, the worst an operator's
// scripts could do.
func runListers(args []string) error {
	fs := flag.NewFlagSet("loadtest listers", flag.ContinueOnError)
	url := fs.String("url", "", "the listing to GET")
	clients := fs.Int("clients", 100, "clients, each listing in a loop")
	wantRows := fs.Int("rows", 0, "allocations every listing must hold")
	out := fs.String("out", "", "where to write the result (JSON) at the end")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	var lists, busy, bytesRead atomic.Int64
	var errs errorCounter
	var wg sync.WaitGroup
	start := time.Now()
	for range *clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
			defer c.CloseIdleConnections()
			buf := make([]byte, 64<<10)
			for ctx.Err() == nil {
				rows, size, err := fetchList(c, *url, buf)
				bytesRead.Add(size)
				switch {
				case err == errBusy:
					busy.Add(1)
				case err != nil:
					errs.add(err)
					time.Sleep(100 * time.Millisecond)
				case rows != *wantRows:
					errs.add(fmt.Errorf("a listing had %d allocations; want %d", rows, *wantRows))
				default:
					lists.Add(1)
				}
			}
		}()
	}
	<-ctx.Done()
	wg.Wait()
	r := listersResult{Seconds: time.Since(start).Seconds(), Lists: lists.Load(), Busy: busy.Load(), Bytes: bytesRead.Load()}
	errs.mu.Lock()
	r.Errors = int64(errs.n)
	if errs.first != nil {
		r.FirstError = errs.first.Error()
	}
	errs.mu.Unlock()
	data, _ := json.Marshal(r)
	return os.WriteFile(*out, data, 0o644)
}

// errBusy is a 503 answer to a listing.
var errBusy = fmt.Errorf("503")

// fetchList GETs a listing and counts its allocations as it reads, without
// keeping it; buf is the read buffer.
func fetchList(c *http.Client, url string, buf []byte) (rows int, size int64, err error) {
	resp, err := c.Get(url)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusServiceUnavailable {
		n, _ := io.Copy(io.Discard, resp.Body)
		return 0, n, errBusy
	}
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	// Every allocation starts with {"key": (no name holds an unescaped
	// quote). A marker cut in two by a read straddles tail, the last
	// bytes of the reads before, and the head of the next read.
	marker := []byte(`{"key":`)
	var tailBuf [2 * 8]byte
	tail := tailBuf[:0]
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			size += int64(n)
			rows += bytes.Count(buf[:n], marker)
			rows += bytes.Count(append(tail, buf[:min(n, len(marker)-1)]...), marker)
			joined := append(tail, buf[max(0, n-(len(marker)-1)):n]...)
			tail = append(tailBuf[:0], joined[max(0, len(joined)-(len(marker)-1)):]...)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return rows, size, rerr
		}
	}
	if !bytes.HasSuffix(tail, []byte("}\n")) {
		return rows, size, fmt.Errorf("GET %s: the answer ends in %q, not a whole listing", url, tail)
	}
	return rows, size, nil
}
