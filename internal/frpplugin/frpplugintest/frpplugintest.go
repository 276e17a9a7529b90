// Package frpplugintest holds what the protocol's tests and fuzzers share:
// the requests real frps sent, and hand-made ones at the protocol's edges.
package frpplugintest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// CapturePath is the path of a captured request file, whatever the test's
// working directory.
func CapturePath(name string) string {
	_, here, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(here), "..", "testdata", name)
}

// captures are the real frps requests (frps v0.65.0 and v0.51.3 to a
// plugin, recorded on loopback) the fuzzers and replay tests start from,
// in internal/frpplugin/testdata.
var captures = []string{"frps-v0.65.0.jsonl", "frps-v0.51.3.jsonl"}

// Captures returns the body and op of every captured request.
func Captures(t testing.TB) (bodies [][]byte, ops []string) {
	t.Helper()
	for _, name := range captures {
		path := CapturePath(name)
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

// HostileSeeds are hand-made requests at the edges of the protocol.
var HostileSeeds = []string{
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

// SameContentExceptPort checks that every member of the answer's content
// but remote_port (any case) is the request content's member byte for
// byte, and that nothing was added or lost.
func SameContentExceptPort(reqContent, ansContent []byte) error {
	var req, ans map[string]json.RawMessage
	if err := json.Unmarshal(reqContent, &req); err != nil {
		return fmt.Errorf("request content: %v", err)
	}
	if err := json.Unmarshal(ansContent, &ans); err != nil {
		return fmt.Errorf("answer content: %v", err)
	}
	isPort := func(k string) bool { return strings.EqualFold(k, "remote_port") }
	for k, v := range req {
		if isPort(k) {
			continue
		}
		got, ok := ans[k]
		if !ok {
			return fmt.Errorf("content member %q: got none; want %.80s", k, v)
		}
		if !bytes.Equal(got, v) {
			return fmt.Errorf("content member %q: got %.80s; want %.80s", k, got, v)
		}
	}
	for k := range ans {
		if _, ok := req[k]; !ok && !isPort(k) {
			return fmt.Errorf("content member %q: got one; want none (not in the request)", k)
		}
	}
	return nil
}
