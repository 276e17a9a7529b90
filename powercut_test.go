package main

// TestPowerCut: the real binary keeps its data directory on a real ext4
// file system on a loop device, mounted with a 300 s journal commit
// interval, so nothing reaches the disk unless the store made it durable
// (fsync). After a few seconds of allocations, moves and releases, the
// disk image is copied while the server still runs: the copy is what a
// power cut would leave. A fresh server started on the copy must still
// give every acknowledged key its last acknowledged port, must not hand
// those ports to other keys, must not bring released keys back, and its
// history must answer "who held port N at T" for changes acknowledged
// well before the cut.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	powerCutPoolLow  = 30000
	powerCutPoolHigh = 30099
	powerCutFresh    = 60 // keys allocated before the moves and releases
	powerCutLate     = 20 // keys allocated in the last moments before the cut
	powerCutImageMiB = 64
	// powerCutHistoryLag: history entries are written in the background,
	// so only changes acknowledged this long before the cut must be in
	// the history on the copy.
	powerCutHistoryLag = 1500 * time.Millisecond
)

func TestPowerCut(t *testing.T) {
	fullTier(t, "root and loop devices")
	requireLoopMount(t)
	bin := binary(t)
	for _, st := range []string{"file", "bbolt"} {
		t.Run(st, func(t *testing.T) { powerCut(t, bin, st) })
	}
}

// requireLoopMount skips the test, saying why, where loop devices cannot
// be mounted; with TEST_REQUIRE_LOOP set (as .ci/run sets it) it fails
// instead.
func requireLoopMount(t *testing.T) {
	t.Helper()
	miss := t.Skipf
	if os.Getenv("TEST_REQUIRE_LOOP") != "" {
		miss = t.Fatalf
	}
	switch {
	case runtime.GOOS != "linux":
		miss("the power-cut test mounts ext4 on a loop device: Linux only")
	case os.Geteuid() != 0:
		miss("the power-cut test mounts ext4 on a loop device: run it as root")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		miss("the power-cut test needs loop devices: %v (modprobe loop, as .ci/run does)", err)
	}
	for _, tool := range []string{"mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "cp", "sync"} {
		if _, err := exec.LookPath(tool); err != nil {
			miss("the power-cut test needs %s: apt-get install e2fsprogs mount util-linux coreutils (%v)", tool, err)
		}
	}
}

// pcRun runs a command and fails t with its output when it fails.
func pcRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// loopMount is an image attached to a loop device and mounted.
type loopMount struct {
	dev, dir string
	closed   bool
}

// mountImage attaches image to a free loop device and mounts it on dir
// (created) with options; t's cleanup unmounts and detaches it.
func mountImage(t *testing.T, image, dir, options string) *loopMount {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "-f", "--show", image).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup -f --show %s: %v: %s", image, err, bytes.TrimSpace(out))
	}
	m := &loopMount{dev: strings.TrimSpace(string(out)), dir: dir}
	args := []string{"-t", "ext4"}
	if options != "" {
		args = append(args, "-o", options)
	}
	if out, err := exec.Command("mount", append(args, m.dev, dir)...).CombinedOutput(); err != nil {
		exec.Command("losetup", "-d", m.dev).Run()
		t.Fatalf("mount %s on %s: %v: %s", m.dev, dir, err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() { m.close(t) })
	return m
}

// close unmounts and detaches; only the first call does anything. The
// servers on it must be gone.
func (m *loopMount) close(t testing.TB) {
	if m.closed {
		return
	}
	m.closed = true
	var out []byte
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if out, err = exec.Command("umount", m.dir).CombinedOutput(); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Errorf("umount %s: %v: %s (detached lazily)", m.dir, err, bytes.TrimSpace(out))
		exec.Command("umount", "-l", m.dir).Run()
	}
	if out, err := exec.Command("losetup", "-d", m.dev).CombinedOutput(); err != nil {
		t.Errorf("losetup -d %s: %v: %s", m.dev, err, bytes.TrimSpace(out))
	}
}

// pcEvent is one acknowledged change.
type pcEvent struct {
	at   time.Time // when its answer arrived
	what string    // new, moved, assigned, released
	key  string
	port int // the key's port after it; 0: released
	old  int // the port it left; 0: none
}

// pcLedger is what the server acknowledged before the cut.
type pcLedger struct {
	held     map[string]int // key -> last acknowledged port
	released map[string]int // key -> the port it held when it was released
	events   []pcEvent
}

func (l *pcLedger) record(e pcEvent) {
	l.events = append(l.events, e)
	if e.port == 0 {
		delete(l.held, e.key)
		l.released[e.key] = e.old
		return
	}
	l.held[e.key] = e.port
	delete(l.released, e.key)
}

// freePort returns the highest pool port no key holds, for a move.
func (l *pcLedger) freePort() int {
	taken := map[int]bool{}
	for _, p := range l.held {
		taken[p] = true
	}
	for p := powerCutPoolHigh; p >= powerCutPoolLow; p-- {
		if !taken[p] {
			return p
		}
	}
	return 0
}

// heldKeys returns the ledger's held keys, sorted.
func (l *pcLedger) heldKeys() []string {
	keys := make([]string, 0, len(l.held))
	for k := range l.held {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func powerCutArgs(dataDir, st string) []string {
	return []string{"-data-dir", dataDir, "-store", st, "-probe=false",
		"-allow-ports", fmt.Sprintf("%d-%d", powerCutPoolLow, powerCutPoolHigh)}
}

func powerCut(t *testing.T, bin, st string) {
	work := t.TempDir()
	logDir := t.TempDir()
	t.Cleanup(func() {
		if t.Failed() {
			pcLogWarnings(t, logDir)
		}
	})
	image := filepath.Join(work, "disk.img")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(image, powerCutImageMiB<<20); err != nil {
		t.Fatal(err)
	}
	// Inode tables and journal written now, so no lazy init writes behind
	// the test's back while it runs.
	pcRun(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", image)
	// commit=300: the journal commits on its own only every 300 s, and
	// dirty pages expire after 30 s, so within a few seconds only what the
	// store fsyncs reaches the image.
	disk := mountImage(t, image, filepath.Join(work, "mnt"), "commit=300")
	began := time.Now()
	p := startKeeperProc(t, bin, filepath.Join(logDir, "before-cut.log"), powerCutArgs(filepath.Join(disk.dir, "data"), st)...)

	ledger := powerCutWorkload(t, p, st)
	workTook := time.Since(began)

	// The power cut: the backing file holds what the loop device was
	// given, i.e. the disk as it would be found after a cut. Nothing
	// syncs before this copy.
	cut := time.Now()
	cutImage := filepath.Join(work, "cut.img")
	pcRun(t, "cp", "--sparse=always", image, cutImage)
	// The control: the same disk after a sync must hold everything, or the
	// harness loses data by itself.
	pcRun(t, "sync", "-f", disk.dir)
	syncedImage := filepath.Join(work, "synced.img")
	pcRun(t, "cp", "--sparse=always", image, syncedImage)
	p.kill()
	disk.close(t)

	ctl := bootImage(t, bin, st, syncedImage, filepath.Join(work, "mnt-synced"), filepath.Join(logDir, "synced.log"))
	if lost := listedLosses(t, ctl.proc, ledger); lost.count() > 0 {
		t.Fatalf("harness: the control copy, taken after sync, lost data, so this test cannot tell what a power cut does:\n%s", lost)
	}
	ctl.close(t)

	after := bootImage(t, bin, st, cutImage, filepath.Join(work, "mnt-cut"), filepath.Join(logDir, "after-cut.log"))
	t.Logf("%s store: %d changes acknowledged in %v from the server's start to the cut (%d keys held, %d released); the control copy after sync held all of them",
		st, len(ledger.events), workTook.Round(time.Millisecond), len(ledger.held), len(ledger.released))

	t.Run("ports", func(t *testing.T) { powerCutPorts(t, after.proc, ledger) })
	t.Run("history", func(t *testing.T) { powerCutHistory(t, after.proc, ledger, cut) })
}

// powerCutWorkload makes changes of every kind, one at a time, each
// recorded once acknowledged: fresh keys, device moves, operator assigns
// and releases; a pause, so that those are acknowledged well before the
// cut; then more of each in the last moments.
func powerCutWorkload(t *testing.T, p *keeperProc, st string) *pcLedger {
	t.Helper()
	l := &pcLedger{held: map[string]int{}, released: map[string]int{}}
	key := func(i int) string { return fmt.Sprintf("pc-%s.%03d", st, i) }
	fresh := func(from, to int) {
		for i := from; i < to; i++ {
			l.record(pcEvent{what: "new", key: key(i), port: pcNewProxy(t, p, key(i), 0), at: time.Now()})
		}
	}
	moveByDevice := func(from, to int) {
		for i := from; i < to; i++ {
			old, want := l.held[key(i)], l.freePort()
			if got := pcNewProxy(t, p, key(i), want); got != want {
				t.Fatalf("before the cut: %s asked for port %d, got %d", key(i), want, got)
			}
			l.record(pcEvent{what: "moved", key: key(i), port: want, old: old, at: time.Now()})
		}
	}
	assignByOperator := func(from, to int) {
		for i := from; i < to; i++ {
			old, want := l.held[key(i)], l.freePort()
			pcAssign(t, p, key(i), want)
			l.record(pcEvent{what: "assigned", key: key(i), port: want, old: old, at: time.Now()})
		}
	}
	release := func(from, to int) {
		for i := from; i < to; i++ {
			old := l.held[key(i)]
			pcRelease(t, p, key(i))
			l.record(pcEvent{what: "released", key: key(i), old: old, at: time.Now()})
		}
	}
	fresh(0, powerCutFresh)
	moveByDevice(0, 10)
	assignByOperator(10, 20)
	release(20, 30)
	// Everything so far must be in the history after the cut.
	time.Sleep(2 * powerCutHistoryLag)
	fresh(powerCutFresh, powerCutFresh+powerCutLate)
	moveByDevice(30, 35)
	assignByOperator(35, 40)
	release(40, 45)
	return l
}

// pcNewProxy registers key (user "pc", tcp), asking for port when it is
// not 0, and returns the port answered; anything else fails t.
func pcNewProxy(t testing.TB, p *keeperProc, key string, port int) int {
	t.Helper()
	got, reject, err := pcTryNewProxy(p, key, port)
	if err != nil || reject != "" {
		t.Fatalf("NewProxy %s (remote_port %d): %v %s; want a port", key, port, err, reject)
	}
	return got
}

// pcTryNewProxy registers key and returns the port, or why it was refused.
func pcTryNewProxy(p *keeperProc, key string, port int) (int, string, error) {
	extra := ""
	if port != 0 {
		extra = fmt.Sprintf(`"remote_port":%d`, port)
	}
	r, err := newProxyHTTP(context.Background(), p.client, p.url, "pc-"+key, newProxyBody("pc", key, "tcp", extra))
	switch {
	case err != nil:
		return 0, "", err
	case r.status != http.StatusOK:
		return 0, "", fmt.Errorf("status %d: %s", r.status, r.body)
	}
	return r.port, r.reject, nil
}

func pcAssign(t testing.TB, p *keeperProc, key string, port int) {
	t.Helper()
	status, body := pcAdmin(t, p, http.MethodPut, "/api/allocations/"+url.PathEscape(key), fmt.Sprintf(`{"port":%d}`, port))
	var got apiAllocation
	if status != http.StatusOK || json.Unmarshal([]byte(body), &got) != nil || got.Port != port {
		t.Fatalf("assign %s to %d: status %d: %s; want 200 with port %d", key, port, status, body, port)
	}
}

func pcRelease(t testing.TB, p *keeperProc, key string) {
	t.Helper()
	if status, body := pcAdmin(t, p, http.MethodDelete, "/api/allocations/"+url.PathEscape(key), ""); status != http.StatusNoContent {
		t.Fatalf("release %s: status %d: %s; want 204", key, status, body)
	}
}

// pcAdmin calls the admin API (loopback needs no token).
func pcAdmin(t testing.TB, p *keeperProc, method, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, p.url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp.StatusCode, string(b)
}

// bootedImage is a server started on a copied disk image.
type bootedImage struct {
	disk *loopMount
	proc *keeperProc
}

func (b *bootedImage) close(t testing.TB) {
	b.proc.kill()
	b.disk.close(t)
}

// bootImage repairs image as a boot after a power cut would (e2fsck
// replays the journal), mounts it on dir and starts the server on it.
func bootImage(t *testing.T, bin, st, image, dir, logPath string) *bootedImage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "e2fsck", "-fy", image).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 1) { // 1: errors corrected
		t.Fatalf("e2fsck -fy %s: %v\n%s", image, err, out)
	}
	disk := mountImage(t, image, dir, "")
	proc := startKeeperProc(t, bin, logPath, powerCutArgs(filepath.Join(dir, "data"), st)...)
	return &bootedImage{disk: disk, proc: proc}
}

// pcLosses is what a server on a copy has lost of the ledger.
type pcLosses struct {
	held     int      // keys the ledger holds
	missing  []string // held keys the server does not list
	moved    []string // held keys it lists on another port
	released int
	back     []string // released keys it lists again
}

func (l pcLosses) count() int { return len(l.missing) + len(l.moved) + len(l.back) }

func (l pcLosses) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d of %d acknowledged keys lost (%d not listed, %d listed on another port); %d of %d released keys listed again",
		len(l.missing)+len(l.moved), l.held, len(l.missing), len(l.moved), len(l.back), l.released)
	for _, part := range []struct {
		name string
		list []string
	}{{"not listed", l.missing}, {"on another port", l.moved}, {"released, listed again", l.back}} {
		if len(part.list) > 0 {
			fmt.Fprintf(&b, "\n  %s: %s", part.name, pcShow(part.list, ", "))
		}
	}
	return b.String()
}

// listedLosses compares the server's listing with the ledger; it changes
// nothing on the server.
func listedLosses(t testing.TB, p *keeperProc, l *pcLedger) pcLosses {
	t.Helper()
	status, body := pcAdmin(t, p, http.MethodGet, "/api/allocations", "")
	var list allocationList
	if status != http.StatusOK || json.Unmarshal([]byte(body), &list) != nil {
		t.Fatalf("GET /api/allocations: status %d: %s", status, body)
	}
	listed := map[string]int{}
	for _, a := range list.Allocations {
		listed[a.Key] = a.Port
	}
	lost := pcLosses{held: len(l.held), released: len(l.released)}
	for _, key := range l.heldKeys() {
		want := l.held[key]
		switch got, ok := listed[key]; {
		case !ok:
			lost.missing = append(lost.missing, fmt.Sprintf("%s (port %d)", key, want))
		case got != want:
			lost.moved = append(lost.moved, fmt.Sprintf("%s on %d (acknowledged %d)", key, got, want))
		}
	}
	for key, was := range l.released {
		if got, ok := listed[key]; ok {
			lost.back = append(lost.back, fmt.Sprintf("%s on %d (released from %d)", key, got, was))
		}
	}
	slices.Sort(lost.back)
	return lost
}

// powerCutPorts checks the allocations on the copy: first the listing,
// then new keys fill the pool (none may get a held key's port), then every
// held key registers again and must get its port as a sticky hit.
func powerCutPorts(t *testing.T, p *keeperProc, l *pcLedger) {
	lost := listedLosses(t, p, l)

	holder := map[int]string{}
	for k, port := range l.held {
		holder[port] = k
	}
	var strangers []string // "port (key's) -> stranger"
	newKeys := 0
	for i := 0; i <= powerCutPoolHigh-powerCutPoolLow+1; i++ {
		stranger := fmt.Sprintf("stranger.%03d", i)
		port, reject, err := pcTryNewProxy(p, stranger, 0)
		if err != nil {
			t.Fatalf("after the cut: NewProxy %s: %v", stranger, err)
		}
		if reject != "" {
			if !strings.Contains(reject, "no free port") {
				t.Fatalf("after the cut: NewProxy %s: rejected %q; want a port or a full pool", stranger, reject)
			}
			break
		}
		newKeys++
		if k, ok := holder[port]; ok {
			strangers = append(strangers, fmt.Sprintf("%d (%s's) -> %s", port, k, stranger))
		}
	}

	var reasked []string
	for _, key := range l.heldKeys() {
		want := l.held[key]
		port, reject, err := pcTryNewProxy(p, key, 0)
		switch {
		case err != nil:
			reasked = append(reasked, fmt.Sprintf("%s: %v", key, err))
		case reject != "":
			reasked = append(reasked, fmt.Sprintf("%s: rejected %q (acknowledged %d)", key, reject, want))
		case port != want:
			reasked = append(reasked, fmt.Sprintf("%s: got %d (acknowledged %d)", key, port, want))
		}
	}
	// A lost key may come back on its port by chance (a fresh allocation
	// that picks the same one): the log says whether it was remembered.
	if len(reasked) == 0 {
		var outcomes map[string]string
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			var err error
			if outcomes, err = decisionOutcomes(p.logPath); err != nil {
				t.Fatal(err)
			}
			missing := slices.ContainsFunc(l.heldKeys(), func(key string) bool { _, ok := outcomes["pc-"+key]; return !ok })
			if !missing || time.Now().After(deadline) {
				break
			}
		}
		for _, key := range l.heldKeys() {
			if got := outcomes["pc-"+key]; got != "hit" {
				reasked = append(reasked, fmt.Sprintf("%s: outcome %q (want hit)", key, got))
			}
		}
	}

	if lost.count() > 0 || len(strangers) > 0 || len(reasked) > 0 {
		msg := fmt.Sprintf("after the power cut: %s; %d ports of held keys went to new keys (%d new keys filled the pool); %d held keys did not get their port back when they registered again",
			lost, len(strangers), newKeys, len(reasked))
		if len(strangers) > 0 {
			msg += "\n  ports given to new keys: " + pcShow(strangers, ", ")
		}
		if len(reasked) > 0 {
			msg += "\n  registered again: " + pcShow(reasked, ", ")
		}
		t.Error(msg)
	}
}

// powerCutHistory asks the copy's history who held each port changed by a
// change acknowledged powerCutHistoryLag before the cut, at the moment
// its answer arrived: the key it went to, and nobody for a port it left.
func powerCutHistory(t *testing.T, p *keeperProc, l *pcLedger, cut time.Time) {
	var wrong []string
	asked := 0
	ask := func(e pcEvent, port int, wantKey string) {
		asked++
		q := url.Values{"port": {fmt.Sprint(port)}, "at": {e.at.Format(time.RFC3339Nano)}}
		status, body := pcAdmin(t, p, http.MethodGet, "/api/history?"+q.Encode(), "")
		var ans portAt
		if status != http.StatusOK || json.Unmarshal([]byte(body), &ans) != nil {
			wrong = append(wrong, fmt.Sprintf("port %d after %s %s: status %d: %s", port, e.what, e.key, status, strings.TrimSpace(body)))
			return
		}
		if !ans.Known || ans.Held != (wantKey != "") || ans.Key != wantKey {
			want := "held by " + wantKey
			if wantKey == "" {
				want = "free"
			}
			got := "unknown"
			switch {
			case ans.Known && ans.Held:
				got = "held by " + ans.Key
			case ans.Known:
				got = "free"
			}
			wrong = append(wrong, fmt.Sprintf("port %d after %s %s: %s; want %s", port, e.what, e.key, got, want))
		}
	}
	for _, e := range l.events {
		if !e.at.Before(cut.Add(-powerCutHistoryLag)) {
			continue
		}
		if e.port != 0 {
			ask(e, e.port, e.key)
		}
		if e.old != 0 {
			ask(e, e.old, "")
		}
	}
	if asked == 0 {
		t.Fatalf("no change was acknowledged %v before the cut: nothing to ask", powerCutHistoryLag)
	}
	if len(wrong) > 0 {
		t.Errorf("after the power cut the history answers %d of %d questions \"who held port N at T\" wrongly (changes acknowledged at least %v before the cut):\n  %s",
			len(wrong), asked, powerCutHistoryLag, pcShow(wrong, "\n  "))
	}
}

// pcShow joins the first 20 items with sep and says how many more there are.
func pcShow(items []string, sep string) string {
	const show = 20
	if len(items) <= show {
		return strings.Join(items, sep)
	}
	return strings.Join(items[:show], sep) + fmt.Sprintf("%s... and %d more", sep, len(items)-show)
}

// pcLogWarnings logs, for a failure, what the servers' logs in dir warned
// of, but for the decisions (the failure names those that matter).
func pcLogWarnings(t testing.TB, dir string) {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, path := range logs {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var warn []string
		for line := range strings.Lines(string(data)) {
			if !strings.Contains(line, "level=INFO") && !decisionLine.MatchString(line) {
				warn = append(warn, strings.TrimRight(line, "\n"))
			}
		}
		if len(warn) > 0 {
			t.Logf("%s:\n%s", filepath.Base(path), pcShow(warn, "\n"))
		}
	}
}
