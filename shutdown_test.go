package main

// How the server stops: promptly with event streams open, and on every
// exit path with last_seen flushed and the history drained before the
// store closes.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/file"
	"frp-port-keeper/internal/testenv"
)

// openEventStream opens GET /api/events and returns once the server has
// sent the stream's first line.
func openEventStream(t testing.TB, base string) *http.Response {
	t.Helper()
	resp, err := (&http.Client{}).Get(base + "/api/events")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/events: %s", resp.Status)
	}
	if line, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil || !strings.HasPrefix(line, ":") {
		t.Fatalf("event stream opened with %q, %v", line, err)
	}
	return resp
}

// TestStopWithEventStreamOpen: SIGTERM to the real binary with an
// /api/events stream open ends the stream, exits 0 well before a
// supervisor's grace period (docker stop: 10s) runs out, and still
// flushes last_seen and writes the checkpoint.
func TestStopWithEventStreamOpen(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(t.TempDir(), "keeper.log")
	p := startKeeperProc(t, binary(t), logPath, "-data-dir", dir, "-allow-ports", "30000-30009", "-probe=false")
	reply, err := newProxyHTTP(context.Background(), p.client, p.url, "r1", newProxyBody("u", "u.a", "tcp", ""))
	if err != nil || reply.port == 0 {
		t.Fatalf("NewProxy: %+v %v", reply, err)
	}
	stream := openEventStream(t, p.url)
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		log, _ := os.ReadFile(logPath)
		t.Fatalf("still running 5s after SIGTERM with an event stream open; log:\n%s", log)
	}
	log, _ := os.ReadFile(logPath)
	if p.waitErr != nil {
		t.Fatalf("exit after SIGTERM: %v; want 0. log:\n%s", p.waitErr, log)
	}
	if _, err := io.Copy(io.Discard, stream.Body); err != nil {
		t.Errorf("the event stream did not end cleanly: %v", err)
	}
	if !strings.Contains(string(log), `msg="stored last_seen" keys=1`) {
		t.Errorf("no last_seen flush at stop; log:\n%s", log)
	}
	if _, err := os.Stat(filepath.Join(dir, file.CheckpointName)); err != nil {
		t.Errorf("no checkpoint after a clean stop: %v", err)
	}
}

// breakListener makes accept fail on this process's socket listening on
// port (shutdown(2) on a listening socket), so http.Server.Serve returns
// an error: the exit path a dead listener takes.
func breakListener(t testing.TB, port int) {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	for _, f := range fds {
		fd, err := strconv.Atoi(f.Name())
		if err != nil {
			continue
		}
		sa, err := syscall.Getsockname(fd)
		if err != nil {
			continue
		}
		if in, ok := sa.(*syscall.SockaddrInet4); ok && in.Port == port {
			if v, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err == nil && v == 1 {
				if err := syscall.Shutdown(fd, syscall.SHUT_RD); err != nil {
					t.Fatal(err)
				}
				return
			}
		}
	}
	t.Fatalf("no socket listening on port %d in this process", port)
}

// TestServeErrorDrains: when Serve fails (its listener dies), the server
// exits with that error, and before the store closes it flushes last_seen
// and writes what the history recorder holds, as a normal stop does.
func TestServeErrorDrains(t *testing.T) {
	dir := t.TempDir()
	port := testenv.FreePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(context.Background(), []string{"-listen", fmt.Sprintf("127.0.0.1:%d", port), "-data-dir", dir,
			"-allow-ports", "30000-30009", "-probe=false"}, func(string) string { return "" }, logs, logs)
	}()
	waitFor(t, "the server to answer /ping", 10*time.Second, func() bool {
		resp, err := http.Get(base + "/ping")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
	got := register(t, base, "u", "u.a", "tcp")
	breakListener(t, port)
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "accept") {
			t.Fatalf("run after its listener died: %v; want the accept error", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("run did not return after its listener died; log:\n%s", logs)
	}
	st := openTestStore(t, "file", dir)
	snap, err := st.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Allocations) != 1 || snap.Allocations[0].Port != got {
		t.Fatalf("allocations after the exit: %+v; want u.a on %d", snap.Allocations, got)
	}
	if _, ok := snap.LastSeen["u.a"]; !ok || !snap.Online["u.a"] {
		t.Errorf("last_seen of u.a not flushed before the store closed (seen %v, online %v); log:\n%s", snap.LastSeen, snap.Online, logs)
	}
	entries, err := st.History().Entries(context.Background(), store.HistoryQuery{Key: "u.a"})
	if err != nil || len(entries) != 1 || entries[0].Change != store.HistNew {
		t.Errorf("history of u.a after the exit: %+v, %v; want its new entry", entries, err)
	}
}

// TestWatchReconnects: watch follows a server that stops and starts again
// on the same address: it says on stderr that the connection was lost and
// when it is back, and prints the changes made after that.
func TestWatchReconnects(t *testing.T) {
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	noEnv := func(string) string { return "" }
	serveOnce := func() (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, []string{"-listen", addr, "-data-dir", dir, "-allow-ports", "30000-30099", "-probe=false"}, noEnv, io.Discard, testWriter{t})
		}()
		waitFor(t, "the server to answer /ping", 10*time.Second, func() bool {
			resp, err := http.Get("http://" + addr + "/ping")
			if err == nil {
				resp.Body.Close()
			}
			return err == nil
		})
		return func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("server stop: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("server did not stop")
			}
		}
	}
	stop := serveOnce()
	var out, errOut syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	watched := make(chan error, 1)
	go func() { watched <- run(ctx, []string{"watch", "-server", addr}, noEnv, &out, &errOut) }()
	defer func() {
		cancel()
		if err := <-watched; err != nil {
			t.Errorf("watch after interrupt: %v; want nil", err)
		}
	}()
	// The stream opens in the background: change things until one shows.
	n := 0
	waitFor(t, "watch to print a change", 10*time.Second, func() bool {
		n++
		name := fmt.Sprintf("u.a%d", n)
		port := register(t, "http://"+addr, "u", name, "tcp")
		time.Sleep(50 * time.Millisecond)
		return strings.Contains(out.String(), fmt.Sprintf("new       %s %d", name, port))
	})
	stop()
	waitFor(t, "watch to say the connection was lost", 10*time.Second, func() bool {
		return strings.Contains(errOut.String(), "connection lost") && strings.Contains(errOut.String(), "reconnecting in 1s")
	})
	stop = serveOnce()
	defer stop()
	waitFor(t, "watch to reconnect", 30*time.Second, func() bool { return strings.Contains(errOut.String(), "reconnected") })
	port := register(t, "http://"+addr, "u", "u.b", "tcp")
	waitFor(t, "watch to print a change after reconnecting", 10*time.Second, func() bool {
		return strings.Contains(out.String(), fmt.Sprintf("new       u.b %d", port))
	})
	t.Logf("watch's stderr:\n%s", errOut.String())
}

// TestWatchGivesUpOnRefusal: a refusal that waiting cannot fix (a wrong
// token) ends watch with the server's reason instead of retrying forever.
func TestWatchGivesUpOnRefusal(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusUnauthorized, "a valid admin token is required (Authorization: Bearer ...)")
	}))
	defer srv.Close()
	done := make(chan error, 1)
	var out, errOut syncBuffer
	go func() {
		done <- run(context.Background(), []string{"watch", "-server", srv.URL}, func(string) string { return "" }, &out, &errOut)
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "a valid admin token is required") || !strings.Contains(err.Error(), "401 Unauthorized") {
			t.Fatalf("watch refused with 401: %v; want the server's reason", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("watch still retrying a 401; stderr:\n%s", errOut.String())
	}
}
