#!/usr/bin/env bash
# The benchmark suite of issue 6 (`make bench`; not part of `make test`).
#
#   bench/run.sh            micro-benchmarks, then the load tool; rewrites BENCHMARKS.md
#   bench/run.sh profile    the same loads, once each, against a copy of the server with CPU,
#                           mutex and block profiles (the package's test binary running run()
#                           in TestBenchServe), plus profiled micro-benchmarks; profiles and
#                           `pprof -top` summaries go to bench/out/profiles (BENCHMARKS.md is
#                           left alone: profiling slows the server down)
#
# Knobs (environment): BENCH_COUNT (micro-benchmark -count, default 3),
# BENCH_RUNS (load-tool repetitions, default 3), BENCH_TMP (where the
# run's data directories go, default the system's temp directory: put it
# on the disk a server would use, not on tmpfs, where an fsync costs nothing).
#
# Every data directory of a run (the micro-benchmarks' and the load tool's)
# lives under one directory, made here and removed when this script exits:
# nothing is deleted before or between timed phases. On an ext4 without a
# journal the kernel's inode allocator passes over inodes freed in the last
# 60-360 s, so file creations after a deletion are slow, and creating files
# is most of what a fresh allocation costs (see BENCHMARKS.md).
# Everything listens on 127.0.0.1 only; every process it starts is gone when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$PATH"
export BENCH_START="$(date +%s)"
mode="${1:-run}"
OUT=bench/out
COUNT="${BENCH_COUNT:-3}"
RUNS="${BENCH_RUNS:-3}"
mkdir -p "$OUT"
RUN_TMP="$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/frp-port-keeper-bench-run-XXXXXX")"
trap 'rm -rf "$RUN_TMP"' EXIT
trap 'exit 130' INT TERM
export BENCH_TMP="$RUN_TMP" # the micro-benchmarks' stores (bench_test.go: benchDataRoot)
TMPARG=(-tmp "$RUN_TMP")

echo "== building the plugin (as make build does), frps/frpc v0.65.0 and the load tool"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$OUT/frp-port-keeper" .
(cd tools/frp-v0.65.0 && GOWORK=off go build -o "../../$OUT/frp-v0.65.0/" \
	github.com/fatedier/frp/cmd/frps github.com/fatedier/frp/cmd/frpc)
go build -o "$OUT/loadtest" ./bench/loadtest
LOADTEST=("$OUT/loadtest" -bin "$OUT/frp-port-keeper" -frps "$OUT/frp-v0.65.0/frps" -frpc "$OUT/frp-v0.65.0/frpc" "${TMPARG[@]}")

case "$mode" in
run)
	MICRO=(go test -run XXX -bench . -benchmem -count "$COUNT" -timeout 30m .)
	echo "== micro-benchmarks: ${MICRO[*]}"
	"${MICRO[@]}" | tee "$OUT/micro.txt"
	# The fleet benchmarks' etcd lives as long as their test binary; end it.
	pkill -f 'frp-port-keeper-bench-etcd-' || true
	echo "== load tool"
	"${LOADTEST[@]}" -runs "$RUNS" -json "$OUT/results.json" \
		-micro "$OUT/micro.txt" -micro-cmd "${MICRO[*]}" -command "make bench   # = bench/run.sh" -md BENCHMARKS.md
	echo "== done in $(($(date +%s) - BENCH_START)) s; figures in BENCHMARKS.md and $OUT/results.json"
	;;
profile)
	P="$OUT/profiles"
	# The last profiles go with the run's data directories, at exit.
	if [ -e "$P" ]; then mv "$P" "$RUN_TMP/old-profiles"; fi
	mkdir -p "$P"
	go test -tags benchserve -c -o "$OUT/frp-port-keeper.test" .
	echo "== profiled micro-benchmarks"
	for b in 'HandlerStickyHit$' 'Allocator/existing=50000/(load|fresh)$' 'FreshClaims/store=file/existing=0/'; do
		name="$(echo "$b" | tr -c 'a-zA-Z0-9=\n' '_')"
		"$OUT/frp-port-keeper.test" -test.run XXX -test.bench "$b" -test.benchmem -test.count 1 \
			-test.cpuprofile "$P/micro-$name.cpu.prof" -test.memprofile "$P/micro-$name.mem.prof" | grep -E '^Benchmark|^ok|FAIL' || true
	done
	echo "== load tool against the profiled server (figures are slowed by profiling: not for BENCHMARKS.md)"
	"${LOADTEST[@]}" -runs 1 -storm-runs 1 -e2e-runs 2 -startup-runs 2 -admin-runs 1 -profile "$P" \
		-test-bin "$OUT/frp-port-keeper.test" -cpuprofile "$P/loadtest.cpu.prof"
	for f in "$P"/*.prof; do
		case "$f" in *.mem.prof) continue ;; esac
		go tool pprof -top -nodecount 40 "$f" > "${f%.prof}.top.txt" 2>/dev/null || true
		go tool pprof -top -cum -nodecount 60 "$f" > "${f%.prof}.cum.txt" 2>/dev/null || true
	done
	for f in "$P"/*.mem.prof; do
		go tool pprof -sample_index=alloc_space -top -cum -nodecount 60 "$f" > "${f%.prof}.alloc.txt" 2>/dev/null || true
	done
	echo "== profiles and pprof -top summaries in $P"
	;;
*)
	echo "usage: bench/run.sh [run|profile]" >&2
	exit 2
	;;
esac
