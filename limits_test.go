package main

// Bounds every path keeps: notes of at most maxNoteBytes, and times that
// are times (not Go's zero time, which reads as "no bound").

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
	store := newFakeStore()
	a := newAllocatorOn(t, store, "30000-30009", allocatorOptions{})
	h := newServer(a, testLogger(t), serverOptions{})
	huge := strings.Repeat("n", 2<<20)
	file, _ := json.Marshal(exportFile{Allocations: []exportRecord{
		{record: record{Key: "u.a", Port: 30001, User: "u", ProxyName: "u.a", ProxyType: "tcp"}},
		{record: record{Key: "u.b", Port: 30002, User: "u", ProxyName: "u.b", ProxyType: "tcp", Note: huge}}}})
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
	ok, _ := json.Marshal(exportFile{Allocations: []exportRecord{{record: record{Key: "u.c", Port: 30003, User: "u", Note: max}}}})
	if rec := adminRequest(h, "POST", "/api/import", string(ok)); rec.Code != http.StatusOK {
		t.Fatalf("POST /api/import with a note of exactly the limit: %d %s", rec.Code, rec.Body)
	}
	over := max + "n"
	if _, err := a.assign("u.d", 30004, operatorChange{note: &over, by: "test"}); err == nil || !strings.Contains(err.Error(), "at most 1024 bytes") {
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

