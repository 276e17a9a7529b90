// Command frp-port-keeper is an frps server plugin that gives every tcp and
// udp proxy the same remote port on every connection, across restarts of
// frpc, frps and itself.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
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
// directly with their own context, arguments and environment.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, nil))

	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("-listen: %v", err)
	}
	defer ln.Close()
	plan, err := planPool(cfg, ln.Addr().(*net.TCPAddr).Port)
	if err != nil {
		return err
	}
	store, unlock, err := openStore(cfg)
	if err != nil {
		return err
	}
	defer unlock()
	opts := allocatorOptions{excluded: plan.excluded, storeTimeout: cfg.storeTimeout, log: log}
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

	srv := &http.Server{
		Handler: newServer(alloc, log),
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
		"pool_size", plan.pool.len(), "allocations", len(got.allocations), "store", cfg.store,
		"data_dir", cfg.dataDir, "probe", cfg.probe)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		store.close()
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = srv.Shutdown(shutdownCtx)
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
	switch cfg.store {
	case "bbolt":
		kv, err := bbolt.NewStore(bbolt.Options{Path: filepath.Join(cfg.dataDir, "allocations.bbolt")})
		if err != nil {
			unlock()
			return nil, nil, fmt.Errorf("open bbolt store: %v", err)
		}
		return &kvStore{kv: kv}, unlock, nil
	default:
		kv, err := file.NewStore(file.Options{Directory: cfg.dataDir})
		if err != nil {
			unlock()
			return nil, nil, fmt.Errorf("open file store: %v", err)
		}
		return &kvStore{kv: kv, dir: cfg.dataDir}, unlock, nil
	}
}
