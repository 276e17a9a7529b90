package main

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/history"
	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/storetest"
)

// The tests of two port spaces: frps keeps tcp and udp ports apart (a tcp
// proxy and a udp proxy may both listen on 53), and so does the plugin,
// in the allocator, every store and every surface.

// reopenable is an allocator over a store of kind in dir that can be
// stopped and started again, as a restart of the plugin does.
type reopenable struct {
	t          *testing.T
	kind, dir  string
	pool       string
	opts       allocatorOptions
	st         store.Store
	unlock     func()
	*allocator // the running one
}

func openReopenable(t *testing.T, kind, pool string, opts allocatorOptions) *reopenable {
	r := &reopenable{t: t, kind: kind, dir: t.TempDir(), pool: pool, opts: opts}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *reopenable) start() {
	r.t.Helper()
	st, unlock, err := openStore(config{dataDir: r.dir, store: r.kind}, testLogger(r.t))
	if err != nil {
		r.t.Fatal(err)
	}
	r.st, r.unlock = st, unlock
	r.allocator = newAllocatorOn(r.t, st, r.pool, r.opts)
}

func (r *reopenable) stop() {
	if r.st != nil {
		r.st.Close()
		r.unlock()
		r.st = nil
	}
}

func (r *reopenable) restart() {
	r.t.Helper()
	r.stop()
	r.start()
}

// TestSpacesShareNumbers: a tcp key and a udp key hold one number, each
// space has the whole pool (a pool of 2 holds 2 tcp and 2 udp proxies, as
// frps would), a third key on a taken number is refused naming its space,
// and all of it stays across a restart, on every local store.
func TestSpacesShareNumbers(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			a := openReopenable(t, kind, "30000-30001", allocatorOptions{})
			dnsTCP, dnsUDP := withPort(req("u", "u.dns-tcp", "tcp"), 30001), withPort(req("u", "u.dns-udp", "udp"), 30001)
			if p, how := mustAllocate(t, a.allocator, dnsTCP); p != 30001 || how != outcomeRequested {
				t.Fatalf("tcp asking for 30001 = %d %s", p, how)
			}
			if p, how := mustAllocate(t, a.allocator, dnsUDP); p != 30001 || how != outcomeRequested {
				t.Fatalf("udp asking for 30001 beside a tcp key = %d %s; want 30001 requested", p, how)
			}
			_, _, err := a.allocate(withPort(req("v", "v.dns", "udp"), 30001))
			if !errors.Is(err, errPortReserved) || rejectReason(err) != "remote port 30001/udp is reserved for another proxy" {
				t.Fatalf("a second udp key on 30001: %v (%q)", err, rejectReason(err))
			}
			_, _, err = a.allocate(withPort(req("v", "v.ssh", "tcp"), 30001))
			if !errors.Is(err, errPortReserved) || rejectReason(err) != "remote port 30001 is reserved for another proxy" {
				t.Fatalf("a second tcp key on 30001: %v (%q)", err, rejectReason(err))
			}
			wgUDP, sshTCP := req("u", "u.wg", "udp"), req("u", "u.ssh", "tcp")
			if p, _ := mustAllocate(t, a.allocator, wgUDP); p != 30000 {
				t.Fatalf("fresh udp = %d; want 30000", p)
			}
			if p, _ := mustAllocate(t, a.allocator, sshTCP); p != 30000 {
				t.Fatalf("fresh tcp = %d; want 30000", p)
			}
			_, _, err = a.allocate(req("u", "u.more-tcp", "tcp"))
			if !errors.Is(err, errPoolExhausted) || rejectReason(err) != "no free port left in pool 30000-30001" {
				t.Fatalf("third tcp in a pool of 2: %v (%q)", err, rejectReason(err))
			}
			_, _, err = a.allocate(req("u", "u.more-udp", "udp"))
			if !errors.Is(err, errPoolExhausted) || rejectReason(err) != "no free udp port left in pool 30000-30001" {
				t.Fatalf("third udp in a pool of 2: %v (%q)", err, rejectReason(err))
			}
			if s := a.stats(); s.TCP.Used != 2 || s.UDP.Used != 2 || s.Size != 4 || s.Free != 0 {
				t.Fatalf("stats = %+v tcp %+v udp %+v; want 2 used in each space of 2", s, *s.TCP, *s.UDP)
			}

			a.restart()
			for _, r := range []struct {
				req  frpplugin.Proxy
				port int
			}{{dnsTCP, 30001}, {dnsUDP, 30001}, {wgUDP, 30000}, {sshTCP, 30000}} {
				r.req.RemotePort = 0
				if p, how := mustAllocate(t, a.allocator, r.req); p != r.port || how != outcomeHit {
					t.Errorf("after a restart %s (%s) = %d %s; want %d hit", r.req.ProxyName, r.req.ProxyType, p, how, r.port)
				}
			}
			views := a.atPort(30001, "")
			if len(views) != 2 || views[0].Proto != store.TCP || views[0].Key != "u.dns-tcp" || views[1].Proto != store.UDP || views[1].Key != "u.dns-udp" {
				t.Fatalf("atPort(30001) = %+v; want the tcp then the udp key", views)
			}
		})
	}
}

// TestSpacesOwnPorts: frps's listeners are kept out of their own space
// only (bindPort from tcp, kcpBindPort from udp), as are a release and a
// reclaim: each touches one space.
func TestSpacesOwnPorts(t *testing.T) {
	a := newAllocatorOn(t, storetest.NewFake(), "7000-7001", allocatorOptions{
		excluded: map[store.Slot]string{store.TCPPort(7000): "frps bindPort", store.UDPPort(7001): "frps kcpBindPort"}})
	if p, _ := mustAllocate(t, a, req("u", "u.a", "tcp")); p != 7001 {
		t.Fatalf("tcp = %d; want 7001 (7000 is frps's bindPort)", p)
	}
	if p, _ := mustAllocate(t, a, req("u", "u.b", "udp")); p != 7000 {
		t.Fatalf("udp = %d; want 7000 (bindPort is tcp; 7001 is kcp's)", p)
	}
	_, _, err := a.allocate(withPort(req("u", "u.c", "udp"), 7001))
	if !errors.Is(err, errPortForFrps) || !strings.Contains(rejectReason(err), "7001/udp is used by frps itself (frps kcpBindPort)") {
		t.Fatalf("udp asking for kcp's port: %v", err)
	}
	if s := a.stats(); s.TCP.Size != 1 || s.UDP.Size != 1 || s.TCP.Free != 0 || s.UDP.Free != 0 {
		t.Fatalf("stats tcp %+v udp %+v; want one port in each space, used", *s.TCP, *s.UDP)
	}

	// The release of the udp key frees 7000/udp only.
	if err := a.release("u.b", "test"); err != nil {
		t.Fatal(err)
	}
	if p, _ := mustAllocate(t, a, req("v", "v.b", "udp")); p != 7000 {
		t.Fatalf("udp after the release = %d; want 7000", p)
	}
	if _, _, err := a.allocate(req("v", "v.a", "tcp")); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("tcp after a udp release: %v; want the tcp pool still full", err)
	}
}

// TestSpacesReclaimQuotaPolicy: a reclaim takes an abandoned key of the
// asking proxy's space, a quota counts a user's keys in both spaces (as
// frps's maxPortsPerClient does), and a policy range is the same numbers
// in each space.
func TestSpacesReclaimQuotaPolicy(t *testing.T) {
	now, advance := fakeClock(time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC))
	a := newAllocatorOn(t, storetest.NewFake(), "30000-30001", allocatorOptions{now: now,
		policy: mustPolicy(t, "[[rule]]\nusers = [\"lab-*\"]\nports = \"30001\"\nmax_ports = 2\n", "30000-30001", 0, time.Hour)})
	old := []frpplugin.Proxy{req("u", "u.old-tcp", "tcp"), req("u", "u.old-udp", "udp")}
	for _, r := range old {
		if p, _ := mustAllocate(t, a, r); p != 30000 {
			t.Fatalf("%s = %d; want 30000", r.ProxyName, p)
		}
	}
	advance(2 * time.Hour)
	if p, _ := mustAllocate(t, a, req("w", "w.new-udp", "udp")); p != 30000 {
		t.Fatalf("udp in a full shared pool = %d; want 30000 reclaimed", p)
	}
	if _, ok := a.current("u.old-udp"); ok {
		t.Fatal("the udp key was not reclaimed")
	}
	if r, ok := a.current("u.old-tcp"); !ok || r.Port != 30000 {
		t.Fatalf("the tcp key on 30000 = %+v %v; want it kept (a udp reclaim takes a udp port)", r, ok)
	}

	// lab-a's range 30001 holds one tcp and one udp key; its quota of 2
	// counts both.
	if p, _ := mustAllocate(t, a, req("lab-a", "lab-a.t", "tcp")); p != 30001 {
		t.Fatalf("lab tcp = %d; want 30001", p)
	}
	if p, _ := mustAllocate(t, a, req("lab-a", "lab-a.u", "udp")); p != 30001 {
		t.Fatalf("lab udp = %d; want 30001", p)
	}
	if _, _, err := a.allocate(req("lab-a", "lab-a.x", "udp")); !errors.Is(err, errQuota) {
		t.Fatalf("a third lab key: %v; want the quota of 2 (tcp and udp keys count alike)", err)
	}
	_, _, err := a.allocate(withPort(req("w", "w.x", "udp"), 30001))
	if !errors.Is(err, errPortReserved) || !strings.Contains(rejectReason(err), "30001/udp") {
		t.Fatalf("another user asking for lab's 30001/udp: %v", err)
	}
}

// TestSpacesProbe: the bind test binds the port's own protocol, so a
// number another program holds in udp only is still given to tcp.
func TestSpacesProbe(t *testing.T) {
	var busy int
	for range 50 {
		pc, err := net.ListenPacket("udp", "0.0.0.0:0")
		if err != nil {
			t.Fatal(err)
		}
		busy = pc.LocalAddr().(*net.UDPAddr).Port
		if bindProbe("0.0.0.0")(store.TCPPort(busy)) == nil {
			t.Cleanup(func() { pc.Close() })
			break
		}
		pc.Close()
		busy = 0
	}
	if busy == 0 {
		t.Skip("no udp port whose tcp twin is free")
	}
	if err := bindProbe("0.0.0.0")(store.UDPPort(busy)); err == nil {
		t.Fatalf("the udp probe of %d, bound in udp: no error", busy)
	}
	pool := strconv.Itoa(busy)
	a := newAllocatorOn(t, storetest.NewFake(), pool, allocatorOptions{probe: bindProbe("0.0.0.0")})
	if p, _ := mustAllocate(t, a, req("u", "u.t", "tcp")); p != busy {
		t.Fatalf("tcp = %d; want %d (only its udp twin is in use)", p, busy)
	}
	if _, _, err := a.allocate(req("u", "u.u", "udp")); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("udp on a number bound in udp: %v; want the pool exhausted", err)
	}

	var probed []store.Slot
	var mu sync.Mutex
	b := newAllocatorOn(t, storetest.NewFake(), "30000", allocatorOptions{probe: func(s store.Slot) error {
		mu.Lock()
		probed = append(probed, s)
		mu.Unlock()
		return nil
	}})
	mustAllocate(t, b, req("u", "u.t", "tcp"))
	mustAllocate(t, b, req("u", "u.u", "udp"))
	if want := []store.Slot{store.TCPPort(30000), store.UDPPort(30000)}; !slices.Equal(probed, want) {
		t.Fatalf("probed %v; want %v", probed, want)
	}
}

// TestSpacesOperator: assign names the protocol of a key not seen yet,
// refuses the other protocol than a known key's, and a pinned key whose
// device turns out to be of the other protocol keeps its number there; a
// proxy that changes protocol keeps its number when it is free.
func TestSpacesOperator(t *testing.T) {
	h := newHistoryAllocator(t, "file", "30000-30009", allocatorOptions{})
	mustAllocate(t, h.allocator, withPort(req("u", "u.dns", "tcp"), 30005))
	if _, err := h.assign("u.dns-udp", 30005, store.UDP, operatorChange{by: "test"}); err != nil {
		t.Fatalf("assign -proto udp beside a tcp key: %v", err)
	}
	if _, err := h.assign("u.other", 30005, "", operatorChange{by: "test"}); !errors.Is(err, errPortReserved) {
		t.Fatalf("assign of a taken tcp port: %v", err)
	}
	if _, err := h.assign("u.dns", 30006, store.UDP, operatorChange{by: "test"}); !errors.Is(err, errWrongSpace) {
		t.Fatalf("assign -proto udp of a tcp key: %v; want errWrongSpace", err)
	}
	// The device of the udp pin registers, asking for another port: it
	// gets its pin, and its details are filled in.
	if p, how := mustAllocate(t, h.allocator, withPort(req("u", "u.dns-udp", "udp"), 30007)); p != 30005 || how != outcomePinned {
		t.Fatalf("pinned udp device = %d %s; want 30005 pinned", p, how)
	}
	if r, _ := h.current("u.dns-udp"); r.User != "u" || r.Space() != store.UDP || !r.Pinned {
		t.Fatalf("filled in = %+v", r)
	}
	// A key assigned without a protocol (tcp) whose device is udp keeps
	// its number, in udp.
	if _, err := h.assign("u.game", 30001, "", operatorChange{by: "test"}); err != nil {
		t.Fatal(err)
	}
	mustAllocate(t, h.allocator, req("w", "w.tcp-on-1", "tcp"))
	if p, _ := mustAllocate(t, h.allocator, req("u", "u.game", "udp")); p != 30001 {
		t.Fatalf("udp device of a tcp pin = %d; want 30001", p)
	}
	if r, _ := h.current("u.game"); r.Space() != store.UDP || !r.Pinned {
		t.Fatalf("u.game = %+v; want pinned on 30001/udp", r)
	}
	// A proxy that changed protocol keeps its number if free.
	if p, _ := mustAllocate(t, h.allocator, req("u", "u.dns", "udp")); p == 30005 {
		t.Fatal("u.dns as udp took 30005, which u.dns-udp holds in udp")
	}
	p, _ := mustAllocate(t, h.allocator, req("u", "u.flip", "tcp"))
	if q, _ := mustAllocate(t, h.allocator, req("u", "u.flip", "udp")); q != p {
		t.Fatalf("u.flip from tcp %d to udp got %d; want its number kept", p, q)
	}

	var moved, filled *store.HistoryEntry
	for _, e := range h.all(t) {
		if e.Key == "u.flip" && e.Change == store.HistMoved {
			moved = &e
		}
		if e.Key == "u.game" && e.Change == store.HistFilledIn {
			filled = &e
		}
	}
	if filled == nil || filled.Port != 30001 || filled.Space() != store.UDP || filled.OldSpace() != store.TCP {
		t.Fatalf("u.game's first registration in the history: %+v; want filled_in 30001/tcp -> 30001/udp", filled)
	}
	if moved == nil || moved.OldPort != p || moved.OldSpace() != store.TCP || moved.Space() != store.UDP {
		t.Fatalf("the move of u.flip in the history: %+v", moved)
	}
	// Who held p/tcp and p/udp after the move: nobody, and u.flip.
	at := time.Now().Add(time.Minute)
	if e, held, ok, err := history.HolderAt(context.Background(), h.log, store.TCPPort(p), at); err != nil || !ok || held {
		t.Fatalf("holder of %d/tcp after the move: %+v held %v ok %v %v; want free", p, e, held, ok, err)
	}
	if e, held, ok, err := history.HolderAt(context.Background(), h.log, store.UDPPort(p), at); err != nil || !ok || !held || e.Key != "u.flip" {
		t.Fatalf("holder of %d/udp after the move: %+v held %v ok %v %v; want u.flip", p, e, held, ok, err)
	}
}

// TestSpacesImport: an import or adopt with a tcp and a udp record on one
// number takes both; two records on one slot are named.
func TestSpacesImport(t *testing.T) {
	a := newAllocatorOn(t, storetest.NewFake(), "30000-30009", allocatorOptions{})
	recs := []store.Record{
		{Key: "u.dns-tcp", Port: 31600, User: "u", ProxyName: "u.dns-tcp", ProxyType: "tcp"},
		{Key: "u.dns-udp", Port: 31600, User: "u", ProxyName: "u.dns-udp", ProxyType: "udp"},
	}
	n, refused, err := a.importWith(recs, store.HistAdopted, "adopt", importMode{dryRun: true})
	if err != nil || n != 2 || len(refused) != 0 {
		t.Fatalf("dry run: %d %v %v; want 2 would be adopted", n, refused, err)
	}
	if n, err := a.importAll(recs, store.HistAdopted, "adopt"); err != nil || n != 2 {
		t.Fatalf("adopt: %d %v", n, err)
	}
	if got := a.atPort(31600, ""); len(got) != 2 {
		t.Fatalf("31600 holds %+v; want a tcp and a udp key", got)
	}
	clash := append(recs, store.Record{Key: "v.dns", Port: 31600, ProxyType: "udp"})
	_, refused, err = a.importWith(clash, store.HistAdopted, "adopt", importMode{dryRun: true})
	if err == nil || len(refused) != 1 || refused[0].Key != "v.dns" || refused[0].Proto != store.UDP ||
		!strings.Contains(refused[0].Reason, `port 31600/udp is given to both "u.dns-udp" and "v.dns"`) {
		t.Fatalf("two udp records on one number: %v %+v", err, refused)
	}
	_, refused, err = a.importWith(clash[2:], store.HistAdopted, "adopt", importMode{dryRun: true})
	if err == nil || len(refused) != 1 || !strings.Contains(refused[0].Reason, "port 31600/udp is reserved for another proxy") {
		t.Fatalf("a udp record on a held udp port: %v %+v", err, refused)
	}
	if n, refused, err := a.importWith([]store.Record{{Key: "v.ssh", Port: 31601, ProxyType: "tcp"}, {Key: "v.dns", Port: 31601, ProxyType: "udp"}},
		store.HistAdopted, "adopt", importMode{}); err != nil || n != 2 || len(refused) != 0 {
		t.Fatalf("a tcp and a udp record on a free number: %d %v %v", n, refused, err)
	}
}

// TestSpacesAPI: the admin API shows each row's protocol, filters by it,
// looks a port up in both spaces, never splits a port's rows across pages,
// and frees a port by number only when it is clear which space is meant.
func TestSpacesAPI(t *testing.T) {
	h := newHistoryAllocator(t, "file", "30000-30009", allocatorOptions{})
	srv := newServer(h.allocator, testLogger(t), serverOptions{history: h.log, unpaced: true})
	for i, name := range []string{"a", "b", "c"} {
		for _, typ := range []string{"tcp", "udp"} {
			mustAllocate(t, h.allocator, withPort(req("u", "u."+name+"-"+typ, typ), 30000+i))
		}
	}
	list := func(query string) allocationList {
		t.Helper()
		rec := adminRequest(srv, "GET", "/api/allocations?"+query, "")
		var out allocationList
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &out) != nil {
			t.Fatalf("GET ?%s: %d %s", query, rec.Code, rec.Body)
		}
		return out
	}
	rows := func(l allocationList) string {
		var b []string
		for _, a := range l.Allocations {
			b = append(b, strconv.Itoa(a.Port)+"/"+string(a.Proto)+"="+a.Key)
		}
		return strings.Join(b, " ")
	}
	if got := rows(list("port=30001")); got != "30001/tcp=u.b-tcp 30001/udp=u.b-udp" {
		t.Fatalf("lookup of 30001: %s", got)
	}
	if got := rows(list("proto=udp")); got != "30000/udp=u.a-udp 30001/udp=u.b-udp 30002/udp=u.c-udp" {
		t.Fatalf("udp only: %s", got)
	}
	// limit=1 pages: each page holds one port, both its rows.
	var all []string
	after, pages := 0, 0
	for {
		page := list("limit=1&after=" + strconv.Itoa(after))
		all = append(all, rows(page))
		pages++
		if page.Next == 0 {
			break
		}
		after = page.Next
	}
	if got := strings.Join(all, " | "); got != "30000/tcp=u.a-tcp 30000/udp=u.a-udp | 30001/tcp=u.b-tcp 30001/udp=u.b-udp | 30002/tcp=u.c-tcp 30002/udp=u.c-udp" {
		t.Fatalf("pages of one port: %s", got)
	}
	if l := list(""); l.Pool.TCP == nil || l.Pool.TCP.Used != 3 || l.Pool.UDP.Used != 3 || l.Pool.Used != 6 {
		t.Fatalf("pool = %+v", l.Pool)
	}

	// The page shows each row's protocol; a filter of 30001/udp finds one.
	if page := adminRequest(srv, "GET", "/", "").Body.String(); !strings.Contains(page, `<td class="port">30000</td><td class="proto">udp</td><td>u.a-udp</td>`) {
		t.Fatalf("the page lacks 30000/udp's row:\n%s", page)
	}
	if rows := pageRows(adminRequest(srv, "GET", "/?q=30001/udp", "").Body.String()); len(rows) != 1 || rows[0] != "30001 u.b-udp u udp" {
		t.Fatalf("page filtered by 30001/udp: %q", rows)
	}
	rec := adminRequest(srv, "DELETE", "/api/ports/30001", "")
	if rec.Code != http.StatusConflict || !strings.Contains(rec.Body.String(), `tcp by \"u.b-tcp\" and udp by \"u.b-udp\"`) {
		t.Fatalf("DELETE /api/ports/30001 with both spaces held: %d %s", rec.Code, rec.Body)
	}
	if rec := adminRequest(srv, "DELETE", "/api/ports/30001?proto=udp", ""); rec.Code != http.StatusNoContent {
		t.Fatalf("DELETE ?proto=udp: %d %s", rec.Code, rec.Body)
	}
	if got := rows(list("port=30001")); got != "30001/tcp=u.b-tcp" {
		t.Fatalf("30001 after releasing its udp key: %s", got)
	}
	if rec := adminRequest(srv, "DELETE", "/api/ports/30002?proto=sctp", ""); rec.Code != http.StatusBadRequest {
		t.Fatalf("?proto=sctp: %d %s", rec.Code, rec.Body)
	}
	if rec := adminRequest(srv, "PUT", "/api/allocations/u.new", `{"port":30000,"proto":"udp"}`); rec.Code != http.StatusConflict {
		t.Fatalf("assign of 30000/udp, held: %d %s", rec.Code, rec.Body)
	}
	rec = adminRequest(srv, "PUT", "/api/allocations/u.new", `{"port":30001,"proto":"udp"}`)
	if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), `"proto":"udp"`) {
		t.Fatalf("assign of the freed 30001/udp: %d %s", rec.Code, rec.Body)
	}

	// The history of 30001: both spaces, or one.
	h.recorder.Stop()
	var page historyPage
	rec = adminRequest(srv, "GET", "/api/history?port=30001&proto=udp", "")
	if json.Unmarshal(rec.Body.Bytes(), &page) != nil {
		t.Fatalf("history: %d %s", rec.Code, rec.Body)
	}
	for _, e := range page.Entries {
		if e.Space() != store.UDP {
			t.Fatalf("history ?proto=udp has %+v", e)
		}
	}
	if len(page.Entries) != 3 { // requested, released, assigned
		t.Fatalf("history of 30001/udp: %+v", page.Entries)
	}
	var ans portAt
	rec = adminRequest(srv, "GET", "/api/history?port=30001&at="+time.Now().Add(time.Minute).Format(time.RFC3339), "")
	if json.Unmarshal(rec.Body.Bytes(), &ans) != nil || !ans.Held || ans.Key != "u.b-tcp" || ans.Proto != store.TCP ||
		ans.UDP == nil || !ans.UDP.Held || ans.UDP.Key != "u.new" || ans.UDP.Proto != store.UDP {
		t.Fatalf("who held 30001 now: %s", rec.Body)
	}
}

// TestSpacesExportImport: an export file of a version with one port space
// imports with each record in its proxy type's space, and an export with a
// tcp and a udp key on one number round-trips through import and export.
func TestSpacesExportImport(t *testing.T) {
	fullTier(t, "the built binary")
	// As versions with one space exported: the fields of a record, no proto.
	old := `{"allocations":[
 {"key":"u.ssh","port":30000,"user":"u","proxy_name":"u.ssh","proxy_type":"tcp","created_at":"2026-01-01T00:00:00Z","assigned_at":"2026-01-01T00:00:00Z"},
 {"key":"u.wg","port":30001,"user":"u","proxy_name":"u.wg","proxy_type":"udp","created_at":"2026-01-01T00:00:00Z","assigned_at":"2026-01-01T00:00:00Z","note":"WireGuard"}]}`
	dir := t.TempDir()
	cli(t, false, old, "import", "-data-dir", dir)
	a := newTestAllocator(t, dir, "30000-30009", allocatorOptions{})
	if r, _ := a.current("u.wg"); r.Slot() != store.UDPPort(30001) || r.Note != "WireGuard" {
		t.Fatalf("u.wg from an old export = %+v", r)
	}
	mustAllocate(t, a, withPort(req("u", "u.dns", "udp"), 30000))
	a.store.Close()

	exported, _ := cli(t, false, "", "export", "-data-dir", dir)
	fresh := t.TempDir()
	cli(t, false, exported, "import", "-data-dir", fresh)
	again, _ := cli(t, false, "", "export", "-data-dir", fresh)
	var before, after exportFile
	if json.Unmarshal([]byte(exported), &before) != nil || json.Unmarshal([]byte(again), &after) != nil {
		t.Fatalf("exports: %s\n%s", exported, again)
	}
	slots := func(f exportFile) string {
		var s []string
		for _, r := range f.Allocations {
			s = append(s, r.Key+"="+r.Slot().String())
		}
		slices.Sort(s)
		return strings.Join(s, " ")
	}
	if want := "u.dns=30000/udp u.ssh=30000/tcp u.wg=30001/udp"; slots(before) != want || slots(after) != want {
		t.Fatalf("export %s, after import and export %s; want %s", slots(before), slots(after), want)
	}
}

// TestSpacesReclaimSparesFrpsPorts: a key left on a number that frps has
// since taken for its kcp listener (udp) is abandoned; a reclaim must not
// hand frps's own port to a new key, and the key shows as outside the
// pool.
func TestSpacesReclaimSparesFrpsPorts(t *testing.T) {
	dir := t.TempDir()
	now, advance := fakeClock(time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC))
	st := newTestStore(t, dir)
	a := newAllocatorOn(t, st, "7000-7001", allocatorOptions{now: now})
	if p, _ := mustAllocate(t, a, withPort(req("u", "u.old", "udp"), 7001)); p != 7001 {
		t.Fatalf("old = %d", p)
	}
	st.Close()

	advance(2 * time.Hour)
	st2 := newTestStore(t, dir)
	defer st2.Close()
	a2 := newAllocatorOn(t, st2, "7000-7001", allocatorOptions{now: now,
		excluded: map[store.Slot]string{store.UDPPort(7001): "frps kcpBindPort"},
		policy:   mustPolicy(t, "", "7000-7001", 0, time.Hour)})
	if p, _ := mustAllocate(t, a2, req("w", "w.a", "udp")); p != 7000 {
		t.Fatalf("w.a = %d; want 7000", p)
	}
	p, _, err := a2.allocate(req("w", "w.b", "udp"))
	if !errors.Is(err, errPoolExhausted) {
		t.Fatalf("w.b got %d/udp (err %v): a reclaim handed out frps's kcpBindPort", p, err)
	}
	if v, _ := a2.find("u.old"); !v.OutsidePool {
		t.Fatalf("u.old on frps's kcpBindPort: %+v; want it shown outside the pool", v)
	}
}
