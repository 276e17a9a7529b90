package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/etcd"

	frpconfig "github.com/fatedier/frp/pkg/config"
)

// defaultPool avoids privileged ports and stays below Linux's ephemeral
// range (32768-60999), where outgoing connections would collide with it.
const defaultPool = "10000-32767"

// defaultListen is where the server listens, and where the client
// commands look for it, when nothing else is said.
const defaultListen = "127.0.0.1:8080"

// config is everything the command line and environment decide.
type config struct {
	listen       string
	dataDir      string
	allowPorts   string
	frpsConfig   string
	probe        bool
	store        string
	storeTimeout time.Duration
	tlsCert      string
	tlsKey       string
	adminToken   string
	pluginAllow  string
	version      bool
	policyFile   string
	maxPorts     int
	reclaimAfter time.Duration
	// adoptRequests: for this long after the start, a device's own
	// remote_port outside the pool is adopted instead of refused.
	adoptRequests time.Duration
	historyKeep   time.Duration
	notifyURL     string
	notifySecret  string

	etcd etcdFlags

	allowNets  allowList // pluginAllow, parsed by check
	notifyURLs []string  // notifyURL, split by check
}

// etcdFlags say where the etcd store (-store etcd) is and how to log in.
type etcdFlags struct {
	endpoints                 string // comma-separated URLs
	prefix                    string
	caFile, certFile, keyFile string
	username, password        string
}

// declareStore puts the flags that choose and reach the store on fs: serve's,
// and export's and import's.
func (c *config) declareStore(fs *flag.FlagSet) {
	fs.StringVar(&c.dataDir, "data-dir", "gokv", "directory that holds the allocations (file and bbolt)")
	fs.StringVar(&c.store, "store", "file", "store backend: file (JSON files), bbolt (one fsync'd database file) or etcd (shared by several frps)")
	fs.StringVar(&c.etcd.endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "etcd client URLs for -store etcd, comma-separated")
	fs.StringVar(&c.etcd.prefix, "etcd-prefix", etcd.DefaultPrefix, "etcd key prefix under which the allocations are kept")
	fs.StringVar(&c.etcd.caFile, "etcd-ca", "", "CA certificate that signed etcd's (PEM)")
	fs.StringVar(&c.etcd.certFile, "etcd-cert", "", "client certificate for etcd (PEM; needs -etcd-key)")
	fs.StringVar(&c.etcd.keyFile, "etcd-key", "", "private key of -etcd-cert (PEM)")
	fs.StringVar(&c.etcd.username, "etcd-username", "", "etcd user (with -etcd-password)")
	fs.StringVar(&c.etcd.password, "etcd-password", "", "password of -etcd-username")
}

// checkStore rejects store settings that cannot work.
func (c *config) checkStore() error {
	if c.store != "file" && c.store != "bbolt" && c.store != "etcd" {
		return fmt.Errorf("-store %q: want file, bbolt or etcd", c.store)
	}
	if (c.etcd.certFile == "") != (c.etcd.keyFile == "") {
		return errors.New("-etcd-cert and -etcd-key go together")
	}
	if (c.etcd.username == "") != (c.etcd.password == "") {
		return errors.New("-etcd-username and -etcd-password go together")
	}
	return nil
}

// envName is the environment fallback of a flag: -data-dir reads
// FRP_PORT_KEEPER_DATA_DIR.
func envName(flagName string) string {
	return "FRP_PORT_KEEPER_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// declare puts serve's flags on fs, bound to c.
func (c *config) declare(fs *flag.FlagSet) {
	fs.StringVar(&c.listen, "listen", defaultListen, "address to serve the plugin on")
	fs.StringVar(&c.allowPorts, "allow-ports", "", `ports to hand out, frps syntax "6000-7000,8080" (default `+defaultPool+`)`)
	fs.StringVar(&c.frpsConfig, "frps-config", "", "frps config file (toml, yaml, json or ini): take allowPorts and frps's own ports from it")
	fs.BoolVar(&c.probe, "probe", true, "test-bind a port before handing it out (turn off when frps runs on another host or network namespace)")
	c.declareStore(fs)
	fs.DurationVar(&c.storeTimeout, "store-timeout", 2*time.Second, "deadline for every store call")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "serve HTTPS with this certificate (PEM; needs -tls-key)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "private key of -tls-cert (PEM)")
	fs.StringVar(&c.adminToken, "admin-token", "", "Bearer token for /api, / and /metrics (without it they answer loopback clients only)")
	fs.StringVar(&c.pluginAllow, "plugin-allow", defaultPluginAllow, "addresses that may call the plugin path (frps's): comma-separated CIDRs")
	fs.BoolVar(&c.version, "version", false, "print the version and exit")
	fs.StringVar(&c.policyFile, "policy", "", "policy file (TOML): per-user port ranges and quotas; re-read on SIGHUP")
	fs.IntVar(&c.maxPorts, "max-ports-per-user", 0, "keys a user may hold, unless a policy rule says otherwise (0: unlimited)")
	fs.DurationVar(&c.reclaimAfter, "reclaim-after", 0, "let a full pool take back the port of a key unseen this long, e.g. 2160h (0: never)")
	fs.DurationVar(&c.adoptRequests, "adopt-requests", 0, "for this long after the start (e.g. 24h), adopt the port a device asks for outside the pool (when free and not frps's own) instead of refusing it: a migration for a frps whose dashboard is off (0: never)")
	fs.DurationVar(&c.historyKeep, "history-keep", 400*24*time.Hour, "keep the allocation history this long (0: forever)")
	fs.Func("notify-url", "POST every change as JSON to this URL (repeat the flag, or comma-separate); signed with -notify-secret", func(v string) error {
		if c.notifyURL != "" {
			v = c.notifyURL + "," + v
		}
		c.notifyURL = v
		return nil
	})
	fs.StringVar(&c.notifySecret, "notify-secret", "", "sign every webhook request with this secret: header\n"+
		signatureHeader+": sha256=HEX(HMAC-SHA256(secret, body)),\n"+
		"HEX the lowercase hex of the HMAC of the request body as sent")
}

// check rejects settings that cannot work together and parses the ones
// that need it.
func (c *config) check() error {
	if err := c.checkStore(); err != nil {
		return err
	}
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("-tls-cert and -tls-key go together")
	}
	if c.storeTimeout <= 0 {
		return fmt.Errorf("-store-timeout %v: must be positive", c.storeTimeout)
	}
	c.notifyURLs = nil
	for _, u := range strings.Split(c.notifyURL, ",") {
		if u = strings.TrimSpace(u); u == "" {
			continue
		}
		if parsed, err := url.Parse(u); err != nil || (parsed.Scheme != "http" && parsed.Scheme != "https") || parsed.Host == "" {
			return fmt.Errorf("-notify-url %q: want an http or https URL", u)
		}
		c.notifyURLs = append(c.notifyURLs, u)
	}
	if c.historyKeep < 0 {
		return fmt.Errorf("-history-keep %v: must not be negative", c.historyKeep)
	}
	if c.adoptRequests < 0 {
		return fmt.Errorf("-adopt-requests %v: must not be negative", c.adoptRequests)
	}
	nets, err := parseAllowList(c.pluginAllow)
	if err != nil {
		return fmt.Errorf("-plugin-allow: %v", err)
	}
	c.allowNets = nets
	return nil
}

// parseConfig reads serve's flags, then fills every flag not given on the
// command line from its environment variable, and checks the result: the
// serve command's parse, for tests.
func parseConfig(args []string, getenv func(string) string) (config, error) {
	var c config
	fs := newFlagSet("frp-port-keeper")
	c.declare(fs)
	pos, err := parseArgs(fs, args, getenv)
	if err != nil {
		return c, err
	}
	if len(pos) > 0 {
		return c, fmt.Errorf("unexpected argument %q", pos[0])
	}
	return c, c.check()
}

// poolPlan is the pool the allocator serves and the ports kept out of it.
type poolPlan struct {
	// pool is the allowed ports, alike in both spaces; each space's own
	// listeners are kept out by excluded.
	pool      *portSet
	excluded  map[store.Slot]string // port -> what uses it
	probeAddr string                // where frps binds proxies
}

// planPool works out the pool: the allowed ports (from -allow-ports, frps's
// allowPorts, or the default; both when both are given), minus, in each
// space, frps's own listeners of that protocol (bindPort is tcp, kcp and
// quic bind ports are udp) and the plugin's port (tcp). frps's listeners
// are known only from -frps-config: with -allow-ports alone, frps's
// bindPort stays in the pool if -allow-ports names it (the probe then
// skips it while frps holds it).
func planPool(c config, listenPort int) (poolPlan, error) {
	plan := poolPlan{excluded: map[store.Slot]string{}, probeAddr: "0.0.0.0"}
	var allowed *portSet
	from := "the default pool " + defaultPool // where the allowed ports came from, for errors
	if c.allowPorts != "" {
		set, err := parsePorts(c.allowPorts)
		if err != nil {
			return plan, fmt.Errorf("-allow-ports: %w", err)
		}
		allowed, from = set, "-allow-ports "+set.String()
	}
	if c.frpsConfig != "" {
		frps, err := readFrpsConfig(c.frpsConfig)
		if err != nil {
			return plan, err
		}
		plan.probeAddr = frps.proxyBindAddr
		for slot, use := range frps.ownPorts {
			plan.excluded[slot] = use
		}
		switch {
		case frps.allowPorts != nil && allowed != nil:
			from += " and frps's allowPorts " + frps.allowPorts.String()
			for i := range allowed {
				allowed[i] &= frps.allowPorts[i]
			}
			if allowed.len() == 0 {
				return plan, fmt.Errorf("the port pool is empty: %s have no port in common", from)
			}
		case frps.allowPorts != nil:
			allowed, from = frps.allowPorts, "frps's allowPorts "+frps.allowPorts.String()
		}
	}
	if allowed == nil {
		allowed, _ = parsePorts(defaultPool)
	}
	if listenPort > 0 {
		plan.excluded[store.TCPPort(listenPort)] = "the plugin's own port"
	}
	if allowed.len() == 0 {
		return plan, fmt.Errorf("the port pool is empty: %s", from)
	}
	// Each space must keep a port: frps allows both protocols on every
	// allowed port, so a pool that only one of them can use is a mistake.
	for _, space := range store.Spaces {
		left := *allowed
		var removed []store.Slot
		for slot := range plan.excluded {
			if slot.Space == space && left.has(slot.Port) {
				removed = append(removed, slot)
				left.remove(slot.Port)
			}
		}
		if left.len() > 0 {
			continue
		}
		slices.SortFunc(removed, func(a, b store.Slot) int { return a.Port - b.Port })
		why := make([]string, len(removed))
		for i, slot := range removed {
			why[i] = fmt.Sprintf("%s (%s)", portName(slot), plan.excluded[slot])
		}
		return plan, fmt.Errorf("the port pool is empty for %s: %s minus %s", space, from, strings.Join(why, ", "))
	}
	plan.pool = allowed
	return plan, nil
}

// frpsPorts is what the plugin needs from frps's configuration.
type frpsPorts struct {
	allowPorts    *portSet // nil: frps allows every port
	ownPorts      map[store.Slot]string
	proxyBindAddr string
}

// readFrpsConfig reads frps's config with frp's own loader, so templates,
// legacy ini and defaults are understood exactly as frps understands them.
func readFrpsConfig(path string) (frpsPorts, error) {
	cfg, _, err := frpconfig.LoadServerConfig(path, false)
	if err != nil {
		return frpsPorts{}, frpsConfigError(path, err)
	}
	out := frpsPorts{ownPorts: map[store.Slot]string{}, proxyBindAddr: cfg.ProxyBindAddr}
	if out.proxyBindAddr == "" {
		out.proxyBindAddr = "0.0.0.0"
	}
	// kcp and quic listen on udp, often on bindPort's number (frp's own
	// examples do so), and take that number from udp proxies only.
	for _, own := range []struct {
		slot store.Slot
		use  string
	}{
		{store.TCPPort(cfg.BindPort), "frps bindPort"},
		{store.UDPPort(cfg.KCPBindPort), "frps kcpBindPort"},
		{store.UDPPort(cfg.QUICBindPort), "frps quicBindPort"},
		{store.TCPPort(cfg.VhostHTTPPort), "frps vhostHTTPPort"},
		{store.TCPPort(cfg.VhostHTTPSPort), "frps vhostHTTPSPort"},
		{store.TCPPort(cfg.TCPMuxHTTPConnectPort), "frps tcpmuxHTTPConnectPort"},
		{store.TCPPort(cfg.WebServer.Port), "frps webServer.port"},
		{store.TCPPort(cfg.SSHTunnelGateway.BindPort), "frps sshTunnelGateway.bindPort"},
	} {
		if own.slot.Port > 0 && own.slot.Port <= maxPort {
			out.ownPorts[own.slot] = own.use
		}
	}
	if len(cfg.AllowPorts) > 0 {
		out.allowPorts = &portSet{}
		for _, r := range cfg.AllowPorts {
			if r.Single > 0 {
				r.Start, r.End = r.Single, r.Single
			}
			if r.Start < 1 || r.End > maxPort || r.End < r.Start {
				return frpsPorts{}, fmt.Errorf("-frps-config %s: allowPorts has a bad range %d-%d", path, r.Start, r.End)
			}
			out.allowPorts.addRange(r.Start, r.End)
		}
	}
	return out, nil
}

// etcdOptionsFrom turns the -etcd-* flags into the etcd store's options.
func etcdOptionsFrom(c config, log *slog.Logger) etcd.Options {
	var eps []string
	for ep := range strings.SplitSeq(c.etcd.endpoints, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			eps = append(eps, ep)
		}
	}
	return etcd.Options{
		Endpoints: eps, Prefix: c.etcd.prefix,
		CAFile: c.etcd.caFile, CertFile: c.etcd.certFile, KeyFile: c.etcd.keyFile,
		Username: c.etcd.username, Password: c.etcd.password,
		Timeout: c.storeTimeout, Log: log,
	}
}

// frpsConfigError says why frps's config could not be read; when this
// process may not read it (a root-owned 0600 frps.toml and the container's
// non-root user, say), it says how to let it.
func frpsConfigError(path string, err error) error {
	if !errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("-frps-config %s: %v", path, err)
	}
	uid, gid := os.Getuid(), os.Getgid()
	return fmt.Errorf("-frps-config %s: %v: frp-port-keeper runs as uid %d, gid %d and may not read it; "+
		"let it (chgrp %d %s && chmod 0640 %s), or run it as the file's owner (in Docker: --user 0:0, in compose: user: \"0:0\")",
		path, err, uid, gid, gid, path, path)
}
