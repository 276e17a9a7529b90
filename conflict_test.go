package main

// Claims that lose a race to another instance sharing the store: every
// kind of claim goes back to its retry loop with the winner's state.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
)

// TestFillInLostRace: the first registration of a key an operator
// assigned fills in its details; when another instance took the key's
// port meanwhile, the device is not told the lost port.
func TestFillInLostRace(t *testing.T) {
	st := storetest.NewFake()
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	if _, err := a.assign("u.a", 30005, "", operatorChange{by: "test"}); err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	st.Rival(func(f *storetest.Fake) {
		f.Put(store.Record{Key: "other.x", Port: 30005, User: "other", ProxyName: "other.x", ProxyType: "tcp", CreatedAt: at, AssignedAt: at})
	})
	p, _ := mustAllocate(t, a, req("u", "u.a", "tcp"))
	if p == 30005 {
		t.Fatalf("u.a was told 30005, which other.x won at another instance")
	}
	if r, _, ok := a.lookup("u.a"); !ok || r.Port != p {
		t.Fatalf("u.a answered %d but memory holds %+v", p, r)
	}
	if r, _, ok := a.lookup("other.x"); !ok || r.Port != 30005 {
		t.Fatalf("the winner is not in memory: %+v", r)
	}
	if got, ok := st.Get("u.a"); !ok || got.Port != p {
		t.Fatalf("the store holds u.a as %+v; want it on the answered port %d", got, p)
	}
}

// TestPolicyReloadDuringConflicts: a SIGHUP's setPolicy while allocations
// lose quota races and reclaim ports reads no policy outside the lock (run
// with -race).
func TestPolicyReloadDuringConflicts(t *testing.T) {
	pool, _ := parsePorts("30000")
	pol, err := loadPolicy("", pool, 1, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	now, advance := fakeClock(time.Now())
	st := storetest.NewFake()
	a := newAllocatorOn(t, st, "30000", allocatorOptions{policy: pol, now: now})
	// Another instance gave user q its one key: every new key of q loses
	// the store's quota check while this instance's memory knows nothing.
	at := time.Now()
	st.Rival(func(f *storetest.Fake) {
		f.Put(store.Record{Key: "q.elsewhere", Port: 31000, User: "q", ProxyName: "q.elsewhere", ProxyType: "tcp", CreatedAt: at, AssignedAt: at})
	})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				a.setPolicy(pol)
			}
		}
	}()
	for i := range 50 {
		// The single port's holder is abandoned: a new key reclaims it,
		// unless it is q's, which loses the quota race first.
		advance(2 * time.Hour)
		if _, _, err := a.allocate(req("q", "q.k", "tcp")); err == nil || !strings.Contains(err.Error(), "quota") {
			t.Errorf("q.k at round %d: %v; want the quota", i, err)
		}
		// A read of the policy after the lock was let go stays unordered
		// with setPolicy until this goroutine takes the lock again: the
		// pause lets the race detector see the two overlap.
		time.Sleep(time.Millisecond)
		if p, _ := mustAllocate(t, a, req(fmt.Sprintf("r%d", i), fmt.Sprintf("r%d.k", i), "tcp")); p != 30000 {
			t.Errorf("round %d: port %d; want 30000 reclaimed", i, p)
		}
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
}

// TestSetNoteLostRace: a note set while another instance changed the key's
// record is retried on the new record; the admin API answers 200.
func TestSetNoteLostRace(t *testing.T) {
	st := storetest.NewFake()
	a := newAllocatorOn(t, st, "30000-30009", allocatorOptions{})
	p, _ := mustAllocate(t, a, req("u", "u.a", "tcp"))
	r, _, _ := a.lookup("u.a")
	st.Rival(func(f *storetest.Fake) {
		moved := r
		moved.Port, moved.AssignedAt = 30007, r.AssignedAt.Add(time.Second)
		f.Put(moved)
	})
	h := newServer(a, testLogger(t), serverOptions{})
	rec := httptest.NewRecorder()
	patch := httptest.NewRequest("PATCH", "/api/allocations/u.a", strings.NewReader(`{"note":"Alice's NAS"}`))
	patch.RemoteAddr = "127.0.0.1:5555"
	h.ServeHTTP(rec, patch)
	if rec.Code != http.StatusOK {
		t.Fatalf("PATCH note after another instance moved u.a from %d: %d %s; want 200", p, rec.Code, rec.Body)
	}
	var got apiAllocation
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil || got.Note != "Alice's NAS" || got.Port != 30007 {
		t.Fatalf("answer %s (%v); want the note on port 30007", rec.Body, err)
	}
	if s, ok := st.Get("u.a"); !ok || s.Note != "Alice's NAS" || s.Port != 30007 {
		t.Fatalf("store holds %+v; want the note on the winner's record", s)
	}
}
