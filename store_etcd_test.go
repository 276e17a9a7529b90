package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/etcd"
	"frp-port-keeper/internal/store/storetest"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestStoreContractEtcd runs the store contract on a real etcd, each case
// under a prefix of its own.
func TestStoreContractEtcd(t *testing.T) {
	srv := startEtcd(t, nil)
	var n atomic.Int64
	storetest.Run(t, storetest.Backend{Kind: "etcd", Shared: true,
		Compact: func(t testing.TB, s store.Store) { compactForTest(t, s.(*etcd.Store)) },
		New: func(t *testing.T) func(t *testing.T) store.Store {
			prefix := fmt.Sprintf("/contract-%d/", n.Add(1))
			return func(t *testing.T) store.Store {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s, err := etcd.Open(ctx, srv.options(t, prefix))
				if err != nil {
					t.Fatal(err)
				}
				return s
			}
		}})
}

// openLoadedEtcdStores opens n handles on one prefix and loads each.
func openLoadedEtcdStores(t *testing.T, srv *etcdServer, prefix string, n int) []*etcd.Store {
	t.Helper()
	var out []*etcd.Store
	for range n {
		s := openTestEtcdStore(t, srv, prefix)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := s.Load(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		out = append(out, s)
	}
	return out
}

// etcdGet reads the raw value of name under prefix ("" when absent).
func etcdGet(t *testing.T, cli *clientv3.Client, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return ""
	}
	return string(resp.Kvs[0].Value)
}

// etcdCount is how many records lie under a prefix.
func etcdCount(t *testing.T, cli *clientv3.Client, prefix string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

// TestEtcdStoreConcurrentClaims: three handles (three servers sharing one
// etcd) claiming at once never give a port twice, a key two ports, or a
// user more keys than the quota.
func TestEtcdStoreConcurrentClaims(t *testing.T) {
	srv := startEtcd(t, nil)
	raw := srv.client(t)
	ctxFor := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 20*time.Second)
	}

	t.Run("30 keys, 10 ports", func(t *testing.T) {
		const lo, ports, keys = 21000, 10, 30
		handles := openLoadedEtcdStores(t, srv, "/pool/", 3)
		var mu sync.Mutex
		granted := map[string]int{} // key -> port
		var wg sync.WaitGroup
		for i := range keys {
			wg.Go(func() {
				s := handles[i%len(handles)]
				key := fmt.Sprintf("user%d.proxy", i)
				start := rand.IntN(ports)
				for j := range ports {
					r := storetest.Rec(key, lo+(start+j)%ports, fmt.Sprintf("user%d", i%4))
					ctx, cancel := ctxFor()
					_, err := s.Claim(ctx, store.Claim{Want: r})
					cancel()
					var cerr *store.ConflictError
					switch {
					case err == nil:
						mu.Lock()
						granted[key] = r.Port
						mu.Unlock()
						return
					case errors.As(err, &cerr):
						continue
					default:
						t.Errorf("claim %s@%d: %v", key, r.Port, err)
						return
					}
				}
			})
		}
		wg.Wait()
		if len(granted) != ports {
			t.Fatalf("granted %d keys: %v; want exactly %d (one per port)", len(granted), granted, ports)
		}
		owner := map[int]string{}
		for k, p := range granted {
			if other, dup := owner[p]; dup {
				t.Fatalf("port %d granted to %q and %q", p, other, k)
			}
			owner[p] = k
		}
		fresh := openLoadedEtcdStores(t, srv, "/pool/", 1)[0]
		ctx, cancel := ctxFor()
		defer cancel()
		snap, err := fresh.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(snap.Allocations) != ports || len(snap.Problems) != 0 {
			t.Fatalf("load after the race: %d allocations, problems %v; want %d and none", len(snap.Allocations), snap.Problems, ports)
		}
		for _, r := range snap.Allocations {
			if granted[r.Key] != r.Port {
				t.Fatalf("load after the race: %q on %d; it was granted %d", r.Key, r.Port, granted[r.Key])
			}
		}
		var total int
		for u := range 4 {
			n := etcdGet(t, raw, "/pool/"+etcd.UserName(fmt.Sprintf("user%d", u)))
			var c int
			fmt.Sscan(n, &c)
			total += c
		}
		if total != ports {
			t.Fatalf("user counts add up to %d; want %d", total, ports)
		}
	})

	t.Run("one key at three servers", func(t *testing.T) {
		handles := openLoadedEtcdStores(t, srv, "/same/", 3)
		for round := range 10 {
			key := fmt.Sprintf("shared.%d", round)
			var mu sync.Mutex
			var wins []store.Record
			var wg sync.WaitGroup
			for i, s := range handles {
				wg.Go(func() {
					r := storetest.Rec(key, 22000+round*10+i, "shared")
					ctx, cancel := ctxFor()
					defer cancel()
					_, err := s.Claim(ctx, store.Claim{Want: r})
					var cerr *store.ConflictError
					switch {
					case err == nil:
						mu.Lock()
						wins = append(wins, r)
						mu.Unlock()
					case errors.As(err, &cerr):
						if len(cerr.Current) == 0 || cerr.Current[0].Kind != store.ChangePut || cerr.Current[0].Key != key {
							t.Errorf("loser of %s: conflict %+v; want the winner's record", key, cerr.Current)
						}
					default:
						t.Errorf("claim %s: %v", key, err)
					}
				})
			}
			wg.Wait()
			if len(wins) != 1 {
				t.Fatalf("%s: %d winners %+v; want exactly 1", key, len(wins), wins)
			}
		}
		if n := etcdCount(t, raw, "/same/port/"); n != 10 {
			t.Fatalf("%d port records; want 10 (one per key, none left by losers)", n)
		}
		if got := etcdGet(t, raw, "/same/"+etcd.UserName("shared")); got != "10" {
			t.Fatalf("user count %q; want 10", got)
		}
	})

	t.Run("quota across servers", func(t *testing.T) {
		const limit, tries = 5, 15
		handles := openLoadedEtcdStores(t, srv, "/quota/", 3)
		var ok, quota atomic.Int64
		var wg sync.WaitGroup
		for i := range tries {
			wg.Go(func() {
				r := storetest.Rec(fmt.Sprintf("greedy.%d", i), 23000+i, "greedy")
				ctx, cancel := ctxFor()
				defer cancel()
				_, err := handles[i%3].Claim(ctx, store.Claim{Want: r, MaxKeys: limit})
				var cerr *store.ConflictError
				switch {
				case err == nil:
					ok.Add(1)
				case errors.As(err, &cerr) && cerr.Quota:
					quota.Add(1)
				default:
					t.Errorf("claim %s: %v; want success or a quota conflict", r.Key, err)
				}
			})
		}
		wg.Wait()
		if ok.Load() != limit || quota.Load() != tries-limit {
			t.Fatalf("%d granted, %d refused by quota; want %d and %d", ok.Load(), quota.Load(), limit, tries-limit)
		}
		if n := etcdCount(t, raw, "/quota/key/"); n != limit {
			t.Fatalf("%d key records; want %d", n, limit)
		}
		if got := etcdGet(t, raw, "/quota/"+etcd.UserName("greedy")); got != fmt.Sprint(limit) {
			t.Fatalf("user count %q; want %d", got, limit)
		}
	})
}

// TestEtcdStoreOutage: while etcd is stopped (SIGSTOP) or dead, store calls
// fail within their deadline; once it is back, writes work again within
// about a second on the same handle, and a write whose caller gave up but
// that etcd applied late is delivered by watch.
func TestEtcdStoreOutage(t *testing.T) {
	srv := startEtcd(t, nil)
	handles := openLoadedEtcdStores(t, srv, "/outage/", 2)
	s, other := handles[0], handles[1]

	ctx0, cancel0 := context.WithTimeout(context.Background(), 10*time.Second)
	snap, err := other.Load(ctx0)
	cancel0()
	if err != nil {
		t.Fatal(err)
	}
	h := storetest.NewHarness(t, "etcd")
	w := h.StartWatch(other, snap.Rev)
	// delivered are the puts the watch delivered so far, by key.
	delivered := map[string]store.Record{}
	// waitPut waits for the watch to deliver a put of r (in whatever order
	// with other puts).
	waitPut := func(what string, r store.Record) {
		t.Helper()
		for {
			if got, ok := delivered[r.Key]; ok && store.SameRecord(got, r) {
				return
			}
			if c := w.Next(t, what); c.Kind == store.ChangePut {
				delivered[c.Key] = c.Rec
			}
		}
	}
	claimWithin := func(r store.Record, d time.Duration) (time.Duration, error) {
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		start := time.Now()
		_, err := s.Claim(ctx, store.Claim{Want: r})
		return time.Since(start), err
	}
	const deadline = 500 * time.Millisecond
	const slack = time.Second

	a := storetest.Rec("a.web", 24001, "a")
	if _, err := claimWithin(a, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitPut("claim before the outage", a)

	// Paused: the request reaches etcd's socket but is not answered.
	srv.pause(t)
	b := storetest.Rec("b.web", 24002, "b")
	took, err := claimWithin(b, deadline)
	if !errors.Is(err, store.ErrOutcomeUnknown) || took > deadline+slack {
		srv.resume(t)
		t.Fatalf("claim while etcd is paused = %v after %v; want errOutcomeUnknown within %v", err, took, deadline+slack)
	}
	t.Logf("claim while paused failed after %v: %v", took.Round(time.Millisecond), err)
	lctx, lcancel := context.WithTimeout(context.Background(), deadline)
	start := time.Now()
	_, err = s.Load(lctx)
	lcancel()
	if err == nil || time.Since(start) > deadline+slack || strings.Contains(err.Error(), "\n") {
		srv.resume(t)
		t.Fatalf("load while paused = %v after %v; want one line within %v", err, time.Since(start), deadline+slack)
	}
	srv.resume(t)
	resumed := time.Now()
	waitPut("the claim that timed out while paused, landing late", b)
	t.Logf("late write delivered by watch %v after SIGCONT", time.Since(resumed).Round(time.Millisecond))
	c := storetest.Rec("c.web", 24003, "c")
	if took, err := claimWithin(c, 5*time.Second); err != nil {
		t.Fatalf("claim after SIGCONT: %v", err)
	} else {
		t.Logf("first claim after SIGCONT took %v", took.Round(time.Millisecond))
	}

	// Dead: connections refused; the client keeps redialing.
	srv.kill(t)
	d := storetest.Rec("d.web", 24004, "d")
	took, err = claimWithin(d, deadline)
	if !errors.Is(err, store.ErrOutcomeUnknown) || took > deadline+slack {
		t.Fatalf("claim while etcd is down = %v after %v; want errOutcomeUnknown within %v", err, took, deadline+slack)
	}
	time.Sleep(2 * time.Second) // long enough for gRPC's redial backoff to grow
	srv.restart(t)
	healthy := time.Now()
	e := storetest.Rec("e.web", 24005, "e")
	var attempts int
	for {
		attempts++
		_, err := claimWithin(e, 300*time.Millisecond)
		var cerr *store.ConflictError
		if err == nil || (errors.As(err, &cerr) && len(cerr.Current) > 0 && store.SameRecord(cerr.Current[0].Rec, e)) {
			break // a timed-out attempt may have landed: then it is ours
		}
		if time.Since(healthy) > 10*time.Second {
			t.Fatalf("claims still fail %v after etcd is back: %v", time.Since(healthy), err)
		}
	}
	recovery := time.Since(healthy)
	t.Logf("writes recovered %v after etcd was healthy again (%d attempts)", recovery.Round(time.Millisecond), attempts)
	if recovery > 3*time.Second {
		t.Fatalf("writes recovered %v after etcd was back; want about a second", recovery)
	}
	waitPut("a claim after the restart, through the reconnected watch", e)

	// The claim made while etcd was down may have been lost with the
	// connection (it failed at once) or waited for the restart and landed:
	// whichever it was, watch and load agree.
	fresh := openLoadedEtcdStores(t, srv, "/outage/", 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	final, err := fresh.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(final.Allocations, func(r store.Record) bool { return r.Key == d.Key }) {
		t.Logf("the claim made while etcd was down landed after the restart")
		waitPut("the claim made while etcd was down, landing after its restart", d)
		storetest.WantAllocations(t, "after the outages", final, a, b, c, d, e)
	} else {
		t.Logf("the claim made while etcd was down was lost with its connection")
		storetest.WantAllocations(t, "after the outages", final, a, b, c, e)
		w.Quiet(t, "watch, for the lost claim", 300*time.Millisecond)
	}
}

// TestEtcdTLS: the store talks to an etcd that requires client
// certificates, and fails to start with one line when the certificates or
// URLs are wrong.
func TestEtcdTLS(t *testing.T) {
	pki := newEtcdTestPKI(t)
	srv := startEtcd(t, pki)
	h := storetest.NewHarness(t, "etcd")
	s := openTestEtcdStore(t, srv, "/tls/")
	h.Load(s)
	a := storetest.Rec("secure.web", 25001, "secure")
	h.ClaimOK(s, store.Claim{Want: a})
	h.Touch(s, store.SeenMark{Key: a.Key, Seen: storetest.Base, Online: true})
	other := openTestEtcdStore(t, srv, "/tls/")
	storetest.WantAllocations(t, "over TLS", h.Load(other), a)

	good := srv.options(t, "/tls/")
	good.Timeout = time.Second
	tests := []struct {
		name   string
		change func(o *etcd.Options)
		want   string
	}{
		{"no client certificate", func(o *etcd.Options) { o.CertFile, o.KeyFile = "", "" }, "cannot read from etcd at " + srv.endpoint() + ": no answer within 1s (" + srv.endpoint() + ": remote error: tls: certificate required)"},
		{"certificate of another CA", func(o *etcd.Options) { o.CertFile, o.KeyFile = pki.otherCert, pki.otherKey }, "tls: certificate required"},
		{"server not trusted", func(o *etcd.Options) { o.CAFile = pki.otherCAFile }, "certificate signed by unknown authority"},
		{"plain http with TLS files", func(o *etcd.Options) { o.Endpoints = []string{strings.Replace(srv.endpoint(), "https", "http", 1)} }, "use https://"},
		{"missing key file", func(o *etcd.Options) { o.KeyFile = "" }, "-etcd-cert and -etcd-key go together"},
		{"unreadable CA", func(o *etcd.Options) { o.CAFile = "/nonexistent/ca.pem" }, "-etcd-ca"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			tt.change(&o)
			start := time.Now()
			s, err := etcd.Open(context.Background(), o)
			if err == nil {
				s.Close()
				t.Fatalf("openEtcdStore(%s) succeeded; want an error", tt.name)
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") || time.Since(start) > o.Timeout+2*time.Second {
				t.Fatalf("openEtcdStore(%s) = %v after %v; want one line containing %q within %v", tt.name, err, time.Since(start), tt.want, o.Timeout)
			}
			t.Logf("%s: %v", tt.name, err)
		})
	}
}

// TestEtcdUnreachable: nothing listening is one clear line within the
// timeout (clientv3.New alone would succeed).
func TestEtcdUnreachable(t *testing.T) {
	ep := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	start := time.Now()
	s, err := etcd.Open(context.Background(), etcd.Options{Endpoints: []string{ep}, Timeout: time.Second, Log: testLogger(t)})
	if err == nil {
		s.Close()
		t.Fatal("openEtcdStore with nothing listening succeeded")
	}
	if !strings.Contains(err.Error(), "cannot read from etcd at "+ep+": no answer within 1s (dial tcp") || strings.Contains(err.Error(), "\n") || time.Since(start) > 3*time.Second {
		t.Fatalf("openEtcdStore with nothing listening = %v after %v; want one line naming %s within 1s", err, time.Since(start), ep)
	}
	t.Logf("%v", err)
}

// TestEtcdAuth: with etcd's authentication on, a user whose role may only
// read and write the prefix can do everything the store does.
func TestEtcdAuth(t *testing.T) {
	srv := startEtcd(t, nil)
	cli := srv.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const prefix = "/auth/"
	steps := []func() error{
		func() error { _, err := cli.UserAdd(ctx, "root", "root-secret"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.RoleAdd(ctx, "keeper"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctx, "keeper", prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := cli.UserAdd(ctx, "keeper", "keeper-secret"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "keeper", "keeper"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth set-up step %d: %v", i, err)
		}
	}
	o := srv.options(t, prefix)
	o.Username, o.Password = "keeper", "keeper-secret"
	s, err := etcd.Open(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	h := storetest.NewHarness(t, "etcd")
	w := h.StartWatch(s, h.Load(s).Rev)
	a := storetest.Rec("auth.web", 26001, "auth")
	h.ClaimOK(s, store.Claim{Want: a, MaxKeys: 3})
	h.Touch(s, store.SeenMark{Key: a.Key, Seen: storetest.Base, Online: true})
	if c := w.Next(t, "watch as keeper"); c.Kind != store.ChangePut || c.Key != a.Key {
		t.Fatalf("watch as keeper: %+v; want the put of %q", c, a.Key)
	}
	if _, err := h.Release(s, a, storetest.Base); err != nil {
		t.Fatal(err)
	}

	o.Password = "wrong"
	o.Timeout = 2 * time.Second
	if s, err := etcd.Open(ctx, o); err == nil {
		s.Close()
		t.Fatal("openEtcdStore with a wrong password succeeded")
	} else if !strings.Contains(err.Error(), "cannot log in to etcd") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("openEtcdStore with a wrong password = %v; want one line saying it cannot log in", err)
	}
	o.Password = "keeper-secret"
	o.Prefix = "/elsewhere/"
	if s, err := etcd.Open(ctx, o); err == nil {
		s.Close()
		t.Fatal("openEtcdStore outside the permitted prefix succeeded")
	} else {
		t.Logf("outside the permitted prefix: %v", err)
	}
}

// TestEtcdStoreLoadRepairsHandEdits: the store writes a key record and its
// port record together, so records without their twin were made by hand.
// load reports each, repairs what it can (in transactions guarded against
// concurrent change), never serves two keys on one port, and corrects user
// counts that disagree with the key records, so the quota stays exact.
func TestEtcdStoreLoadRepairsHandEdits(t *testing.T) {
	srv := startEtcd(t, nil)
	raw := srv.client(t)
	const prefix = "/hand/"
	h := storetest.NewHarness(t, "etcd")
	s := openTestEtcdStore(t, srv, prefix)
	h.Load(s)
	a, b := storetest.Rec("a.web", 27001, "u"), storetest.Rec("b.web", 27002, "u")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := storetest.Rec("c.web", a.Port, "v")
	cJSON, _ := json.Marshal(c)
	edits := []clientv3.Op{
		clientv3.OpPut(prefix+etcd.UserName("u"), "7"),         // wrong count
		clientv3.OpPut(prefix+etcd.UserName("nobody"), "3"),    // a count without keys
		clientv3.OpDelete(prefix + etcd.PortName(b.Port)),      // b's port record lost
		clientv3.OpPut(prefix+etcd.KeyName("junk"), "{broken"), // not a record
		clientv3.OpPut(prefix+etcd.PortName(27009), "ghost.web"),
		clientv3.OpPut(prefix+etcd.KeyName(c.Key), string(cJSON)), // on a's port
	}
	if _, err := raw.Txn(ctx).Then(edits...).Commit(); err != nil {
		t.Fatal(err)
	}
	snap := h.Load(openTestEtcdStore(t, srv, prefix))
	storetest.WantAllocations(t, "after hand edits", snap, a, b)
	want := []string{
		`key/junk: not a valid allocation; ignored`,
		`port/27009: named "ghost.web", which does not hold it; removed`,
		`key/b.web: the record of port 27002 was missing; rebuilt`,
		`key/c.web: port 27001 belongs to "a.web"; ignored`,
		`user/u: counted 7 keys but 2 exist; corrected`,
		`user/nobody: counted 3 keys but 0 exist; corrected`,
		`user/v: counted 0 keys but 1 exist; corrected`,
	}
	slices.Sort(want)
	got := slices.Sorted(slices.Values(snap.Problems))
	if !slices.Equal(got, want) {
		t.Fatalf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for name, want := range map[string]string{
		etcd.PortName(b.Port): b.Key, etcd.PortName(27009): "",
		etcd.UserName("u"): "2", etcd.UserName("nobody"): "", etcd.UserName("v"): "1",
	} {
		if got := etcdGet(t, raw, prefix+name); got != want {
			t.Errorf("%s after load = %q; want %q", name, got, want)
		}
	}
	snap = h.Load(openTestEtcdStore(t, srv, prefix))
	storetest.WantAllocations(t, "second load", snap, a, b)
	if len(snap.Problems) != 2 {
		t.Fatalf("second load: problems %q; want only the two it cannot repair (junk, c.web)", snap.Problems)
	}
}

// TestEtcdStoreTouchBatches: more marks than etcd takes in one transaction
// are written in several; marks of keys without a record are skipped.
func TestEtcdStoreTouchBatches(t *testing.T) {
	srv := startEtcd(t, nil)
	h := storetest.NewHarness(t, "etcd")
	s := openTestEtcdStore(t, srv, "/touch/")
	h.Load(s)
	const keys, ghosts = 2*etcd.MaxTxnOps + 10, 50
	var marks []store.SeenMark
	for i := range keys {
		r := storetest.Rec(fmt.Sprintf("k%03d", i), 28000+i, "u")
		h.ClaimOK(s, store.Claim{Want: r})
		marks = append(marks, store.SeenMark{Key: r.Key, Seen: storetest.Base.Add(time.Duration(i) * time.Second), Online: i%2 == 0})
	}
	for i := range ghosts {
		marks = append(marks, store.SeenMark{Key: fmt.Sprintf("ghost%d", i), Seen: storetest.Base, Online: true})
	}
	h.Touch(s, marks...)
	snap := h.Load(openTestEtcdStore(t, srv, "/touch/"))
	if len(snap.LastSeen) != keys {
		t.Fatalf("after touching %d keys and %d ghosts: %d last-seen times; want %d", keys, ghosts, len(snap.LastSeen), keys)
	}
	for _, m := range marks[:keys] {
		if !snap.LastSeen[m.Key].Equal(m.Seen) || snap.Online[m.Key] != m.Online {
			t.Fatalf("%s: last seen %v online %v; want %v %v", m.Key, snap.LastSeen[m.Key], snap.Online[m.Key], m.Seen, m.Online)
		}
	}
	if n := etcdCount(t, srv.client(t), "/touch/seen/"); n != keys {
		t.Fatalf("%d seen records; want %d (none for ghosts)", n, keys)
	}
}

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
			srv := startEtcd(t, nil)
			raw := srv.client(t)
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

			srv.wipe(t, tc.token)
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
				clientv3.OpPut(prefix+etcd.KeyName(intruder.Key), string(ij)), clientv3.OpPut(prefix+etcd.PortName(c.Port), intruder.Key),
				clientv3.OpPut(prefix+etcd.UserName("w"), "1"),
				clientv3.OpPut(prefix+etcd.KeyName(d.Key), string(dj)), clientv3.OpPut(prefix+etcd.PortName(d2.Port), d.Key),
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
				etcd.PortName(a.Port): a.Key, etcd.PortName(b.Port): b.Key, etcd.PortName(c.Port): intruder.Key,
				etcd.PortName(d.Port): "", etcd.PortName(d2.Port): d.Key,
				etcd.UserName("u"): "2", etcd.UserName("v"): "1", etcd.UserName("w"): "1",
			} {
				if got := etcdGet(t, raw, prefix+name); got != want {
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

// historyAt is an entry of key on port at when.
func historyAt(when time.Time, key string, port int) store.HistoryEntry {
	return store.HistoryEntry{ID: fmt.Sprintf("%019d-x-%06d", when.UnixNano(), port), Time: when, Key: key, Port: port, Change: store.HistNew}
}

// TestEtcdHistoryUnderPrefix: a server writes nothing outside -etcd-prefix
// (its history included), and the history is read, paged and pruned
// across the prefix and where earlier versions wrote it, newest first.
func TestEtcdHistoryUnderPrefix(t *testing.T) {
	srv := startEtcd(t, nil)
	raw := srv.client(t)
	const prefix = "/hl/"
	day := func(m time.Month, d int) time.Time { return time.Date(2025, m, d, 0, 0, 0, 0, time.UTC) }
	l1, n1, l2 := historyAt(day(1, 10), "old.one", 30051), historyAt(day(2, 10), "new.one", 30052), historyAt(day(3, 10), "old.two", 30051)
	putLegacyHistory(t, raw, prefix, l1)
	putLegacyHistory(t, raw, prefix, l2)

	s := startInProc(t, "-store", "etcd", "-etcd-endpoints", srv.endpoint(), "-etcd-prefix", prefix, "-probe=false", "-allow-ports", "30000-30099",
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
	if e, held, ok, err := history.HolderAt(ctx, log, 30051, day(2, 1)); err != nil || !ok || !held || e.Key != "old.one" {
		t.Fatalf("port 30051 on 1 February: %+v held %v known %v (%v); want old.one", e, held, ok, err)
	}
	if n, err := log.Prune(ctx, day(2, 20)); err != nil || n != 2 {
		t.Fatalf("prune before 20 February = %d, %v; want 2 (one of each layout)", n, err)
	}
	if got, err := log.Entries(ctx, old); err != nil || keys(got) != "old.two" {
		t.Fatalf("after pruning: %s, %v; want old.two", keys(got), err)
	}
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

// TestEtcdHistoryAuth: a user whose role may only read and write
// -etcd-prefix writes and reads the history (where earlier versions wrote
// it is skipped, not an error); one also granted reading there reads the
// entries earlier versions wrote.
func TestEtcdHistoryAuth(t *testing.T) {
	srv := startEtcd(t, nil)
	cli := srv.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const prefix, legacy = "/ah/", "/ah-history/"
	old := historyAt(time.Date(2025, 1, 10, 0, 0, 0, 0, time.UTC), "old.one", 30051)
	putLegacyHistory(t, cli, prefix, old)
	steps := []func() error{
		func() error { _, err := cli.UserAdd(ctx, "root", "root-secret"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.RoleAdd(ctx, "keeper"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctx, "keeper", prefix, clientv3.GetPrefixRangeEnd(prefix), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := cli.RoleAdd(ctx, "old-reader"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctx, "old-reader", legacy, clientv3.GetPrefixRangeEnd(legacy), clientv3.PermissionType(clientv3.PermRead))
			return err
		},
		func() error { _, err := cli.UserAdd(ctx, "keeper", "keeper-secret"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "keeper", "keeper"); return err },
		func() error { _, err := cli.UserAdd(ctx, "upgraded", "upgraded-secret"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "upgraded", "keeper"); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "upgraded", "old-reader"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth set-up step %d: %v", i, err)
		}
	}
	openAs := func(user, password string) store.HistoryLog {
		o := srv.options(t, prefix)
		o.Username, o.Password = user, password
		s, err := etcd.Open(ctx, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		if _, err := s.Load(ctx); err != nil {
			t.Fatal(err)
		}
		return s.History()
	}
	fresh := historyAt(time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC), "new.one", 30052)
	keeper := openAs("keeper", "keeper-secret")
	if err := keeper.Append(ctx, []store.HistoryEntry{fresh}); err != nil {
		t.Fatalf("history written as a user granted only %s: %v", prefix, err)
	}
	if got, err := keeper.Entries(ctx, store.HistoryQuery{}); err != nil || len(got) != 1 || got[0].Key != fresh.Key {
		t.Fatalf("history read as a user granted only %s: %+v, %v; want the new entry", prefix, got, err)
	}
	if n, err := keeper.Prune(ctx, time.Date(2025, 6, 1, 0, 0, 0, 0, time.UTC)); err != nil || n != 0 {
		t.Fatalf("prune as a user granted only %s = %d, %v; want 0, no error", prefix, n, err)
	}
	upgraded := openAs("upgraded", "upgraded-secret")
	if got, err := upgraded.Entries(ctx, store.HistoryQuery{}); err != nil || len(got) != 2 || got[0].Key != fresh.Key || got[1].Key != old.Key {
		t.Fatalf("history read by a user also granted reading %s: %+v, %v; want the new entry, then the old", legacy, got, err)
	}
}
