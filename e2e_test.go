package main

// End-to-end tests: real frps and frpc binaries (built from the pinned tool
// modules under tools/) talking to the plugin's run() in this test process.
//
// Every test runs against three frp versions:
//   - v0.65.0, configured with TOML (frps.toml, [[httpPlugins]])
//   - v0.51.3, configured with legacy INI (frps.ini, [plugin.NAME])
//   - v0.71.0, configured with TOML, built with frp's "noweb" tag (its module
//     has no built dashboard assets)
//
// frps and frpc are built once per test binary run into bin/frp-VERSION/
// (git-ignored) with `go build` run inside tools/frp-VERSION/; the go build
// cache makes repeat builds a matter of seconds.
//
// Everything listens on 127.0.0.1 only, on ports chosen free at run time. All
// processes are started by the test and stopped in t.Cleanup, and every wait
// is bounded.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"frp-port-keeper/internal/testenv"
)

// Timeouts. Generous enough for a loaded 2-core CI machine, short enough that
// a broken plugin fails the suite in well under a minute per test.
const (
	e2eFrpBuildTimeout    = 8 * time.Minute
	e2eReadyTimeout       = 15 * time.Second // a process or the plugin answering
	e2eProxyOnlineTimeout = 25 * time.Second // frpc (re)connecting and registering a proxy
	e2eProxyGoneTimeout   = 15 * time.Second // frps noticing a client went away
	e2eStopTimeout        = 10 * time.Second // a process or run() exiting after being told to
	e2eEchoTimeout        = 10 * time.Second // bytes making it through a published port
	e2ePollInterval       = 100 * time.Millisecond
)

const (
	e2eDashboardUser     = "admin"
	e2eDashboardPassword = "e2e-secret"
	e2ePluginPath        = "/port-registrations"
	e2ePluginPoolSize    = 6  // ports the plugin may hand out
	e2eFrpsAllowPortsLen = 16 // ports frps accepts: the pool plus ports the plugin must not use
)

// frpVersion is one frp release the e2e tests run against.
type frpVersion struct {
	name      string // "v0.65.0": the tools/frp-NAME and bin/frp-NAME directories
	legacyINI bool   // configure with INI (frps.ini/frpc.ini) instead of TOML
	// buildTags for go build. frp v0.71.0's module no longer carries the
	// dashboards' built assets (web/frps/dist, web/frpc/dist, which
	// //go:embed wants); its "noweb" tag, which frp's own Makefile sets when
	// they are missing, leaves them out. The dashboard API still answers,
	// only its web pages are gone.
	buildTags string
}

var frpVersions = []frpVersion{
	{name: "v0.65.0"},
	{name: "v0.51.3", legacyINI: true},
	{name: "v0.71.0", buildTags: "noweb"},
}

// forEachFrpVersion runs fn as a parallel subtest per frp version.
func forEachFrpVersion(t *testing.T, fn func(t *testing.T, v frpVersion)) {
	fullTier(t, "frps and frpc")
	t.Helper()
	for _, v := range frpVersions {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			fn(t, v)
		})
	}
}

// ---------------------------------------------------------------------------
// The tests.

// TestE2EStickyTCPPort: alice's tcp proxy without a remote port gets a port
// from the plugin's pool, bytes flow through it, and she keeps that port when
// frpc, frps or the plugin restarts.
func TestE2EStickyTCPPort(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		echo := startTCPEcho(t)
		aliceProxies := []proxySpec{{Name: "web", Type: "tcp", LocalPort: echo.Port}}

		alice := startFrpc(t, env, "alice", aliceProxies...)
		first := waitProxy(t, env, "tcp", "alice.web")
		env.requireInPool(t, "alice.web", first.RemotePort)
		checkTCPEcho(t, first.RemotePort)

		// Each step restarts something, then alice's proxy must come back
		// on the same port and still carry bytes. The steps share alice's
		// frpc and frps, so they run in order in this test.
		steps := []struct {
			name    string
			restart func()
		}{
			{"frpc restart", func() {
				alice.stop(t)
				waitProxyGone(t, env, "tcp", "alice.web")
				alice = startFrpc(t, env, "alice", aliceProxies...)
			}},
			{"frps restart", func() {
				// frpc keeps running and logs in again by itself.
				env.restartFrps(t)
			}},
			{"plugin restart", func() {
				// frps only asks the plugin on NewProxy, so take alice
				// offline, restart the plugin on the same data dir, let a
				// newcomer register first (a plugin that forgot alice's
				// port would be free to hand it to bob), then bring alice
				// back.
				alice.stop(t)
				waitProxyGone(t, env, "tcp", "alice.web")
				env.restartPlugin(t)

				bobEcho := startTCPEcho(t)
				startFrpc(t, env, "bob", proxySpec{Name: "web", Type: "tcp", LocalPort: bobEcho.Port})
				bob := waitProxy(t, env, "tcp", "bob.web")
				if bob.RemotePort == first.RemotePort {
					t.Fatalf("after plugin restart bob.web remote port = %d; want any pool port but alice.web's %d", bob.RemotePort, first.RemotePort)
				}
				alice = startFrpc(t, env, "alice", aliceProxies...)
			}},
		}
		for _, step := range steps {
			t.Logf("step: %s", step.name)
			step.restart()
			got := waitProxy(t, env, "tcp", "alice.web")
			if got.RemotePort != first.RemotePort {
				t.Fatalf("after %s alice.web remote port = %d; want %d (its port before)", step.name, got.RemotePort, first.RemotePort)
			}
			checkTCPEcho(t, got.RemotePort)
		}
	})
}

// TestE2ESecondClientGetsAnotherPort: bob's proxy gets a different pool port
// than alice's, each port reaches its own backend, and alice's port stays
// hers while she is offline.
func TestE2ESecondClientGetsAnotherPort(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		aliceEcho, bobEcho := startTCPEcho(t), startTCPEcho(t)
		aliceProxies := []proxySpec{{Name: "web", Type: "tcp", LocalPort: aliceEcho.Port}}

		alice := startFrpc(t, env, "alice", aliceProxies...)
		a := waitProxy(t, env, "tcp", "alice.web")
		bob := startFrpc(t, env, "bob", proxySpec{Name: "web", Type: "tcp", LocalPort: bobEcho.Port})
		b := waitProxy(t, env, "tcp", "bob.web")

		env.requireInPool(t, "alice.web", a.RemotePort)
		env.requireInPool(t, "bob.web", b.RemotePort)
		if a.RemotePort == b.RemotePort {
			t.Fatalf("bob.web remote port = %d; want a port other than alice.web's %d", b.RemotePort, a.RemotePort)
		}
		checkTCPEchoReaches(t, b.RemotePort, bobEcho)
		checkTCPEchoReaches(t, a.RemotePort, aliceEcho)

		// While alice is offline bob re-registers; he must keep his own
		// port, not take the one alice left behind. Then alice comes back
		// to hers.
		alice.stop(t)
		waitProxyGone(t, env, "tcp", "alice.web")
		bob.stop(t)
		waitProxyGone(t, env, "tcp", "bob.web")
		startFrpc(t, env, "bob", proxySpec{Name: "web", Type: "tcp", LocalPort: bobEcho.Port})
		if got := waitProxy(t, env, "tcp", "bob.web"); got.RemotePort != b.RemotePort {
			t.Fatalf("bob.web after reconnect (alice offline) remote port = %d; want %d", got.RemotePort, b.RemotePort)
		}
		startFrpc(t, env, "alice", aliceProxies...)
		if got := waitProxy(t, env, "tcp", "alice.web"); got.RemotePort != a.RemotePort {
			t.Fatalf("alice.web after reconnect remote port = %d; want %d", got.RemotePort, a.RemotePort)
		}
		checkTCPEchoReaches(t, a.RemotePort, aliceEcho)
	})
}

// TestE2EUDPProxy: a udp proxy gets a pool port and datagrams make the round
// trip through it to a local udp echo server.
func TestE2EUDPProxy(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		echo := startUDPEcho(t)
		startFrpc(t, env, "alice", proxySpec{Name: "dns", Type: "udp", LocalPort: echo.Port})

		got := waitProxy(t, env, "udp", "alice.dns")
		env.requireInPool(t, "alice.dns", got.RemotePort)
		checkUDPEcho(t, got.RemotePort)
	})
}

// TestE2ELoadBalancingGroupSharesPort: two proxies in one load-balancing
// group both come up, on one shared pool port.
func TestE2ELoadBalancingGroupSharesPort(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		echo1, echo2 := startTCPEcho(t), startTCPEcho(t)
		startFrpc(t, env, "alice",
			proxySpec{Name: "web1", Type: "tcp", LocalPort: echo1.Port, Group: "web", GroupKey: "k"},
			proxySpec{Name: "web2", Type: "tcp", LocalPort: echo2.Port, Group: "web", GroupKey: "k"},
		)

		p1 := waitProxy(t, env, "tcp", "alice.web1")
		p2 := waitProxy(t, env, "tcp", "alice.web2")
		for _, p := range []proxyInfo{p1, p2} {
			if p.Group != "web" {
				t.Errorf("%s group = %q; want %q", p.Name, p.Group, "web")
			}
		}
		env.requireInPool(t, "alice.web1", p1.RemotePort)
		if p2.RemotePort != p1.RemotePort {
			t.Fatalf("alice.web2 remote port = %d; want %d (alice.web1's, same group)", p2.RemotePort, p1.RemotePort)
		}
		checkTCPEcho(t, p1.RemotePort)
	})
}

// TestE2EReclaimSparesConnectedProxy: with a two-port pool and
// -reclaim-after 3s, alice's two proxies stay connected past 3 s; bob's new
// proxy is refused (the pool is full) instead of taking a port alice still
// carries traffic on, also after the plugin restarts. Once alice's frpc
// stops (frps sends CloseProxy), bob gets one of her ports.
func TestE2EReclaimSparesConnectedProxy(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v, func(e *e2eEnv) {
			e.pluginArgs = []string{"-allow-ports", fmt.Sprintf("%d-%d", e.pool.lo, e.pool.lo+1), "-reclaim-after", "3s"}
		})
		echo0, echo1, bobEcho := startTCPEcho(t), startTCPEcho(t), startTCPEcho(t)
		alice := startFrpc(t, env, "alice",
			proxySpec{Name: "p0", Type: "tcp", LocalPort: echo0.Port},
			proxySpec{Name: "p1", Type: "tcp", LocalPort: echo1.Port})
		p0, p1 := waitProxy(t, env, "tcp", "alice.p0"), waitProxy(t, env, "tcp", "alice.p1")
		bobRefused := func(when string) {
			t.Helper()
			time.Sleep(4 * time.Second) // past -reclaim-after, alice still connected
			bob := startFrpc(t, env, "bob", proxySpec{Name: "p", Type: "tcp", LocalPort: bobEcho.Port})
			deadline := time.Now().Add(e2eProxyOnlineTimeout)
			for frpcStartError(env, "bob.p") == "" {
				if time.Now().After(deadline) {
					t.Fatalf("%s: bob.p was not refused while alice's proxies are connected", when)
				}
				time.Sleep(e2ePollInterval)
			}
			if msg := frpcStartError(env, "bob.p"); !strings.Contains(msg, "no free port") {
				t.Fatalf("%s: bob.p refused with %q; want the pool exhausted", when, msg)
			}
			checkTCPEchoReaches(t, p0.RemotePort, echo0)
			checkTCPEchoReaches(t, p1.RemotePort, echo1)
			bob.stop(t)
		}
		bobRefused("first")
		env.restartPlugin(t)
		bobRefused("after a plugin restart")

		alice.stop(t)
		waitProxyGone(t, env, "tcp", "alice.p0")
		waitProxyGone(t, env, "tcp", "alice.p1")
		time.Sleep(4 * time.Second)
		startFrpc(t, env, "bob", proxySpec{Name: "p", Type: "tcp", LocalPort: bobEcho.Port})
		got := waitProxy(t, env, "tcp", "bob.p")
		if got.RemotePort != p0.RemotePort && got.RemotePort != p1.RemotePort {
			t.Fatalf("bob.p = %d after alice left; want one of her ports %d, %d", got.RemotePort, p0.RemotePort, p1.RemotePort)
		}
		checkTCPEchoReaches(t, got.RemotePort, bobEcho)
	})
}

// TestE2EAdoptBeforeEnabling: devices with frp's classic explicit
// remotePort (outside the plugin's pool) run on an frps without the
// plugin; adopt records their ports from frps's dashboard; frps restarts
// with the plugin, and every device keeps its port. A device that was not
// adopted is refused its port outside the pool, as before.
func TestE2EAdoptBeforeEnabling(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v, func(e *e2eEnv) { e.frpsWithoutPlugin = true })
		echo, udp := startTCPEcho(t), startUDPEcho(t)
		sshPort, dnsPort := env.allow.hi, env.allow.hi-1
		startFrpc(t, env, "alice",
			proxySpec{Name: "ssh", Type: "tcp", LocalPort: echo.Port, RemotePort: sshPort},
			proxySpec{Name: "dns", Type: "udp", LocalPort: udp.Port, RemotePort: dnsPort})
		waitProxy(t, env, "tcp", "alice.ssh")
		waitProxy(t, env, "udp", "alice.dns")
		// An frpc without user whose proxy's name has a dot: frps from
		// v0.67 reports its (empty) user; older frps report none, and the
		// text before the dot is all adopt has to go on.
		camPort := env.allow.hi - 2
		startFrpc(t, env, "", proxySpec{Name: "my.cam", Type: "tcp", LocalPort: echo.Port, RemotePort: camPort})
		waitProxy(t, env, "tcp", "my.cam")
		camUser := "-"
		if !versionAtLeast(v.name, 0, 67) {
			camUser = "my"
		}

		stdout, stderr, err := runCLI(nil, "adopt", "-server", env.pluginURL(""), "-frps-api", env.dashboardURL(""),
			"-frps-user", e2eDashboardUser, "-frps-password", e2eDashboardPassword)
		out := stdout + stderr
		if err != nil {
			t.Fatalf("adopt: %v\n%s%s", err, stdout, stderr)
		}
		for _, want := range []string{fmt.Sprintf("adopted: alice.ssh on port %d (tcp, user alice)", sshPort),
			fmt.Sprintf("adopted: alice.dns on port %d (udp, user alice)", dnsPort),
			fmt.Sprintf("adopted: my.cam on port %d (tcp, user %s)", camPort, camUser)} {
			if !strings.Contains(out, want) {
				t.Fatalf("adopt said:\n%s\nwant %q", out, want)
			}
		}

		env.frpsWithoutPlugin = false
		env.restartFrps(t)
		if got := waitProxy(t, env, "tcp", "alice.ssh"); got.RemotePort != sshPort {
			t.Fatalf("alice.ssh with the plugin = %d; want %d, its port before", got.RemotePort, sshPort)
		}
		if got := waitProxy(t, env, "udp", "alice.dns"); got.RemotePort != dnsPort {
			t.Fatalf("alice.dns with the plugin = %d; want %d", got.RemotePort, dnsPort)
		}
		checkTCPEchoReaches(t, sshPort, echo)
		checkUDPEcho(t, dnsPort)
	})
}

// TestE2EPinMovesDevice (issue 17): alice's frpc asks for remotePort = X
// and gets it; an operator assigns her key to Y with the CLI; when her
// frpc reconnects, still asking for X, frps listens on Y (not X), bytes
// flow through Y to her backend, and the history says she asked for X and
// was given the pin.
func TestE2EPinMovesDevice(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		echo := startTCPEcho(t)
		asked, pin := env.pool.lo+1, env.pool.lo+4
		spec := proxySpec{Name: "ssh", Type: "tcp", LocalPort: echo.Port, RemotePort: asked}
		alice := startFrpc(t, env, "alice", spec)
		if got := waitProxy(t, env, "tcp", "alice.ssh"); got.RemotePort != asked {
			t.Fatalf("alice.ssh = %d; want %d, the port it asked for", got.RemotePort, asked)
		}
		checkTCPEchoReaches(t, asked, echo)

		server := env.pluginURL("")
		stdout, stderr, err := runCLI(nil, "assign", "-server", server, "alice.ssh", fmt.Sprint(pin))
		if want := fmt.Sprintf("alice.ssh now holds port %d (pinned)", pin); err != nil || !strings.Contains(stdout, want) {
			t.Fatalf("assign: %v\n%s%s\nwant %q", err, stdout, stderr, want)
		}

		alice.stop(t)
		waitProxyGone(t, env, "tcp", "alice.ssh")
		startFrpc(t, env, "alice", spec) // the same config: remotePort = asked
		if got := waitProxy(t, env, "tcp", "alice.ssh"); got.RemotePort != pin {
			t.Fatalf("alice.ssh after the assign and a reconnect = %d; want %d, the pin", got.RemotePort, pin)
		}
		checkTCPEchoReaches(t, pin, echo)
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", asked), time.Second); err == nil {
			c.Close()
			t.Fatalf("something listens on %d, the port alice asked for; want only the pin %d", asked, pin)
		}

		stdout, stderr, err = runCLI(nil, "list", "-server", server, "-key", "alice.ssh")
		if err != nil || !strings.Contains(stdout, fmt.Sprint(pin)) || !strings.Contains(stdout, "pinned") {
			t.Fatalf("list -key alice.ssh: %v\n%s%s\nwant port %d, pinned", err, stdout, stderr, pin)
		}
		// History is written in the background, within a second.
		want := fmt.Sprintf("asked for %d; pinned to %d by an operator", asked, pin)
		deadline := time.Now().Add(e2eReadyTimeout)
		for {
			stdout, stderr, err = runCLI(nil, "history", "-server", server, "-key", "alice.ssh")
			if err == nil && strings.Contains(stdout, want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("history -key alice.ssh: %v\n%s%s\nwant %q", err, stdout, stderr, want)
			}
			time.Sleep(e2ePollInterval)
		}
	})
}

// TestE2ETransportOptionsKept: the plugin's answer keeps the proxy's other
// settings: frps's effective conf still has the bandwidth limit and
// encryption, and encrypted traffic flows.
func TestE2ETransportOptionsKept(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v)
		echo := startTCPEcho(t)
		startFrpc(t, env, "alice", proxySpec{Name: "secure", Type: "tcp", LocalPort: echo.Port, BandwidthLimit: "2MB", UseEncryption: true})

		got := waitProxy(t, env, "tcp", "alice.secure")
		env.requireInPool(t, "alice.secure", got.RemotePort)
		if got.BandwidthLimit != "2MB" {
			t.Errorf("alice.secure bandwidth limit in frps conf = %q; want %q", got.BandwidthLimit, "2MB")
		}
		if !got.UseEncryption {
			t.Errorf("alice.secure use encryption in frps conf = %v; want true", got.UseEncryption)
		}
		checkTCPEcho(t, got.RemotePort)
	})
}

// ---------------------------------------------------------------------------
// Environment: one plugin and one frps, with their ports and directories.

type e2eEnv struct {
	v          frpVersion
	bins       frpBinaries
	dir        string       // configs and logs
	dataDir    string       // the plugin's -data-dir, kept across plugin restarts
	pool       e2ePortRange // the plugin's -allow-ports
	allow      e2ePortRange // frps's allowPorts: the pool and more
	pluginPort int
	bindPort   int
	dashPort   int

	// Variations, set by newE2EEnv's options before anything starts (see
	// newE2ETLSEnv). The zero values are a plain-HTTP plugin and an frps
	// that inherits the test's environment.
	pluginArgs     []string     // extra flags for run()
	pluginScheme   string       // "https" for a TLS plugin; "" is plain HTTP
	pluginClient   *http.Client // for talking to the plugin; nil is a plain client
	frpsPluginINI  string       // extra lines for frps.ini's [plugin.port-keeper]
	frpsPluginTOML string       // extra lines for frps.toml's [[httpPlugins]]
	frpsEnv        []string     // frps's environment; nil inherits the test's
	// frpsWithoutPlugin starts frps as it ran before the plugin was added.
	frpsWithoutPlugin bool

	plugin *pluginInstance
	frps   *e2eProcess
	frpcs  []*e2eProcess // every frpc started, running or not
}

// newE2EEnv builds frp (once per test binary), applies opts, then starts the
// plugin and frps. Their logs are printed if the test fails.
func newE2EEnv(t *testing.T, v frpVersion, opts ...func(*e2eEnv)) *e2eEnv {
	fullTier(t, "frps and frpc")
	t.Helper()
	env := &e2eEnv{
		v:    v,
		bins: buildFrp(t, v),
		dir:  t.TempDir(),
	}
	env.dataDir = filepath.Join(env.dir, "plugin-data")
	if err := os.Mkdir(env.dataDir, 0o755); err != nil {
		t.Fatal(err)
	}
	block := reservePortBlock(t, e2eFrpsAllowPortsLen)
	env.allow = block
	env.pool = e2ePortRange{block.lo, block.lo + e2ePluginPoolSize - 1}
	env.pluginPort, env.bindPort, env.dashPort = testenv.FreePort(t), testenv.FreePort(t), testenv.FreePort(t)
	if env.pluginClient == nil {
		env.pluginClient = &http.Client{Timeout: time.Second}
	}
	for _, opt := range opts {
		opt(env)
	}

	// Registered first, so it runs last: after every process has stopped
	// and flushed its log.
	t.Cleanup(func() {
		if t.Failed() {
			e2eDumpLogs(t, env.dir)
		}
	})

	env.plugin = startPlugin(t, env)
	env.frps = startFrps(t, env)
	return env
}

func (env *e2eEnv) requireInPool(t testing.TB, proxy string, port int) {
	t.Helper()
	if !env.pool.contains(port) {
		t.Fatalf("%s remote port = %d; want a port in the plugin's pool %s (frps allows %s)", proxy, port, env.pool, env.allow)
	}
}

func (env *e2eEnv) restartFrps(t testing.TB) {
	t.Helper()
	env.frps.stop(t)
	env.frps = startFrps(t, env)
}

func (env *e2eEnv) restartPlugin(t testing.TB) {
	t.Helper()
	env.plugin.stop(t)
	env.plugin = startPlugin(t, env)
}

func (env *e2eEnv) dashboardURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", env.dashPort, path)
}

// pluginURL is the URL of path on the plugin, with the env's scheme.
func (env *e2eEnv) pluginURL(path string) string {
	scheme := env.pluginScheme
	if scheme == "" {
		scheme = "http"
	}
	return fmt.Sprintf("%s://127.0.0.1:%d%s", scheme, env.pluginPort, path)
}

// frpsPluginAddr is the plugin's addr in frps's config: host:port for plain
// HTTP (frp adds "http://"), scheme://host:port otherwise.
func (env *e2eEnv) frpsPluginAddr() string {
	addr := fmt.Sprintf("127.0.0.1:%d", env.pluginPort)
	if env.pluginScheme != "" {
		addr = env.pluginScheme + "://" + addr
	}
	return addr
}

// ---------------------------------------------------------------------------
// The plugin, in this process.

type pluginInstance struct {
	cancel   context.CancelFunc
	done     chan error // run's result
	stopOnce sync.Once
}

// startPlugin calls run() in a goroutine with the env's flags (and
// env.pluginArgs) and waits until it answers GET /ping, at env.pluginURL with
// env.pluginClient. Its stdout and stderr go to plugin.log.
func startPlugin(t testing.TB, env *e2eEnv) *pluginInstance {
	t.Helper()
	logFile := e2eOpenLog(t, filepath.Join(env.dir, "plugin.log"))
	label := ""
	if env.pluginScheme == "https" {
		label = " (TLS)"
	}
	fmt.Fprintf(logFile, "=== e2e: starting plugin%s at %s\n", label, time.Now().Format(time.RFC3339Nano))
	args := append([]string{
		"-listen", fmt.Sprintf("127.0.0.1:%d", env.pluginPort),
		"-data-dir", env.dataDir,
		"-allow-ports", env.pool.String(),
		"-probe=true",
	}, env.pluginArgs...)
	getenv := func(string) string { return "" } // hermetic: no settings from the environment

	ctx, cancel := context.WithCancel(context.Background())
	p := &pluginInstance{cancel: cancel, done: make(chan error, 1)}
	go func() {
		defer func() {
			if r := recover(); r != nil {
				p.done <- fmt.Errorf("run panicked: %v", r)
			}
		}()
		p.done <- run(ctx, args, getenv, logFile, logFile)
	}()
	t.Cleanup(func() {
		p.stop(t)
		logFile.Close()
	})

	url := env.pluginURL("/ping")
	client := env.pluginClient
	deadline := time.Now().Add(e2eReadyTimeout)
	var last string
	for {
		select {
		case err := <-p.done:
			p.done <- err // for stop
			t.Fatalf("plugin run(%q) returned before answering /ping: %v", args, err)
		default:
		}
		resp, err := client.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.TrimSpace(string(body)) == "pong" {
				return p
			}
			last = fmt.Sprintf("status %d, body %q", resp.StatusCode, body)
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin GET %s: got %s after %v; want 200 \"pong\"", url, last, e2eReadyTimeout)
		}
		time.Sleep(e2ePollInterval)
	}
}

// stop cancels run's context and waits for run to return nil.
func (p *pluginInstance) stop(t testing.TB) {
	t.Helper()
	p.stopOnce.Do(func() {
		p.cancel()
		select {
		case err := <-p.done:
			if err != nil {
				t.Errorf("plugin run returned %v after its context was cancelled; want nil", err)
			}
		case <-time.After(e2eStopTimeout):
			t.Errorf("plugin run did not return within %v after its context was cancelled", e2eStopTimeout)
		}
	})
}

// ---------------------------------------------------------------------------
// frps and frpc.

// startFrps writes frps's config (with env.frpsPluginAddr and
// env.frpsPluginINI/TOML) and starts it in env.frpsEnv, waiting until its
// dashboard API answers.
func startFrps(t testing.TB, env *e2eEnv) *e2eProcess {
	fullTier(t, "frps")
	t.Helper()
	var conf, name string
	if env.v.legacyINI {
		name = "frps.ini"
		conf = fmt.Sprintf(`[common]
bind_addr = 127.0.0.1
bind_port = %d
proxy_bind_addr = 127.0.0.1
allow_ports = %s
dashboard_addr = 127.0.0.1
dashboard_port = %d
dashboard_user = %s
dashboard_pwd = %s
log_file = console
log_level = debug
disable_log_color = true

[plugin.port-keeper]
addr = %s
path = %s
ops = NewProxy,CloseProxy
`, env.bindPort, env.allow, env.dashPort, e2eDashboardUser, e2eDashboardPassword, env.frpsPluginAddr(), e2ePluginPath) + env.frpsPluginINI
	} else {
		name = "frps.toml"
		conf = fmt.Sprintf(`bindAddr = "127.0.0.1"
bindPort = %d
proxyBindAddr = "127.0.0.1"
allowPorts = [{ start = %d, end = %d }]

webServer.addr = "127.0.0.1"
webServer.port = %d
webServer.user = %q
webServer.password = %q

log.to = "console"
log.level = "debug"
log.disablePrintColor = true

[[httpPlugins]]
name = "port-keeper"
addr = %q
path = %q
ops = ["NewProxy", "CloseProxy"]
`, env.bindPort, env.allow.lo, env.allow.hi, env.dashPort, e2eDashboardUser, e2eDashboardPassword, env.frpsPluginAddr(), e2ePluginPath) + env.frpsPluginTOML
	}
	if env.frpsWithoutPlugin {
		for _, section := range []string{"\n[plugin.port-keeper]", "\n[[httpPlugins]]"} {
			if i := strings.Index(conf, section); i >= 0 {
				conf = conf[:i+1]
			}
		}
	}
	confPath := e2eWriteFile(t, env.dir, name, conf)
	p := startE2EProcess(t, "frps", filepath.Join(env.dir, "frps.log"), env.bins.frps, env.frpsEnv, "-c", confPath)

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(e2eReadyTimeout)
	var last string
	for {
		if p.exited() {
			t.Fatalf("frps exited before its dashboard answered: %v (see frps.log)", p.waitErr)
		}
		req, _ := http.NewRequest(http.MethodGet, env.dashboardURL("/api/serverinfo"), nil)
		req.SetBasicAuth(e2eDashboardUser, e2eDashboardPassword)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("frps dashboard GET /api/serverinfo: got %s after %v; want 200 OK", last, e2eReadyTimeout)
		}
		time.Sleep(e2ePollInterval)
	}
}

// proxySpec is one frpc proxy. No remote port: that is the plugin's job.
type proxySpec struct {
	Name           string
	Type           string // "tcp" or "udp"
	LocalPort      int
	Group          string
	GroupKey       string
	BandwidthLimit string // "2MB"
	UseEncryption  bool
	RemotePort     int // 0: none asked for
}

// startFrpc writes an frpc config for user with the given proxies and starts
// it. It does not wait: use waitProxy. frpc retries its login forever with a
// short backoff, so it rides out frps restarts.
func startFrpc(t testing.TB, env *e2eEnv, user string, proxies ...proxySpec) *e2eProcess {
	t.Helper()
	var b strings.Builder
	ext := "toml"
	if env.v.legacyINI {
		ext = "ini"
		fmt.Fprintf(&b, `[common]
server_addr = 127.0.0.1
server_port = %d
user = %s
login_fail_exit = false
heartbeat_interval = 1
heartbeat_timeout = 5
log_file = console
log_level = debug
disable_log_color = true
`, env.bindPort, user)
		for _, p := range proxies {
			fmt.Fprintf(&b, "\n[%s]\ntype = %s\nlocal_ip = 127.0.0.1\nlocal_port = %d\n", p.Name, p.Type, p.LocalPort)
			if p.Group != "" {
				fmt.Fprintf(&b, "group = %s\ngroup_key = %s\n", p.Group, p.GroupKey)
			}
			if p.BandwidthLimit != "" {
				fmt.Fprintf(&b, "bandwidth_limit = %s\n", p.BandwidthLimit)
			}
			if p.UseEncryption {
				b.WriteString("use_encryption = true\n")
			}
			if p.RemotePort != 0 {
				fmt.Fprintf(&b, "remote_port = %d\n", p.RemotePort)
			}
		}
	} else {
		fmt.Fprintf(&b, `serverAddr = "127.0.0.1"
serverPort = %d
user = %q
loginFailExit = false
transport.heartbeatInterval = 1
transport.heartbeatTimeout = 5
log.to = "console"
log.level = "debug"
log.disablePrintColor = true
`, env.bindPort, user)
		for _, p := range proxies {
			fmt.Fprintf(&b, "\n[[proxies]]\nname = %q\ntype = %q\nlocalIP = \"127.0.0.1\"\nlocalPort = %d\n", p.Name, p.Type, p.LocalPort)
			if p.Group != "" {
				fmt.Fprintf(&b, "loadBalancer.group = %q\nloadBalancer.groupKey = %q\n", p.Group, p.GroupKey)
			}
			if p.BandwidthLimit != "" {
				fmt.Fprintf(&b, "transport.bandwidthLimit = %q\n", p.BandwidthLimit)
			}
			if p.UseEncryption {
				b.WriteString("transport.useEncryption = true\n")
			}
			if p.RemotePort != 0 {
				fmt.Fprintf(&b, "remotePort = %d\n", p.RemotePort)
			}
		}
	}
	base := fmt.Sprintf("frpc-%d-%s", len(env.frpcs)+1, user)
	confPath := e2eWriteFile(t, env.dir, base+"."+ext, b.String())
	p := startE2EProcess(t, "frpc "+user, filepath.Join(env.dir, base+".log"), env.bins.frpc, nil, "-c", confPath)
	env.frpcs = append(env.frpcs, p)
	return p
}

// proxyInfo is one proxy as frps's dashboard API reports it, normalised over
// the versions' JSON shapes.
type proxyInfo struct {
	Name           string
	Status         string // "online" or "offline"
	RemotePort     int
	UseEncryption  bool
	BandwidthLimit string
	Group          string
}

// getProxies asks frps's dashboard for GET /api/proxy/TYPE.
//
// v0.65.0 and v0.71.0: {"proxies":[{"name":"alice.web","status":"online","conf":{
// "remotePort":30001,"transport":{"useEncryption":true,"bandwidthLimit":"2MB"},
// "loadBalancer":{"group":"web","groupKey":"k"},...}}]}
//
// v0.51.3: {"proxies":[{"name":"alice.web","status":"online","conf":{
// "remote_port":30001,"use_encryption":true,"bandwidth_limit":"2MB",
// "group":"web","group_key":"k",...}}]}
//
// Offline proxies have "conf": null.
func getProxies(env *e2eEnv, typ string) ([]proxyInfo, string, error) {
	req, err := http.NewRequest(http.MethodGet, env.dashboardURL("/api/proxy/"+typ), nil)
	if err != nil {
		return nil, "", err
	}
	req.SetBasicAuth(e2eDashboardUser, e2eDashboardPassword)
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, string(body), fmt.Errorf("GET /api/proxy/%s: %s", typ, resp.Status)
	}
	var list struct {
		Proxies []struct {
			Name   string          `json:"name"`
			Status string          `json:"status"`
			Conf   json.RawMessage `json:"conf"`
		} `json:"proxies"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, string(body), fmt.Errorf("GET /api/proxy/%s: %v", typ, err)
	}
	var out []proxyInfo
	for _, p := range list.Proxies {
		info := proxyInfo{Name: p.Name, Status: p.Status}
		if len(p.Conf) > 0 && string(p.Conf) != "null" {
			if env.v.legacyINI {
				var c struct {
					RemotePort     int    `json:"remote_port"`
					UseEncryption  bool   `json:"use_encryption"`
					BandwidthLimit string `json:"bandwidth_limit"`
					Group          string `json:"group"`
				}
				if err := json.Unmarshal(p.Conf, &c); err != nil {
					return nil, string(body), fmt.Errorf("proxy %s conf: %v", p.Name, err)
				}
				info.RemotePort, info.UseEncryption, info.BandwidthLimit, info.Group = c.RemotePort, c.UseEncryption, c.BandwidthLimit, c.Group
			} else {
				var c struct {
					RemotePort int `json:"remotePort"`
					Transport  struct {
						UseEncryption  bool   `json:"useEncryption"`
						BandwidthLimit string `json:"bandwidthLimit"`
					} `json:"transport"`
					LoadBalancer struct {
						Group string `json:"group"`
					} `json:"loadBalancer"`
				}
				if err := json.Unmarshal(p.Conf, &c); err != nil {
					return nil, string(body), fmt.Errorf("proxy %s conf: %v", p.Name, err)
				}
				info.RemotePort, info.UseEncryption, info.BandwidthLimit, info.Group = c.RemotePort, c.Transport.UseEncryption, c.Transport.BandwidthLimit, c.LoadBalancer.Group
			}
		}
		out = append(out, info)
	}
	return out, string(body), nil
}

// waitProxy polls frps's dashboard until the proxy (full name, "user.name")
// is online with a remote port, and returns it.
func waitProxy(t testing.TB, env *e2eEnv, typ, name string) proxyInfo {
	t.Helper()
	deadline := time.Now().Add(e2eProxyOnlineTimeout)
	var last string
	for {
		if env.frps.exited() {
			t.Fatalf("waiting for %s proxy %s: frps exited: %v", typ, name, env.frps.waitErr)
		}
		proxies, body, err := getProxies(env, typ)
		switch {
		case err != nil:
			last = fmt.Sprintf("error %v (body %s)", err, body)
		default:
			last = body
			for _, p := range proxies {
				if p.Name == name && p.Status == "online" && p.RemotePort != 0 {
					return p
				}
			}
		}
		if line := frpcStartError(env, name); line != "" {
			t.Fatalf("%s proxy %s online in frps dashboard: got frpc log line %q; want it online", typ, name, line)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s proxy %s online in frps dashboard: got %s after %v; want it listed with status \"online\" and a remote port", typ, name, last, e2eProxyOnlineTimeout)
		}
		time.Sleep(e2ePollInterval)
	}
}

// frpcStartError returns the line in which a running frpc reports that frps
// refused to start the proxy, name being its full name "user.proxy", or "".
// frpc retries such a proxy only after 30s, so there is no point waiting.
// frpc v0.51.3 and v0.65.0 log the full name ("[alice.web] start error:
// ..."), v0.71.0 the name without the user prefix ("[web] start error:
// ..."), so only the user's own frpcs are searched, for either.
func frpcStartError(env *e2eEnv, name string) string {
	user, short, ok := strings.Cut(name, ".")
	if !ok {
		panic("frpcStartError: want a full proxy name user.proxy, got " + name)
	}
	needles := [][]byte{[]byte("[" + name + "] start error"), []byte("[" + short + "] start error")}
	for _, p := range env.frpcs {
		if p.exited() || p.name != "frpc "+user {
			continue
		}
		data, err := os.ReadFile(p.logPath)
		if err != nil {
			continue
		}
		i := bytes.Index(data, needles[0])
		if i < 0 {
			i = bytes.Index(data, needles[1])
		}
		if i >= 0 {
			line := data[i:]
			if j := bytes.IndexByte(line, '\n'); j >= 0 {
				line = line[:j]
			}
			return string(line)
		}
	}
	return ""
}

// waitProxyGone polls frps's dashboard until the proxy is not online, so a
// following registration cannot be confused with the old one.
func waitProxyGone(t testing.TB, env *e2eEnv, typ, name string) {
	t.Helper()
	deadline := time.Now().Add(e2eProxyGoneTimeout)
	var last string
	for {
		proxies, body, err := getProxies(env, typ)
		if err == nil {
			online := false
			for _, p := range proxies {
				online = online || (p.Name == name && p.Status == "online")
			}
			if !online {
				return
			}
			last = body
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s proxy %s in frps dashboard: got %s after %v; want it offline", typ, name, last, e2eProxyGoneTimeout)
		}
		time.Sleep(e2ePollInterval)
	}
}

// ---------------------------------------------------------------------------
// Child processes.

// e2eProcess is a started frps or frpc.
type e2eProcess struct {
	name     string
	logPath  string
	cmd      *exec.Cmd
	done     chan struct{} // closed when the process has exited
	waitErr  error         // valid after done is closed
	stopOnce sync.Once
}

// startE2EProcess starts bin with its stdout and stderr appended to logPath and
// stops it in t.Cleanup. A nil environ inherits the test's environment.
func startE2EProcess(t testing.TB, name, logPath, bin string, environ []string, args ...string) *e2eProcess {
	t.Helper()
	logFile := e2eOpenLog(t, logPath)
	cmd := exec.Command(bin, args...)
	cmd.Env = environ
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &e2eProcess{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

func (p *e2eProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, then SIGKILL if the process is still there after
// e2eStopTimeout, and waits for it to exit.
func (p *e2eProcess) stop(t testing.TB) {
	t.Helper()
	p.stopOnce.Do(func() {
		if p.exited() {
			return
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
			return
		case <-time.After(e2eStopTimeout):
		}
		t.Logf("%s did not exit within %v of SIGTERM; killing it", p.name, e2eStopTimeout)
		_ = p.cmd.Process.Kill()
		select {
		case <-p.done:
		case <-time.After(e2eStopTimeout):
			t.Errorf("%s (pid %d) still running %v after SIGKILL", p.name, p.cmd.Process.Pid, e2eStopTimeout)
		}
	})
}

// ---------------------------------------------------------------------------
// Building frp.

type frpBinaries struct{ frps, frpc string }

var frpBuilds sync.Map // version name -> *frpBuild

type frpBuild struct {
	once sync.Once
	bins frpBinaries
	err  error
}

// buildFrp builds frps and frpc of version v into bin/frp-VERSION/, once per
// test binary run, from the tool module tools/frp-VERSION (which pins frp and
// carries the replace directives frp needs).
func buildFrp(t testing.TB, v frpVersion) frpBinaries {
	t.Helper()
	bAny, _ := frpBuilds.LoadOrStore(v.name, &frpBuild{})
	b := bAny.(*frpBuild)
	b.once.Do(func() { b.bins, b.err = doBuildFrp(t, v) })
	if b.err != nil {
		t.Fatalf("build frp %s: %v", v.name, b.err)
	}
	return b.bins
}

func doBuildFrp(t testing.TB, v frpVersion) (frpBinaries, error) {
	start := time.Now()
	binDir, err := testenv.GoBuildToolTags("frp-"+v.name, e2eFrpBuildTimeout, "", v.buildTags, "github.com/fatedier/frp/cmd/frps", "github.com/fatedier/frp/cmd/frpc")
	if err != nil {
		return frpBinaries{}, err
	}
	bins := frpBinaries{frps: filepath.Join(binDir, "frps"), frpc: filepath.Join(binDir, "frpc")}
	want := strings.TrimPrefix(v.name, "v")
	for _, bin := range []string{bins.frps, bins.frpc} {
		vctx, vcancel := context.WithTimeout(context.Background(), 30*time.Second)
		got, err := exec.CommandContext(vctx, bin, "--version").Output()
		vcancel()
		if err != nil {
			return frpBinaries{}, fmt.Errorf("%s --version: %v", bin, err)
		}
		if strings.TrimSpace(string(got)) != want {
			return frpBinaries{}, fmt.Errorf("%s --version: got %q; want %q", bin, strings.TrimSpace(string(got)), want)
		}
	}
	t.Logf("built frps and frpc %s into %s in %v", v.name, binDir, time.Since(start).Round(time.Millisecond))
	return bins, nil
}

// ---------------------------------------------------------------------------
// Ports.

// e2ePortRange is an inclusive range of ports.
type e2ePortRange struct{ lo, hi int }

func (r e2ePortRange) contains(p int) bool { return p >= r.lo && p <= r.hi }

// String is frps's allow_ports syntax: "30000-30005".
func (r e2ePortRange) String() string { return fmt.Sprintf("%d-%d", r.lo, r.hi) }

var (
	e2ePortBlocksMu sync.Mutex
	e2ePortBlocks   []e2ePortRange // handed out in this test binary run
)

// reservePortBlock finds n consecutive ports, free for TCP and UDP on
// 127.0.0.1, below Linux's default ephemeral range (32768+) so that the
// kernel does not hand them to outgoing connections, and not overlapping
// another block of this test binary run.
func reservePortBlock(t testing.TB, n int) e2ePortRange {
	t.Helper()
	const lo, hi = 20000, 32000
	e2ePortBlocksMu.Lock()
	defer e2ePortBlocksMu.Unlock()
	for range 200 {
		r := e2ePortRange{lo: lo + rand.IntN(hi-lo-n)}
		r.hi = r.lo + n - 1
		if e2eOverlapsAny(r, e2ePortBlocks) || !e2eRangeFree(r) {
			continue
		}
		e2ePortBlocks = append(e2ePortBlocks, r)
		return r
	}
	t.Fatalf("found no %d consecutive free loopback ports in %d-%d", n, lo, hi)
	return e2ePortRange{}
}

func e2eOverlapsAny(r e2ePortRange, others []e2ePortRange) bool {
	for _, o := range others {
		if r.lo <= o.hi && o.lo <= r.hi {
			return true
		}
	}
	return false
}

func e2eRangeFree(r e2ePortRange) bool {
	for p := r.lo; p <= r.hi; p++ {
		addr := fmt.Sprintf("127.0.0.1:%d", p)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		l.Close()
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		pc.Close()
	}
	return true
}

// ---------------------------------------------------------------------------
// Echo servers and checks.

type tcpEcho struct {
	Port     int
	mu       sync.Mutex
	accepted int
}

func (e *tcpEcho) Accepted() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.accepted
}

// startTCPEcho runs a TCP echo server on a free loopback port until the test
// ends.
func startTCPEcho(t testing.TB) *tcpEcho {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &tcpEcho{Port: l.Addr().(*net.TCPAddr).Port}
	var wg sync.WaitGroup
	var connsMu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			e.mu.Lock()
			e.accepted++
			e.mu.Unlock()
			connsMu.Lock()
			conns[c] = true
			connsMu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(c, c)
				c.Close()
				connsMu.Lock()
				delete(conns, c)
				connsMu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		connsMu.Lock()
		for c := range conns {
			c.Close()
		}
		connsMu.Unlock()
		wg.Wait()
	})
	return e
}

type udpEcho struct{ Port int }

// startUDPEcho runs a UDP echo server on a free loopback port until the test
// ends.
func startUDPEcho(t testing.TB) *udpEcho {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for {
			n, addr, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], addr)
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	return &udpEcho{Port: pc.LocalAddr().(*net.UDPAddr).Port}
}

// checkTCPEcho sends a line to 127.0.0.1:port and expects it back, retrying
// for up to e2eEchoTimeout.
func checkTCPEcho(t testing.TB, port int) {
	t.Helper()
	payload := fmt.Sprintf("e2e-tcp-%d-%x\n", port, rand.Uint64())
	deadline := time.Now().Add(e2eEchoTimeout)
	for {
		got, err := tcpRoundTrip(port, payload)
		if err == nil && got == payload {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("TCP echo through 127.0.0.1:%d: got %q (err %v); want %q", port, got, err, payload)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkTCPEchoReaches is checkTCPEcho that also requires the connection to
// have landed on the given backend.
func checkTCPEchoReaches(t testing.TB, port int, backend *tcpEcho) {
	t.Helper()
	before := backend.Accepted()
	checkTCPEcho(t, port)
	if got := backend.Accepted(); got <= before {
		t.Fatalf("connections accepted by backend 127.0.0.1:%d after echo through port %d: got %d; want more than %d", backend.Port, port, got, before)
	}
}

func tcpRoundTrip(port int, payload string) (string, error) {
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, payload); err != nil {
		return "", err
	}
	buf := make([]byte, len(payload))
	n, err := io.ReadFull(c, buf)
	return string(buf[:n]), err
}

// checkUDPEcho sends datagrams to 127.0.0.1:port until one comes back
// unchanged, for up to e2eEchoTimeout. (frps may drop datagrams that arrive
// before its work connection to frpc is up, hence the resending.)
func checkUDPEcho(t testing.TB, port int) {
	t.Helper()
	c, err := net.Dial("udp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	payload := fmt.Sprintf("e2e-udp-%d-%x", port, rand.Uint64())
	deadline := time.Now().Add(e2eEchoTimeout)
	buf := make([]byte, 2048)
	var got string
	var lastErr error
	for time.Now().Before(deadline) {
		if _, err := io.WriteString(c, payload); err != nil {
			lastErr = err
			time.Sleep(200 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := c.Read(buf)
			if err != nil {
				lastErr = err
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					time.Sleep(200 * time.Millisecond) // e.g. ICMP port unreachable
				}
				break
			}
			got = string(buf[:n])
			if got == payload {
				return
			}
		}
	}
	t.Fatalf("UDP echo through 127.0.0.1:%d: got %q (last err %v); want %q", port, got, lastErr, payload)
}

// ---------------------------------------------------------------------------
// Files.

func e2eWriteFile(t testing.TB, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func e2eOpenLog(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// e2eDumpLogs prints the last lines of every log in dir, for a failed test.
func e2eDumpLogs(t testing.TB, dir string) {
	t.Helper()
	const maxLines = 80
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, path := range logs {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Logf("read %s: %v", path, err)
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > maxLines {
			lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-maxLines)}, lines[len(lines)-maxLines:]...)
		}
		t.Logf("--- %s:\n%s", filepath.Base(path), strings.Join(lines, "\n"))
	}
}

// TestE2EAdoptRequests: migration from a frps whose dashboard is off.
// While -adopt-requests lasts, a device whose frpc asks for its own port
// outside the plugin's pool keeps it (frps listens there, bytes flow) and
// the history says it was adopted; after a restart without the flag the
// device still gets its port on every reconnect, and a newcomer asking for
// a port outside the pool is refused as before.
func TestE2EAdoptRequests(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v, func(e *e2eEnv) { e.pluginArgs = []string{"-adopt-requests", "1h"} })
		echo := startTCPEcho(t)
		own := env.pool.hi + 2 // outside the plugin's pool, inside frps's allowPorts
		spec := proxySpec{Name: "cam", Type: "tcp", LocalPort: echo.Port, RemotePort: own}
		bob := startFrpc(t, env, "bob", spec)
		if got := waitProxy(t, env, "tcp", "bob.cam"); got.RemotePort != own {
			t.Fatalf("bob.cam = %d; want %d, its own port, adopted", got.RemotePort, own)
		}
		checkTCPEchoReaches(t, own, echo)

		server := env.pluginURL("")
		want := fmt.Sprintf("asked for %d, outside the pool %s", own, env.pool)
		deadline := time.Now().Add(e2eReadyTimeout)
		for { // the history is written in the background, within a second
			stdout, stderr, err := runCLI(nil, "history", "-server", server, "-key", "bob.cam")
			if err == nil && strings.Contains(stdout, "adopted") && strings.Contains(stdout, want) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("history -key bob.cam: %v\n%s%s\nwant adopted, %q", err, stdout, stderr, want)
			}
			time.Sleep(e2ePollInterval)
		}

		// The window ends: a restart without the flag.
		env.pluginArgs = nil
		env.restartPlugin(t)
		bob.stop(t)
		waitProxyGone(t, env, "tcp", "bob.cam")
		startFrpc(t, env, "bob", spec)
		if got := waitProxy(t, env, "tcp", "bob.cam"); got.RemotePort != own {
			t.Fatalf("bob.cam after the window and a reconnect = %d; want %d", got.RemotePort, own)
		}
		checkTCPEchoReaches(t, own, echo)
		if stdout, stderr, err := runCLI(nil, "list", "-server", server, "-key", "bob.cam"); err != nil || !strings.Contains(stdout, fmt.Sprint(own)) {
			t.Fatalf("list -key bob.cam: %v\n%s%s\nwant port %d", err, stdout, stderr, own)
		}

		startFrpc(t, env, "carol", proxySpec{Name: "cam", Type: "tcp", LocalPort: echo.Port, RemotePort: own + 1})
		deadline = time.Now().Add(e2eProxyOnlineTimeout)
		for frpcStartError(env, "carol.cam") == "" {
			if time.Now().After(deadline) {
				t.Fatalf("carol.cam asking for %d outside the pool after the window was not refused", own+1)
			}
			time.Sleep(e2ePollInterval)
		}
		if msg := frpcStartError(env, "carol.cam"); !strings.Contains(msg, "outside the allowed ports") {
			t.Fatalf("carol.cam refused with %q; want outside the allowed ports", msg)
		}
	})
}
