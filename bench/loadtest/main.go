// Command loadtest is the load half of `make bench` (see bench/run.sh and
// BENCHMARKS.md). It runs the real frp-port-keeper binary, each time on a
// temporary data directory, and measures:
//
//   - storm:   K allocations, then a reconnect storm of R sticky NewProxy
//     requests over C keep-alive connections, against the plugin and
//     against a bare net/http baseline process with an answer of the same
//     size;
//   - fresh:   fresh allocations one at a time into an empty store and into
//     one that already holds 50,000;
//   - startup: exec to the first 200 on /ping and VmRSS with 60,000
//     allocations in the data directory;
//   - e2e:     real frps and frpc v0.65.0, 500 tcp proxies registering with
//     and without the plugin;
//   - admin:   paced sticky hits on a plugin holding 64,000 allocations,
//     alone and while 100 admin clients list every allocation in a loop
//     (the admin storm of issue 9).
//
// Everything listens on 127.0.0.1, every wait is bounded, and every child
// process is ended (by its pid) before the tool exits. With -md it writes
// BENCHMARKS.md from the figures and the micro-benchmark output (-micro).
//
// `loadtest baseline ...` is the baseline server itself, `loadtest
// listers ...` the admin clients of the admin phase.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"
)

type config struct {
	bin, frps, frpc, self string
	pool                  string

	keys, requests, conns, runs int
	stormRuns, e2eRuns          int
	freshKeys, freshExisting    int
	startupRuns                 int
	e2eProxies, e2ePoolSize     int
	e2ePoll                     time.Duration
	adminKeys, adminClients     int
	adminConns, adminRequests   int
	adminRuns                   int
	adminRate                   float64

	phases     map[string]bool
	tmpRoot    string
	keep       bool
	jsonOut    string
	mdOut      string
	notes      string
	micro      string
	microCmd   string
	command    string
	cpuprofile string
	profileDir string
	testBin    string
}

// results is everything one run measured; -json writes it as is.
type results struct {
	Machine  machine            `json:"machine"`
	Started  time.Time          `json:"started"`
	Finished time.Time          `json:"finished"`
	Phases   map[string]float64 `json:"phase_seconds"`
	Storm    *stormResults      `json:"storm,omitempty"`
	Fresh    *freshResults      `json:"fresh,omitempty"`
	Startup  *startupResults    `json:"startup,omitempty"`
	E2E      *e2eResults        `json:"e2e,omitempty"`
	Admin    *adminResults      `json:"admin,omitempty"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "listers" {
		if err := runListers(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) > 1 && os.Args[1] == "baseline" {
		if err := serveBaseline(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	err := run()
	killAll()
	if err != nil {
		fmt.Fprintf(os.Stderr, "loadtest: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	var cfg config
	var phases string
	flag.StringVar(&cfg.bin, "bin", "bin/frp-port-keeper", "the frp-port-keeper binary")
	flag.StringVar(&cfg.frps, "frps", "bin/frp-v0.65.0/frps", "frps v0.65.0")
	flag.StringVar(&cfg.frpc, "frpc", "bin/frp-v0.65.0/frpc", "frpc v0.65.0")
	flag.StringVar(&cfg.pool, "pool", "1024-65535", "the plugin's -allow-ports for the storm, fresh and start-up phases")
	flag.IntVar(&cfg.keys, "k", 20000, "storm: keys allocated before the storm")
	flag.IntVar(&cfg.requests, "r", 200000, "storm: sticky requests per storm")
	flag.IntVar(&cfg.conns, "c", 64, "storm: keep-alive connections (one goroutine each)")
	flag.IntVar(&cfg.runs, "runs", 3, "repetitions of the fresh measurements (medians are reported)")
	flag.IntVar(&cfg.stormRuns, "storm-runs", 5, "repetitions of the storms, each against the plugin and the baseline")
	flag.IntVar(&cfg.e2eRuns, "e2e-runs", 5, "repetitions of the e2e measurement, each with and without the plugin")
	flag.IntVar(&cfg.freshKeys, "fresh", 10000, "fresh: new keys per measurement")
	flag.IntVar(&cfg.freshExisting, "fresh-existing", 50000, "fresh: allocations already in the full store")
	flag.IntVar(&cfg.startupRuns, "startup-runs", 5, "start-up: repetitions")
	flag.IntVar(&cfg.e2eProxies, "e2e-proxies", 500, "e2e: tcp proxies in the one frpc")
	flag.IntVar(&cfg.e2ePoolSize, "e2e-pool", 2000, "e2e: ports in frps's allowPorts and the plugin's pool")
	flag.DurationVar(&cfg.e2ePoll, "e2e-poll", 20*time.Millisecond, "e2e: dashboard poll interval")
	flag.IntVar(&cfg.adminKeys, "admin-keys", 64000, "admin: allocations the plugin holds")
	flag.IntVar(&cfg.adminClients, "admin-clients", 100, "admin: clients listing every allocation in a loop")
	flag.IntVar(&cfg.adminConns, "admin-conns", 8, "admin: connections of the paced sticky hits")
	flag.Float64Var(&cfg.adminRate, "admin-rate", 2000, "admin: sticky hits per second")
	flag.IntVar(&cfg.adminRequests, "admin-requests", 20000, "admin: sticky hits per measurement")
	flag.IntVar(&cfg.adminRuns, "admin-runs", 5, "admin: repetitions, each alone then during the storm")
	flag.StringVar(&phases, "phases", "storm,fresh,startup,e2e,admin", "phases to run (startup needs fresh's store)")
	flag.StringVar(&cfg.tmpRoot, "tmp", "", "parent of the temporary directory (default: the system's)")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the temporary directory (data, configs, logs)")
	flag.StringVar(&cfg.jsonOut, "json", "", "write the results as JSON to this file")
	flag.StringVar(&cfg.mdOut, "md", "", "write BENCHMARKS.md here")
	flag.StringVar(&cfg.notes, "notes", "bench/misses.md", "hand-written notes appended to -md")
	flag.StringVar(&cfg.micro, "micro", "", "go test -bench output to include in -md")
	flag.StringVar(&cfg.microCmd, "micro-cmd", "", "the command that produced -micro, for -md")
	flag.StringVar(&cfg.command, "command", "", "the command that ran the whole suite, for -md")
	flag.StringVar(&cfg.cpuprofile, "cpuprofile", "", "write the load tool's own CPU profile here")
	flag.StringVar(&cfg.profileDir, "profile", "", "profile the plugin: run -test-bin's TestBenchServe (same run() as the binary) with a CPU profile per plugin start in this directory")
	flag.StringVar(&cfg.testBin, "test-bin", "bench/out/frp-port-keeper.test", "with -profile: the package's test binary (go test -c)")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", flag.Arg(0))
	}
	cfg.phases = map[string]bool{}
	for _, p := range strings.Split(phases, ",") {
		switch p = strings.TrimSpace(p); p {
		case "storm", "fresh", "startup", "e2e", "admin":
			cfg.phases[p] = true
		case "":
		default:
			return fmt.Errorf("-phases: unknown phase %q", p)
		}
	}
	if cfg.phases["startup"] && !cfg.phases["fresh"] {
		return fmt.Errorf("-phases: startup uses the store the fresh phase leaves behind")
	}
	if cfg.runs < 1 || cfg.stormRuns < 1 || cfg.e2eRuns < 1 || cfg.startupRuns < 1 || cfg.conns < 1 || cfg.keys < 1 || cfg.requests < 1 || cfg.freshKeys < 1 ||
		cfg.adminKeys < 1 || cfg.adminClients < 1 || cfg.adminConns < 1 || cfg.adminRequests < 1 || cfg.adminRuns < 1 || cfg.adminRate <= 0 {
		return fmt.Errorf("counts must be positive")
	}
	var err error
	if cfg.self, err = os.Executable(); err != nil {
		return err
	}
	if cfg.profileDir != "" {
		if cfg.mdOut != "" {
			return fmt.Errorf("-profile slows the plugin down: its figures do not go into -md")
		}
		if err := os.MkdirAll(cfg.profileDir, 0o755); err != nil {
			return err
		}
	}
	for _, p := range []*string{&cfg.bin, &cfg.frps, &cfg.frpc, &cfg.testBin, &cfg.profileDir} {
		if *p == "" {
			continue
		}
		if *p, err = filepath.Abs(*p); err != nil {
			return err
		}
	}
	need := []string{cfg.bin}
	if cfg.profileDir != "" {
		need = []string{cfg.testBin}
	}
	if cfg.phases["e2e"] {
		need = append(need, cfg.frps, cfg.frpc)
	}
	for _, p := range need {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%v (build it first: bench/run.sh does)", err)
		}
	}

	// Children die with us: on a signal, end them by pid and leave.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "loadtest: %v: stopping every child process\n", s)
		killAll()
		os.Exit(2)
	}()

	if cfg.cpuprofile != "" {
		f, err := os.Create(cfg.cpuprofile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}

	// Every phase's data directories go under tmp and stay there until the
	// last phase is over: nothing is deleted before or between timed
	// phases (a deletion slows the file creations of the next minutes on
	// an ext4 without a journal; see BENCHMARKS.md).
	tmp, err := os.MkdirTemp(cfg.tmpRoot, "frp-port-keeper-bench-")
	if err != nil {
		return err
	}
	if cfg.keep {
		logf("keeping %s", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}

	res := results{Machine: describeMachine(tmp, cfg.bin), Started: time.Now(), Phases: map[string]float64{}}
	logf("%d cores, %s, %s, load average %s", res.Machine.Cores, res.Machine.CPU, res.Machine.Go, res.Machine.LoadStart)
	timed := func(name string, fn func() error) error {
		start := time.Now()
		err := fn()
		res.Phases[name] = time.Since(start).Seconds()
		return err
	}
	if cfg.phases["storm"] {
		if err := timed("storm", func() (err error) { res.Storm, err = phaseStorm(cfg, tmp); return }); err != nil {
			return fmt.Errorf("storm: %v", err)
		}
	}
	var fullData string
	if cfg.phases["fresh"] {
		if err := timed("fresh", func() (err error) { res.Fresh, fullData, err = phaseFresh(cfg, tmp); return }); err != nil {
			return fmt.Errorf("fresh: %v", err)
		}
	}
	if cfg.phases["startup"] {
		want := cfg.freshExisting + cfg.freshKeys
		if err := timed("startup", func() (err error) { res.Startup, err = phaseStartup(cfg, tmp, fullData, want); return }); err != nil {
			return fmt.Errorf("start-up: %v", err)
		}
	}
	if cfg.phases["e2e"] {
		if err := timed("e2e", func() (err error) { res.E2E, err = phaseE2E(cfg, tmp); return }); err != nil {
			return fmt.Errorf("e2e: %v", err)
		}
	}
	if cfg.phases["admin"] {
		if err := timed("admin", func() (err error) { res.Admin, err = phaseAdmin(cfg, tmp); return }); err != nil {
			return fmt.Errorf("admin: %v", err)
		}
	}
	res.Finished = time.Now()
	res.Machine.LoadEnd = loadAvg()

	printSummary(os.Stdout, cfg, &res)
	if cfg.jsonOut != "" {
		data, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(cfg.jsonOut, append(data, '\n'), 0o644); err != nil {
			return err
		}
	}
	if cfg.mdOut != "" {
		micro, err := readMicro(cfg.micro)
		if err != nil {
			return err
		}
		md := markdown(cfg, &res, micro)
		// The explanation of each missed target is written by people, from
		// the profiles; it is kept beside the tool and appended as is.
		if notes, err := os.ReadFile(cfg.notes); err == nil {
			md += "\n" + string(notes)
		}
		if err := os.WriteFile(cfg.mdOut, []byte(md), 0o644); err != nil {
			return err
		}
		logf("wrote %s", cfg.mdOut)
	}
	return nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// machine is what BENCHMARKS.md says about where the figures come from.
type machine struct {
	Cores      int    `json:"cores"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	CPU        string `json:"cpu"`
	MemTotal   string `json:"mem_total"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	FS         string `json:"tmp_fs"` // filesystem of the data directories, in short
	Disk       fsInfo `json:"tmp_fs_detail"`
	Binary     string `json:"binary"`
	LoadStart  string `json:"load_start"`
	LoadEnd    string `json:"load_end"`
}

func describeMachine(tmp, bin string) machine {
	m := machine{Cores: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), Go: runtime.Version(),
		CPU: "unknown", MemTotal: "unknown", Kernel: "unknown", FS: "unknown", Binary: bin, LoadStart: loadAvg()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if name, val, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "model name" {
				m.CPU = strings.TrimSpace(val)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if name, val, ok := strings.Cut(line, ":"); ok && name == "MemTotal" {
				m.MemTotal = strings.TrimSpace(val)
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	m.Disk = describeFS(tmp)
	m.FS = m.Disk.short()
	return m
}

func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// fsInfo is what BENCHMARKS.md says about the file system of the data
// directories: what an fsync and a file creation cost depends on it.
type fsInfo struct {
	Dir        string `json:"dir"`
	Device     string `json:"device"`
	Type       string `json:"type"`
	MountPoint string `json:"mount_point"`
	Options    string `json:"options"`     // /proc/self/mounts
	Journal    string `json:"journal"`     // "yes", "no" or "" (unknown)
	JournalWhy string `json:"journal_why"` // how that was found out
	Features   string `json:"features"`    // tune2fs -l, when it can read the superblock
	NoFeatures string `json:"no_features"` // why not
	WriteCache string `json:"write_cache"` // /sys/block/DEV/queue/write_cache
	Size       string `json:"size"`        // statfs
}

func (f fsInfo) short() string {
	if f.Type == "" {
		return "unknown"
	}
	s := fmt.Sprintf("%s (%s on %s)", f.Type, f.Device, f.MountPoint)
	switch f.Journal {
	case "yes":
		s += ", with a journal"
	case "no":
		s += ", without a journal"
	}
	return s
}

// describeFS finds the mount holding dir in /proc/self/mounts (the longest
// mount point that prefixes it) and, for ext4, whether it has a journal:
// from tune2fs -l when the superblock can be read, else from the kernel's
// view (/sys/fs/ext4/DEV/journal_task, /proc/fs/jbd2).
func describeFS(dir string) fsInfo {
	f := fsInfo{Dir: dir}
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return f
	}
	best := ""
	for _, line := range strings.Split(string(data), "\n") {
		m := strings.Fields(line)
		if len(m) < 4 {
			continue
		}
		mp := m[1]
		if (dir == mp || strings.HasPrefix(dir, strings.TrimSuffix(mp, "/")+"/")) && len(mp) > len(best) {
			best = mp
			f.Device, f.MountPoint, f.Type, f.Options = m[0], mp, m[2], m[3]
		}
	}
	if f.Type == "" {
		return f
	}
	var st syscall.Statfs_t
	if syscall.Statfs(dir, &st) == nil {
		size := float64(st.Blocks) * float64(st.Bsize) / (1 << 30)
		used := 0.0
		if st.Files > 0 {
			used = 100 * float64(st.Files-st.Ffree) / float64(st.Files)
		}
		f.Size = fmt.Sprintf("%.0f GiB, %d KiB blocks, %s inodes (%.0f%% in use)", size, st.Bsize/1024, n(int(st.Files)), used)
	}
	dev := filepath.Base(f.Device)
	for _, p := range []string{"/sys/class/block/" + dev + "/queue/write_cache", "/sys/class/block/" + dev + "/../queue/write_cache"} {
		if b, err := os.ReadFile(p); err == nil {
			f.WriteCache = strings.TrimSpace(string(b))
			break
		}
	}
	if f.Type != "ext4" {
		return f
	}
	out, err := exec.Command("tune2fs", "-l", f.Device).CombinedOutput()
	if err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if v, ok := strings.CutPrefix(line, "Filesystem features:"); ok {
				f.Features = strings.TrimSpace(v)
			}
		}
	} else {
		why := strings.TrimSpace(string(out))
		for _, line := range strings.Split(why, "\n") {
			if strings.Contains(line, "while trying") || strings.Contains(line, "not found") {
				why = strings.TrimSpace(line)
				break
			}
		}
		if len(why) > 120 || why == "" {
			why = err.Error()
		}
		f.NoFeatures = fmt.Sprintf("`tune2fs -l %s` cannot read the superblock here (%s)", f.Device, why)
	}
	if f.Features != "" {
		f.Journal, f.JournalWhy = "no", "`tune2fs -l "+f.Device+"`: no has_journal among the features"
		if slices.Contains(strings.Fields(f.Features), "has_journal") {
			f.Journal, f.JournalWhy = "yes", "`tune2fs -l "+f.Device+"`: has_journal"
		}
		return f
	}
	var why []string
	if b, err := os.ReadFile(filepath.Join("/sys/fs/ext4", dev, "journal_task")); err == nil {
		task := strings.TrimSpace(string(b))
		why = append(why, fmt.Sprintf("/sys/fs/ext4/%s/journal_task is `%s`", dev, task))
		if task == "<none>" {
			f.Journal = "no"
		} else {
			f.Journal = "yes"
		}
	}
	if entries, err := os.ReadDir("/proc/fs/jbd2"); err == nil {
		found := false
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), dev+"-") {
				found = true
			}
		}
		if found {
			why = append(why, fmt.Sprintf("/proc/fs/jbd2 has an entry for %s", dev))
			f.Journal = "yes"
		} else {
			why = append(why, fmt.Sprintf("/proc/fs/jbd2 has no entry for %s", dev))
			if f.Journal == "" {
				f.Journal = "no"
			}
		}
	}
	f.JournalWhy = strings.Join(why, "; ")
	return f
}
