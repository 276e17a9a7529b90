package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"
)

// fuzzCaptures are the real frps requests the fuzzers start from.
var fuzzCaptures = []string{"testdata/frps-v0.65.0.jsonl", "testdata/frps-v0.51.3.jsonl"}

// capturedBodies returns the body and op of every captured request.
func capturedBodies(t testing.TB) (bodies [][]byte, ops []string) {
	t.Helper()
	for _, path := range fuzzCaptures {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var c struct {
				Path string          `json:"path"`
				Body json.RawMessage `json:"body"`
			}
			if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
				f.Close()
				t.Fatalf("%s: %v", path, err)
			}
			op := ""
			if u, err := url.Parse(c.Path); err == nil {
				op = u.Query().Get("op")
			}
			bodies = append(bodies, c.Body)
			ops = append(ops, op)
		}
		err = sc.Err()
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
	}
	if len(bodies) == 0 {
		t.Fatal("no captured requests")
	}
	return bodies, ops
}

// fuzzHostileSeeds are hand-made requests at the edges of the protocol.
var fuzzHostileSeeds = []string{
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a.b","proxy_type":"tcp"}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a.b","proxy_type":"tcp","remote_port":30001}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a.b","proxy_type":"udp","remote_port":-1}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a.b","proxy_type":"tcp","remote_port":"1"}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a.b","proxy_type":"tcp","Remote_Port":5,"remote_port":6}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy\u005fname":"a\u0000/..","proxy_type":"tcp","remote\u005fport":1}}`,
	`{"op":"NewProxy","content":{"user":{"user":"\ud800"},"proxy_name":"` + "\xff\xfe" + `","proxy_type":"tcp","x":[[[{"}":"]"}]]]}}`,
	`{"op":"NewProxy","content":{ }}`,
	`{"op":"NewProxy","content":{"user":{"user":""},"proxy_name":"g","proxy_type":"tcp","group":"grp","group":null}}`,
	" {\"OP\" : \"NewProxy\" , \"CONTENT\" : {\"USER\":{\"USER\":\"a\"} ,\"PROXY_NAME\":\"a\",\"PROXY_TYPE\":\"tcp\" } } ",
	`{"op":"Login","content":{"user":"a"}}`,
	`{"op":"NewProxy","content":null}`,
	`{"content":{"user":{"user":"a"},"proxy_name":"a","proxy_type":"tcp"},"content":[]}`,
	`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a","proxy_type":"tcp","remote_port":1e3}}`,
	`{"op":"NewProxy","content":{"user":{"user":"a"},"proxy_name":"a","proxy_type":"tcp","remote_port":99999999999999999999}}`,
	``,
	`null`,
	"\xef\xbb\xbf{}",
}

const fuzzPort = 12345

// FuzzPluginRequest: decoding never panics; an allowing answer built from a
// decoded NewProxy is valid JSON that keeps every content member but
// remote_port byte for byte; the whole handler answers 200, 400 or 413
// with JSON.
func FuzzPluginRequest(f *testing.F) {
	bodies, ops := capturedBodies(f)
	for i := range bodies {
		f.Add(bodies[i], ops[i])
	}
	for _, s := range fuzzHostileSeeds {
		f.Add([]byte(s), "NewProxy")
	}
	pool, _ := parsePorts("31000-31007")
	a := newTestAllocator(f, f.TempDir(), "31000-31007", allocatorOptions{log: slog.New(slog.DiscardHandler)})
	h := newServer(a, slog.New(slog.DiscardHandler), serverOptions{})

	f.Fuzz(func(t *testing.T, body []byte, op string) {
		req, err := decodePluginRequest(body, op)
		if err == nil && req.op == "NewProxy" && req.hasPort {
			checkAllowedAnswer(t, req.rawContent)
		}

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
			if err != nil || !req.hasPort {
				t.Fatalf("allowing answer %q for a request decodePluginRequest refused (%v, hasPort %v)", rec.Body, err, req.hasPort)
			}
		}
	})
}

// checkAllowedAnswer checks appendAllowed's answer for content.
func checkAllowedAnswer(t *testing.T, content []byte) {
	t.Helper()
	out := appendAllowed(nil, content, fuzzPort)
	if !json.Valid(out) {
		t.Fatalf("appendAllowed(%q): %q is not valid JSON", content, out)
	}
	var ans struct {
		Reject   *bool           `json:"reject"`
		Unchange *bool           `json:"unchange"`
		Content  json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal(out, &ans); err != nil {
		t.Fatalf("appendAllowed(%q) = %q: %v", content, out, err)
	}
	if ans.Reject == nil || *ans.Reject || ans.Unchange == nil || *ans.Unchange {
		t.Fatalf("appendAllowed(%q) = %q: want reject and unchange false", content, out)
	}
	var port struct {
		RemotePort *int `json:"remote_port"`
	}
	if err := json.Unmarshal(ans.Content, &port); err != nil || port.RemotePort == nil || *port.RemotePort != fuzzPort {
		t.Fatalf("appendAllowed(%q) content %q: remote_port %v (%v); want %d", content, ans.Content, ptrString(port.RemotePort), err, fuzzPort)
	}
	// Every member named remote_port in any case and spelling is the port.
	var members map[string]json.RawMessage
	json.Unmarshal(ans.Content, &members)
	for k, v := range members {
		if strings.EqualFold(k, "remote_port") && string(v) != "12345" {
			t.Fatalf("appendAllowed(%q): member %q = %s; want %d", content, k, v, fuzzPort)
		}
	}
	if err := sameContentExceptPort(content, ans.Content); err != nil {
		t.Fatalf("appendAllowed(%q) = %q: %v", content, out, err)
	}
}

func ptrString(p *int) string {
	if p == nil {
		return "absent"
	}
	b, _ := json.Marshal(*p)
	return string(b)
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
