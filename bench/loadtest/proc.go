package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Every child process is registered here, so that killAll can end each one
// by its own pid however the load tool exits.
var (
	procsMu sync.Mutex
	procs   = map[*proc]bool{}
)

// proc is a child process: the plugin, the baseline, frps or frpc.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	started time.Time // just before exec
	done    chan struct{}
	waitErr error
	stopped sync.Once
}

// startProc starts bin with its stdout and stderr in logPath ("" for
// /dev/null). The environment is the load tool's, minus the plugin's
// FRP_PORT_KEEPER_* settings, so only the flags given here count.
func startProc(name, logPath, bin string, args ...string) (*proc, error) {
	return startProcEnv(name, logPath, nil, bin, args...)
}

// startProcEnv is startProc with extra environment variables.
func startProcEnv(name, logPath string, env []string, bin string, args ...string) (*proc, error) {
	out := io.Discard
	var logFile *os.File
	if logPath != "" {
		f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return nil, err
		}
		logFile, out = f, f
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "FRP_PORT_KEEPER_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	setDeathSignal(cmd)
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	p.started = time.Now()
	if err := cmd.Start(); err != nil {
		if logFile != nil {
			logFile.Close()
		}
		return nil, fmt.Errorf("start %s: %v", name, err)
	}
	procsMu.Lock()
	procs[p] = true
	procsMu.Unlock()
	go func() {
		p.waitErr = cmd.Wait()
		if logFile != nil {
			logFile.Close()
		}
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig (SIGTERM for a graceful stop, SIGKILL for a crash), then
// SIGKILL after a minute, and waits for the process to be gone.
func (p *proc) stop(sig syscall.Signal) {
	p.stopped.Do(func() {
		defer func() {
			procsMu.Lock()
			delete(procs, p)
			procsMu.Unlock()
		}()
		if p.exited() {
			return
		}
		_ = p.cmd.Process.Signal(sig)
		select {
		case <-p.done:
			return
		case <-time.After(time.Minute):
		}
		fmt.Fprintf(os.Stderr, "loadtest: %s (pid %d) still running a minute after %v; killing it\n", p.name, p.pid(), sig)
		_ = p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			fmt.Fprintf(os.Stderr, "loadtest: %s (pid %d) survived SIGKILL\n", p.name, p.pid())
		}
	})
}

// killAll ends every child still registered, each by its pid.
func killAll() {
	procsMu.Lock()
	list := make([]*proc, 0, len(procs))
	for p := range procs {
		list = append(list, p)
	}
	procsMu.Unlock()
	for _, p := range list {
		p.stop(syscall.SIGKILL)
	}
}

// memInfo is what /proc/PID/status says about a process's memory.
type memInfo struct {
	RSS, HWM int64 // bytes: resident now, resident at the peak
}

func readMem(pid int) (memInfo, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memInfo{}, err
	}
	defer f.Close()
	var m memInfo
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), ":")
		if !ok || (name != "VmRSS" && name != "VmHWM") {
			continue
		}
		fields := strings.Fields(val) // "12345 kB"
		if len(fields) != 2 || fields[1] != "kB" {
			return m, fmt.Errorf("/proc/%d/status: odd %s line %q", pid, name, sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return m, err
		}
		if name == "VmRSS" {
			m.RSS = kb << 10
		} else {
			m.HWM = kb << 10
		}
	}
	if m.RSS == 0 {
		return m, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
	}
	return m, sc.Err()
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// waitHTTP polls url until it answers 200, as fast as every interval, for at
// most timeout, and returns when it first did. prepare, when set, adjusts
// each request (credentials).
func waitHTTP(p *proc, url string, interval, timeout time.Duration, prepare func(*http.Request)) (time.Time, error) {
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(timeout)
	last := "no answer"
	for {
		if p != nil && p.exited() {
			return time.Time{}, fmt.Errorf("%s exited before %s answered: %v (log: %s)", p.name, url, p.waitErr, p.logPath)
		}
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if prepare != nil {
			prepare(req)
		}
		resp, err := client.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return time.Now(), nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("GET %s: %s after %v", url, last, timeout)
		}
		time.Sleep(interval)
	}
}

// plugin is a running frp-port-keeper.
type plugin struct {
	*proc
	addr    string // 127.0.0.1:port
	dataDir string
	ready   time.Duration // exec to the first 200 on /ping
}

// startPlugin runs the binary on dataDir with pool, without bind tests, and
// waits for /ping. With -profile it runs the test binary's TestBenchServe
// instead (the same run() as the binary) with a CPU profile named label.
func startPlugin(cfg config, label, dataDir, pool, logPath string) (*plugin, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	args := []string{"serve", "-listen", addr, "-data-dir", dataDir, "-allow-ports", pool, "-probe=false", "-store", "file"}
	var p *proc
	if cfg.profileDir == "" {
		p, err = startProc("frp-port-keeper", logPath, cfg.bin, args...)
	} else {
		profiles.Add(1)
		prof := filepath.Join(cfg.profileDir, fmt.Sprintf("%s-%d", label, profiles.Load()))
		env, _ := json.Marshal(args)
		// CPU, and where goroutines wait: on locks (mutex) and on anything
		// at all for 10 µs or more (block).
		p, err = startProcEnv("frp-port-keeper (profiled)", logPath, []string{"BENCH_SERVE_ARGS=" + string(env)},
			cfg.testBin, "-test.run", "^TestBenchServe$", "-test.count", "1", "-test.cpuprofile", prof+".cpu.prof",
			"-test.mutexprofile", prof+".mutex.prof", "-test.blockprofile", prof+".block.prof", "-test.blockprofilerate", "10000")
	}
	if err != nil {
		return nil, err
	}
	at, err := waitHTTP(p, "http://"+addr+"/ping", time.Millisecond, 60*time.Second, nil)
	if err != nil {
		p.stop(syscall.SIGKILL)
		return nil, err
	}
	return &plugin{proc: p, addr: addr, dataDir: dataDir, ready: at.Sub(p.started)}, nil
}

// profiles numbers the profiled plugin runs.
var profiles atomic.Int64

// errorCounter keeps the first error and counts the rest.
type errorCounter struct {
	mu    sync.Mutex
	n     int
	first error
}

func (e *errorCounter) add(err error) {
	e.mu.Lock()
	e.n++
	if e.first == nil {
		e.first = err
	}
	e.mu.Unlock()
}

func (e *errorCounter) err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.n == 0 {
		return nil
	}
	return fmt.Errorf("%d errors, the first: %w", e.n, e.first)
}
