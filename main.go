// Command frp-port-keeper is an frps server plugin that gives every tcp and
// udp proxy the same remote port on every connection, across restarts of
// frpc, frps and itself.
package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/bolt"
	"frp-port-keeper/internal/store/etcd"
	"frp-port-keeper/internal/store/file"
)

// version is stamped at build time (make build: git describe).
var version = "dev"

func main() {
	if err := run(context.Background(), os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "frp-port-keeper: %v\n", err)
		os.Exit(1)
	}
}

// run is the whole program; main only reports its error. Tests call it
// directly with their own context, arguments and environment. With no
// command it serves, so frps-side docs stay one line; the commands and
// their flags are in cli.go.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	name, implicit := "serve", true
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		name, args, implicit = args[0], args[1:], false
	}
	return runCommand(name, implicit, args, cmdEnv{ctx: ctx, getenv: getenv, stdout: stdout, stderr: stderr})
}

// serve runs the plugin server until ctx ends or a signal arrives.
func serve(ctx context.Context, cfg config, stderr io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	logOut := newBatchWriter(stderr)
	defer logOut.close()
	log := slog.New(slog.NewTextHandler(logOut, nil))

	var tlsConfig *tls.Config
	if cfg.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.tlsCert, cfg.tlsKey)
		if err != nil {
			return fmt.Errorf("-tls-cert/-tls-key: %v", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("-listen: %v", err)
	}
	defer ln.Close()
	if warning := openPluginWarning(ln.Addr(), cfg.allowNets); warning != "" {
		log.Warn(warning, "listen", ln.Addr().String(), "plugin_allow", cfg.allowNets.String())
	}
	plan, err := planPool(cfg, ln.Addr().(*net.TCPAddr).Port)
	if err != nil {
		return err
	}
	pol, err := loadPolicy(cfg.policyFile, plan.pool, cfg.maxPorts, cfg.reclaimAfter)
	if err != nil {
		return err
	}
	st, unlock, err := openStore(cfg, log)
	if err != nil {
		return err
	}
	defer unlock()
	var alloc *allocator
	m := newMetrics(func() poolStats { return alloc.stats() })
	if r, ok := st.(interface {
		OnRestore(func(store.RestoreReport))
	}); ok {
		r.OnRestore(m.restored)
	}
	opts := allocatorOptions{excluded: plan.excluded, storeTimeout: cfg.storeTimeout, log: log, policy: pol,
		adoptUntil:  adoptUntil(cfg.adoptRequests, time.Now()),
		storeFailed: func(error) { m.storeErrors.Inc() }, reclaimed: func(store.Record) { m.reclaims.Inc() }}
	if cfg.probe {
		opts.probe = bindProbe(plan.probeAddr)
	}
	// Every change goes to the history (beside the allocations, written in
	// the background) and to the event stream and webhooks.
	var notifiers []*notifier
	for _, u := range cfg.notifyURLs {
		notifiers = append(notifiers, newNotifier(u, cfg.notifySecret, log, m.notify))
	}
	queued := func() int {
		n := 0
		for _, nt := range notifiers {
			n += nt.length()
		}
		return n
	}
	m.notifyQueued.Store(&queued)
	events := newEventHub(notifiers)
	hist := st.History()
	recorder := history.NewRecorder(hist, log, func(n int) { m.historyFailures.Add(float64(n)) }, events.publish)
	defer recorder.Stop()
	opts.changed = recorder.Record
	alloc, got, err := newAllocator(st, plan.pool, opts)
	if err != nil {
		recorder.Stop()
		st.Close()
		return err
	}
	// After a power cut every lazily written record may be damaged: name
	// the first few, count them all in one line.
	const namedProblems = 20
	for i, p := range got.Problems {
		if i == namedProblems {
			log.Warn("store repaired: further problems not listed", "more", len(got.Problems)-namedProblems)
			break
		}
		log.Warn("store repaired", "problem", p)
	}
	if got.Damaged > 0 || len(got.HeldBack) > 0 {
		held := slices.SortedFunc(maps.Keys(got.HeldBack), func(a, b store.Slot) int { return cmp.Or(a.Port-b.Port, cmp.Compare(a.Space, b.Space)) })
		log.Warn("records found damaged (a crash or power cut?): ports whose record is damaged and whose key is unknown are held back from new keys until an operator releases them (release -port N)",
			"damaged_records", got.Damaged, "held_back", len(held), "ports", fmt.Sprint(held))
	}
	if got.Degraded != "" {
		log.Error("the store cannot take writes: serving the allocations it holds, refusing new keys", "why", got.Degraded)
	}
	count, from := len(got.Allocations), got.From
	got = store.Snapshot{}
	// Loading made garbage many times the size of what stays: hand it back
	// now rather than carry it until the heap grows again.
	runtime.GC()
	debug.FreeOSMemory()
	for _, v := range alloc.snapshot() {
		if v.OutsidePool {
			log.Warn("allocation outside the pool stays sticky", "key", v.Key, "port", v.Port, "proto", v.Proto)
		}
	}

	srv := &http.Server{
		Handler: newServer(alloc, log, serverOptions{metrics: m, adminToken: cfg.adminToken, pluginAllow: cfg.allowNets,
			history: hist, events: events}),
		// frps waits for the plugin without a timeout of its own, so no
		// client may hold a connection or a handler open for long.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// Shutdown waits for every handler; an event stream's never ends by itself.
	srv.RegisterOnShutdown(events.close)
	attrs := []any{"addr", ln.Addr().String(), "path", pluginPath, "pool", alloc.poolStr,
		"pool_size", plan.pool.len(), "allocations", count, "loaded_from", from}
	attrs = append(attrs, storeLogAttrs(cfg)...)
	attrs = append(attrs, "probe", cfg.probe, "tls", tlsConfig != nil, "plugin_allow", cfg.allowNets.String(), "policy_rules", len(pol.rules),
		"max_ports_per_user", cfg.maxPorts, "reclaim_after", cfg.reclaimAfter)
	log.Info("serving", attrs...)
	if !opts.adoptUntil.IsZero() {
		log.Warn("adopting the ports devices ask for outside the pool (-adopt-requests)", "until", opts.adoptUntil.UTC().Format(time.RFC3339),
			"pool", alloc.poolStr)
	}
	logOut.sync() // the start-up report is out before the first answer
	errc := make(chan error, 1)
	if tlsConfig != nil {
		srv.TLSConfig = tlsConfig
		ln = tls.NewListener(ln, tlsConfig)
	}
	go func() { errc <- srv.Serve(ln) }()
	followCtx, stopFollow := context.WithCancel(context.Background())
	defer stopFollow()
	go alloc.follow(followCtx)
	for _, n := range notifiers {
		go n.run(followCtx)
	}
	if hist != nil && cfg.historyKeep > 0 {
		go pruneHistory(followCtx, hist, cfg.historyKeep, log)
	}
	flush := time.NewTicker(time.Minute)
	defer flush.Stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	var serveErr error
	for running := true; running; {
		select {
		case <-hup:
			p, err := loadPolicy(cfg.policyFile, plan.pool, cfg.maxPorts, cfg.reclaimAfter)
			if err != nil {
				log.Error("policy not reloaded; keeping the old one", "err", err)
				continue
			}
			alloc.setPolicy(p)
			log.Info("policy reloaded", "file", cfg.policyFile, "rules", len(p.rules))
		case serveErr = <-errc:
			log.Error("serving stopped", "err", serveErr)
			running = false
		case <-ctx.Done():
			running = false
		case <-flush.C:
			if _, err := alloc.flushSeen(seenInterval); err != nil {
				log.Warn("writing last_seen failed", "err", err)
			}
		}
	}
	// One order for every exit: no request in flight, last_seen flushed,
	// the history drained, and only then the store closed (it writes its
	// checkpoint; what reaches it later is lost).
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = srv.Shutdown(shutdownCtx)
	if serveErr != nil {
		err = serveErr
	}
	if n, ferr := alloc.flushSeen(0); ferr != nil {
		log.Warn("writing last_seen failed", "err", ferr)
	} else {
		log.Info("stored last_seen", "keys", n)
	}
	stopFollow()
	recorder.Stop()
	if cerr := st.Close(); err == nil {
		err = cerr
	}
	return err
}

// storeLogAttrs say in the start line where the allocations are: the
// data directory as an absolute path (the service's working directory is
// rarely where the operator looks), or etcd's endpoints and prefix.
func storeLogAttrs(cfg config) []any {
	if cfg.store == "etcd" {
		return []any{"store", cfg.store, "etcd_endpoints", strings.Join(etcdOptionsFrom(cfg, nil).Endpoints, ","), "etcd_prefix", cfg.etcd.prefix}
	}
	dir := cfg.dataDir
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	return []any{"store", cfg.store, "data_dir", dir}
}

// openStore opens the chosen backend. For file and bbolt it locks the data
// directory first: two servers on one directory would hand out the same
// ports. A directory that cannot be written is opened all the same, so the
// allocations it holds are still served.
func openStore(cfg config, log *slog.Logger) (store.Store, func(), error) {
	if cfg.store == "etcd" {
		// Several instances on one etcd are the point: no directory lock.
		ctx, cancel := context.WithTimeout(context.Background(), 5*max(cfg.storeTimeout, time.Second))
		defer cancel()
		st, err := etcd.Open(ctx, etcdOptionsFrom(cfg, log))
		if err != nil {
			return nil, nil, err
		}
		return st, func() {}, nil
	}
	if cfg.store == "bbolt" {
		st, err := bolt.Open(cfg.dataDir, log) // takes the directory's lock itself
		if err != nil {
			return nil, nil, err
		}
		return st, func() {}, nil
	}
	st, err := file.Open(cfg.dataDir, log) // takes the directory's lock itself
	if err != nil {
		return nil, nil, err
	}
	return st, func() {}, nil
}

// pruneHistory deletes history older than keep, at start and then daily.
func pruneHistory(ctx context.Context, hist store.HistoryLog, keep time.Duration, log *slog.Logger) {
	for {
		pctx, cancel := context.WithTimeout(ctx, time.Minute)
		n, err := hist.Prune(pctx, time.Now().Add(-keep))
		cancel()
		switch {
		case err != nil:
			log.Warn("pruning the history failed", "err", err)
		case n > 0:
			log.Info("history pruned", "entries", n, "older_than", time.Now().Add(-keep).UTC().Format(time.RFC3339))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(24 * time.Hour):
		}
	}
}

// adoptUntil is when -adopt-requests ends, for a start at now (zero: off).
func adoptUntil(d time.Duration, now time.Time) time.Time {
	if d <= 0 {
		return time.Time{}
	}
	return now.Add(d)
}
