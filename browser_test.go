package main

import (
	"context"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"
)

// chromiumPath is Debian's chromium, installed by .ci/run and `make test`.
const chromiumPath = "/usr/bin/chromium"

// renderInChromium loads url in real headless Chromium and returns the DOM
// it ended up with.
func renderInChromium(t testing.TB, url string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, chromiumPath,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-dev-shm-usage", "--user-data-dir="+t.TempDir(), "--dump-dom", url)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium (%s) failed: %v; install it with: apt-get install chromium", chromiumPath, err)
	}
	return string(out)
}

var rowPattern = regexp.MustCompile(`(?s)<tr>\s*<td class="port">(\d+)</td><td class="proto">(?:tcp|udp)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>`)

// pageRows returns "port key user type" for every allocation row.
func pageRows(dom string) []string {
	var rows []string
	for _, m := range rowPattern.FindAllStringSubmatch(dom, -1) {
		rows = append(rows, strings.Join(m[1:], " "))
	}
	return rows
}

func TestBrowserPage(t *testing.T) {
	fullTier(t, "chromium")
	base, _ := startServer(t, "-data-dir", t.TempDir(), "-allow-ports", "31000-31009")
	register(t, base, "alice", "alice.ssh", "tcp")
	register(t, base, "bob", "bob.wg", "udp")
	register(t, base, "alice", "alice.web", "tcp")

	dom := renderInChromium(t, base+"/")
	want := []string{"31000 alice.ssh alice tcp", "31000 bob.wg bob udp", "31001 alice.web alice tcp"}
	if got := pageRows(dom); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("table rows = %q; want %q\n%s", got, want, dom)
	}
	for _, s := range []string{"<strong>3</strong> used", "<strong>17</strong> free", "20 ports (tcp 2 used of 10, udp 1 used of 10)", "version ", "up "} {
		if !strings.Contains(dom, s) {
			t.Errorf("page lacks %q", s)
		}
	}
	// The filter box is a plain GET form: no JavaScript needed.
	if !strings.Contains(dom, `<form method="get" action="/">`) || !strings.Contains(dom, `name="q"`) {
		t.Fatalf("page has no filter form")
	}
	filtered := renderInChromium(t, base+"/?q=bob")
	if got := pageRows(filtered); len(got) != 1 || got[0] != "31000 bob.wg bob udp" {
		t.Fatalf("filtered rows = %q; want only bob's", got)
	}
}
