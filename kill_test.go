package main

// TestKillRestart: the real binary, SIGKILLed at random moments while it
// hands out ports, must come back on the same data directory with every
// port it acknowledged, and never give one port to two keys.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/testenv"
)

const (
	killRounds         = 20
	killSenders        = 4
	killMaxPerSender   = 150 // bounds one round's allocations
	killOldSample      = 300 // older keys re-checked after each restart
	killPool           = "10000-32000"
	killStartTimeout   = 5 * time.Second // the binary answering /ping
	killRequestTimeout = 5 * time.Second
)

func TestKillRestart(t *testing.T) {
	bin := binary(t)
	for _, backend := range []string{"file", "bbolt"} {
		t.Run(backend, func(t *testing.T) {
			killRestartRounds(t, bin, backend, killRounds)
		})
	}
}

// keeperProc is one run of the binary.
type keeperProc struct {
	cmd     *exec.Cmd
	url     string // http://127.0.0.1:PORT
	logPath string
	client  *http.Client
	exited  chan struct{} // closed when Wait returned
	waitErr error
}

// startKeeperProc starts bin on a free loopback port and waits until it
// answers /ping.
func startKeeperProc(t testing.TB, bin, logPath string, args ...string) *keeperProc {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the child holds its own descriptor
	port := testenv.FreePort(t)
	args = append([]string{"-listen", fmt.Sprintf("127.0.0.1:%d", port)}, args...)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = []string{} // hermetic: no FRP_PORT_KEEPER_* from the environment
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	p := &keeperProc{
		cmd: cmd, url: fmt.Sprintf("http://127.0.0.1:%d", port), logPath: logPath,
		exited: make(chan struct{}),
		client: &http.Client{
			Timeout:   killRequestTimeout,
			Transport: &http.Transport{MaxIdleConnsPerHost: killSenders * 2, DisableCompression: true},
		},
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(p.kill)
	deadline := time.Now().Add(killStartTimeout)
	for {
		select {
		case <-p.exited:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("%s %q exited (%v) before answering /ping; log:\n%s", bin, args, p.waitErr, log)
		default:
		}
		if body, err := p.get("/ping"); err == nil && body == "pong" {
			return p
		}
		if time.Now().After(deadline) {
			p.kill()
			log, _ := os.ReadFile(logPath)
			t.Fatalf("%s %q: no pong on /ping within %v; log:\n%s", bin, args, killStartTimeout, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *keeperProc) get(path string) (string, error) {
	resp, err := p.client.Get(p.url + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
	}
	return string(b), err
}

// kill sends SIGKILL and waits until the process is gone.
func (p *keeperProc) kill() {
	select {
	case <-p.exited:
	default:
		p.cmd.Process.Signal(syscall.SIGKILL)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
		}
	}
	p.client.CloseIdleConnections()
}

// pluginReply is one answer to a NewProxy as the test understands it.
type pluginReply struct {
	status int
	port   int    // allowing answers only
	reject string // reject_reason of refusing answers
	body   string
}

// newProxyHTTP sends a tcp NewProxy for name to a running server.
func newProxyHTTP(ctx context.Context, client *http.Client, baseURL, reqid, body string) (pluginReply, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, baseURL+pluginPath+"?version=0.1.0&op=NewProxy", strings.NewReader(body))
	if err != nil {
		return pluginReply{}, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Frp-Reqid", reqid)
	resp, err := client.Do(req)
	if err != nil {
		return pluginReply{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return pluginReply{}, err
	}
	r := pluginReply{status: resp.StatusCode, body: string(b)}
	if resp.StatusCode != http.StatusOK {
		return r, nil
	}
	var ans struct {
		Reject       bool   `json:"reject"`
		RejectReason string `json:"reject_reason"`
		Unchange     bool   `json:"unchange"`
		Content      struct {
			RemotePort *int `json:"remote_port"`
		} `json:"content"`
	}
	if err := json.Unmarshal(b, &ans); err != nil {
		return r, fmt.Errorf("answer %q is not JSON: %v", b, err)
	}
	switch {
	case ans.Reject:
		r.reject = ans.RejectReason
		if r.reject == "" {
			r.reject = "(empty reason)"
		}
	case ans.Unchange || ans.Content.RemotePort == nil:
		return r, fmt.Errorf("answer %s: neither a port nor a reject", b)
	default:
		r.port = *ans.Content.RemotePort
	}
	return r, nil
}

// portLedger is every acknowledged (key, port), checked as answers arrive.
type portLedger struct {
	mu       sync.Mutex
	byKey    map[string]int
	byPort   map[int]string
	inflight map[string]bool // sent, never acknowledged
	errs     []string
}

func newPortLedger() *portLedger {
	return &portLedger{byKey: map[string]int{}, byPort: map[int]string{}, inflight: map[string]bool{}}
}

// ack records an allowing answer and reports any contradiction with an
// earlier one.
func (l *portLedger) ack(key string, port int, when string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.inflight, key)
	if old, ok := l.byKey[key]; ok && old != port {
		l.errs = append(l.errs, fmt.Sprintf("%s: key %q got port %d; want %d (acknowledged before)", when, key, port, old))
		return
	}
	if holder, ok := l.byPort[port]; ok && holder != key {
		l.errs = append(l.errs, fmt.Sprintf("%s: port %d acknowledged to %q; want only %q (acknowledged before)", when, port, key, holder))
		return
	}
	l.byKey[key], l.byPort[port] = port, key
}

func (l *portLedger) fail(format string, args ...any) {
	l.mu.Lock()
	l.errs = append(l.errs, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

func (l *portLedger) sent(key string) {
	l.mu.Lock()
	l.inflight[key] = true
	l.mu.Unlock()
}

// check fails t with every contradiction found so far.
func (l *portLedger) check(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) > 0 {
		const show = 20
		errs := l.errs
		if len(errs) > show {
			errs = append(errs[:show:show], fmt.Sprintf("... and %d more", len(l.errs)-show))
		}
		t.Fatalf("%d contradictions:\n%s", len(l.errs), strings.Join(errs, "\n"))
	}
}

func killRestartRounds(t *testing.T, bin, backend string, rounds int) {
	dataDir := filepath.Join(t.TempDir(), "data")
	logDir := t.TempDir()
	t.Cleanup(func() {
		if t.Failed() {
			dumpWarnings(t, logDir)
		}
	})
	args := []string{"-data-dir", dataDir, "-allow-ports", killPool, "-probe=false", "-store", backend}
	ledger := newPortLedger()
	var checked, loadSent, loadAcked, inflightAtKill, storedUnacked, repairedStarts int
	var startTimes []time.Duration

	lastRound := map[string]bool{} // keys sent in the round before the restart
	for round := 0; round <= rounds; round++ {
		logPath := filepath.Join(logDir, fmt.Sprintf("start-%02d.log", round))
		began := time.Now()
		p := startKeeperProc(t, bin, logPath, args...)
		startTimes = append(startTimes, time.Since(began))

		// Every key the killed run was sent, answered or not, and a random
		// sample of older acknowledged keys; after the last kill, every key.
		// (Checking every key at every start grows with the square of the
		// rounds.)
		ledger.mu.Lock()
		var verify []string
		for k := range ledger.inflight {
			verify = append(verify, k)
		}
		older := 0
		for k := range ledger.byKey { // map order: a random sample
			switch {
			case round == rounds || lastRound[k]:
				verify = append(verify, k)
			case older < killOldSample:
				verify = append(verify, k)
				older++
			}
		}
		ledger.mu.Unlock()
		checked += len(verify)
		st := killVerify(t, p, ledger, round, verify)
		storedUnacked += st.storedUnacked
		if st.repaired {
			repairedStarts++
		}
		ledger.check(t)
		if round == rounds {
			p.kill()
			break
		}

		// Load, then SIGKILL at a random moment.
		clear(lastRound)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var mu sync.Mutex
		for g := range killSenders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for n := 0; n < killMaxPerSender && ctx.Err() == nil; n++ {
					key := fmt.Sprintf("kr.%s-r%02d-g%d-%04d", backend, round, g, n)
					mu.Lock()
					loadSent++
					lastRound[key] = true
					mu.Unlock()
					ledger.sent(key)
					r, err := newProxyHTTP(ctx, p.client, p.url, fmt.Sprintf("l%d-%d-%d", round, g, n), newProxyBody("kr", key, "tcp", ""))
					if err != nil {
						return // the server is gone
					}
					if r.status != http.StatusOK || r.port == 0 {
						ledger.fail("round %d load: %s: status %d, answer %s; want 200 with a port", round, key, r.status, r.body)
						continue
					}
					ledger.ack(key, r.port, fmt.Sprintf("round %d load", round))
					mu.Lock()
					loadAcked++
					mu.Unlock()
				}
			}()
		}
		time.Sleep(time.Duration(20+rand.IntN(181)) * time.Millisecond)
		p.kill()
		cancel()
		select {
		case <-p.exited:
		default:
			t.Fatalf("round %d: the process outlived SIGKILL", round)
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * killRequestTimeout):
			t.Fatalf("round %d: senders still busy %v after the kill", round, 2*killRequestTimeout)
		}
		ledger.mu.Lock()
		inflightAtKill += len(ledger.inflight)
		ledger.mu.Unlock()
		if err := p.waitErr; err == nil || !strings.Contains(err.Error(), "killed") {
			t.Fatalf("round %d: process ended with %v; want killed by SIGKILL (did it exit by itself?)", round, err)
		}
		ledger.check(t)
	}
	slices.Sort(startTimes)
	t.Logf("%s store: %d rounds, %d allocations sent, %d acknowledged before the kill, %d cut off by it (%d of them stored before it), %d answers re-checked after restarts, %d starts repaired the store; start to /ping median %v, max %v",
		backend, rounds, loadSent, loadAcked, inflightAtKill, storedUnacked, checked, repairedStarts, startTimes[len(startTimes)/2].Round(time.Millisecond),
		startTimes[len(startTimes)-1].Round(time.Millisecond))
}

// killVerify sends each key's NewProxy again: acknowledged keys must hit
// their port, the others may get any port nobody else holds.
func killVerify(t *testing.T, p *keeperProc, ledger *portLedger, round int, keys []string) (st verifyStats) {
	t.Helper()
	if log, err := os.ReadFile(p.logPath); err == nil {
		st.repaired = bytes.Contains(log, []byte("store repaired"))
	}
	if len(keys) == 0 {
		return st
	}
	type want struct {
		key  string
		port int // 0: not acknowledged before
	}
	reqs := map[string]want{} // reqid -> expectation
	ledger.mu.Lock()
	for i, k := range keys {
		reqs[fmt.Sprintf("v%d-%d", round, i)] = want{k, ledger.byKey[k]}
	}
	ledger.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	work := make(chan string)
	var wg sync.WaitGroup
	for range killSenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for reqid := range work {
				w := reqs[reqid]
				r, err := newProxyHTTP(ctx, p.client, p.url, reqid, newProxyBody("kr", w.key, "tcp", ""))
				switch {
				case err != nil:
					ledger.fail("after restart %d: %s: %v", round, w.key, err)
				case r.status != http.StatusOK || r.port == 0:
					ledger.fail("after restart %d: %s: status %d, answer %s; want 200 with a port", round, w.key, r.status, r.body)
				default:
					ledger.ack(w.key, r.port, fmt.Sprintf("after restart %d", round))
				}
			}
		}()
	}
	for reqid := range reqs {
		work <- reqid
	}
	close(work)
	wg.Wait()

	// Acknowledged keys must have been hits, not new ports that happen to
	// match: the log says how each port was decided.
	// Log lines are written by a goroutine of their own: wait until every
	// acknowledged request's line is there (bounded).
	var outcomes map[string]string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var err error
		if outcomes, err = decisionOutcomes(p.logPath); err != nil {
			t.Fatal(err)
		}
		missing := 0
		for reqid, w := range reqs {
			if _, ok := outcomes[reqid]; !ok && w.port != 0 {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
	}
	for reqid, w := range reqs {
		if w.port == 0 {
			if outcomes[reqid] == "hit" {
				st.storedUnacked++
			}
			continue
		}
		if got := outcomes[reqid]; got != "hit" {
			ledger.fail("after restart %d: acknowledged key %q (port %d): outcome %q; want \"hit\"", round, w.key, w.port, got)
		}
	}
	return st
}

// verifyStats is what one restart's check saw.
type verifyStats struct {
	storedUnacked int  // keys cut off by the kill that the store had kept
	repaired      bool // the start log reports repairs
}

var (
	decisionLine = regexp.MustCompile(`msg=decision\b`)
	reqidField   = regexp.MustCompile(`\breqid=("?)([^" ]*)`)
	outcomeField = regexp.MustCompile(`\boutcome=("?)([^" ]*)`)
)

// decisionOutcomes reads a server log and maps each request id to the
// outcome of its decision.
func decisionOutcomes(logPath string) (map[string]string, error) {
	data, err := os.ReadFile(logPath)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 4<<20)
	for sc.Scan() {
		line := sc.Text()
		if !decisionLine.MatchString(line) {
			continue
		}
		id, oc := reqidField.FindStringSubmatch(line), outcomeField.FindStringSubmatch(line)
		if id != nil && oc != nil {
			out[id[2]] = oc[2]
		}
	}
	if err := sc.Err(); err != nil {
		return nil, errors.Join(fmt.Errorf("read %s", logPath), err)
	}
	return out, nil
}

// dumpWarnings logs the warnings of every start log in dir, for a failure.
func dumpWarnings(t testing.TB, dir string) {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, path := range logs {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var warn []string
		for line := range strings.Lines(string(data)) {
			if !strings.Contains(line, "level=INFO") && len(warn) < 50 {
				warn = append(warn, strings.TrimRight(line, "\n"))
			}
		}
		if len(warn) > 0 {
			t.Logf("%s:\n%s", filepath.Base(path), strings.Join(warn, "\n"))
		}
	}
}
