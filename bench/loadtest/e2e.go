package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// e2eResults: one frpc with N tcp proxies (no remote_port) registering
// through frps, with the plugin and without it, runs times, interleaved.
type e2eResults struct {
	Proxies      int      `json:"proxies"`
	Pool         string   `json:"pool"`
	PollInterval float64  `json:"poll_interval_ms"`
	Alone        []e2eRun `json:"alone"`
	Plugin       []e2eRun `json:"plugin"`
	// Noop: frps with a trivial HTTP plugin (the baseline server answering
	// {"reject":false,"unchange":true}): what any plugin call costs frps.
	Noop []e2eRun `json:"noop"`
}

// e2eRun is one frps (+ plugin) life: the first registration of every
// proxy, and a second one after frpc was killed (for the plugin: sticky
// hits; frps alone keeps a closed proxy's port reserved for its name, too).
type e2eRun struct {
	FirstMS     float64 `json:"first_ms"`     // frpc exec to N proxies online
	ReconnectMS float64 `json:"reconnect_ms"` // second frpc exec to N proxies online
	SamePorts   int     `json:"same_ports"`   // proxies that got their first port back
	// With the plugin: the time its handler spent on the registrations'
	// NewProxy requests, from its request_duration histogram (sum).
	PluginFirstMS     float64 `json:"plugin_first_ms,omitempty"`
	PluginReconnectMS float64 `json:"plugin_reconnect_ms,omitempty"`
}

const pluginConf = `
[[httpPlugins]]
name = "port-keeper"
addr = %q
path = "/port-registrations"
ops = ["NewProxy"]
`

const (
	e2eUser     = "bench"
	e2eDashUser = "admin"
	e2eDashPass = "bench-pass"
)

func phaseE2E(cfg config, tmp string) (*e2eResults, error) {
	lo, hi, err := freeBlock(20000, 32000, cfg.e2ePoolSize)
	if err != nil {
		return nil, err
	}
	res := &e2eResults{Proxies: cfg.e2eProxies, Pool: fmt.Sprintf("%d-%d", lo, hi), PollInterval: ms(cfg.e2ePoll)}
	modes := []string{"alone", "plugin", "noop"}
	for run := range cfg.e2eRuns {
		for k := range modes {
			mode := modes[(run+k)%len(modes)] // each mode goes first in turn
			dir := filepath.Join(tmp, fmt.Sprintf("e2e-%d-%s", run+1, mode))
			r, err := e2eOnce(cfg, dir, lo, hi, mode)
			if err != nil {
				return nil, fmt.Errorf("e2e run %d (%s): %v (logs in %s)", run+1, mode, err, dir)
			}
			switch mode {
			case "plugin":
				res.Plugin = append(res.Plugin, r)
			case "noop":
				res.Noop = append(res.Noop, r)
			default:
				res.Alone = append(res.Alone, r)
			}
			logf("e2e run %d %-6s: %d proxies online in %.0f ms; again after frpc was killed: %.0f ms (%d kept their port)",
				run+1, mode, cfg.e2eProxies, r.FirstMS, r.ReconnectMS, r.SamePorts)
			// dir stays until the load tool ends: a deletion here would
			// slow the next run's file creations (see phaseFresh).
		}
	}
	return res, nil
}

// e2eOnce runs frps alone ("alone"), with the plugin ("plugin"), or with
// a trivial plugin that lets frps choose ("noop").
func e2eOnce(cfg config, dir string, lo, hi int, mode string) (e2eRun, error) {
	withPlugin := mode == "plugin"
	var r e2eRun
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return r, err
	}
	plugins := ""
	var pl *plugin
	if withPlugin {
		var err error
		pl, err = startPlugin(cfg, "e2e", filepath.Join(dir, "data"), fmt.Sprintf("%d-%d", lo, hi), filepath.Join(dir, "plugin.log"))
		if err != nil {
			return r, err
		}
		defer pl.stop(syscall.SIGTERM)
		plugins = fmt.Sprintf(pluginConf, pl.addr)
	}
	if mode == "noop" {
		noop, addr, err := startBaseline(cfg.self, dir, []byte(`{"reject":false,"unchange":true}`))
		if err != nil {
			return r, err
		}
		defer noop.stop(syscall.SIGTERM)
		plugins = fmt.Sprintf(pluginConf, addr)
	}
	bindPort, err := freePort()
	if err != nil {
		return r, err
	}
	dashPort, err := freePort()
	if err != nil {
		return r, err
	}
	// maxPortsPerClient = 0 is frps's default: no limit per client.
	frpsConf := fmt.Sprintf(`bindAddr = "127.0.0.1"
bindPort = %d
proxyBindAddr = "127.0.0.1"
allowPorts = [{ start = %d, end = %d }]
maxPortsPerClient = 0

webServer.addr = "127.0.0.1"
webServer.port = %d
webServer.user = %q
webServer.password = %q

log.to = "console"
log.level = "info"
log.disablePrintColor = true
%s`, bindPort, lo, hi, dashPort, e2eDashUser, e2eDashPass, plugins)
	frpsPath := filepath.Join(dir, "frps.toml")
	if err := os.WriteFile(frpsPath, []byte(frpsConf), 0o600); err != nil {
		return r, err
	}
	frps, err := startProc("frps", filepath.Join(dir, "frps.log"), cfg.frps, "-c", frpsPath)
	if err != nil {
		return r, err
	}
	defer frps.stop(syscall.SIGTERM)
	dash := fmt.Sprintf("http://127.0.0.1:%d", dashPort)
	auth := func(req *http.Request) { req.SetBasicAuth(e2eDashUser, e2eDashPass) }
	if _, err := waitHTTP(frps, dash+"/api/serverinfo", 10*time.Millisecond, 30*time.Second, auth); err != nil {
		return r, err
	}

	var b strings.Builder
	fmt.Fprintf(&b, `serverAddr = "127.0.0.1"
serverPort = %d
user = %q
loginFailExit = false
log.to = "console"
log.level = "info"
log.disablePrintColor = true
`, bindPort, e2eUser)
	// The local service is never dialled: registration does not touch it.
	for i := range cfg.e2eProxies {
		fmt.Fprintf(&b, "\n[[proxies]]\nname = \"p%04d\"\ntype = \"tcp\"\nlocalIP = \"127.0.0.1\"\nlocalPort = %d\n", i, bindPort)
	}
	frpcPath := filepath.Join(dir, "frpc.toml")
	if err := os.WriteFile(frpcPath, []byte(b.String()), 0o600); err != nil {
		return r, err
	}

	register := func(n int) (time.Duration, map[string]int, error) {
		frpc, err := startProc("frpc", filepath.Join(dir, fmt.Sprintf("frpc-%d.log", n)), cfg.frpc, "-c", frpcPath)
		if err != nil {
			return 0, nil, err
		}
		ports, at, err := waitOnline(frps, dash, cfg.e2eProxies, cfg.e2ePoll)
		took := at.Sub(frpc.started)
		// Killed, not stopped: frps sees the control connection drop and
		// takes every proxy offline, as when a client machine crashes.
		frpc.stop(syscall.SIGKILL)
		if err != nil {
			return 0, nil, err
		}
		if _, _, err := waitOnline(frps, dash, 0, cfg.e2ePoll); err != nil {
			return 0, nil, fmt.Errorf("waiting for the proxies to go offline: %v", err)
		}
		return took, ports, nil
	}
	// handled is the plugin's handler time so far, in ms.
	handled := func() (float64, error) {
		if pl == nil {
			return 0, nil
		}
		sum, _, err := durationSum(pl.addr)
		return sum * 1000, err
	}
	first, ports1, err := register(1)
	if err != nil {
		return r, err
	}
	h1, err := handled()
	if err != nil {
		return r, err
	}
	again, ports2, err := register(2)
	if err != nil {
		return r, err
	}
	h2, err := handled()
	if err != nil {
		return r, err
	}
	r.PluginFirstMS, r.PluginReconnectMS = h1, h2-h1
	r.FirstMS, r.ReconnectMS = ms(first), ms(again)
	for name, p := range ports1 {
		if ports2[name] == p {
			r.SamePorts++
		}
	}
	if withPlugin && r.SamePorts != cfg.e2eProxies {
		return r, fmt.Errorf("with the plugin only %d of %d proxies kept their port", r.SamePorts, cfg.e2eProxies)
	}
	return r, nil
}

// waitOnline polls frps's dashboard (GET /api/proxy/tcp) until exactly want
// proxies are online, and returns their remote ports and when it saw them.
func waitOnline(frps *proc, dash string, want int, every time.Duration) (map[string]int, time.Time, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(120 * time.Second)
	last := ""
	for {
		if frps.exited() {
			return nil, time.Time{}, fmt.Errorf("frps exited: %v", frps.waitErr)
		}
		req, _ := http.NewRequest(http.MethodGet, dash+"/api/proxy/tcp", nil)
		req.SetBasicAuth(e2eDashUser, e2eDashPass)
		resp, err := client.Do(req)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			var list struct {
				Proxies []struct {
					Name   string `json:"name"`
					Status string `json:"status"`
					Conf   *struct {
						RemotePort int `json:"remotePort"`
					} `json:"conf"`
				} `json:"proxies"`
			}
			switch {
			case rerr != nil:
				last = rerr.Error()
			case resp.StatusCode != http.StatusOK:
				last = resp.Status
			case json.Unmarshal(body, &list) != nil:
				last = "undecodable answer"
			default:
				ports := map[string]int{}
				for _, p := range list.Proxies {
					if p.Status == "online" && p.Conf != nil && p.Conf.RemotePort > 0 {
						ports[p.Name] = p.Conf.RemotePort
					}
				}
				if len(ports) == want {
					return ports, time.Now(), nil
				}
				last = fmt.Sprintf("%d online", len(ports))
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return nil, time.Time{}, fmt.Errorf("want %d tcp proxies online: %s after 120s", want, last)
		}
		time.Sleep(every)
	}
}

// freeBlock finds n consecutive ports in [lo, hi) that are free for TCP on
// 127.0.0.1, below Linux's ephemeral range so outgoing connections do not
// take them meanwhile.
func freeBlock(lo, hi, n int) (int, int, error) {
	for start := lo; start+n <= hi; {
		bad := -1
		for p := start; p < start+n; p++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				bad = p
				break
			}
			l.Close()
		}
		if bad < 0 {
			return start, start + n - 1, nil
		}
		start = bad + 1
	}
	return 0, 0, fmt.Errorf("no %d consecutive free ports in %d-%d", n, lo, hi-1)
}

// durationSum reads the plugin's frp_port_keeper_request_duration_seconds
// sum and count from its /metrics (loopback: no token needed).
func durationSum(addr string) (float64, int, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET /metrics: %s, %v", resp.Status, err)
	}
	var sum float64
	count, found := 0, 0
	for _, line := range strings.Split(string(body), "\n") {
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		switch name {
		case "frp_port_keeper_request_duration_seconds_sum":
			sum, err = strconv.ParseFloat(val, 64)
			found++
		case "frp_port_keeper_request_duration_seconds_count":
			count, err = strconv.Atoi(val)
			found++
		}
		if err != nil {
			return 0, 0, fmt.Errorf("/metrics %s: %v", name, err)
		}
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("/metrics has no frp_port_keeper_request_duration_seconds")
	}
	return sum, count, nil
}
