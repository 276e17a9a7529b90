package main

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
)

// TestBatchWriter: every line arrives whole and in order per writer, and
// close leaves nothing behind.
func TestBatchWriter(t *testing.T) {
	var out syncBuffer
	w := newBatchWriter(&out)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 5000 {
				fmt.Fprintf(w, "g%d line %d\n", g, i)
			}
		}()
	}
	wg.Wait()
	w.close()
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 20000 {
		t.Fatalf("%d lines; want 20000", len(lines))
	}
	next := map[string]int{}
	for _, l := range lines {
		var g string
		var i int
		if _, err := fmt.Sscanf(l, "%s line %d", &g, &i); err != nil || next[g] != i {
			t.Fatalf("line %q: got %d; want %d (torn or out of order)", l, i, next[g])
		}
		next[g]++
	}
	var b bytes.Buffer
	w2 := newBatchWriter(&b)
	w2.Write([]byte("last\n"))
	w2.close()
	w2.Write([]byte("late\n")) // a late store call may still log
	if b.String() != "last\nlate\n" {
		t.Fatalf("after close: %q", b.String())
	}
}
