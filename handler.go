package main

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
)

// maxBodyBytes bounds a plugin request; frps's largest NewProxy is a few KiB.
const maxBodyBytes = 1 << 20

// pluginPath is where frps is told to send its plugin calls.
const pluginPath = "/port-registrations"

// server is the HTTP surface: the plugin endpoint frps calls and the
// health check.
type server struct {
	alloc *allocator
	log   *slog.Logger
	bufs  sync.Pool // *bytes.Buffer, reused between requests
}

// newServer builds every route of the plugin in one place.
func newServer(alloc *allocator, log *slog.Logger) http.Handler {
	s := &server{alloc: alloc, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pluginPath, s.serveRegistration)
	mux.HandleFunc("GET /ping", s.servePing)
	return mux
}

func (s *server) servePing(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Write([]byte("pong"))
}

// serveRegistration answers frps's plugin calls: a port for tcp and udp
// NewProxy, "unchanged" for everything else.
func (s *server) serveRegistration(w http.ResponseWriter, r *http.Request) {
	buf, _ := s.bufs.Get().(*bytes.Buffer)
	if buf == nil {
		buf = new(bytes.Buffer)
	}
	defer func() {
		if buf.Cap() <= 64<<10 {
			buf.Reset()
			s.bufs.Put(buf)
		}
	}()
	log := s.log.With("reqid", r.Header.Get("X-Frp-Reqid"))
	if _, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, maxBodyBytes)); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			log.Warn("request refused", "outcome", "invalid", "reason", "body over 1 MiB")
			writeJSON(w, http.StatusRequestEntityTooLarge, []byte(`{"error":"TOOLARGE","message":"request body is over 1 MiB"}`))
			return
		}
		log.Warn("request refused", "outcome", "invalid", "reason", "body unreadable", "err", err)
		writeJSON(w, http.StatusBadRequest, answerInvalid)
		return
	}
	body := buf.Bytes()
	req, err := decodePluginRequest(body, r.URL.Query().Get("op"))
	if err != nil {
		log.Warn("request refused", "op", req.op, "outcome", "invalid", "reason", "not a valid plugin request")
		writeJSON(w, http.StatusBadRequest, answerInvalid)
		return
	}
	if req.op != "NewProxy" {
		log.Debug("passed through", "op", req.op, "outcome", "passthrough")
		writeJSON(w, http.StatusOK, answerUnchanged)
		return
	}
	p := req.proxy
	log = log.With("user", p.User, "proxy", p.ProxyName, "type", p.ProxyType)
	if !req.hasPort {
		log.Info("decision", "outcome", "passthrough")
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
		log.Warn("decision", "requested", p.RemotePort, "outcome", "rejected", "reason", reason, "err", err)
		writeJSON(w, http.StatusOK, rejectAnswer(reason))
		return
	}
	log.Info("decision", "port", port, "outcome", how)
	answer := appendAllowed(make([]byte, 0, len(req.rawContent)+64), req.rawContent, port)
	writeJSON(w, http.StatusOK, answer)
}

// rejectReason maps allocation errors to the reason frps shows the client.
// Store internals stay in the log.
func rejectReason(err error) string {
	var pe *portError
	var poolErr *poolError
	switch {
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

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	w.Write(body)
}
