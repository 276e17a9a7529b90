package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/etcd"
	"frp-port-keeper/internal/store/storetest"
	"frp-port-keeper/internal/testenv"
)

// Tests of the server on the etcd store (the etcd store's own tests are in
// internal/store/etcd).

// TestEtcdOptionsFromFlags: the -etcd-* flags and their environment
// fallbacks reach etcdOptions.
func TestEtcdOptionsFromFlags(t *testing.T) {
	env := map[string]string{
		"FRP_PORT_KEEPER_ETCD_ENDPOINTS": " https://10.0.0.1:2379 ,https://10.0.0.2:2379,",
		"FRP_PORT_KEEPER_ETCD_PASSWORD":  "from-env",
	}
	c, err := parseConfig([]string{"-store", "etcd", "-etcd-prefix", "/pk/", "-etcd-ca", "ca.pem", "-etcd-cert", "c.pem", "-etcd-key", "k.pem", "-etcd-username", "keeper"},
		func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	got := etcdOptionsFrom(c, nil)
	want := etcd.Options{Endpoints: []string{"https://10.0.0.1:2379", "https://10.0.0.2:2379"}, Prefix: "/pk/",
		CAFile: "ca.pem", CertFile: "c.pem", KeyFile: "k.pem", Username: "keeper", Password: "from-env", Timeout: 2 * time.Second}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("etcdOptionsFrom = %+v; want %+v", got, want)
	}
	defaults, err := parseConfig(nil, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if d := etcdOptionsFrom(defaults, nil); !slices.Equal(d.Endpoints, []string{"http://127.0.0.1:2379"}) || d.Prefix != etcd.DefaultPrefix {
		t.Fatalf("default etcd options = %+v; want http://127.0.0.1:2379 under %s", d, etcd.DefaultPrefix)
	}
	if _, err := parseConfig([]string{"-etcd-username", "keeper"}, func(string) string { return "" }); err == nil ||
		err.Error() != "-etcd-username and -etcd-password go together" {
		t.Fatalf("parseConfig(-etcd-username only) = %v; want the pairing error", err)
	}
}

// TestEtcdStoreRestoreAfterDataLoss: etcd comes back with none of its data
// (the same cluster with its revision gone back, or another cluster whose
// revision is already past the old one) under two loaded handles, and a
// third writer is first on one held port and on one held key. The handle
// that notices refuses writes; each watch writes back what its handle
// held, create-if-absent: records written by the other handle are found
// present, the two the third writer took are lost, and the reset each
// watch delivers holds what etcd holds, user counts included.
func TestEtcdStoreRestoreAfterDataLoss(t *testing.T) {
	for _, tc := range []struct {
		name, token string
		pad         int // writes outside the prefix before the stores notice
	}{
		{"revision went back", "", 0},
		{"cluster ID changed", "another-cluster", 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := testenv.StartEtcd(t, nil)
			raw := srv.Client(t)
			const prefix = "/lost/"
			h := storetest.NewHarness(t, "etcd")
			s1 := openTestEtcdStore(t, srv, prefix)
			rev1 := h.Load(s1).Rev
			a, b := storetest.Rec("a.web", 28001, "u"), storetest.Rec("b.web", 28002, "u")
			c, d := storetest.Rec("c.web", 28003, "v"), storetest.Rec("d.web", 28004, "v")
			for _, r := range []store.Record{a, b, c, d} {
				h.ClaimOK(s1, store.Claim{Want: r})
			}
			alloc := newAllocatorOn(t, s1, "28001-28010", allocatorOptions{})
			s2 := openTestEtcdStore(t, srv, prefix)
			snap2 := h.Load(s2)
			storetest.WantAllocations(t, "the second handle", snap2, a, b, c, d)
			var reports [2]chan store.RestoreReport
			for i, s := range []*etcd.Store{s1, s2} {
				reports[i] = make(chan store.RestoreReport, 4)
				s.OnRestore(func(r store.RestoreReport) { reports[i] <- r })
			}

			srv.Wipe(t, tc.token)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for i := range tc.pad {
				if _, err := raw.Put(ctx, fmt.Sprintf("/pad/%d", i), "x"); err != nil {
					t.Fatal(err)
				}
			}
			// The third writer takes c's port and puts d on another port.
			intruder := storetest.Rec("intruder.web", c.Port, "w")
			d2 := storetest.Rec(d.Key, 28009, d.User)
			ij, _ := json.Marshal(intruder)
			dj, _ := json.Marshal(d2)
			if _, err := raw.Txn(ctx).Then(
				clientv3.OpPut(prefix+etcd.KeyName(intruder.Key), string(ij)), clientv3.OpPut(prefix+etcd.PortName(store.TCPPort(c.Port)), intruder.Key),
				clientv3.OpPut(prefix+etcd.UserName("w"), "1"),
				clientv3.OpPut(prefix+etcd.KeyName(d.Key), string(dj)), clientv3.OpPut(prefix+etcd.PortName(store.TCPPort(d2.Port)), d.Key),
				clientv3.OpPut(prefix+etcd.UserName("v"), "1"),
			).Commit(); err != nil {
				t.Fatal(err)
			}

			// s1 notices at its first answer, and refuses writes until
			// it has written back what it holds; sticky hits need none.
			_, _, err := alloc.allocate(frpplugin.Proxy{User: "u", ProxyName: "e.web", ProxyType: "tcp"})
			if reason := rejectReason(err); !strings.Contains(reason, "could not store the port allocation: the port store failed (the store lost its data and is being written back from memory); try again") {
				t.Fatalf("a new key after etcd lost its data: %v; reject reason %q", err, reason)
			} else {
				t.Logf("reject reason: %s", reason)
			}
			if port, how, err := alloc.allocate(frpplugin.Proxy{User: "u", ProxyName: a.Key, ProxyType: "tcp"}); port != a.Port || how != outcomeHit || err != nil {
				t.Fatalf("a held key after etcd lost its data = %d %s %v; want its port %d, a hit", port, how, err, a.Port)
			}
			e := storetest.Rec("e.web", 28005, "u")
			if _, err := h.Claim(s1, store.Claim{Want: e}); !errors.Is(err, store.ErrRestoring) {
				t.Fatalf("a new key's claim after etcd lost its data = %v; want errStoreRestoring", err)
			} else {
				t.Logf("claim refused: %v", err)
			}
			if _, err := h.Release(s1, a, storetest.Base); !errors.Is(err, store.ErrRestoring) {
				t.Fatalf("a release after etcd lost its data = %v; want errStoreRestoring", err)
			}

			after := func(w *storetest.Watcher, what string) store.Snapshot {
				t.Helper()
				for {
					if c := w.Next(t, what); c.Kind == store.ChangeReset {
						return *c.Reset
					}
				}
			}
			w1 := h.StartWatch(s1, rev1)
			storetest.WantAllocations(t, "the reset of the handle that noticed", after(w1, "s1's write-back"), a, b, intruder, d2)
			// s2 has not asked etcd anything: its check notices.
			w2 := h.StartWatch(s2, snap2.Rev)
			storetest.WantAllocations(t, "the reset of the other handle", after(w2, "s2's write-back"), a, b, intruder, d2)
			r1, r2 := <-reports[0], <-reports[1]
			t.Logf("s1 wrote back %+v; s2 %+v", r1, r2)
			if r1 != (store.RestoreReport{Restored: 2, Lost: 2}) || r2 != (store.RestoreReport{Present: 2, Lost: 2}) {
				t.Fatalf("write-backs %+v and %+v; want a and b restored by s1 and found present by s2, c and d lost at both", r1, r2)
			}
			for name, want := range map[string]string{
				etcd.PortName(store.TCPPort(a.Port)): a.Key, etcd.PortName(store.TCPPort(b.Port)): b.Key, etcd.PortName(store.TCPPort(c.Port)): intruder.Key,
				etcd.PortName(store.TCPPort(d.Port)): "", etcd.PortName(store.TCPPort(d2.Port)): d.Key,
				etcd.UserName("u"): "2", etcd.UserName("v"): "1", etcd.UserName("w"): "1",
			} {
				if got := testenv.EtcdGet(t, raw, prefix+name); got != want {
					t.Errorf("%s after the write-back = %q; want %q", name, got, want)
				}
			}
			// Writes work again, on what etcd holds now.
			h.ClaimOK(s1, store.Claim{Want: e})
			h.ClaimOK(s2, store.Claim{Want: storetest.Rec("f.web", d.Port, "v")})
			if _, err := h.Release(s2, a, storetest.Base); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestEtcdHistoryUnderPrefix: a server writes nothing outside -etcd-prefix
// (its history included), and the history is read, paged and pruned
// across the prefix and where earlier versions wrote it, newest first.
func TestEtcdHistoryUnderPrefix(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/hl/"
	day := func(m time.Month, d int) time.Time { return time.Date(2025, m, d, 0, 0, 0, 0, time.UTC) }
	l1, n1, l2 := historyAt(day(1, 10), "old.one", 30051), historyAt(day(2, 10), "new.one", 30052), historyAt(day(3, 10), "old.two", 30051)
	putLegacyHistory(t, raw, prefix, l1)
	putLegacyHistory(t, raw, prefix, l2)

	s := startInProc(t, "-store", "etcd", "-etcd-endpoints", srv.Endpoint(), "-etcd-prefix", prefix, "-probe=false", "-allow-ports", "30000-30099",
		"-history-keep", "0") // the 2025 entries stay
	for _, name := range []string{"a.x", "a.y", "b.z"} {
		if got := tryPost(s, strings.Split(name, ".")[0], name, ""); got.port == 0 {
			t.Fatalf("%s: %+v", name, got)
		}
	}
	req, _ := http.NewRequest("DELETE", s.url+"/api/allocations/a.y", nil)
	if resp, err := s.client.Do(req); err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE a.y: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	st := openTestEtcdStore(t, srv, prefix)
	log := st.History()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	waitFor(t, "the workload's history", 5*time.Second, func() bool {
		got, err := log.Entries(ctx, store.HistoryQuery{Since: day(6, 1)})
		return err == nil && len(got) == 4
	})
	if err := log.Append(ctx, []store.HistoryEntry{n1}); err != nil {
		t.Fatal(err)
	}
	all, err := raw.Get(ctx, "\x00", clientv3.WithFromKey(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var historyKeys int
	for _, kv := range all.Kvs {
		k := string(kv.Key)
		switch {
		case k == "/hl-history/"+l1.ID, k == "/hl-history/"+l2.ID: // written by hand, as before
		case !strings.HasPrefix(k, prefix):
			t.Errorf("%q is outside -etcd-prefix %s", k, prefix)
		case strings.HasPrefix(k, prefix+"history/"):
			historyKeys++
		}
	}
	if historyKeys != 5 {
		t.Errorf("%d history keys under %shistory/; want 5", historyKeys, prefix)
	}
	snap := loadEtcd(t, st)
	if len(snap.Problems) != 0 || len(snap.Allocations) != 2 {
		t.Fatalf("load with the history under the prefix: %d allocations, problems %q; want 2, none", len(snap.Allocations), snap.Problems)
	}

	keys := func(es []store.HistoryEntry) string {
		var ks []string
		for _, e := range es {
			ks = append(ks, e.Key)
		}
		return strings.Join(ks, ",")
	}
	old := store.HistoryQuery{Until: day(12, 31)}
	for _, tc := range []struct {
		q    store.HistoryQuery
		want string
	}{
		{old, "old.two,new.one,old.one"},
		{store.HistoryQuery{Until: day(12, 31), Limit: 2}, "old.two,new.one"},
		{store.HistoryQuery{Before: l2.ID, Limit: 1}, "new.one"},
		{store.HistoryQuery{Port: 30051, Until: day(12, 31)}, "old.two,old.one"},
	} {
		got, err := log.Entries(ctx, tc.q)
		if err != nil || keys(got) != tc.want {
			t.Fatalf("entries(%+v) = %s, %v; want %s", tc.q, keys(got), err, tc.want)
		}
	}
	if e, held, ok, err := history.HolderAt(ctx, log, store.TCPPort(30051), day(2, 1)); err != nil || !ok || !held || e.Key != "old.one" {
		t.Fatalf("port 30051 on 1 February: %+v held %v known %v (%v); want old.one", e, held, ok, err)
	}
	if n, err := log.Prune(ctx, day(2, 20)); err != nil || n != 2 {
		t.Fatalf("prune before 20 February = %d, %v; want 2 (one of each layout)", n, err)
	}
	if got, err := log.Entries(ctx, old); err != nil || keys(got) != "old.two" {
		t.Fatalf("after pruning: %s, %v; want old.two", keys(got), err)
	}
}

// etcdOptions are etcd.Options that reach srv (with its client certificate
// when it serves TLS) under prefix, logging to t.
func etcdOptions(t testing.TB, srv *testenv.EtcdServer, prefix string) etcd.Options {
	o := etcd.Options{Endpoints: []string{srv.Endpoint()}, Prefix: prefix, Timeout: 5 * time.Second, Log: testLogger(t)}
	if p := srv.TLS(); p != nil {
		o.CAFile, o.CertFile, o.KeyFile = p.CAFile, p.ClientCert, p.ClientKey
	}
	return o
}

// openTestEtcdStore opens an etcd store on srv under prefix and closes it
// in t.Cleanup.
func openTestEtcdStore(t testing.TB, srv *testenv.EtcdServer, prefix string) *etcd.Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := etcd.Open(ctx, etcdOptions(t, srv, prefix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// historyAt is an entry of key on port at when.
func historyAt(when time.Time, key string, port int) store.HistoryEntry {
	return store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", when.UnixNano(), port), Time: when, Key: key, Port: port, Change: store.HistNew}
}

// loadEtcd loads s.
func loadEtcd(t *testing.T, s *etcd.Store) store.Snapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap, err := s.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// putLegacyHistory writes e where versions before the history moved under
// the prefix wrote it: "<prefix without its slash>-history/<ID>".
func putLegacyHistory(t *testing.T, cli *clientv3.Client, prefix string, e store.HistoryEntry) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	data, _ := json.Marshal(e)
	if _, err := cli.Put(ctx, strings.TrimSuffix(prefix, "/")+"-history/"+e.ID, string(data)); err != nil {
		t.Fatal(err)
	}
}
