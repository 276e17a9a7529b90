package main

// Bounds every path keeps: notes of at most maxNoteBytes, and times that
// are times (not Go's zero time, which reads as "no bound").

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
	"frp-port-keeper/internal/testenv"
)

// adminRequest sends an admin request to h from loopback.
func adminRequest(h http.Handler, method, target, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, strings.NewReader(body))
	req.RemoteAddr = "127.0.0.1:5555"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// TestNoteBoundEverywhere: a note over 1,024 bytes is refused with 400
// naming the limit by POST /api/import (and so adopt), by the offline
// import, and by the allocator's assign and setNote themselves; nothing
// is written.
func TestNoteBoundEverywhere(t *testing.T) {
	st := storetest.NewFake()
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{})
	huge := strings.Repeat("n", 2<<20)
	file, _ := json.Marshal(exportFile{Allocations: []exportRecord{
		{Record: store.Record{Key: "u.a", Port: 30001, User: "u", ProxyName: "u.a", ProxyType: "tcp"}},
		{Record: store.Record{Key: "u.b", Port: 30002, User: "u", ProxyName: "u.b", ProxyType: "tcp", Note: huge}}}})
	for _, target := range []string{"/api/import", "/api/import?as=adopt"} {
		rec := adminRequest(h, "POST", target, string(file))
		if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "at most 1024 bytes") || !strings.Contains(rec.Body.String(), "u.b") {
			t.Errorf("POST %s with a 2 MB note: %d %.200s; want 400 naming u.b and the limit", target, rec.Code, rec.Body)
		}
	}
	if len(a.snapshot()) != 0 {
		t.Fatalf("a refused import wrote %+v", a.snapshot())
	}
	max := strings.Repeat("n", maxNoteBytes)
	ok, _ := json.Marshal(exportFile{Allocations: []exportRecord{{Record: store.Record{Key: "u.c", Port: 30003, User: "u", Note: max}}}})
	if rec := adminRequest(h, "POST", "/api/import", string(ok)); rec.Code != http.StatusOK {
		t.Fatalf("POST /api/import with a note of exactly the limit: %d %s", rec.Code, rec.Body)
	}
	over := max + "n"
	if _, err := a.assign("u.d", 30004, "", operatorChange{note: &over, by: "test"}); err == nil || !strings.Contains(err.Error(), "at most 1024 bytes") {
		t.Errorf("assign with a note over the limit: %v", err)
	}
	if _, err := a.setNote("u.c", over, "test"); err == nil || !strings.Contains(err.Error(), "at most 1024 bytes") {
		t.Errorf("setNote over the limit: %v", err)
	}
	if v, _ := a.find("u.c"); v.Note != max {
		t.Errorf("u.c's note changed by a refused setNote")
	}

	dir := t.TempDir()
	out, err := runImportOffline(t, string(file), "-data-dir", dir)
	if err == nil || !strings.Contains(err.Error(), "at most 1024 bytes") {
		t.Fatalf("offline import with a 2 MB note: %v\n%.300s; want it refused naming the limit", err, out)
	}
	if keys := storedKeys(t, dir); len(keys) != 0 {
		t.Fatalf("a refused offline import wrote %q", keys)
	}
}

// TestZeroTimeRefused: 0001-01-01 (Go's zero time) as until= or at= would
// read as "no bound" and answer today's holder: every history endpoint
// and CLI flag that takes a time refuses it with 400 and why.
func TestZeroTimeRefused(t *testing.T) {
	st := newTestStore(t, t.TempDir())
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{history: st.History()})
	zeros := []string{"0001-01-01T00:00:00Z", "0001-01-01T01:00:00%2B01:00", "0001-01-01T00:00:00.000Z"}
	if _, offset := time.Date(1, 1, 1, 0, 0, 0, 0, time.Local).Zone(); offset == 0 {
		zeros = append(zeros, "0001-01-01", "0001-01-01%2000:00", "0001-01-01T00:00", "0001-01-01%2000:00:00")
	}
	for _, z := range zeros {
		for _, query := range []string{"until=" + z, "since=" + z, "port=30000&at=" + z} {
			rec := adminRequest(h, "GET", "/api/history?"+query, "")
			if rec.Code != http.StatusBadRequest || !strings.Contains(rec.Body.String(), "zero time") {
				t.Errorf("GET /api/history?%s: %d %s; want 400 saying it is the zero time", query, rec.Code, rec.Body)
			}
		}
	}
	closed := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)) // the flag is refused before any request
	for _, flag := range []string{"-until", "-since", "-at"} {
		_, _, err := runCLI(nil, "history", "-port", "30000", flag, "0001-01-01T00:00:00Z", "-server", closed)
		if err == nil || !strings.HasPrefix(err.Error(), flag+": ") || !strings.Contains(err.Error(), "zero time") {
			t.Errorf("history %s 0001-01-01T00:00:00Z: %v; want it refused", flag, err)
		}
	}
	// A real time still answers.
	if rec := adminRequest(h, "GET", "/api/history?port=30000&at=2026-03-03T14:05:00Z", ""); rec.Code != http.StatusOK {
		t.Errorf("GET /api/history?port=30000&at=2026-03-03T14:05:00Z: %d %s", rec.Code, rec.Body)
	}
}
