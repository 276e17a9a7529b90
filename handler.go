package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
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
	history store.HistoryLog // nil: no history kept
	events  *eventHub
	started time.Time
	bufs    sync.Pool // *bytes.Buffer, reused between requests
	// heavy holds a token per admin listing or page in progress; its
	// capacity is how many may run at once (see enterHeavy).
	heavy     chan struct{}
	heavyWait time.Duration
	unpaced   bool // serverOptions.unpaced
}

// serverOptions are what the operators' side needs beyond the allocator.
type serverOptions struct {
	metrics     *metrics
	adminToken  string
	pluginAllow allowList
	// history is the store's history log (nil: none kept); events streams
	// every change as it happens.
	history store.HistoryLog
	events  *eventHub
	// heavySlots is how many listings and pages may run at once (default
	// 2); heavyWait how long another waits for a slot before it is
	// answered 503 (default 1s).
	heavySlots int
	heavyWait  time.Duration
	// unpaced lets heavy work run flat out (tests that measure something
	// else); see heavyRest.
	unpaced bool
}

// peerWarnEvery is how often one peer (or one wrong path) may put a
// warning in the log.
const peerWarnEvery = time.Minute

// newServer builds every route in one place.
func newServer(alloc *allocator, log *slog.Logger, opts serverOptions) http.Handler {
	s := &server{alloc: alloc, log: log, metrics: opts.metrics, adminToken: opts.adminToken,
		pluginAllow: opts.pluginAllow, quiet: newLogLimiter(peerWarnEvery), started: time.Now(),
		history: opts.history, events: opts.events,
		heavy:     make(chan struct{}, cmp.Or(opts.heavySlots, defaultHeavySlots)),
		heavyWait: cmp.Or(opts.heavyWait, defaultHeavyWait), unpaced: opts.unpaced}
	if s.events == nil {
		s.events = newEventHub(nil)
	}
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
		{"DELETE /api/ports/{port}", s.admin(s.serveReleasePort)},
		{"PATCH /api/allocations/{key}", s.admin(s.serveNote)},
		{"GET /api/export", s.admin(s.serveExport)},
		{"POST /api/import", s.admin(s.serveImport)},
		{"GET /api/history", s.admin(s.serveHistory)},
		{"GET /api/events", s.admin(s.serveEvents)},
		{"GET /metrics", s.admin(s.metrics.handler.ServeHTTP)},
		{"GET /{$}", s.admin(s.servePage)},
		{"GET /history", s.admin(s.servePageHistory)},
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
		writeJSON(w, http.StatusBadRequest, frpplugin.AnswerInvalid)
		return
	}
	req, err := frpplugin.Decode(in.Bytes(), queryValue(r.URL.RawQuery, "op"))
	if err != nil {
		s.decided(start, decisionInvalid, slog.LevelWarn, reqid, slog.String("op", req.Op), slog.String("reason", "not a valid plugin request"))
		writeJSON(w, http.StatusBadRequest, frpplugin.AnswerInvalid)
		return
	}
	if req.Op == "CloseProxy" && req.Proxy.ProxyName != "" {
		s.alloc.proxyClosed(req.Proxy.User, req.Proxy.ProxyName)
	}
	if req.Op != "NewProxy" {
		s.decided(start, decisionPassthrough, slog.LevelDebug, reqid, slog.String("op", req.Op))
		writeJSON(w, http.StatusOK, frpplugin.AnswerUnchanged)
		return
	}
	p := req.Proxy
	who := []slog.Attr{reqid, slog.String("user", p.User), slog.String("proxy", p.ProxyName), slog.String("type", p.ProxyType)}
	if !req.HasPort {
		s.decided(start, decisionPassthrough, slog.LevelInfo, who...)
		writeJSON(w, http.StatusOK, frpplugin.AnswerUnchanged)
		return
	}
	p.ReqID = reqid.Value.String()
	if req.BadPort {
		err = &portError{slot: store.Slot{Space: store.SpaceOf(p.ProxyType), Port: p.RemotePort}, err: errPortInvalid}
	}
	port, how := 0, outcome("")
	if err == nil {
		port, how, err = s.alloc.allocate(p)
	}
	if err != nil {
		reason := rejectReason(err)
		s.decided(start, decisionRejected, slog.LevelWarn, append(who, slog.Int("requested", p.RemotePort),
			slog.String("reason", reason), slog.Any("err", err))...)
		writeJSON(w, http.StatusOK, frpplugin.RejectAnswer(reason))
		return
	}
	s.alloc.proxyOpened(p)
	out.Write(frpplugin.AppendAllowed(out.AvailableBuffer(), req.RawContent, port))
	writeJSON(w, http.StatusOK, out.Bytes())
	if how == outcomePinned { // it asked for another port and got its pin
		who = append(who, slog.Int("asked", p.RemotePort))
	}
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
			got, ok := bearerToken(r.Header.Get("Authorization"))
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

// bearerToken is the token of an "Authorization: Bearer TOKEN" header.
// The scheme is matched in any case and may be followed by more than one
// space (RFC 7235 section 2.1); the token is taken as it stands.
func bearerToken(header string) (string, bool) {
	scheme, token, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimLeft(token, " ")
	return token, token != ""
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
	Key       string `json:"key"`
	ProxyName string `json:"proxy_name"`
	User      string `json:"user"`
	ProxyType string `json:"proxy_type"`
	Group     string `json:"group"`
	Port      int    `json:"port"`
	// Proto is the port's space, tcp or udp: a tcp and a udp key may
	// hold one number, as frps allows.
	Proto     store.Space `json:"proto"`
	CreatedAt time.Time   `json:"created_at"`
	LastSeen  time.Time   `json:"last_seen"`
	// Pinned: an operator assigned this port; the device gets it whatever
	// port it asks for.
	Pinned bool   `json:"pinned"`
	Note   string `json:"note,omitempty"`
	// HeldBack, on a row with no key, says why its port is held back: a
	// crash damaged its record, whose key is unknown (DELETE /api/ports/N).
	HeldBack string `json:"held_back,omitempty"`
	// OutsidePool marks a port outside the pool; OutsidePolicy one of the
	// pool that today's policy would not give this user. Both stay until
	// an operator moves them.
	OutsidePool   bool `json:"outside_pool"`
	OutsidePolicy bool `json:"outside_policy"`
}

func (s *server) toAPI(v allocationView) apiAllocation {
	return apiAllocation{Key: v.Key, ProxyName: v.ProxyName, User: v.User, ProxyType: v.ProxyType,
		Group: v.Group, Port: v.Port, Proto: v.Proto, CreatedAt: v.CreatedAt.UTC(), LastSeen: v.LastSeen.UTC(),
		Pinned: v.Pinned, Note: v.Note, HeldBack: v.HeldBack, OutsidePool: v.OutsidePool, OutsidePolicy: v.OutsidePolicy}
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
		Port  *int    `json:"port"`
		Proto string  `json:"proto"`
		Note  *string `json:"note"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
	if err := dec.Decode(&body); err != nil || body.Port == nil {
		writeError(w, http.StatusBadRequest, `the body must be {"port":N}, with "proto":"tcp"|"udp" and "note":"…" optional`)
		return
	}
	space, err := store.ParseSpace(body.Proto)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if body.Note != nil && len(*body.Note) > maxNoteBytes {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("a note is at most %d bytes", maxNoteBytes))
		return
	}
	key := r.PathValue("key")
	rec, err := s.alloc.assign(key, *body.Port, space, operatorChange{note: body.Note, by: adminActor(r)})
	if err != nil {
		s.writeChangeError(w, "assign", key, err)
		return
	}
	s.log.Info("admin assigned", "key", key, "port", rec.Port, "proto", rec.Space())
	v, ok := s.alloc.find(key)
	if !ok || v.Slot() != rec.Slot() { // changed again meanwhile: answer what was assigned
		v = allocationView{Record: rec, Proto: rec.Space(), LastSeen: rec.AssignedAt}
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

// serveReleasePort frees a port by number (?proto=tcp|udp says which
// space; it may be left out when only one space holds the port): the key
// holding it is released, or the hold of a damaged record of an unknown
// key is lifted.
func (s *server) serveReleasePort(w http.ResponseWriter, r *http.Request) {
	port, err := strconv.Atoi(r.PathValue("port"))
	if err != nil || port < 1 || port > maxPort {
		writeError(w, http.StatusBadRequest, "port must be a number from 1 to 65535")
		return
	}
	space, err := store.ParseSpace(r.URL.Query().Get("proto"))
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	holders := s.alloc.atPort(port, space)
	switch len(holders) {
	case 0:
		writeError(w, http.StatusNotFound, "nobody holds this port")
		return
	case 2:
		writeError(w, http.StatusConflict, fmt.Sprintf("port %d is held in both spaces, tcp by %s and udp by %s: say which with ?proto=tcp or ?proto=udp",
			port, holderName(holders[0]), holderName(holders[1])))
		return
	}
	h, by := holders[0], adminActor(r)
	if h.Key != "" {
		err = s.alloc.release(h.Key, by)
	} else {
		err = s.alloc.releaseHeldBack(h.Slot(), by)
	}
	switch {
	case errors.Is(err, errNoAllocation):
		writeError(w, http.StatusNotFound, "nobody holds this port")
	case err != nil:
		s.log.Warn("admin release failed", "port", port, "proto", h.Proto, "err", err)
		writeError(w, http.StatusServiceUnavailable, rejectReason(err))
	default:
		s.log.Info("admin released", "port", port, "proto", h.Proto, "key", h.Key)
		w.WriteHeader(http.StatusNoContent)
	}
}

// holderName names what holds a port, for an operator.
func holderName(v allocationView) string {
	if v.Key == "" {
		return "a damaged record (held back)"
	}
	return strconv.Quote(v.Key)
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
		why := errStoreFailed.Error()
		for _, known := range []error{store.ErrFull, store.ErrReadOnly, store.ErrGone, store.ErrRestoring} {
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

// serveNote changes an allocation's note: PATCH {"note":"…"}.
func (s *server) serveNote(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Note *string `json:"note"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10)).Decode(&body); err != nil || body.Note == nil {
		writeError(w, http.StatusBadRequest, `the body must be {"note":"…"}`)
		return
	}
	if len(*body.Note) > maxNoteBytes {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("a note is at most %d bytes", maxNoteBytes))
		return
	}
	key := r.PathValue("key")
	if _, err := s.alloc.setNote(key, *body.Note, adminActor(r)); err != nil {
		s.writeChangeError(w, "note", key, err)
		return
	}
	v, _ := s.alloc.find(key)
	writeValue(w, http.StatusOK, s.toAPI(v))
}

// maxNoteBytes bounds a note.
const maxNoteBytes = 1024

// writeChangeError answers an admin change the allocator refused.
func (s *server) writeChangeError(w http.ResponseWriter, what, key string, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, errNoAllocation):
		writeError(w, http.StatusNotFound, "no allocation for this key")
		return
	case errors.Is(err, errNoteTooLong):
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, errPortReserved):
		status = http.StatusConflict
	case errors.Is(err, errPortOutside), errors.Is(err, errPortForFrps), errors.Is(err, errPortInvalid), errors.Is(err, errWrongSpace):
		status = http.StatusUnprocessableEntity
	case errors.Is(err, errStoreTimedOut), errors.Is(err, errStoreFailed):
		status = http.StatusServiceUnavailable
	}
	s.log.Warn("admin "+what+" refused", "key", key, "err", err)
	writeError(w, status, rejectReason(err))
}

// serveExport is a consistent snapshot of every allocation, in export's
// format, from the running server: a backup without downtime.
func (s *server) serveExport(w http.ResponseWriter, _ *http.Request) {
	out := exportFile{Allocations: []exportRecord{}}
	for _, v := range s.alloc.snapshot() {
		out.Allocations = append(out.Allocations, exportRecord{Record: v.Record, LastSeen: v.LastSeen.UTC()})
	}
	writeValue(w, http.StatusOK, out)
}

// serveImport records an export file's allocations (or adopt's) through
// the running server, all or nothing: POST /api/import[?as=adopt]. With
// dry_run=1 it checks everything and writes nothing; with skip_conflicts=1
// it takes what it can and names the rest (Refused).
func (s *server) serveImport(w http.ResponseWriter, r *http.Request) {
	var file exportFile
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&file); err != nil {
		writeError(w, http.StatusBadRequest, "not an export file: "+err.Error())
		return
	}
	q := r.URL.Query()
	how := store.HistImported
	if q.Get("as") == "adopt" {
		how = store.HistAdopted
	}
	mode := importMode{dryRun: queryFlag(q.Get("dry_run")), skipConflicts: queryFlag(q.Get("skip_conflicts"))}
	recs := make([]store.Record, 0, len(file.Allocations))
	for _, e := range file.Allocations {
		recs = append(recs, e.Record)
	}
	n, refused, err := s.alloc.importWith(recs, how, adminActor(r), mode)
	if err != nil {
		status := http.StatusUnprocessableEntity
		switch {
		case errors.Is(err, errStoreTimedOut), errors.Is(err, errStoreFailed):
			status = http.StatusServiceUnavailable
		case errors.Is(err, errNoteTooLong):
			status = http.StatusBadRequest
		}
		s.log.Warn("admin import refused", "err", err)
		writeError(w, status, err.Error())
		return
	}
	taken := slices.DeleteFunc(slices.Clone(recs), func(r store.Record) bool {
		return slices.ContainsFunc(refused, func(f importRefusal) bool { return f.Key == r.Key && f.Port == r.Port && f.Proto == r.Space() })
	})
	res := s.alloc.importSummary(taken, n)
	res.Refused, res.DryRun = refused, mode.dryRun
	if mode.dryRun {
		writeValue(w, http.StatusOK, res)
		return
	}
	s.log.Info("admin imported", "as", how, "changed", n, "unchanged", len(taken)-n, "refused", len(refused))
	writeValue(w, http.StatusOK, res)
}

// queryFlag reads a boolean query parameter: "1" or "true" (any case).
func queryFlag(v string) bool { return v == "1" || strings.EqualFold(v, "true") }

// importSummary is what an import of recs that changed n reports, through
// the server or offline.
func (a *allocator) importSummary(recs []store.Record, n int) importResult {
	res := importResult{Imported: n, Unchanged: len(recs) - n, Pool: a.poolStr}
	for _, r := range recs {
		if !a.pool.has(r.Port) {
			res.OutsidePool = append(res.OutsidePool, fmt.Sprintf("%s:%d", r.Key, r.Port))
		}
	}
	return res
}

// importResult is the answer of POST /api/import.
type importResult struct {
	Imported  int    `json:"imported"`
	Unchanged int    `json:"unchanged"`
	Pool      string `json:"pool"`
	// OutsidePool lists "key:port" of imported allocations outside the
	// pool: kept, as an operator may, and shown as such.
	OutsidePool []string `json:"outside_pool,omitempty"`
	// Refused names the records skipped (skip_conflicts=1), or that a dry
	// run found would be, with why.
	Refused []importRefusal `json:"refused,omitempty"`
	// DryRun: nothing was written; Imported says what would change.
	DryRun bool `json:"dry_run,omitempty"`
}

// historyPage is the answer of GET /api/history.
type historyPage struct {
	Entries []store.HistoryEntry `json:"entries"`
	// Next, when set, is the before= of the next (older) page.
	Next string `json:"next,omitempty"`
}

// portAt answers GET /api/history?port=N&at=TIME[&proto=P]: who held
// port N then. Without proto it is tcp's answer, with the udp space's in
// UDP when the udp space knows anything of N then.
type portAt struct {
	Port  int         `json:"port"`
	Proto store.Space `json:"proto"`
	At    time.Time   `json:"at"`
	// Held says a key held it; Key and User name it. Known is false when
	// neither the history nor today's allocations say anything of it then.
	Held  bool                `json:"held"`
	Known bool                `json:"known"`
	Key   string              `json:"key,omitempty"`
	User  string              `json:"user,omitempty"`
	Entry *store.HistoryEntry `json:"entry,omitempty"` // the change that decided it
	UDP   *portAt             `json:"udp,omitempty"`
}

// serveHistory answers history queries, newest first, paged.
func (s *server) serveHistory(w http.ResponseWriter, r *http.Request) {
	if s.history == nil {
		writeError(w, http.StatusNotFound, "this store keeps no history")
		return
	}
	q := r.URL.Query()
	var hq store.HistoryQuery
	var err error
	bad := func(msg string) { writeError(w, http.StatusBadRequest, msg) }
	if v := q.Get("port"); v != "" {
		if hq.Port, err = strconv.Atoi(v); err != nil || hq.Port < 1 || hq.Port > maxPort {
			bad("port must be 1-65535")
			return
		}
	}
	if hq.Space, err = store.ParseSpace(q.Get("proto")); err != nil {
		bad("proto: " + err.Error())
		return
	}
	hq.Key, hq.User, hq.Before = q.Get("key"), q.Get("user"), q.Get("before")
	for name, dst := range map[string]*time.Time{"since": &hq.Since, "until": &hq.Until} {
		if v := q.Get(name); v != "" {
			if *dst, err = parseWhen(v, time.Now()); err != nil {
				bad(name + ": " + err.Error())
				return
			}
		}
	}
	hq.Limit = 100
	if v := q.Get("limit"); v != "" {
		if hq.Limit, err = strconv.Atoi(v); err != nil || hq.Limit < 1 || hq.Limit > 1000 {
			bad("limit must be 1-1000")
			return
		}
	}
	if v := q.Get("at"); v != "" {
		if hq.Port == 0 {
			bad("at needs port")
			return
		}
		at, err := parseWhen(v, time.Now())
		if err != nil {
			bad("at: " + err.Error())
			return
		}
		var ans portAt
		if hq.Space != "" {
			ans, err = s.portAt(r.Context(), store.Slot{Space: hq.Space, Port: hq.Port}, at)
		} else if ans, err = s.portAt(r.Context(), store.TCPPort(hq.Port), at); err == nil {
			var udp portAt
			if udp, err = s.portAt(r.Context(), store.UDPPort(hq.Port), at); udp.Known {
				ans.UDP = &udp
			}
		}
		if err != nil {
			writeError(w, http.StatusServiceUnavailable, "history unreadable: "+err.Error())
			return
		}
		writeValue(w, http.StatusOK, ans)
		return
	}
	hq.Limit++ // one more tells whether a next page exists
	got, err := s.history.Entries(r.Context(), hq)
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, "history unreadable: "+err.Error())
		return
	}
	page := historyPage{Entries: got}
	if len(got) == hq.Limit {
		page.Entries = got[:hq.Limit-1]
		page.Next = page.Entries[len(page.Entries)-1].ID
	}
	if page.Entries == nil {
		page.Entries = []store.HistoryEntry{}
	}
	writeValue(w, http.StatusOK, page)
}

// portAt works out who held slot at t: the last change of the slot at or
// before t, else today's holder if it got the port before t.
func (s *server) portAt(ctx context.Context, slot store.Slot, t time.Time) (portAt, error) {
	ans := portAt{Port: slot.Port, Proto: slot.Space, At: t.UTC()}
	e, held, ok, err := history.HolderAt(ctx, s.history, slot, t)
	if err != nil {
		return ans, err
	}
	if ok {
		ans.Known, ans.Held, ans.Entry = true, held, &e
		if held {
			ans.Key, ans.User = e.Key, e.User
		}
		return ans, nil
	}
	for _, v := range s.alloc.atPort(slot.Port, slot.Space) {
		if v.Key != "" && !v.AssignedAt.After(t) {
			ans.Known, ans.Held, ans.Key, ans.User = true, true, v.Key, v.User
		}
	}
	return ans, nil
}

// parseWhen reads a time as operators write it: RFC 3339, or a local
// "2006-01-02 15:04[:05]", or a date (its midnight, local time). Go's zero
// time (0001-01-01 UTC) is refused: a history query reads it as no bound.
func parseWhen(v string, now time.Time) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02T15:04", "2006-01-02 15:04", "2006-01-02"} {
		if t, err := time.ParseInLocation(layout, v, now.Location()); err == nil {
			if t.IsZero() {
				return t, fmt.Errorf("%q is the zero time (0001-01-01 00:00 UTC), which would mean no bound: give a real time", v)
			}
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is not a time (want 2026-03-03 14:05, or RFC 3339)", v)
}

// serveEvents streams every change as server-sent events ("data: {entry}").
// A client that reads too slowly is cut off; it reconnects and reads what
// it missed from /api/history (each event's id is the entry's).
func (s *server) serveEvents(w http.ResponseWriter, r *http.Request) {
	ch, cancel, err := s.events.subscribe()
	if err != nil {
		w.Header().Set("Retry-After", "5")
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	defer cancel()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	// The server's WriteTimeout ends ordinary answers; a stream lives on,
	// as long as each write goes out within a while.
	extend := func() { rc.SetWriteDeadline(time.Now().Add(30 * time.Second)) }
	extend()
	io.WriteString(w, ": frp-port-keeper events\n\n")
	if rc.Flush() != nil {
		return
	}
	keepalive := time.NewTicker(15 * time.Second)
	defer keepalive.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-keepalive.C:
			extend()
			if _, err := io.WriteString(w, ": keepalive\n\n"); err != nil || rc.Flush() != nil {
				return
			}
		case e, open := <-ch:
			if !open {
				return
			}
			data, _ := json.Marshal(e)
			extend()
			if _, err := fmt.Fprintf(w, "id: %s\nevent: change\ndata: %s\n\n", e.ID, data); err != nil || rc.Flush() != nil {
				return
			}
		}
	}
}
