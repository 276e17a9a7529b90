package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// defaultPluginAllow is who may call the plugin path when -plugin-allow is
// not given: this host only, where frps usually runs.
const defaultPluginAllow = "127.0.0.0/8,::1/128"

// allowList is the set of peer addresses that may call the plugin path.
// frps's plugin client sends no credentials, so the peer's address is all
// there is to go by.
type allowList []netip.Prefix

// parseAllowList reads -plugin-allow: comma-separated CIDRs; a bare
// address stands for itself alone, and an IPv4-mapped IPv6 address or
// prefix for its IPv4 form.
func parseAllowList(spec string) (allowList, error) {
	if strings.TrimSpace(spec) == "" {
		return nil, errors.New("empty address list (the default is " + defaultPluginAllow + ")")
	}
	var out allowList
	for _, item := range strings.Split(spec, ",") {
		item = strings.TrimSpace(item)
		p, err := netip.ParsePrefix(item)
		if err != nil {
			a, aerr := netip.ParseAddr(item)
			if aerr != nil || a.Zone() != "" {
				return nil, fmt.Errorf("%q is not an address or CIDR, e.g. 10.0.0.0/8 or 192.0.2.7", item)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		// An IPv4 peer's address reaches allows unmapped, so an
		// IPv4-mapped entry (::ffff:a.b.c.d/N) could never match as
		// written: it stands for its IPv4 form, a.b.c.d/(N-96).
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, fmt.Errorf("%q reaches beyond the IPv4-mapped addresses (::ffff:0:0/96): write the IPv4 form, e.g. 10.0.0.0/8", item)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// allows reports whether a request's RemoteAddr ("ip:port") is in the
// list. An IPv4 peer on a dual-stack listener counts as IPv4.
func (l allowList) allows(remoteAddr string) bool {
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return false
	}
	ip := ap.Addr().Unmap().WithZone("")
	for _, p := range l {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// String renders the list as -plugin-allow takes it.
func (l allowList) String() string {
	parts := make([]string, len(l))
	for i, p := range l {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

// openToWorld returns the first prefix that admits every address of its
// family (0.0.0.0/0, ::/0), or "".
func (l allowList) openToWorld() string {
	for _, p := range l {
		if p.Bits() == 0 {
			return p.String()
		}
	}
	return ""
}

// openPluginWarning is the start-up warning for a plugin path that anyone
// on the network may call: the listener is not loopback and -plugin-allow
// admits every address. "" when there is nothing to warn about.
func openPluginWarning(listen net.Addr, allow allowList) string {
	world := allow.openToWorld()
	if world == "" {
		return ""
	}
	if tcp, ok := listen.(*net.TCPAddr); ok && tcp.IP.IsLoopback() {
		return ""
	}
	return fmt.Sprintf("-plugin-allow %s lets every host that reaches %s register proxies and take ports; "+
		"allow only frps's address (and use -tls-cert when frps runs on another host)", world, listen)
}

// logLimiter lets through one log line per key and interval, so a
// misconfigured or hostile peer cannot flood the log. It remembers a
// bounded number of keys; when they are all recent, new keys stay quiet
// until one ages out.
type logLimiter struct {
	every time.Duration
	now   func() time.Time

	mu   sync.Mutex
	seen map[string]*limitEntry
}

type limitEntry struct {
	last       time.Time
	suppressed int
}

// logLimiterKeys bounds the memory of a limiter.
const logLimiterKeys = 256

func newLogLimiter(every time.Duration) *logLimiter {
	return &logLimiter{every: every, now: time.Now, seen: map[string]*limitEntry{}}
}

// allow reports whether a line for key may be logged now, and how many
// lines for it were held back since the last one.
func (l *logLimiter) allow(key string) (ok bool, suppressed int) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.seen[key]; e != nil {
		if now.Sub(e.last) < l.every {
			e.suppressed++
			return false, 0
		}
		suppressed = e.suppressed
		e.last, e.suppressed = now, 0
		return true, suppressed
	}
	if len(l.seen) >= logLimiterKeys {
		for k, e := range l.seen {
			if now.Sub(e.last) >= l.every {
				delete(l.seen, k)
			}
		}
		if len(l.seen) >= logLimiterKeys {
			return false, 0
		}
	}
	l.seen[key] = &limitEntry{last: now}
	return true, 0
}
