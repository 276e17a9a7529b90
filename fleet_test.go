package main

// Several frps, one set of ports: three plugin instances (the real server,
// run() in this process) share one real etcd.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/etcd"
	"frp-port-keeper/internal/testenv"
)

var fleetPrefixes atomic.Int64

// startFleet starts n instances on one etcd under a fresh prefix.
func startFleet(t *testing.T, etcdSrv *testenv.EtcdServer, n int, args ...string) ([]*inProcServer, []string) {
	t.Helper()
	flags := append([]string{"-store", "etcd", "-etcd-endpoints", etcdSrv.Endpoint(),
		"-etcd-prefix", fmt.Sprintf("/fleet-%d/", fleetPrefixes.Add(1)), "-probe=false"}, args...)
	var out []*inProcServer
	for range n {
		out = append(out, startInProc(t, flags...))
	}
	return out, flags
}

// fleetAnswer is a plugin answer, for goroutines (no t.Fatal there).
type fleetAnswer struct {
	port   int
	reason string
	err    error
}

func tryPost(s *inProcServer, user, name, extra string) fleetAnswer {
	return tryPostType(s, user, name, "tcp", extra)
}

func tryPostType(s *inProcServer, user, name, typ, extra string) fleetAnswer {
	req, _ := http.NewRequest("POST", s.url+pluginPath+"?version=0.1.0&op=NewProxy", strings.NewReader(newProxyBody(user, name, typ, extra)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return fleetAnswer{err: err}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var a answer
	if err := json.Unmarshal(body, &a); err != nil {
		return fleetAnswer{err: fmt.Errorf("%d %s", resp.StatusCode, body)}
	}
	if a.Reject {
		return fleetAnswer{reason: a.RejectReason}
	}
	var port int
	json.Unmarshal(a.Content["remote_port"], &port)
	return fleetAnswer{port: port}
}

// lookupAt asks an instance's admin API for key's port (0: none).
func lookupAt(s *inProcServer, key string) int {
	resp, err := s.client.Get(s.url + "/api/allocations/" + key)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	var a apiAllocation
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&a) != nil {
		return 0
	}
	return a.Port
}

// TestFleetClaims: at three instances at once, new keys never share a
// port, the same key gets one port everywhere, a 10-port pool grants
// exactly 10 of 30 keys, and a quota is exact fleet-wide.
func TestFleetClaims(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	t.Run("exhaustion", func(t *testing.T) {
		fleet, _ := startFleet(t, etcdSrv, 3, "-allow-ports", "30000-30009")
		answers := make([]fleetAnswer, 30)
		var wg sync.WaitGroup
		for i := range 30 {
			wg.Go(func() { answers[i] = tryPost(fleet[i%3], "u", fmt.Sprintf("u.k%02d", i), "") })
		}
		wg.Wait()
		granted := map[int]string{}
		for i, a := range answers {
			switch {
			case a.err != nil:
				t.Fatalf("u.k%02d: %v", i, a.err)
			case a.port != 0:
				if other, dup := granted[a.port]; dup {
					t.Fatalf("port %d given to %s and u.k%02d", a.port, other, i)
				}
				granted[a.port] = fmt.Sprintf("u.k%02d", i)
			case !strings.Contains(a.reason, "no free port"):
				t.Fatalf("u.k%02d refused with %q; want the pool exhausted", i, a.reason)
			}
		}
		if len(granted) != 10 {
			t.Fatalf("granted %d keys from a 10-port pool: %v", len(granted), granted)
		}
	})
	t.Run("same keys everywhere", func(t *testing.T) {
		fleet, _ := startFleet(t, etcdSrv, 3, "-allow-ports", "30000-30099")
		answers := make([][3]fleetAnswer, 10)
		var wg sync.WaitGroup
		for k := range 10 {
			for i := range 3 {
				wg.Go(func() { answers[k][i] = tryPost(fleet[i], "u", fmt.Sprintf("u.s%d", k), "") })
			}
		}
		wg.Wait()
		seen := map[int]int{}
		for k, as := range answers {
			for i, a := range as {
				if a.err != nil || a.port == 0 || a.port != as[0].port {
					t.Fatalf("u.s%d at the three instances: %+v; want one port everywhere (instance %d)", k, as, i)
				}
			}
			if other, dup := seen[as[0].port]; dup {
				t.Fatalf("u.s%d and u.s%d share port %d", k, other, as[0].port)
			}
			seen[as[0].port] = k
		}
		// Every instance lists every key on the same port.
		for k, as := range answers {
			for i, s := range fleet {
				key := fmt.Sprintf("u.s%d", k)
				waitFor(t, key+" at instance "+fmt.Sprint(i), 3*time.Second, func() bool { return lookupAt(s, key) == as[0].port })
			}
		}
	})
	t.Run("quota", func(t *testing.T) {
		fleet, _ := startFleet(t, etcdSrv, 3, "-allow-ports", "30000-30099", "-max-ports-per-user", "3")
		answers := make([]fleetAnswer, 12)
		var wg sync.WaitGroup
		for i := range 12 {
			wg.Go(func() { answers[i] = tryPost(fleet[i%3], "q", fmt.Sprintf("q.k%02d", i), "") })
		}
		wg.Wait()
		granted := 0
		for i, a := range answers {
			switch {
			case a.err != nil:
				t.Fatalf("q.k%02d: %v", i, a.err)
			case a.port != 0:
				granted++
			case !strings.Contains(a.reason, "quota of 3"):
				t.Fatalf("q.k%02d refused with %q; want the quota", i, a.reason)
			}
		}
		if granted != 3 {
			t.Fatalf("granted %d keys to a user with a quota of 3", granted)
		}
	})
}

// TestFleetVisibility: an allocation, a move and a DELETE made at one
// instance are seen at every other within moments; a restarted instance
// keeps everything.
func TestFleetVisibility(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	fleet, flags := startFleet(t, etcdSrv, 3, "-allow-ports", "30000-30099")
	a, b, c := fleet[0], fleet[1], fleet[2]
	start := time.Now()
	p := tryPost(a, "alice", "alice.ssh", "")
	if p.port == 0 {
		t.Fatalf("alice.ssh at a: %+v", p)
	}
	waitFor(t, "alice.ssh at b and c", 3*time.Second, func() bool {
		return lookupAt(b, "alice.ssh") == p.port && lookupAt(c, "alice.ssh") == p.port
	})
	t.Logf("an allocation at a was listed at b and c after %v", time.Since(start))
	// A sticky hit at b answers a's port with no etcd round trip needed.
	if got := tryPost(b, "alice", "alice.ssh", ""); got.port != p.port {
		t.Fatalf("alice.ssh at b = %+v; want %d", got, p.port)
	}
	// A move at b.
	moved := tryPost(b, "alice", "alice.ssh", `"remote_port":30050`)
	if moved.port != 30050 {
		t.Fatalf("move at b: %+v", moved)
	}
	waitFor(t, "the move at a and c", 3*time.Second, func() bool {
		return lookupAt(a, "alice.ssh") == 30050 && lookupAt(c, "alice.ssh") == 30050
	})
	// DELETE at c frees the port everywhere.
	req, _ := http.NewRequest("DELETE", c.url+"/api/allocations/alice.ssh", nil)
	resp, err := c.client.Do(req)
	if err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE at c: %v %v", resp, err)
	}
	resp.Body.Close()
	waitFor(t, "the release at a and b", 3*time.Second, func() bool {
		return lookupAt(a, "alice.ssh") == 0 && lookupAt(b, "alice.ssh") == 0
	})
	if got := tryPost(a, "bob", "bob.x", `"remote_port":30050`); got.port != 30050 {
		t.Fatalf("bob.x asking at a for the released 30050: %+v", got)
	}
	// A restarted instance loads everything.
	b.stop(t)
	b = startInProc(t, flags...)
	if lookupAt(b, "bob.x") != 30050 {
		t.Fatal("a restarted instance lost bob.x")
	}
}

// TestFleetEtcdOutage: with etcd paused, known keys are still answered,
// new keys are refused within -store-timeout naming the store; when etcd
// is back (or killed and restarted), new keys work again without
// restarting any instance, and a write that landed late reaches every
// instance.
func TestFleetEtcdOutage(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	fleet, _ := startFleet(t, etcdSrv, 2, "-allow-ports", "30000-30099", "-store-timeout", "500ms")
	a, b := fleet[0], fleet[1]
	known := tryPost(a, "alice", "alice.ssh", "")
	waitFor(t, "alice.ssh at b", 3*time.Second, func() bool { return lookupAt(b, "alice.ssh") == known.port })

	for _, fault := range []string{"pause", "kill"} {
		if fault == "pause" {
			etcdSrv.Pause(t)
		} else {
			etcdSrv.Kill(t)
		}
		for _, s := range fleet {
			if got := tryPost(s, "alice", "alice.ssh", ""); got.port != known.port {
				t.Fatalf("%s: a known key during the outage = %+v; want %d", fault, got, known.port)
			}
		}
		start := time.Now()
		got := tryPost(b, "carol", "carol."+fault, "")
		if took := time.Since(start); got.port != 0 || !strings.Contains(got.reason, "port store") || took > 5*time.Second {
			t.Fatalf("%s: a new key during the outage = %+v after %v; want a reject naming the store within the deadline", fault, got, took)
		}
		if fault == "pause" {
			etcdSrv.Resume(t)
		} else {
			etcdSrv.Restart(t)
		}
		var fresh fleetAnswer
		waitFor(t, fault+": new keys again without a restart", 15*time.Second, func() bool {
			fresh = tryPost(a, "dave", "dave."+fault, "")
			return fresh.port != 0
		})
		waitFor(t, fault+": the new key at b", 5*time.Second, func() bool { return lookupAt(b, "dave."+fault) == fresh.port })
		// A write that timed out during the outage may have landed after
		// it: if it did, both instances agree on it.
		if p := lookupAt(a, "carol."+fault); p != 0 {
			waitFor(t, "a late write at b", 5*time.Second, func() bool { return lookupAt(b, "carol."+fault) == p })
		}
	}
	var list bytes.Buffer
	resp, _ := a.client.Get(a.url + "/api/allocations")
	io.Copy(&list, resp.Body)
	resp.Body.Close()
	t.Logf("after the outages: %s", list.String())
}

// TestEtcdMoveFileStoreAndBack: docs/fleet.md's move of a file store into
// etcd and back, with export and import, keeps every port.
func TestEtcdMoveFileStoreAndBack(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	dir := t.TempDir()
	s := startInProc(t, "-data-dir", dir, "-allow-ports", "30000-30099", "-probe=false")
	want := map[string]int{}
	for _, name := range []string{"a.x", "a.y", "b.z"} {
		want[name] = tryPost(s, strings.Split(name, ".")[0], name, "").port
	}
	s.stop(t)
	cli := func(stdin string, args ...string) string {
		t.Helper()
		file := filepath.Join(t.TempDir(), "in.json")
		os.WriteFile(file, []byte(stdin), 0o600)
		if stdin != "" {
			args = append(args, file)
		}
		out, errOut, err := runCLI(nil, args...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, errOut)
		}
		return out
	}
	etcdFlags := []string{"-store", "etcd", "-etcd-endpoints", etcdSrv.Endpoint(), "-etcd-prefix", "/moved/"}
	exported := cli("", "export", "-data-dir", dir)
	cli(exported, append([]string{"import"}, etcdFlags...)...)
	fleet := startInProc(t, append(etcdFlags, "-allow-ports", "30000-30099", "-probe=false")...)
	for name, port := range want {
		if got := lookupAt(fleet, name); got != port {
			t.Fatalf("%s in etcd = %d; want %d", name, got, port)
		}
	}
	fleet.stop(t)
	back := t.TempDir()
	cli(cli("", append([]string{"export"}, etcdFlags...)...), "import", "-data-dir", back)
	a := newTestAllocator(t, back, "30000-30099", allocatorOptions{})
	for name, port := range want {
		if r, _, ok := a.lookup(name); !ok || r.Port != port {
			t.Fatalf("%s back in a file store = %+v; want %d", name, r, port)
		}
	}
}

// metricAt is the value of one series (name with its labels, as /metrics
// prints it) at an instance; -1 when it is not there.
func metricAt(s *inProcServer, series string) float64 {
	resp, err := s.client.Get(s.url + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.SplitSeq(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err == nil {
				return f
			}
		}
	}
	return -1
}

// TestFleetEtcdDataLoss: etcd restarted on an empty data directory under
// two running instances. Each notices that etcd lost its data, writes back
// every allocation it holds (each record by exactly one of them, the other
// finding it present), and afterwards no port is answered to two keys, a
// DELETE at one instance is seen at the other, and an instance started
// afterwards holds every earlier key on its first port.
func TestFleetEtcdDataLoss(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	fleet, flags := startFleet(t, etcdSrv, 2, "-allow-ports", "30000-30099")
	a, b := fleet[0], fleet[1]
	prefix := flags[slices.Index(flags, "-etcd-prefix")+1]
	raw := etcdSrv.Client(t)
	held := map[string]int{}
	users := map[string]int{}
	for i := range 8 {
		user := fmt.Sprintf("u%d", i%3)
		key := fmt.Sprintf("%s.k%d", user, i)
		got := tryPost(fleet[i%2], user, key, "")
		if got.port == 0 {
			t.Fatalf("%s: %+v", key, got)
		}
		held[key] = got.port
		users[user]++
	}
	for key, port := range held {
		for i, s := range fleet {
			waitFor(t, fmt.Sprintf("%s at instance %d", key, i), 3*time.Second, func() bool { return lookupAt(s, key) == port })
		}
	}

	etcdSrv.Wipe(t, "")
	wiped := time.Now()
	waitFor(t, "every allocation written back to the empty etcd", 15*time.Second, func() bool {
		return testenv.EtcdCount(t, raw, prefix+"key/") == int64(len(held))
	})
	const restores = "frp_port_keeper_store_restores_total"
	waitFor(t, "a restore counted at both instances", 10*time.Second, func() bool {
		return metricAt(a, restores) == 1 && metricAt(b, restores) == 1
	})
	t.Logf("both instances had written back %v after etcd came back empty", time.Since(wiped).Round(time.Millisecond))
	var counts [2]map[string]float64
	sum := func(result string) float64 {
		series := `frp_port_keeper_store_restored_records_total{result="` + result + `"}`
		for i, s := range fleet {
			if counts[i] == nil {
				counts[i] = map[string]float64{}
			}
			counts[i][result] = metricAt(s, series)
		}
		return counts[0][result] + counts[1][result]
	}
	restored, present, lost := sum("restored"), sum("present"), sum("lost")
	t.Logf("records restored %v, found present %v, lost %v (a: %v; b: %v)", restored, present, lost, counts[0], counts[1])
	if restored != float64(len(held)) || present != float64(len(held)) || lost != 0 {
		t.Fatalf("restored %v, present %v, lost %v; want each of the %d records restored by one instance and found present by the other, none lost",
			restored, present, lost, len(held))
	}
	for _, s := range fleet {
		if !strings.Contains(s.log.String(), "etcd lost its data") {
			t.Fatalf("no warning about the lost data in the log:\n%s", s.log)
		}
	}
	for key, port := range held {
		if got := testenv.EtcdGet(t, raw, prefix+etcd.PortName(store.TCPPort(port))); got != key {
			t.Fatalf("%s in etcd names %q; want %q", etcd.PortName(store.TCPPort(port)), got, key)
		}
	}
	for user, n := range users {
		if got := testenv.EtcdGet(t, raw, prefix+etcd.UserName(user)); got != fmt.Sprint(n) {
			t.Fatalf("%s in etcd = %q; want %d", etcd.UserName(user), got, n)
		}
	}

	// New keys at both instances take ports nobody held.
	answered := map[int]string{}
	for key, port := range held {
		answered[port] = key
	}
	for i, s := range fleet {
		key := fmt.Sprintf("v.new%d", i)
		got := tryPost(s, "v", key, "")
		if got.port == 0 {
			t.Fatalf("%s after the restore: %+v", key, got)
		}
		if other, dup := answered[got.port]; dup {
			t.Fatalf("%s got port %d, which %s holds", key, got.port, other)
		}
		answered[got.port], held[key] = key, got.port
	}
	// A DELETE at a is seen at b.
	var gone string
	for key := range held {
		gone = key
		break
	}
	req, _ := http.NewRequest("DELETE", a.url+"/api/allocations/"+gone, nil)
	resp, err := a.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE %s at a = %d; want 204", gone, resp.StatusCode)
	}
	waitFor(t, "the DELETE at b", 3*time.Second, func() bool { return lookupAt(b, gone) == 0 })
	delete(held, gone)

	c := startInProc(t, flags...)
	for key, port := range held {
		for i, s := range []*inProcServer{a, b, c} {
			waitFor(t, fmt.Sprintf("%s at instance %d", key, i), 3*time.Second, func() bool { return lookupAt(s, key) == port })
		}
		if got := tryPost(c, strings.Split(key, ".")[0], key, ""); got.port != port {
			t.Fatalf("%s at an instance started after the restore = %+v; want %d", key, got, port)
		}
	}
}

// TestFleetSpaces: tcp and udp keys registering at two instances at once
// fill a 5-port pool in each space (5 tcp and 5 udp keys, on the same
// five numbers), no two keys of one space share a port, and an instance
// started afterwards holds every key on its port.
func TestFleetSpaces(t *testing.T) {
	etcdSrv := testenv.StartEtcd(t, nil)
	fleet, flags := startFleet(t, etcdSrv, 2, "-allow-ports", "30000-30004")
	answers := make([]fleetAnswer, 20)
	var wg sync.WaitGroup
	for i := range answers {
		wg.Go(func() {
			typ := []string{"tcp", "udp"}[i%2]
			answers[i] = tryPostType(fleet[i/2%2], "u", fmt.Sprintf("u.k%02d", i), typ, "")
		})
	}
	wg.Wait()
	granted := map[string]map[int]string{"tcp": {}, "udp": {}}
	for i, a := range answers {
		typ, key := []string{"tcp", "udp"}[i%2], fmt.Sprintf("u.k%02d", i)
		switch {
		case a.err != nil:
			t.Fatalf("%s: %v", key, a.err)
		case a.port != 0:
			if other, dup := granted[typ][a.port]; dup {
				t.Fatalf("%s port %d given to %s and %s", typ, a.port, other, key)
			}
			granted[typ][a.port] = key
		case !strings.Contains(a.reason, "no free") || (typ == "udp") != strings.Contains(a.reason, "udp"):
			t.Fatalf("%s (%s) refused with %q", key, typ, a.reason)
		}
	}
	if len(granted["tcp"]) != 5 || len(granted["udp"]) != 5 {
		t.Fatalf("granted %v; want 5 tcp and 5 udp keys on 30000-30004", granted)
	}
	late := startInProc(t, flags...)
	for typ, ports := range granted {
		for port, key := range ports {
			if got := lookupAt(late, key); got != port {
				t.Errorf("%s (%s) at a new instance = %d; want %d", key, typ, got, port)
			}
		}
	}
}
