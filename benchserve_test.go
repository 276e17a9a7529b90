//go:build benchserve

package main

import (
	"context"
	"encoding/json"
	"os"
	"testing"
)

// benchServeEnv holds, as a JSON array, the arguments TestBenchServe passes
// to run(). The load tool sets it when it is asked for profiles (-profile):
// it then starts this test binary instead of the real one, with
// -test.cpuprofile, so the server it measures is the same code with a CPU
// profile written when it stops.
const benchServeEnv = "BENCH_SERVE_ARGS"

// TestBenchServe is not a test: it is the server of a profiled benchmark
// run (see benchServeEnv). It is built only with -tags benchserve (bench/run.sh
// profile), so it never counts as a skipped test in make test.
func TestBenchServe(t *testing.T) {
	raw := os.Getenv(benchServeEnv)
	if raw == "" {
		t.Skip(benchServeEnv + " not set: only the load tool's profiled runs use this")
	}
	var args []string
	if err := json.Unmarshal([]byte(raw), &args); err != nil {
		t.Fatalf("%s: %v", benchServeEnv, err)
	}
	noEnv := func(string) string { return "" }
	if err := run(context.Background(), args, noEnv, os.Stdout, os.Stderr); err != nil {
		t.Fatal(err)
	}
}
