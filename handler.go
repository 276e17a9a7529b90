package main

import (
	"bytes"
	"cmp"
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
	started    time.Time
	bufs       sync.Pool // *bytes.Buffer, reused between requests
	// heavy holds a token per admin listing or page in progress; its
	// capacity is how many may run at once (see enterHeavy).
	heavy     chan struct{}
	heavyWait time.Duration
	unpaced   bool // serverOptions.unpaced
}

// serverOptions are what the operators' side needs beyond the allocator.
type serverOptions struct {
	metrics    *metrics
	adminToken string
	// heavySlots is how many listings and pages may run at once (default
	// 2); heavyWait how long another waits for a slot before it is
	// answered 503 (default 1s).
	heavySlots int
	heavyWait  time.Duration
	// unpaced lets heavy work run flat out (tests that measure something
	// else); see heavyRest.
	unpaced bool
}

// newServer builds every route in one place.
func newServer(alloc *allocator, log *slog.Logger, opts serverOptions) http.Handler {
	s := &server{alloc: alloc, log: log, metrics: opts.metrics, adminToken: opts.adminToken, started: time.Now(),
		heavy:     make(chan struct{}, cmp.Or(opts.heavySlots, defaultHeavySlots)),
		heavyWait: cmp.Or(opts.heavyWait, defaultHeavyWait), unpaced: opts.unpaced}
	if s.metrics == nil {
		s.metrics = newMetrics(alloc.stats)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pluginPath, s.serveRegistration)
	mux.HandleFunc("GET /ping", s.servePing)
	mux.HandleFunc("GET /api/allocations", s.admin(s.serveList))
	mux.HandleFunc("GET /api/allocations/{key}", s.admin(s.serveShow))
	mux.HandleFunc("PUT /api/allocations/{key}", s.admin(s.serveAssign))
	mux.HandleFunc("DELETE /api/allocations/{key}", s.admin(s.serveRelease))
	mux.HandleFunc("GET /metrics", s.admin(s.metrics.handler.ServeHTTP))
	mux.HandleFunc("GET /{$}", s.admin(s.servePage))
	return mux
}

func (s *server) servePing(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("pong"))
}

// serveRegistration answers frps's plugin calls: a port for tcp and udp
// NewProxy, "unchanged" for everything else. It logs one line and counts
// one outcome per request; a sticky hit allocates little and touches no disk.
func (s *server) serveRegistration(w http.ResponseWriter, r *http.Request) {
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
	// OutsidePolicy marks a sticky port that today's policy would not
	// give this user; it stays until an operator moves it.
	OutsidePolicy bool `json:"outside_policy"`
}

func (s *server) toAPI(v allocationView) apiAllocation {
	return apiAllocation{Key: v.Key, ProxyName: v.ProxyName, User: v.User, ProxyType: v.ProxyType,
		Group: v.Group, Port: v.Port, CreatedAt: v.CreatedAt.UTC(), LastSeen: v.LastSeen.UTC(),
		OutsidePolicy: v.OutsidePolicy}
}

// allocationList is the answer of GET /api/allocations.
type allocationList struct {
	Allocations []apiAllocation `json:"allocations"`
	Pool        poolStats       `json:"pool"`
	// Next is the cursor of the following page (?after=Next), present
	// when a limited listing may have more.
	Next int `json:"next,omitempty"`
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
		Port *int `json:"port"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	if err := dec.Decode(&body); err != nil || body.Port == nil {
		writeError(w, http.StatusBadRequest, `the body must be {"port":N}`)
		return
	}
	key := r.PathValue("key")
	rec, err := s.alloc.assign(key, *body.Port)
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
	err := s.alloc.release(key)
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
	switch {
	case errors.As(err, &qe):
		return qe.Error()
	case errors.As(err, &pe):
		return "remote " + pe.Error()
	case errors.As(err, &poolErr):
		return poolErr.Error()
	case errors.Is(err, errStoreTimedOut):
		return "frp-port-keeper could not store the port allocation: " + errStoreTimedOut.Error() + "; try again"
	case errors.Is(err, errStoreFailed):
		return "frp-port-keeper could not store the port allocation: " + errStoreFailed.Error() + "; try again"
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
