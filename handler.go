package main

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// maxBodyBytes bounds a plugin request; frps's largest NewProxy is a few KiB.
const maxBodyBytes = 1 << 20

// pluginPath is where frps is told to send its plugin calls.
const pluginPath = "/port-registrations"

// server is the HTTP surface: the plugin endpoint frps calls, the health
// check, and the operators' API, page and metrics.
type server struct {
	alloc   *allocator
	log     *slog.Logger
	metrics *metrics
	// adminToken, when set, is required as a Bearer token on every admin
	// route; without it only loopback peers may use them.
	adminToken string
	// pluginAllow is who may call the plugin path; nil lets everyone (the
	// command line always sets it, by default to loopback).
	pluginAllow allowList
	// quiet rate-limits the warnings a peer can trigger at will.
	quiet   *logLimiter
	started time.Time
	bufs    sync.Pool // *bytes.Buffer, reused between requests
}

// serverOptions are what the operators' side needs beyond the allocator.
type serverOptions struct {
	metrics     *metrics
	adminToken  string
	pluginAllow allowList
}

// peerWarnEvery is how often one peer (or one wrong path) may put a
// warning in the log.
const peerWarnEvery = time.Minute

// newServer builds every route in one place.
func newServer(alloc *allocator, log *slog.Logger, opts serverOptions) http.Handler {
	s := &server{alloc: alloc, log: log, metrics: opts.metrics, adminToken: opts.adminToken,
		pluginAllow: opts.pluginAllow, quiet: newLogLimiter(peerWarnEvery), started: time.Now()}
	if s.metrics == nil {
		s.metrics = newMetrics(alloc.stats)
	}
	routes := []struct {
		pattern string
		handler http.HandlerFunc
	}{
		{"POST " + pluginPath, s.serveRegistration},
		{"GET /ping", s.servePing},
		{"GET /api/allocations", s.admin(s.serveList)},
		{"GET /api/allocations/{key}", s.admin(s.serveShow)},
		{"PUT /api/allocations/{key}", s.admin(s.serveAssign)},
		{"DELETE /api/allocations/{key}", s.admin(s.serveRelease)},
		{"GET /metrics", s.admin(s.metrics.handler.ServeHTTP)},
		{"GET /{$}", s.admin(s.servePage)},
	}
	// strict answers exactly the routes (404, or 405 for a known path);
	// mux adds a catch-all that hands what matches no route to strict and
	// logs a plugin call that went to the wrong path, so a typo in frps's
	// config is not a silent 404. Matched requests never pass through it.
	strict, mux := http.NewServeMux(), http.NewServeMux()
	for _, r := range routes {
		strict.HandleFunc(r.pattern, r.handler)
		mux.HandleFunc(r.pattern, r.handler)
	}
	mux.HandleFunc("/", s.serveUnmatched(strict))
	return mux
}

// serveUnmatched answers a request no route matched as strict does (404,
// or 405 on a known path), and logs, rate-limited, a POST that was likely
// meant for the plugin with the path frps should use: any POST answered
// 404, and one that carries frps's op parameter or X-Frp-Reqid header
// (a frps without `path` calls "/", which only has GET).
func (s *server) serveUnmatched(strict http.Handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		strict.ServeHTTP(sw, r)
		if r.Method != http.MethodPost || r.URL.Path == pluginPath {
			return
		}
		op := queryValue(r.URL.RawQuery, "op")
		if sw.status != http.StatusNotFound && op == "" && r.Header.Get("X-Frp-Reqid") == "" {
			return
		}
		if ok, repeats := s.quiet.allow("path " + r.URL.Path); ok {
			s.log.Warn("plugin call to a wrong path: frps's plugin path is "+pluginPath,
				"path", r.URL.Path, "status", sw.status, "peer", peerHost(r.RemoteAddr), "op", op, "repeats", repeats,
				"hint", `set path = "`+pluginPath+`" in frps's [[httpPlugins]] (frps.ini: path = `+pluginPath+`)`)
		}
	}
}

// statusWriter remembers the status of an answer.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// refusePeer answers a plugin call from outside -plugin-allow with 403 and
// says so in the log, at most once a minute per peer address.
func (s *server) refusePeer(w http.ResponseWriter, r *http.Request) {
	host := peerHost(r.RemoteAddr)
	if ok, repeats := s.quiet.allow("peer " + host); ok {
		s.log.Warn("plugin call refused: peer not in -plugin-allow", "peer", host, "plugin_allow", s.pluginAllow.String(),
			"repeats", repeats, "hint", "add frps's address to -plugin-allow (FRP_PORT_KEEPER_PLUGIN_ALLOW)")
	}
	writeError(w, http.StatusForbidden, "this address may not call the plugin (see -plugin-allow)")
}

func (s *server) servePing(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("pong"))
}

// serveRegistration answers frps's plugin calls: a port for tcp and udp
// NewProxy, "unchanged" for everything else. It logs one line and counts
// one outcome per request; a sticky hit allocates little and touches no disk.
func (s *server) serveRegistration(w http.ResponseWriter, r *http.Request) {
	if s.pluginAllow != nil && !s.pluginAllow.allows(r.RemoteAddr) {
		s.refusePeer(w, r)
		return
	}
	start := time.Now()
	in, out := s.buffer(), s.buffer()
	defer s.release(in)
	defer s.release(out)
	reqid := slog.String("reqid", r.Header.Get("X-Frp-Reqid"))
	if _, err := in.ReadFrom(http.MaxBytesReader(w, r.Body, maxBodyBytes)); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			s.decided(start, decisionInvalid, slog.LevelWarn, reqid, slog.String("reason", "body over 1 MiB"))
			writeJSON(w, http.StatusRequestEntityTooLarge, []byte(`{"error":"TOOLARGE","message":"request body is over 1 MiB"}`))
			return
		}
		s.decided(start, decisionInvalid, slog.LevelWarn, reqid, slog.String("reason", "body unreadable"), slog.Any("err", err))
		writeJSON(w, http.StatusBadRequest, answerInvalid)
		return
	}
	req, err := decodePluginRequest(in.Bytes(), queryValue(r.URL.RawQuery, "op"))
	if err != nil {
		s.decided(start, decisionInvalid, slog.LevelWarn, reqid, slog.String("op", req.op), slog.String("reason", "not a valid plugin request"))
		writeJSON(w, http.StatusBadRequest, answerInvalid)
		return
	}
	if req.op == "CloseProxy" && req.proxy.ProxyName != "" {
		s.alloc.proxyClosed(req.proxy.User, req.proxy.ProxyName)
	}
	if req.op != "NewProxy" {
		s.decided(start, decisionPassthrough, slog.LevelDebug, reqid, slog.String("op", req.op))
		writeJSON(w, http.StatusOK, answerUnchanged)
		return
	}
	p := req.proxy
	who := []slog.Attr{reqid, slog.String("user", p.User), slog.String("proxy", p.ProxyName), slog.String("type", p.ProxyType)}
	if !req.hasPort {
		s.decided(start, decisionPassthrough, slog.LevelInfo, who...)
		writeJSON(w, http.StatusOK, answerUnchanged)
		return
	}
	p.ReqID = reqid.Value.String()
	if req.badPort {
		err = &portError{port: p.RemotePort, err: errPortInvalid}
	}
	port, how := 0, outcome("")
	if err == nil {
		port, how, err = s.alloc.allocate(p)
	}
	if err != nil {
		reason := rejectReason(err)
		s.decided(start, decisionRejected, slog.LevelWarn, append(who, slog.Int("requested", p.RemotePort),
			slog.String("reason", reason), slog.Any("err", err))...)
		writeJSON(w, http.StatusOK, rejectAnswer(reason))
		return
	}
	s.alloc.proxyOpened(p)
	out.Write(appendAllowed(out.AvailableBuffer(), req.rawContent, port))
	writeJSON(w, http.StatusOK, out.Bytes())
	s.decided(start, string(how), slog.LevelInfo, append(who, slog.Int("port", port))...)
}

// decided logs a plugin decision as one line and counts it.
func (s *server) decided(start time.Time, outcome string, level slog.Level, attrs ...slog.Attr) {
	s.metrics.decided(outcome, start)
	if s.log.Enabled(context.Background(), level) {
		s.log.LogAttrs(context.Background(), level, "decision", append(attrs, slog.String("outcome", outcome))...)
	}
}

// buffer and release recycle request and answer buffers between requests.
func (s *server) buffer() *bytes.Buffer {
	if b, ok := s.bufs.Get().(*bytes.Buffer); ok {
		return b
	}
	return new(bytes.Buffer)
}

func (s *server) release(b *bytes.Buffer) {
	if b.Cap() <= 64<<10 { // keep the pool small after a huge body
		b.Reset()
		s.bufs.Put(b)
	}
}

// queryValue reads one parameter of a raw query without building a map.
func queryValue(rawQuery, name string) string {
	for rawQuery != "" {
		var pair string
		pair, rawQuery, _ = strings.Cut(rawQuery, "&")
		if k, v, _ := strings.Cut(pair, "="); k == name {
			if u, err := url.QueryUnescape(v); err == nil {
				return u
			}
			return v
		}
	}
	return ""
}

// admin guards the operators' routes: a Bearer token when one is set,
// otherwise loopback peers only. The plugin path stays open, as frps needs.
func (s *server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.adminToken != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(s.adminToken)) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="frp-port-keeper"`)
				writeError(w, http.StatusUnauthorized, "a valid admin token is required (Authorization: Bearer ...)")
				return
			}
		} else if !isLoopback(r.RemoteAddr) {
			writeError(w, http.StatusForbidden, "without -admin-token the admin API answers loopback clients only")
			return
		}
		h(w, r)
	}
}

// adminActor names who made an admin change, for the history: the peer,
// and the CLI when it says so.
func adminActor(r *http.Request) string {
	by := "admin " + r.RemoteAddr
	if c := r.Header.Get("X-Frp-Port-Keeper-Client"); c != "" {
		by += " (" + c + ")"
	}
	return by
}

// peerHost is the address of a request's peer, without its port.
func peerHost(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	return host
}

func isLoopback(remoteAddr string) bool {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// apiAllocation is an allocation as the admin API shows it.
type apiAllocation struct {
	Key       string    `json:"key"`
	ProxyName string    `json:"proxy_name"`
	User      string    `json:"user"`
	ProxyType string    `json:"proxy_type"`
	Group     string    `json:"group"`
	Port      int       `json:"port"`
	CreatedAt time.Time `json:"created_at"`
	LastSeen  time.Time `json:"last_seen"`
	// Pinned: an operator assigned this port; the device cannot move it.
	Pinned bool `json:"pinned"`
	// OutsidePool marks a port outside the pool; OutsidePolicy one of the
	// pool that today's policy would not give this user. Both stay until
	// an operator moves them.
	OutsidePool   bool `json:"outside_pool"`
	OutsidePolicy bool `json:"outside_policy"`
}

func (s *server) toAPI(v allocationView) apiAllocation {
	return apiAllocation{Key: v.Key, ProxyName: v.ProxyName, User: v.User, ProxyType: v.ProxyType,
		Group: v.Group, Port: v.Port, CreatedAt: v.CreatedAt.UTC(), LastSeen: v.LastSeen.UTC(),
		Pinned: v.Pinned, OutsidePool: v.OutsidePool, OutsidePolicy: v.OutsidePolicy}
}

// allocationList is the answer of GET /api/allocations.
type allocationList struct {
	Allocations []apiAllocation `json:"allocations"`
	Pool        poolStats       `json:"pool"`
}

// listAllocations returns the allocations, sorted by port, of user when
// user is not empty.
func (s *server) listAllocations(user string, filterUser bool) allocationList {
	out := allocationList{Allocations: []apiAllocation{}, Pool: s.alloc.stats()}
	for _, v := range s.alloc.snapshot() {
		if !filterUser || v.User == user {
			out.Allocations = append(out.Allocations, s.toAPI(v))
		}
	}
	return out
}

func (s *server) serveList(w http.ResponseWriter, r *http.Request) {
	user, filter := r.URL.Query()["user"]
	name := ""
	if filter && len(user) > 0 {
		name = user[0]
	}
	writeValue(w, http.StatusOK, s.listAllocations(name, filter))
}

func (s *server) serveShow(w http.ResponseWriter, r *http.Request) {
	v, ok := s.alloc.find(r.PathValue("key"))
	if !ok {
		writeError(w, http.StatusNotFound, "no allocation for this key")
		return
	}
	writeValue(w, http.StatusOK, s.toAPI(v))
}

func (s *server) serveAssign(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Port *int    `json:"port"`
		Note *string `json:"note"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	if err := dec.Decode(&body); err != nil || body.Port == nil {
		writeError(w, http.StatusBadRequest, `the body must be {"port":N}`)
		return
	}
	key := r.PathValue("key")
	rec, err := s.alloc.assign(key, *body.Port, operatorChange{note: body.Note, by: adminActor(r)})
	if err != nil {
		s.log.Warn("admin assign refused", "key", key, "port", *body.Port, "err", err)
		status := http.StatusInternalServerError
		switch {
		case errors.Is(err, errPortReserved):
			status = http.StatusConflict
		case errors.Is(err, errPortOutside), errors.Is(err, errPortForFrps), errors.Is(err, errPortInvalid):
			status = http.StatusUnprocessableEntity
		case errors.Is(err, errStoreTimedOut), errors.Is(err, errStoreFailed):
			status = http.StatusServiceUnavailable
		}
		writeError(w, status, rejectReason(err))
		return
	}
	s.log.Info("admin assigned", "key", key, "port", rec.Port)
	v, ok := s.alloc.find(key)
	if !ok || v.Port != rec.Port { // changed again meanwhile: answer what was assigned
		v = allocationView{record: rec, LastSeen: rec.AssignedAt}
	}
	writeValue(w, http.StatusOK, s.toAPI(v))
}

func (s *server) serveRelease(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	err := s.alloc.release(key, adminActor(r))
	switch {
	case errors.Is(err, errNoAllocation):
		writeError(w, http.StatusNotFound, "no allocation for this key")
	case err != nil:
		s.log.Warn("admin release failed", "key", key, "err", err)
		writeError(w, http.StatusServiceUnavailable, rejectReason(err))
	default:
		s.log.Info("admin released", "key", key)
		w.WriteHeader(http.StatusNoContent)
	}
}

func writeValue(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status, b = http.StatusInternalServerError, []byte(`{"error":"encoding failed"}`)
	}
	writeJSON(w, status, append(b, '\n'))
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeValue(w, status, map[string]string{"error": msg})
}

// rejectReason maps allocation errors to the reason frps shows the client.
// Store internals stay in the log.
func rejectReason(err error) string {
	var pe *portError
	var poolErr *poolError
	var qe *quotaError
	var pin *pinError
	switch {
	case errors.As(err, &qe):
		return qe.Error()
	case errors.As(err, &pin):
		return pin.Error()
	case errors.As(err, &pe):
		return "remote " + pe.Error()
	case errors.As(err, &poolErr):
		return poolErr.Error()
	case errors.Is(err, errStoreTimedOut):
		return "frp-port-keeper could not store the port allocation: " + errStoreTimedOut.Error() + "; try again"
	case errors.Is(err, errStoreFailed):
		why := errStoreFailed.Error()
		for _, known := range []error{errStoreFull, errStoreReadOnly, errStoreGone} {
			if errors.Is(err, known) {
				why += " (" + known.Error() + ")"
			}
		}
		return "frp-port-keeper could not store the port allocation: " + why + "; try again"
	}
	return "frp-port-keeper internal error"
}

// jsonContentType is shared by every answer; net/http never modifies it.
var jsonContentType = []string{"application/json"}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header()["Content-Type"] = jsonContentType
	w.WriteHeader(status)
	w.Write(body)
}
