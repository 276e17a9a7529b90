package main

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/frpplugin/frpplugintest"
)

// FuzzPluginRequest: decoding never panics; an allowing answer built from a
// decoded NewProxy is valid JSON that keeps every content member but
// remote_port byte for byte; the whole handler answers 200, 400 or 413
// with JSON.
func FuzzPluginRequest(f *testing.F) {
	bodies, ops := frpplugintest.Captures(f)
	for i := range bodies {
		f.Add(bodies[i], ops[i])
	}
	for _, s := range frpplugintest.HostileSeeds {
		f.Add([]byte(s), "NewProxy")
	}
	pool, _ := parsePorts("31000-31007")
	a := newTestAllocator(f, f.TempDir(), "31000-31007", allocatorOptions{log: slog.New(slog.DiscardHandler)})
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})

	f.Fuzz(func(t *testing.T, body []byte, op string) {
		req, err := frpplugin.Decode(body, op)

		target := pluginPath + "?version=0.1.0&op=" + url.QueryEscape(op)
		hr := httptest.NewRequest(http.MethodPost, target, bytes.NewReader(body))
		hr.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, hr)
		switch rec.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		default:
			t.Fatalf("status %d; want 200, 400 or 413 (answer %q)", rec.Code, rec.Body)
		}
		if !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("answer %q: not valid JSON", rec.Body)
		}
		var ans struct {
			Reject   bool `json:"reject"`
			Unchange bool `json:"unchange"`
			Content  *struct {
				RemotePort *int `json:"remote_port"`
			} `json:"content"`
		}
		if err := json.Unmarshal(rec.Body.Bytes(), &ans); err != nil {
			t.Fatalf("answer %q: %v", rec.Body, err)
		}
		if rec.Code == http.StatusOK && !ans.Reject && !ans.Unchange {
			if ans.Content == nil || ans.Content.RemotePort == nil || !pool.has(*ans.Content.RemotePort) {
				t.Fatalf("allowing answer %q: want content.remote_port in 31000-31007", rec.Body)
			}
			if err != nil || !req.HasPort {
				t.Fatalf("allowing answer %q for a request decodePluginRequest refused (%v, hasPort %v)", rec.Body, err, req.HasPort)
			}
		}
	})
}

// FuzzParsePorts: parsePorts never panics, and what it accepts prints as a
// list that reads back as the same set.
func FuzzParsePorts(f *testing.F) {
	for _, s := range []string{
		"6000-7000,8080", "1", "65535", "1-65535", " 10 - 20 , 30 ", "0", "65536", "-1", "5-", "-5", "7-6",
		",", "1,,2", "", " ", "+5", "1-2-3", "00010", "6000-7000,6500-8000", "1,3,5,7-9,65534-65535", "\x00", "９",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, spec string) {
		set, err := parsePorts(spec)
		if err != nil {
			if set != nil {
				t.Fatalf("parsePorts(%q) = %v, %v; want nil with the error", spec, set.String(), err)
			}
			return
		}
		if set.len() == 0 {
			t.Fatalf("parsePorts(%q) accepted an empty set", spec)
		}
		if set.has(0) {
			t.Fatalf("parsePorts(%q) holds port 0", spec)
		}
		str := set.String()
		again, err := parsePorts(str)
		if err != nil {
			t.Fatalf("parsePorts(%q).String() = %q; parsing it again: %v", spec, str, err)
		}
		if *again != *set {
			t.Fatalf("parsePorts(%q).String() = %q reads back as %q; want the same set", spec, str, again.String())
		}
		if again.String() != str {
			t.Fatalf("String() is not canonical: %q then %q", str, again.String())
		}
	})
}
