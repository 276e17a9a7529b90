// Command frp-port-keeper is an frps server plugin that gives every tcp and
// udp proxy the same remote port on every connection, across restarts of
// frpc, frps and itself.
package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/philippgille/gokv/bbolt"
	"github.com/philippgille/gokv/file"
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
	store, unlock, err := openStore(cfg)
	if err != nil {
		return err
	}
	defer unlock()
	var alloc *allocator
	m := newMetrics(func() poolStats { return alloc.stats() })
	opts := allocatorOptions{excluded: plan.excluded, storeTimeout: cfg.storeTimeout, log: log, policy: pol,
		storeFailed: func(error) { m.storeErrors.Inc() }, reclaimed: func(record) { m.reclaims.Inc() }}
	if cfg.probe {
		opts.probe = bindProbe(plan.probeAddr)
	}
	alloc, got, err := newAllocator(store, plan.pool, opts)
	if err != nil {
		store.close()
		return err
	}
	for _, p := range got.problems {
		log.Warn("store repaired", "problem", p)
	}
	count, warm := len(got.allocations), got.fromCheckpoint
	got = loaded{}
	// Loading made garbage many times the size of what stays: hand it back
	// now rather than carry it until the heap grows again.
	runtime.GC()
	debug.FreeOSMemory()
	for _, v := range alloc.snapshot() {
		if !plan.pool.has(v.Port) {
			log.Warn("allocation outside the pool stays sticky", "key", v.Key, "port", v.Port)
		}
	}

	srv := &http.Server{
		Handler: newServer(alloc, log, serverOptions{metrics: m, adminToken: cfg.adminToken, pluginAllow: cfg.allowNets}),
		// frps waits for the plugin without a timeout of its own, so no
		// client may hold a connection or a handler open for long.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("serving", "addr", ln.Addr().String(), "path", pluginPath, "pool", alloc.poolStr,
		"pool_size", plan.pool.len(), "allocations", count, "from_checkpoint", warm, "store", cfg.store,
		"data_dir", cfg.dataDir, "probe", cfg.probe, "tls", tlsConfig != nil, "plugin_allow", cfg.allowNets.String(), "policy_rules", len(pol.rules),
		"max_ports_per_user", cfg.maxPorts, "reclaim_after", cfg.reclaimAfter)
	logOut.sync() // the start-up report is out before the first answer
	errc := make(chan error, 1)
	if tlsConfig != nil {
		srv.TLSConfig = tlsConfig
		ln = tls.NewListener(ln, tlsConfig)
	}
	go func() { errc <- srv.Serve(ln) }()
	flush := time.NewTicker(time.Minute)
	defer flush.Stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
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
		case err := <-errc:
			store.close()
			return err
		case <-ctx.Done():
			running = false
		case <-flush.C:
			if _, err := alloc.flushSeen(seenInterval); err != nil {
				log.Warn("writing last_seen failed", "err", err)
			}
		}
	}
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = srv.Shutdown(shutdownCtx)
	if n, ferr := alloc.flushSeen(0); ferr != nil {
		log.Warn("writing last_seen failed", "err", ferr)
	} else {
		log.Info("stored last_seen", "keys", n)
	}
	if cerr := alloc.saveCheckpoint(); cerr != nil {
		log.Warn("checkpoint not written; the next start reads every record", "err", cerr)
	}
	if cerr := store.close(); err == nil {
		err = cerr
	}
	return err
}

// openStore locks the data directory and opens the chosen backend in it.
// The lock comes first: two servers on one directory would hand out the
// same ports, and gokv's bbolt would wait forever for the other's lock.
func openStore(cfg config) (portStore, func(), error) {
	if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("-data-dir: %v", err)
	}
	unlock, err := lockDir(cfg.dataDir)
	if err != nil {
		return nil, nil, err
	}
	// The checkpoint lives in a folder of its own, so writing it never
	// touches the mtime of the record directory it vouches for.
	cpDir := filepath.Join(cfg.dataDir, checkpointDir)
	if err := os.MkdirAll(cpDir, 0o700); err != nil {
		unlock()
		return nil, nil, fmt.Errorf("-data-dir: %v", err)
	}
	switch cfg.store {
	case "bbolt":
		path := filepath.Join(cfg.dataDir, "allocations.bbolt")
		mtime, _ := mtimeOf(path)
		kv, err := bbolt.NewStore(bbolt.Options{Path: path})
		if err != nil {
			unlock()
			return nil, nil, fmt.Errorf("open bbolt store: %v", err)
		}
		return &kvStore{kv: kv, checkpoint: filepath.Join(cpDir, "bbolt.json"), watch: path, openedMtime: mtime}, unlock, nil
	default:
		kv, err := file.NewStore(file.Options{Directory: cfg.dataDir})
		if err != nil {
			unlock()
			return nil, nil, fmt.Errorf("open file store: %v", err)
		}
		mtime, _ := mtimeOf(cfg.dataDir)
		return &kvStore{kv: kv, dir: cfg.dataDir, checkpoint: filepath.Join(cpDir, "file.json"), watch: cfg.dataDir, openedMtime: mtime}, unlock, nil
	}
}
