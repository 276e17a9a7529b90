package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
	"frp-port-keeper/internal/testenv"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// udpRec is storetest.Rec of a udp proxy, whose port is in the udp space.
func udpRec(key string, port int, user string) store.Record {
	r := storetest.Rec(key, port, user)
	r.ProxyType = "udp"
	return r
}

// putRaw writes names (relative to prefix) and their values in one
// transaction, as another writer would.
func putRaw(t *testing.T, cli *clientv3.Client, prefix string, kv map[string]string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ops []clientv3.Op
	for name, value := range kv {
		ops = append(ops, clientv3.OpPut(prefix+name, value))
	}
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		t.Fatal(err)
	}
}

// recordJSON is r as a key record holds it.
func recordJSON(r store.Record) string {
	data, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	return string(data)
}

// wantRaw fails unless each name under prefix holds its value ("": absent).
func wantRaw(t *testing.T, what string, cli *clientv3.Client, prefix string, want map[string]string) {
	t.Helper()
	for name, v := range want {
		if got := testenv.EtcdGet(t, cli, prefix+name); got != v {
			t.Errorf("%s: %s = %q; want %q", what, name, got, v)
		}
	}
}

// nextPutOf waits for w to deliver a put of key, skipping other changes.
func nextPutOf(t *testing.T, w *storetest.Watcher, key, what string) store.Change {
	t.Helper()
	for {
		if c := w.Next(t, what); c.Kind == store.ChangePut && c.Key == key {
			return c
		}
	}
}

// waitPuts waits for w to deliver puts of every key, in any order.
func waitPuts(t *testing.T, w *storetest.Watcher, what string, keys ...string) {
	t.Helper()
	for len(keys) > 0 {
		if c := w.Next(t, what); c.Kind == store.ChangePut {
			keys = slices.DeleteFunc(keys, func(k string) bool { return k == c.Key })
		}
	}
}

// TestEtcdStoreLegacyLayoutLoads: etcd data of a version before tcp and
// udp were two spaces, where a udp key's port record is port/N, loads
// whole; its udp port records move to port/udp/N (one that an earlier
// version's load wrote back beside this version's goes), once, and the tcp
// slots of those numbers are free afterwards.
func TestEtcdStoreLegacyLayoutLoads(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/legacy/"
	dns := udpRec("a.dns", 30053, "u")
	web := storetest.Rec("b.web", 30054, "u")
	vpn := udpRec("c.vpn", 30055, "v")
	putRaw(t, raw, prefix, map[string]string{
		KeyName(dns.Key): recordJSON(dns), "port/30053": dns.Key,
		KeyName(web.Key): recordJSON(web), "port/30054": web.Key,
		// Written by this version, then port/N by an earlier version's load.
		KeyName(vpn.Key): recordJSON(vpn), "port/30055": vpn.Key, "port/udp/30055": vpn.Key,
		UserName("u"): "2", UserName("v"): "1",
		"freed/30056": storetest.Base.Format(time.RFC3339Nano),
	})

	h := storetest.NewHarness(t, "etcd")
	s := openTestStore(t, srv, prefix)
	snap := h.Load(s)
	storetest.WantAllocations(t, "the layout of an earlier version", snap, dns, web, vpn)
	if want := []string{"port/: moved 2 udp port records as earlier versions wrote them to port/udp/"}; !slices.Equal(snap.Problems, want) {
		t.Fatalf("problems %q; want %q", snap.Problems, want)
	}
	if at, ok := snap.Freed[store.TCPPort(30056)]; !ok || !at.Equal(storetest.Base) || len(snap.Freed) != 1 {
		t.Fatalf("freed %v; want 30056/tcp since %v", snap.Freed, storetest.Base)
	}
	wantRaw(t, "after the migration", raw, prefix, map[string]string{
		PortName(store.TCPPort(30053)): "", PortName(store.UDPPort(30053)): dns.Key,
		PortName(store.TCPPort(30054)): web.Key, PortName(store.UDPPort(30054)): "",
		PortName(store.TCPPort(30055)): "", PortName(store.UDPPort(30055)): vpn.Key,
	})
	snap = h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "the second load", snap, dns, web, vpn)
	if len(snap.Problems) != 0 {
		t.Fatalf("second load: problems %q; want none", snap.Problems)
	}

	// Each number's other slot is free.
	tcp, udp := storetest.Rec("d.web", dns.Port, "w"), udpRec("e.dns", web.Port, "w")
	h.ClaimOK(s, store.Claim{Want: tcp})
	h.ClaimOK(s, store.Claim{Want: udp})
	snap = h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "after claims of the other slots", snap, dns, web, vpn, tcp, udp)
	if len(snap.Problems) != 0 {
		t.Fatalf("load after claims of the other slots: problems %q; want none", snap.Problems)
	}
}

// TestEtcdStoreLegacyWrittenAfterLoad: an instance of an earlier version
// still running writes a udp key's port record as port/N after this one
// loaded. It holds N/udp here: a udp claim of N by another key is a
// conflict naming it. A tcp claim of N wins and moves it to port/udp/N in
// the same transaction, so the udp key keeps its slot. Releasing, updating,
// reclaiming or moving a udp key held so retires that port record.
func TestEtcdStoreLegacyWrittenAfterLoad(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/late/"
	h := storetest.NewHarness(t, "etcd")
	s := openTestStore(t, srv, prefix)
	w := h.StartWatch(s, h.Load(s).Rev)

	old, gone := udpRec("old.dns", 30153, "o"), udpRec("gone.dns", 30154, "o")
	self, victim, flip := udpRec("self.dns", 30155, "o"), udpRec("victim.dns", 30156, "o"), udpRec("flip.dns", 30157, "o")
	legacy := map[string]string{UserName("o"): "5"}
	for _, r := range []store.Record{old, gone, self, victim, flip} {
		legacy[KeyName(r.Key)], legacy[fmt.Sprintf("port/%05d", r.Port)] = recordJSON(r), r.Key
	}
	putRaw(t, raw, prefix, legacy)
	waitPuts(t, w, "the earlier version's claims", old.Key, gone.Key, self.Key, victim.Key, flip.Key)

	_, err := h.Claim(s, store.Claim{Want: udpRec("other.dns", old.Port, "x")})
	var cerr *store.ConflictError
	if !errors.As(err, &cerr) || len(cerr.Current) != 1 || !store.SameRecord(cerr.Current[0].Rec, old) {
		t.Fatalf("udp claim of %s = %v; want a conflict with %q's record", old.Slot(), err, old.Key)
	}

	tcp := storetest.Rec("new.web", old.Port, "n")
	h.ClaimOK(s, store.Claim{Want: tcp})
	if _, err := h.Release(s, gone, storetest.Base); err != nil {
		t.Fatalf("release of %q: %v", gone.Key, err)
	}
	noted := self
	noted.Note = "moved to its own name"
	h.ClaimOK(s, store.Claim{Want: noted, Old: &self})
	taker := udpRec("taker.dns", victim.Port, "x")
	h.ClaimOK(s, store.Claim{Want: taker, Victim: &victim})
	flipped := flip
	flipped.ProxyType = "tcp"
	h.ClaimOK(s, store.Claim{Want: flipped, Old: &flip, At: storetest.Base})
	at := storetest.Base.Format(time.RFC3339Nano)
	wantRaw(t, "after the writes", raw, prefix, map[string]string{
		PortName(tcp.Slot()): tcp.Key, PortName(old.Slot()): old.Key,
		PortName(store.TCPPort(gone.Port)): "", PortName(gone.Slot()): "", freedName(gone.Slot()): at,
		PortName(store.TCPPort(self.Port)): "", PortName(self.Slot()): self.Key,
		PortName(store.TCPPort(victim.Port)): "", PortName(victim.Slot()): taker.Key,
		PortName(flipped.Slot()): flip.Key, PortName(flip.Slot()): "", freedName(flip.Slot()): at,
	})
	snap := h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "after the writes", snap, old, tcp, noted, taker, flipped)
	if len(snap.Problems) != 0 {
		t.Fatalf("load after the writes: problems %q; want none", snap.Problems)
	}
}

// TestEtcdStoreSpacesAcrossInstances: two servers sharing etcd claim N/tcp
// and N/udp at once: both win, every round, and each hears of the other's
// record, in its space, through its watch.
func TestEtcdStoreSpacesAcrossInstances(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	const prefix = "/both/"
	h := storetest.NewHarness(t, "etcd")
	handles := openLoadedEtcdStores(t, srv, prefix, 2)
	var watches []*storetest.Watcher
	for _, s := range handles {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		snap, err := s.Load(ctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		watches = append(watches, h.StartWatch(s, snap.Rev))
	}
	var want []store.Record
	for round := range 10 {
		port := 30200 + round
		recs := []store.Record{storetest.Rec(fmt.Sprintf("t%d.web", round), port, "t"), udpRec(fmt.Sprintf("u%d.dns", round), port, "u")}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, s := range handles {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_, errs[i] = s.Claim(ctx, store.Claim{Want: recs[i]})
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: claim of %s by server %d: %v; want both spaces' claims to win", round, recs[i].Slot(), i, err)
			}
		}
		for i, w := range watches {
			other := recs[1-i]
			c := nextPutOf(t, w, other.Key, fmt.Sprintf("server %d, the other's claim", i))
			if c.Rec.Slot() != other.Slot() || !store.SameRecord(c.Rec, other) {
				t.Fatalf("server %d heard %+v on %s; want %+v on %s", i, c.Rec, c.Rec.Slot(), other, other.Slot())
			}
		}
		want = append(want, recs...)
	}
	snap := h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "after the rounds", snap, want...)
	if len(snap.Problems) != 0 {
		t.Fatalf("load after the rounds: problems %q; want none", snap.Problems)
	}
}

// TestEtcdStoreRestoreBothSpaces: after etcd lost its data, the write-back
// restores a tcp and a udp record of one number, each under its slot's
// name; the other server finds both present.
func TestEtcdStoreRestoreBothSpaces(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/lost2/"
	h := storetest.NewHarness(t, "etcd")
	s1 := openTestStore(t, srv, prefix)
	rev1 := h.Load(s1).Rev
	a, b, c := storetest.Rec("a.web", 31001, "u"), udpRec("b.dns", 31001, "u"), udpRec("c.dns", 31002, "v")
	for _, r := range []store.Record{a, b, c} {
		h.ClaimOK(s1, store.Claim{Want: r})
	}
	s2 := openTestStore(t, srv, prefix)
	snap2 := h.Load(s2)
	storetest.WantAllocations(t, "the second handle", snap2, a, b, c)
	var reports [2]chan store.RestoreReport
	for i, s := range []*Store{s1, s2} {
		reports[i] = make(chan store.RestoreReport, 4)
		s.OnRestore(func(r store.RestoreReport) { reports[i] <- r })
	}

	srv.Wipe(t, "")
	reset := func(w *storetest.Watcher, what string) store.Snapshot {
		t.Helper()
		for {
			if c := w.Next(t, what); c.Kind == store.ChangeReset {
				return *c.Reset
			}
		}
	}
	// s1 notices first (s2 has no watch yet, and asks etcd nothing).
	snap := reset(h.StartWatch(s1, rev1), "s1's write-back")
	storetest.WantAllocations(t, "the reset of s1", snap, a, b, c)
	snap = reset(h.StartWatch(s2, snap2.Rev), "s2's write-back")
	storetest.WantAllocations(t, "the reset of s2", snap, a, b, c)
	if r1, r2 := <-reports[0], <-reports[1]; r1 != (store.RestoreReport{Restored: 3}) || r2 != (store.RestoreReport{Present: 3}) {
		t.Fatalf("write-backs %+v and %+v; want all three restored by s1 and found present by s2", r1, r2)
	}
	wantRaw(t, "after the write-back", raw, prefix, map[string]string{
		PortName(a.Slot()): a.Key, PortName(b.Slot()): b.Key, PortName(c.Slot()): c.Key,
		PortName(store.TCPPort(c.Port)): "", UserName("u"): "2", UserName("v"): "1",
	})
	if n := testenv.EtcdCount(t, raw, prefix+"port/"); n != 3 {
		t.Fatalf("%d port records after the write-back; want 3", n)
	}
	if got := strings.Join(snap.Problems, "; "); got != "" {
		t.Fatalf("problems after the write-back: %s", got)
	}
}

// TestEtcdStoreLegacyConcurrentLoads: the servers of an upgraded fleet
// start at once on the layout of an earlier version, more udp keys than
// one migration transaction holds: each loads every allocation, whichever
// of them moved which port records.
func TestEtcdStoreLegacyConcurrentLoads(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/fleet/"
	const n = 3*etcdMigrateBatch + 5
	var recs []store.Record
	legacy := map[string]string{UserName("u"): fmt.Sprint(n)}
	for i := range n {
		r := udpRec(fmt.Sprintf("k%03d.dns", i), 32000+i, "u")
		recs = append(recs, r)
		legacy[KeyName(r.Key)], legacy[fmt.Sprintf("port/%05d", r.Port)] = recordJSON(r), r.Key
	}
	for chunk := range slices.Chunk(slices.Sorted(maps.Keys(legacy)), MaxTxnOps) {
		part := map[string]string{}
		for _, name := range chunk {
			part[name] = legacy[name]
		}
		putRaw(t, raw, prefix, part)
	}
	handles := make([]*Store, 4)
	for i := range handles {
		handles[i] = openTestStore(t, srv, prefix)
	}
	snaps := make([]store.Snapshot, len(handles))
	errs := make([]error, len(handles))
	var wg sync.WaitGroup
	for i, s := range handles {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			snaps[i], errs[i] = s.Load(ctx)
		})
	}
	wg.Wait()
	for i, snap := range snaps {
		if errs[i] != nil {
			t.Fatalf("load %d: %v", i, errs[i])
		}
		storetest.WantAllocations(t, fmt.Sprintf("load %d", i), snap, recs...)
		for _, p := range snap.Problems {
			if !strings.HasPrefix(p, "port/: moved ") {
				t.Errorf("load %d: problem %q; want none but moves", i, p)
			}
		}
	}
	if got := testenv.EtcdCount(t, raw, prefix+"port/udp/"); got != n {
		t.Fatalf("%d port records under port/udp/; want %d", got, n)
	}
	if got := testenv.EtcdCount(t, raw, prefix+"port/"); got != n {
		t.Fatalf("%d port records in all; want %d (none left under the tcp names)", got, n)
	}
}
