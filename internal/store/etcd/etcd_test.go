package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
	"frp-port-keeper/internal/testenv"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// TestStoreContractEtcd runs the store contract on a real etcd, each case
// under a prefix of its own.
func TestStoreContractEtcd(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	var n atomic.Int64
	storetest.Run(t, storetest.Backend{Kind: "etcd", Shared: true,
		Compact: func(t testing.TB, s store.Store) { compact(t, s.(*Store)) },
		New: func(t *testing.T) func(t *testing.T) store.Store {
			prefix := fmt.Sprintf("/contract-%d/", n.Add(1))
			return func(t *testing.T) store.Store {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				s, err := Open(ctx, options(t, srv, prefix))
				if err != nil {
					t.Fatal(err)
				}
				return s
			}
		}})
}

// openLoadedEtcdStores opens n handles on one prefix and loads each.
func openLoadedEtcdStores(t *testing.T, srv *testenv.EtcdServer, prefix string, n int) []*Store {
	t.Helper()
	var out []*Store
	for range n {
		s := openTestStore(t, srv, prefix)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if _, err := s.Load(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		out = append(out, s)
	}
	return out
}

// TestEtcdStoreConcurrentClaims: three handles (three servers sharing one
// etcd) claiming at once never give a port twice, a key two ports, or a
// user more keys than the quota.
func TestEtcdStoreConcurrentClaims(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
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
			n := testenv.EtcdGet(t, raw, "/pool/"+UserName(fmt.Sprintf("user%d", u)))
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
		if n := testenv.EtcdCount(t, raw, "/same/port/"); n != 10 {
			t.Fatalf("%d port records; want 10 (one per key, none left by losers)", n)
		}
		if got := testenv.EtcdGet(t, raw, "/same/"+UserName("shared")); got != "10" {
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
		if n := testenv.EtcdCount(t, raw, "/quota/key/"); n != limit {
			t.Fatalf("%d key records; want %d", n, limit)
		}
		if got := testenv.EtcdGet(t, raw, "/quota/"+UserName("greedy")); got != fmt.Sprint(limit) {
			t.Fatalf("user count %q; want %d", got, limit)
		}
	})
}

// TestEtcdStoreOutage: while etcd is stopped (SIGSTOP) or dead, store calls
// fail within their deadline; once it is back, writes work again within
// about a second on the same handle, and a write whose caller gave up but
// that etcd applied late is delivered by watch.
func TestEtcdStoreOutage(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
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
	srv.Pause(t)
	b := storetest.Rec("b.web", 24002, "b")
	took, err := claimWithin(b, deadline)
	if !errors.Is(err, store.ErrOutcomeUnknown) || took > deadline+slack {
		srv.Resume(t)
		t.Fatalf("claim while etcd is paused = %v after %v; want errOutcomeUnknown within %v", err, took, deadline+slack)
	}
	t.Logf("claim while paused failed after %v: %v", took.Round(time.Millisecond), err)
	lctx, lcancel := context.WithTimeout(context.Background(), deadline)
	start := time.Now()
	_, err = s.Load(lctx)
	lcancel()
	if err == nil || time.Since(start) > deadline+slack || strings.Contains(err.Error(), "\n") {
		srv.Resume(t)
		t.Fatalf("load while paused = %v after %v; want one line within %v", err, time.Since(start), deadline+slack)
	}
	srv.Resume(t)
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
	srv.Kill(t)
	d := storetest.Rec("d.web", 24004, "d")
	took, err = claimWithin(d, deadline)
	if !errors.Is(err, store.ErrOutcomeUnknown) || took > deadline+slack {
		t.Fatalf("claim while etcd is down = %v after %v; want errOutcomeUnknown within %v", err, took, deadline+slack)
	}
	time.Sleep(2 * time.Second) // long enough for gRPC's redial backoff to grow
	srv.Restart(t)
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
	pki := testenv.NewEtcdPKI(t)
	srv := testenv.StartEtcd(t, pki)
	h := storetest.NewHarness(t, "etcd")
	s := openTestStore(t, srv, "/tls/")
	h.Load(s)
	a := storetest.Rec("secure.web", 25001, "secure")
	h.ClaimOK(s, store.Claim{Want: a})
	h.Touch(s, store.SeenMark{Key: a.Key, Seen: storetest.Base, Online: true})
	other := openTestStore(t, srv, "/tls/")
	storetest.WantAllocations(t, "over TLS", h.Load(other), a)

	good := options(t, srv, "/tls/")
	good.Timeout = time.Second
	tests := []struct {
		name   string
		change func(o *Options)
		want   string
	}{
		{"no client certificate", func(o *Options) { o.CertFile, o.KeyFile = "", "" }, "cannot read from etcd at " + srv.Endpoint() + ": no answer within 1s (" + srv.Endpoint() + ": remote error: tls: certificate required)"},
		{"certificate of another CA", func(o *Options) { o.CertFile, o.KeyFile = pki.OtherCert, pki.OtherKey }, "tls: certificate required"},
		{"server not trusted", func(o *Options) { o.CAFile = pki.OtherCAFile }, "certificate signed by unknown authority"},
		{"plain http with TLS files", func(o *Options) { o.Endpoints = []string{strings.Replace(srv.Endpoint(), "https", "http", 1)} }, "use https://"},
		{"missing key file", func(o *Options) { o.KeyFile = "" }, "-etcd-cert and -etcd-key go together"},
		{"unreadable CA", func(o *Options) { o.CAFile = "/nonexistent/ca.pem" }, "-etcd-ca"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := good
			tt.change(&o)
			start := time.Now()
			s, err := Open(context.Background(), o)
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
	ep := fmt.Sprintf("http://127.0.0.1:%d", testenv.FreePort(t))
	start := time.Now()
	s, err := Open(context.Background(), Options{Endpoints: []string{ep}, Timeout: time.Second, Log: slog.New(slog.NewTextHandler(t.Output(), nil))})
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
	srv := testenv.StartEtcd(t, nil)
	cli := srv.Client(t)
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
	o := options(t, srv, prefix)
	o.Username, o.Password = "keeper", "keeper-secret"
	s, err := Open(ctx, o)
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
	if s, err := Open(ctx, o); err == nil {
		s.Close()
		t.Fatal("openEtcdStore with a wrong password succeeded")
	} else if !strings.Contains(err.Error(), "cannot log in to etcd") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("openEtcdStore with a wrong password = %v; want one line saying it cannot log in", err)
	}
	o.Password = "keeper-secret"
	o.Prefix = "/elsewhere/"
	if s, err := Open(ctx, o); err == nil {
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
	srv := testenv.StartEtcd(t, nil)
	raw := srv.Client(t)
	const prefix = "/hand/"
	h := storetest.NewHarness(t, "etcd")
	s := openTestStore(t, srv, prefix)
	h.Load(s)
	a, b := storetest.Rec("a.web", 27001, "u"), storetest.Rec("b.web", 27002, "u")
	h.ClaimOK(s, store.Claim{Want: a})
	h.ClaimOK(s, store.Claim{Want: b})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := storetest.Rec("c.web", a.Port, "v")
	cJSON, _ := json.Marshal(c)
	edits := []clientv3.Op{
		clientv3.OpPut(prefix+UserName("u"), "7"),         // wrong count
		clientv3.OpPut(prefix+UserName("nobody"), "3"),    // a count without keys
		clientv3.OpDelete(prefix + PortName(b.Slot())),    // b's port record lost
		clientv3.OpPut(prefix+KeyName("junk"), "{broken"), // not a record
		clientv3.OpPut(prefix+PortName(store.TCPPort(27009)), "ghost.web"),
		clientv3.OpPut(prefix+KeyName(c.Key), string(cJSON)), // on a's port
	}
	if _, err := raw.Txn(ctx).Then(edits...).Commit(); err != nil {
		t.Fatal(err)
	}
	snap := h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "after hand edits", snap, a, b)
	want := []string{
		`key/junk: not a valid allocation; ignored`,
		`port/27009: named "ghost.web", which does not hold it; removed`,
		`key/b.web: the record of port 27002/tcp was missing; rebuilt`,
		`key/c.web: port 27001/tcp belongs to "a.web"; ignored`,
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
		PortName(b.Slot()): b.Key, PortName(store.TCPPort(27009)): "",
		UserName("u"): "2", UserName("nobody"): "", UserName("v"): "1",
	} {
		if got := testenv.EtcdGet(t, raw, prefix+name); got != want {
			t.Errorf("%s after load = %q; want %q", name, got, want)
		}
	}
	snap = h.Load(openTestStore(t, srv, prefix))
	storetest.WantAllocations(t, "second load", snap, a, b)
	if len(snap.Problems) != 2 {
		t.Fatalf("second load: problems %q; want only the two it cannot repair (junk, c.web)", snap.Problems)
	}
}

// TestEtcdStoreTouchBatches: more marks than etcd takes in one transaction
// are written in several; marks of keys without a record are skipped.
func TestEtcdStoreTouchBatches(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	h := storetest.NewHarness(t, "etcd")
	s := openTestStore(t, srv, "/touch/")
	h.Load(s)
	const keys, ghosts = 2*MaxTxnOps + 10, 50
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
	snap := h.Load(openTestStore(t, srv, "/touch/"))
	if len(snap.LastSeen) != keys {
		t.Fatalf("after touching %d keys and %d ghosts: %d last-seen times; want %d", keys, ghosts, len(snap.LastSeen), keys)
	}
	for _, m := range marks[:keys] {
		if !snap.LastSeen[m.Key].Equal(m.Seen) || snap.Online[m.Key] != m.Online {
			t.Fatalf("%s: last seen %v online %v; want %v %v", m.Key, snap.LastSeen[m.Key], snap.Online[m.Key], m.Seen, m.Online)
		}
	}
	if n := testenv.EtcdCount(t, srv.Client(t), "/touch/seen/"); n != keys {
		t.Fatalf("%d seen records; want %d (none for ghosts)", n, keys)
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

// TestEtcdHistoryAuth: a user whose role may only read and write
// -etcd-prefix writes and reads the history (where earlier versions wrote
// it is skipped, not an error); one also granted reading there reads the
// entries earlier versions wrote.
func TestEtcdHistoryAuth(t *testing.T) {
	srv := testenv.StartEtcd(t, nil)
	cli := srv.Client(t)
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
		o := options(t, srv, prefix)
		o.Username, o.Password = user, password
		s, err := Open(ctx, o)
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

// options are Options that reach srv (with its client certificate when it
// serves TLS) under prefix, logging to t.
func options(t testing.TB, srv *testenv.EtcdServer, prefix string) Options {
	o := Options{Endpoints: []string{srv.Endpoint()}, Prefix: prefix, Timeout: 5 * time.Second, Log: slog.New(slog.NewTextHandler(t.Output(), nil))}
	if p := srv.TLS(); p != nil {
		o.CAFile, o.CertFile, o.KeyFile = p.CAFile, p.ClientCert, p.ClientKey
	}
	return o
}

// openTestStore opens an etcd store on e under prefix and closes it in
// t.Cleanup.
func openTestStore(t testing.TB, e *testenv.EtcdServer, prefix string) *Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Open(ctx, options(t, e, prefix))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// compact compacts the etcd history up to the current revision: the
// store contract suite uses it, when a store has it, to make a watch that
// is behind lose its history.
func compact(t testing.TB, s *Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := s.Client().Get(ctx, s.Prefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client().Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
}
