package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store"

	frpconfig "github.com/fatedier/frp/pkg/config"
)

// adopt is how the plugin is added to a running frps without moving any
// device: frps's dashboard says which port every online proxy has now, and
// those become the proxies' sticky ports before frps ever asks the plugin.

func setupAdopt(fs *flag.FlagSet, e cmdEnv) func([]string) error {
	var cf clientFlags
	cf.declare(fs)
	frpsConfig := fs.String("frps-config", "", "frps config file: the dashboard's address and credentials come from its webServer section")
	api := fs.String("frps-api", "", "frps dashboard URL (default: from -frps-config's webServer)")
	user := fs.String("frps-user", "", "dashboard user (default: from -frps-config)")
	password := fs.String("frps-password", "", "dashboard password (default: from -frps-config)")
	dryRun := fs.Bool("dry-run", false, "check everything the real run checks (with the running server) and change nothing; exits as the real run would")
	skip := fs.Bool("skip-conflicts", false, "adopt what can be adopted and list the rest with why (default: all or nothing)")
	return func([]string) error {
		db, err := dashboardFrom(*frpsConfig, *api, *user, *password)
		if err != nil {
			return err
		}
		found, skipped, err := db.onlinePorts(e.ctx)
		if err != nil {
			return err
		}
		for _, s := range skipped {
			fmt.Fprintf(e.stdout, "not adopted: %s\n", s)
		}
		if len(found) == 0 {
			fmt.Fprintln(e.stdout, "nothing to adopt: frps has no online tcp or udp proxy with a port")
			return nil
		}
		file := exportFile{}
		for _, r := range found {
			file.Allocations = append(file.Allocations, exportRecord{Record: r})
		}
		c, err := cf.client(e.getenv)
		if err != nil {
			return err
		}
		path := "/api/import?as=adopt"
		if *dryRun {
			path += "&dry_run=1"
		}
		if *skip {
			path += "&skip_conflicts=1"
		}
		nothing := "nothing adopted"
		if *dryRun {
			nothing = "nothing would be adopted"
		}
		var res importResult
		if err := c.do(e.ctx, "POST", path, file, &res); err != nil {
			return fmt.Errorf("adopt: %v (%s)", err, nothing)
		}
		for _, r := range found {
			if i := slices.IndexFunc(res.Refused, func(f importRefusal) bool { return f.Key == r.Key && f.Port == r.Port }); i >= 0 {
				fmt.Fprintf(e.stdout, "not adopted: %s on port %d (%s): %s\n", r.Key, r.Port, r.ProxyType, res.Refused[i].Reason)
				continue
			}
			if *dryRun {
				fmt.Fprintf(e.stdout, "would adopt: %s on port %d (%s, user %s)\n", r.Key, r.Port, r.ProxyType, dash(r.User))
			} else {
				fmt.Fprintf(e.stdout, "adopted: %s on port %d (%s, user %s)\n", r.Key, r.Port, r.ProxyType, dash(r.User))
			}
		}
		warnOutsidePool(e.stdout, res)
		notTaken := ""
		if len(res.Refused) > 0 {
			notTaken = fmt.Sprintf(", %d not", len(res.Refused))
		}
		if *dryRun {
			_, err = fmt.Fprintf(e.stdout, "%d would be adopted (%d already hold those ports)%s; nothing changed\n", res.Imported, res.Unchanged, notTaken)
			return err
		}
		_, err = fmt.Fprintf(e.stdout, "%d adopted (%d already held those ports)%s; now add the plugin to frps and restart it\n", res.Imported, res.Unchanged, notTaken)
		return err
	}
}

// frpsDashboard is where frps's dashboard API answers.
type frpsDashboard struct {
	base, user, password string
	timeout              time.Duration // per request; 0: dashboardTimeout
	maxBody              int64         // per answer; 0: dashboardMaxBody
}

// A dashboard answer adopt waits for and reads at most.
const (
	dashboardTimeout = 10 * time.Second
	dashboardMaxBody = 64 << 20
)

// dashboardFrom works out the dashboard from frps's config and the flags
// (which win).
func dashboardFrom(frpsConfig, api, user, password string) (frpsDashboard, error) {
	d := frpsDashboard{base: strings.TrimRight(api, "/"), user: user, password: password}
	if frpsConfig != "" {
		cfg, _, err := frpconfig.LoadServerConfig(frpsConfig, false)
		if err != nil {
			return d, frpsConfigError(frpsConfig, err)
		}
		if cfg.WebServer.Port <= 0 && d.base == "" {
			return d, fmt.Errorf("-frps-config %s has no webServer.port: enable frps's dashboard, or give -frps-api", frpsConfig)
		}
		if d.base == "" {
			host := cfg.WebServer.Addr
			if host == "" || host == "0.0.0.0" || host == "::" {
				host = "127.0.0.1"
			}
			scheme := "http"
			if cfg.WebServer.TLS != nil && cfg.WebServer.TLS.CertFile != "" {
				scheme = "https"
			}
			d.base = scheme + "://" + net.JoinHostPort(host, strconv.Itoa(cfg.WebServer.Port))
		}
		if d.user == "" {
			d.user = cfg.WebServer.User
		}
		if d.password == "" {
			d.password = cfg.WebServer.Password
		}
	}
	if d.base == "" {
		return d, errors.New("adopt needs frps's dashboard: give -frps-config (with a webServer section) or -frps-api")
	}
	if !strings.Contains(d.base, "://") {
		d.base = "http://" + d.base
	}
	return d, nil
}

// dashboardProxy is one proxy of GET /api/proxy/{tcp,udp}: frp v0.52+
// writes camelCase conf fields, earlier versions snake_case.
type dashboardProxy struct {
	Name   string `json:"name"`
	Status string `json:"status"`
	// User is the frpc's user, if frps reports it: frps v0.51.3 to
	// v0.65.0 do not (their ProxyStatsInfo has no user), so nil there.
	User *string `json:"user"`
	Conf *struct {
		RemotePort   int    `json:"remotePort"`
		RemotePortV1 int    `json:"remote_port"`
		Group        string `json:"group"`
		LoadBalancer struct {
			Group string `json:"group"`
		} `json:"loadBalancer"`
	} `json:"conf"`
}

// onlinePorts lists the online tcp and udp proxies as allocations; skipped
// says which proxies could not be adopted and why.
func (d frpsDashboard) onlinePorts(ctx context.Context) (found []store.Record, skipped []string, err error) {
	timeout, maxBody := cmp.Or(d.timeout, dashboardTimeout), cmp.Or(d.maxBody, dashboardMaxBody)
	client := &http.Client{Timeout: timeout}
	byKey := map[string]store.Record{}
	now := time.Now().UTC()
	// frps reports each proxy's user from v0.67.0 on (omitted when
	// empty); before, only the name says it.
	var info struct {
		Version string `json:"version"`
	}
	if body, err := d.get(ctx, client, "/api/serverinfo", maxBody); err == nil {
		json.Unmarshal(body, &info)
	}
	reportsUser := versionAtLeast(info.Version, 0, 67)
	for _, typ := range []string{"tcp", "udp"} {
		body, err := d.get(ctx, client, "/api/proxy/"+typ, maxBody)
		if err != nil {
			return nil, nil, err
		}
		var list struct {
			Proxies []dashboardProxy `json:"proxies"`
		}
		if err := json.Unmarshal(body, &list); err != nil {
			return nil, nil, fmt.Errorf("frps's dashboard: /api/proxy/%s is not what frps answers: %v", typ, err)
		}
		for _, p := range list.Proxies {
			if p.Status != "online" || p.Conf == nil {
				skipped = append(skipped, fmt.Sprintf("%s (%s): offline, so frps reports no port", p.Name, typ))
				continue
			}
			port := max(p.Conf.RemotePort, p.Conf.RemotePortV1)
			group := p.Conf.LoadBalancer.Group
			if group == "" {
				group = p.Conf.Group
			}
			if port < 1 || port > maxPort {
				skipped = append(skipped, fmt.Sprintf("%s (%s): frps reports no remote port", p.Name, typ))
				continue
			}
			// The user frps reports wins (an empty one too: "my.cam" of an
			// frpc without user; frps 0.67 and later omit an empty user).
			// Older frps report none; then the text before the first dot,
			// the "user." frpc puts before the proxy's name, is taken as
			// the user (such a frps cannot tell it from a proxy named
			// "my.cam" by an frpc without user).
			user, _, hasUser := strings.Cut(p.Name, ".")
			switch {
			case p.User != nil:
				user = *p.User
			case reportsUser, !hasUser:
				user = ""
			}
			r := store.Record{Port: port, User: user, ProxyName: p.Name, ProxyType: typ, Group: group, CreatedAt: now, AssignedAt: now}
			r.Key = keyOf(frpplugin.Proxy{User: user, ProxyName: p.Name, Group: group})
			if prev, ok := byKey[r.Key]; ok {
				if prev.Port != port {
					skipped = append(skipped, fmt.Sprintf("%s (%s): group %s has members on ports %d and %d", p.Name, typ, group, prev.Port, port))
				}
				continue
			}
			byKey[r.Key] = r
			found = append(found, r)
		}
	}
	slices.SortFunc(found, func(a, b store.Record) int { return cmp.Or(a.Port-b.Port, cmp.Compare(a.ProxyType, b.ProxyType)) })
	return found, skipped, nil
}

// get reads path from the dashboard, at most maxBody bytes, saying why
// when it cannot: unreachable, too slow, too much, refused.
func (d frpsDashboard) get(ctx context.Context, client *http.Client, path string, maxBody int64) ([]byte, error) {
	url := d.base + path
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return nil, err
	}
	if d.user != "" || d.password != "" {
		req.SetBasicAuth(d.user, d.password)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach frps's dashboard at %s (%v): is webServer enabled? set -frps-api", d.base, err)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody+1))
	resp.Body.Close()
	var netErr net.Error
	switch {
	case err != nil && (errors.As(err, &netErr) && netErr.Timeout() || errors.Is(err, context.DeadlineExceeded)):
		return nil, fmt.Errorf("frps's dashboard answered %s too slowly: not all of it within %v", url, client.Timeout)
	case err != nil:
		return nil, fmt.Errorf("reading frps's dashboard answer to %s: %v", url, err)
	case int64(len(body)) > maxBody:
		return nil, fmt.Errorf("frps's dashboard answered %s with more than %d bytes, adopt's limit: is that frps's dashboard?", url, maxBody)
	case resp.StatusCode == http.StatusUnauthorized:
		return nil, fmt.Errorf("frps's dashboard at %s refused the credentials: set -frps-user and -frps-password (or -frps-config)", d.base)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("frps's dashboard at %s answered %s for %s", d.base, resp.Status, path)
	}
	return body, nil
}

// versionAtLeast says whether version ("0.71.0", "v0.71.0") is at least
// major.minor; an unreadable version is not.
func versionAtLeast(version string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(strings.TrimPrefix(version, "v"), "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}
