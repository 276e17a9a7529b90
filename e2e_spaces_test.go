package main

// End-to-end tests of the two port spaces: frps keeps tcp and udp ports
// apart (a tcp and a udp proxy may both listen on remote port N, as DNS
// does on 53/tcp and 53/udp), and so does the plugin.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestE2ETCPAndUDPOnOneNumber: with a pool of two ports, alice's tcp and
// udp proxies both ask for remote port X (the pool's first) and both get
// it; bytes flow through both; the plugin lists X twice, once per
// protocol. bob's tcp and udp proxies ask for no port and both get the
// other number, the only one left in either space: four proxies on two
// numbers. After frpc, frps and the plugin all restart, every proxy is back
// on its port and bytes flow.
func TestE2ETCPAndUDPOnOneNumber(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v, func(e *e2eEnv) { e.pool = e2ePortRange{e.allow.lo, e.allow.lo + 1} })
		x, y := env.pool.lo, env.pool.hi
		aliceTCP, aliceUDP := startTCPEcho(t), startUDPEcho(t)
		bobTCP, bobUDP := startTCPEcho(t), startUDPEcho(t)
		aliceProxies := []proxySpec{
			{Name: "dns-tcp", Type: "tcp", LocalPort: aliceTCP.Port, RemotePort: x},
			{Name: "dns-udp", Type: "udp", LocalPort: aliceUDP.Port, RemotePort: x},
		}
		bobProxies := []proxySpec{
			{Name: "web", Type: "tcp", LocalPort: bobTCP.Port},
			{Name: "voip", Type: "udp", LocalPort: bobUDP.Port},
		}
		want := []struct {
			typ, name string
			port      int
			check     func()
		}{
			{"tcp", "alice.dns-tcp", x, func() { checkTCPEchoReaches(t, x, aliceTCP) }},
			{"udp", "alice.dns-udp", x, func() { checkUDPEcho(t, x) }},
			{"tcp", "bob.web", y, func() { checkTCPEchoReaches(t, y, bobTCP) }},
			{"udp", "bob.voip", y, func() { checkUDPEcho(t, y) }},
		}
		checkAll := func(when string) {
			t.Helper()
			for _, w := range want {
				if got := waitProxy(t, env, w.typ, w.name); got.RemotePort != w.port {
					t.Fatalf("%s: %s proxy %s remote port = %d; want %d", when, w.typ, w.name, got.RemotePort, w.port)
				}
			}
			for _, w := range want {
				w.check()
			}
		}

		alice := startFrpc(t, env, "alice", aliceProxies...)
		waitProxy(t, env, "tcp", "alice.dns-tcp")
		waitProxy(t, env, "udp", "alice.dns-udp")
		bob := startFrpc(t, env, "bob", bobProxies...)
		checkAll("first registration")
		env.requireListed(t, x, map[string]string{"tcp": "alice.dns-tcp", "udp": "alice.dns-udp"})
		env.requireListed(t, y, map[string]string{"tcp": "bob.web", "udp": "bob.voip"})

		// Everything restarts: frpc, frps and the plugin (on its data dir).
		alice.stop(t)
		bob.stop(t)
		env.frps.stop(t)
		env.restartPlugin(t)
		env.frps = startFrps(t, env)
		startFrpc(t, env, "bob", bobProxies...) // bob first: a plugin that forgot would give him x
		startFrpc(t, env, "alice", aliceProxies...)
		checkAll("after frpc, frps and the plugin restarted")
		env.requireListed(t, x, map[string]string{"tcp": "alice.dns-tcp", "udp": "alice.dns-udp"})
	})
}

// TestE2EAdoptTCPAndUDPOnOneNumber: an frps without the plugin carries
// alice's tcp and udp proxies on one remote port P (outside the plugin's
// pool); adopt -dry-run says it would adopt both, adopt adopts both (exit
// 0 both times); frps restarts with the plugin and both proxies keep P,
// bytes flowing.
func TestE2EAdoptTCPAndUDPOnOneNumber(t *testing.T) {
	forEachFrpVersion(t, func(t *testing.T, v frpVersion) {
		env := newE2EEnv(t, v, func(e *e2eEnv) { e.frpsWithoutPlugin = true })
		echo, udp := startTCPEcho(t), startUDPEcho(t)
		p := env.allow.hi
		startFrpc(t, env, "alice",
			proxySpec{Name: "dns-tcp", Type: "tcp", LocalPort: echo.Port, RemotePort: p},
			proxySpec{Name: "dns-udp", Type: "udp", LocalPort: udp.Port, RemotePort: p})
		waitProxy(t, env, "tcp", "alice.dns-tcp")
		waitProxy(t, env, "udp", "alice.dns-udp")

		adopt := func(extra ...string) string {
			t.Helper()
			args := append([]string{"adopt", "-server", env.pluginURL(""), "-frps-api", env.dashboardURL(""),
				"-frps-user", e2eDashboardUser, "-frps-password", e2eDashboardPassword}, extra...)
			stdout, stderr, err := runCLI(nil, args...)
			if err != nil {
				t.Fatalf("%s: %v\n%s%s", strings.Join(extra, " "), err, stdout, stderr)
			}
			return stdout + stderr
		}
		requireSaid := func(what, out string, wants ...string) {
			t.Helper()
			for _, want := range wants {
				if !strings.Contains(out, want) {
					t.Fatalf("%s said:\n%s\nwant %q", what, out, want)
				}
			}
			if strings.Contains(out, "not adopted") {
				t.Fatalf("%s said:\n%s\nwant nothing \"not adopted\"", what, out)
			}
		}
		out := adopt("-dry-run")
		requireSaid("adopt -dry-run", out,
			fmt.Sprintf("would adopt: alice.dns-tcp on port %d (tcp, user alice)", p),
			fmt.Sprintf("would adopt: alice.dns-udp on port %d (udp, user alice)", p),
			"2 would be adopted")
		out = adopt()
		requireSaid("adopt", out,
			fmt.Sprintf("adopted: alice.dns-tcp on port %d (tcp, user alice)", p),
			fmt.Sprintf("adopted: alice.dns-udp on port %d (udp, user alice)", p),
			"2 adopted")
		env.requireListed(t, p, map[string]string{"tcp": "alice.dns-tcp", "udp": "alice.dns-udp"})

		env.frpsWithoutPlugin = false
		env.restartFrps(t)
		if got := waitProxy(t, env, "tcp", "alice.dns-tcp"); got.RemotePort != p {
			t.Fatalf("alice.dns-tcp with the plugin = %d; want %d, its port before", got.RemotePort, p)
		}
		if got := waitProxy(t, env, "udp", "alice.dns-udp"); got.RemotePort != p {
			t.Fatalf("alice.dns-udp with the plugin = %d; want %d, its port before", got.RemotePort, p)
		}
		checkTCPEchoReaches(t, p, echo)
		checkUDPEcho(t, p)
	})
}

// requireListed checks that the plugin's GET /api/allocations?port=PORT
// lists exactly the keys in want, by protocol ("tcp" -> key), and nothing
// else.
func (env *e2eEnv) requireListed(t testing.TB, port int, want map[string]string) {
	t.Helper()
	url := env.pluginURL(fmt.Sprintf("/api/allocations?port=%d", port))
	// The plugin records a registration as frps is told yes; frps lists the
	// proxy a moment later, so the listing is there by now, but allow the
	// plugin a moment anyway.
	deadline := time.Now().Add(e2eReadyTimeout)
	var last string
	for {
		got, body, err := env.listPort(url)
		if err == nil && len(got) == len(want) {
			ok := true
			for proto, key := range want {
				ok = ok && got[proto] == key
			}
			if ok {
				return
			}
		}
		last = fmt.Sprintf("%v (err %v, body %s)", got, err, body)
		if time.Now().After(deadline) {
			protos := make([]string, 0, len(want))
			for proto := range want {
				protos = append(protos, proto+":"+want[proto])
			}
			slices.Sort(protos)
			t.Fatalf("GET %s: got %s after %v; want rows %v", url, last, e2eReadyTimeout, protos)
		}
		time.Sleep(e2ePollInterval)
	}
}

// listPort reads a port lookup from the plugin: proto -> key. Two rows of
// one protocol are an error.
func (env *e2eEnv) listPort(url string) (map[string]string, string, error) {
	resp, err := env.pluginClient.Get(url)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, "", err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, string(body), fmt.Errorf("status %s", resp.Status)
	}
	var list struct {
		Allocations []struct {
			Key   string `json:"key"`
			Port  int    `json:"port"`
			Proto string `json:"proto"`
		} `json:"allocations"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, string(body), err
	}
	got := map[string]string{}
	for _, a := range list.Allocations {
		if _, dup := got[a.Proto]; dup {
			return got, string(body), fmt.Errorf("two %q rows", a.Proto)
		}
		got[a.Proto] = a.Key
	}
	return got, string(body), nil
}
