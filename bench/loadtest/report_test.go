package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// microWithClaims is `go test -bench` output with two counts of
// BenchmarkFreshClaims (some cases only) among other benchmarks.
const microWithClaims = `goos: linux
BenchmarkHandlerStickyHit-2   	  240000	      5000 ns/op	    1577 B/op	      17 allocs/op
BenchmarkFreshClaims/store=file/existing=0/clients=1-2         	    1000	   2000000 ns/op	       500.0 claims/s	         2.000 p50-ms	        9.000 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=file/existing=0/clients=16-2        	    1000	    900000 ns/op	      1100 claims/s	        14.00 p50-ms	        40.00 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=file-nosync/existing=0/clients=16-2 	    1000	    500000 ns/op	      2000 claims/s	         7.000 p50-ms	        20.00 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=bbolt/existing=0/clients=1-2        	    1000	   2000000 ns/op	       500.0 claims/s	         1.000 p50-ms	        5.000 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=file/existing=0/clients=1-2         	    1000	   2000000 ns/op	       300.0 claims/s	         4.000 p50-ms	        9.000 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=file/existing=0/clients=16-2        	    1000	    900000 ns/op	       900.0 claims/s	        14.00 p50-ms	        40.00 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=file-nosync/existing=0/clients=16-2 	    1000	    500000 ns/op	      2000 claims/s	         7.000 p50-ms	        20.00 p99-ms	    4700 B/op	      70 allocs/op
BenchmarkFreshClaims/store=bbolt/existing=0/clients=1-2        	    1000	   2000000 ns/op	       500.0 claims/s	         3.000 p50-ms	        5.000 p99-ms	    4700 B/op	      70 allocs/op
PASS
`

func readTestMicro(t *testing.T, out string) []microResult {
	t.Helper()
	path := filepath.Join(t.TempDir(), "micro.txt")
	if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	micro, err := readMicro(path)
	if err != nil {
		t.Fatal(err)
	}
	return micro
}

func TestDurableTargetsFromFreshClaims(t *testing.T) {
	ts := durableTargets(readTestMicro(t, microWithClaims))
	if len(ts) != 2 {
		t.Fatalf("got %d targets; want 2", len(ts))
	}
	// 16 clients: medians 1,000 vs 2,000 claims/s.
	if g := ts[0]; g.Missing || !g.Pass || !strings.Contains(g.Measured, "0.50× at 0 existing (1,000 claims/s vs 2,000 claims/s)") {
		t.Errorf("group-commit target = %+v; want a pass at 0.50×", g)
	}
	// One client: p50 medians 3 ms vs 2 ms.
	if s := ts[1]; s.Missing || !s.Pass || !strings.Contains(s.Measured, "1.50× at 0 existing (3.000 ms vs 2.000 ms)") {
		t.Errorf("sequential target = %+v; want a pass at 1.50×", s)
	}
	slower := strings.ReplaceAll(microWithClaims, "         4.000 p50-ms", "         8.000 p50-ms")
	if s := durableTargets(readTestMicro(t, slower))[1]; s.Pass || s.Missing || !strings.Contains(s.Measured, "2.50×") {
		t.Errorf("sequential target with file p50 2.5× bbolt's = %+v; want a miss", s)
	}
	fewer := strings.ReplaceAll(microWithClaims, "      2000 claims/s", "      2400 claims/s")
	if g := durableTargets(readTestMicro(t, fewer))[0]; g.Pass || g.Missing {
		t.Errorf("group-commit target at 1,000 vs 2,400 claims/s = %+v; want a miss", g)
	}
}

func TestDurableTargetsWithoutFreshClaims(t *testing.T) {
	micro := readTestMicro(t, "BenchmarkHandlerStickyHit-2   	  240000	      5000 ns/op\n")
	for _, tg := range durableTargets(micro) {
		if !tg.Missing {
			t.Errorf("%s: %+v; want not measured", tg.What, tg)
		}
	}
	var b strings.Builder
	durableMarkdown(func(f string, a ...any) { b.WriteString(f) }, machine{}, micro)
	if b.Len() != 0 {
		t.Errorf("section 7 written without BenchmarkFreshClaims: %q", b.String())
	}
}

func TestDurableMarkdownTable(t *testing.T) {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	durableMarkdown(p, machine{FS: "ext4 (/dev/vda on /), without a journal"}, readTestMicro(t, microWithClaims))
	md := b.String()
	for _, want := range []string{
		"## 7. Durable commits",
		"Medians of 2 counts",
		"Data directories on ext4 (/dev/vda on /), without a journal.",
		"| file | 0 | 1 | 3.000 ms | 9.00 ms | 400 | 300 – 500 |",
		"| file-nosync | 0 | 16 | 7.000 ms | 20.00 ms | 2,000 | 2,000 – 2,000 |",
		"| bbolt | 0 | 1 | 2.000 ms | 5.00 ms | 500 | 500 – 500 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("section 7 lacks %q:\n%s", want, md)
		}
	}
	// Rows go by store: every file row before the first file-nosync row.
	if strings.Index(md, "| file | 0 | 16 |") > strings.Index(md, "| file-nosync |") {
		t.Errorf("rows not grouped by store:\n%s", md)
	}
}
