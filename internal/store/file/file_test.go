package file

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"
	"frp-port-keeper/internal/store/storetest"
)

func TestContract(t *testing.T) {
	storetest.Run(t, storetest.Backend{Kind: "file", New: func(t *testing.T) func(t *testing.T) store.Store {
		dir := t.TempDir()
		return func(t *testing.T) store.Store {
			s, err := Open(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	}})
}

// writeRecords writes records as JSON files in dir, by record name, as
// any version of the file store wrote them.
func writeRecords(t *testing.T, dir string, recs map[string]any) {
	t.Helper()
	for name, v := range recs {
		data, ok := v.([]byte)
		if !ok {
			var err error
			if data, err = json.Marshal(v); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, RecordFile(name)), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func exists(dir, name string) bool {
	_, err := os.Stat(filepath.Join(dir, RecordFile(name)))
	return err == nil
}

func openLoad(t *testing.T, dir string) (*Store, store.Snapshot) {
	t.Helper()
	s, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := s.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s, snap
}

// TestLegacyUDPRecordsMoved: versions with one port space named a udp
// record's port record port-NNNNN too. Such a directory loads with the
// udp key in the udp space, its record moved to its udp name, so that a
// tcp claim of the same number can write port-NNNNN.
func TestLegacyUDPRecordsMoved(t *testing.T) {
	dir := t.TempDir()
	tcp, udp := storetest.Rec("t.web", 6000, "t"), storetest.UDPRec("u.dns", 6001, "u")
	freedAt := storetest.Base.Add(-time.Hour)
	writeRecords(t, dir, map[string]any{
		local.KeyName(tcp.Key):   tcp,
		"port-06000":             tcp,
		local.KeyName(udp.Key):   udp,
		"port-06001":             udp,
		"freed-06002":            map[string]any{"port": 6002, "freed_at": freedAt},
		local.SeenName(udp.Key):  local.SeenRecord{Key: udp.Key, LastSeen: freedAt},
		"port-06003.json.backup": []byte("x"), // not a record: left alone
	})
	s, snap := openLoad(t, dir)
	storetest.WantAllocations(t, "old layout", snap, tcp, udp)
	if got := snap.LastSeen[udp.Key]; !got.Equal(freedAt) {
		t.Errorf("old layout: %s last seen %v; want %v", udp.Key, got, freedAt)
	}
	if got := snap.Freed[store.TCPPort(6002)]; !got.Equal(freedAt) {
		t.Errorf("freed[6002/tcp] = %v; want %v (an old freed record is tcp's)", got, freedAt)
	}
	if snap.Damaged != 0 || !slices.ContainsFunc(snap.Problems, func(p string) bool { return strings.Contains(p, "moved to port-udp-06001") }) {
		t.Errorf("old layout: damaged %d, problems %q; want no damage and the move reported", snap.Damaged, snap.Problems)
	}
	if !exists(dir, "port-udp-06001") || exists(dir, "port-06001") {
		t.Fatalf("after the load: port-udp-06001 there %v, port-06001 there %v; want moved", exists(dir, "port-udp-06001"), exists(dir, "port-06001"))
	}
	other := storetest.Rec("o.web", 6001, "o")
	if _, err := s.Claim(context.Background(), store.Claim{Want: other}); err != nil {
		t.Fatalf("tcp claim of 6001 beside the moved udp record: %v", err)
	}
	s.Crash() // no checkpoint: the next load reads the records
	s, snap = openLoad(t, dir)
	storetest.WantAllocations(t, "after a crash", snap, tcp, udp, other)
	if len(snap.Problems) != 0 {
		t.Errorf("after a crash: problems %q; want none", snap.Problems)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, snap = openLoad(t, dir)
	defer s.Close()
	if snap.From != "checkpoint" {
		t.Fatalf("after a clean stop: loaded from %q; want the checkpoint", snap.From)
	}
	storetest.WantAllocations(t, "from the checkpoint", snap, tcp, udp, other)
}

// TestOldCheckpointReadsRecords: a checkpoint of a version with one port
// space is not used, so the load reads the records and moves its udp
// records to their udp names.
func TestOldCheckpointReadsRecords(t *testing.T) {
	dir := t.TempDir()
	udp := storetest.UDPRec("u.dns", 6001, "u")
	writeRecords(t, dir, map[string]any{local.KeyName(udp.Key): udp, "port-06001": udp})
	if err := os.MkdirAll(filepath.Join(dir, CheckpointDir), 0o700); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	old := fmt.Sprintf(`{"version":2,"watch_mtime_ns":%d}`+"\n"+`{"allocations":[%s],"freed":{"6002":"2026-01-01T00:00:00Z"}}`,
		fi.ModTime().UnixNano(), must(json.Marshal(udp)))
	if err := os.WriteFile(filepath.Join(dir, CheckpointName), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	s, snap := openLoad(t, dir)
	defer s.Close()
	if snap.From != "records" {
		t.Fatalf("loaded from %q; want the records", snap.From)
	}
	storetest.WantAllocations(t, "old checkpoint", snap, udp)
	if !exists(dir, "port-udp-06001") || exists(dir, "port-06001") {
		t.Fatalf("the udp record was not moved to its udp name")
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestHeldBackPerSlot: a damaged port record holds back the slot its name
// gives, and only that one.
func TestHeldBackPerSlot(t *testing.T) {
	dir := t.TempDir()
	tcp := storetest.Rec("t.web", 6001, "t")
	writeRecords(t, dir, map[string]any{local.KeyName(tcp.Key): tcp, "port-06001": tcp, "port-udp-06001": []byte{}})
	s, snap := openLoad(t, dir)
	defer s.Close()
	storetest.WantAllocations(t, "a damaged udp port record", snap, tcp)
	if _, ok := snap.HeldBack[store.UDPPort(6001)]; !ok || len(snap.HeldBack) != 1 {
		t.Fatalf("held back %v; want 6001/udp alone", snap.HeldBack)
	}
	ctx := context.Background()
	udp := storetest.UDPRec("u.dns", 6001, "u")
	if _, err := s.Claim(ctx, store.Claim{Want: udp}); err == nil {
		t.Fatalf("claim of held-back 6001/udp won")
	}
	if err := s.ReleaseDamaged(ctx, store.TCPPort(6001)); !errors.Is(err, store.ErrNotHeldBack) {
		t.Fatalf("release of 6001/tcp, not held back: %v; want ErrNotHeldBack", err)
	}
	if err := s.ReleaseDamaged(ctx, store.UDPPort(6001)); err != nil {
		t.Fatalf("release of held-back 6001/udp: %v", err)
	}
	if exists(dir, "port-udp-06001") || !exists(dir, "port-06001") {
		t.Fatalf("after the release: want port-udp-06001 gone and port-06001 kept")
	}
	if _, err := s.Claim(ctx, store.Claim{Want: udp}); err != nil {
		t.Fatalf("claim of released 6001/udp: %v", err)
	}
}

// errCut is every directory write after a cut.
var errCut = errors.New("the power is off")

// cutOps lets the first n writes through, then fails every later one (the
// process died there), and remembers which files hold data written since
// their last fsync, which a power cut may lose.
type cutOps struct {
	Ops
	mu       sync.Mutex
	n        int
	unsynced map[string]bool
}

func (o *cutOps) step() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.n == 0 {
		return errCut
	}
	o.n--
	return nil
}

func (o *cutOps) mark(name string, dirty bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.unsynced[name] = dirty
}

func (o *cutOps) WriteFile(name string, data []byte) error {
	if err := o.step(); err != nil {
		return err
	}
	o.mark(name, true)
	return o.Ops.WriteFile(name, data)
}

func (o *cutOps) CreateFile(name string, data []byte) error {
	if err := o.step(); err != nil {
		return err
	}
	o.mark(name, true)
	return o.Ops.CreateFile(name, data)
}

func (o *cutOps) SyncFile(name string) error {
	if err := o.step(); err != nil {
		return err
	}
	err := o.Ops.SyncFile(name)
	if err == nil {
		o.mark(name, false)
	}
	return err
}

func (o *cutOps) Rename(from, to string) error {
	if err := o.step(); err != nil {
		return err
	}
	o.mu.Lock()
	o.unsynced[to], o.unsynced[from] = o.unsynced[from], false
	o.mu.Unlock()
	return o.Ops.Rename(from, to)
}

func (o *cutOps) Remove(name string) error {
	if err := o.step(); err != nil {
		return err
	}
	return o.Ops.Remove(name)
}

func (o *cutOps) SyncDir(name string) error {
	if err := o.step(); err != nil {
		return err
	}
	return o.Ops.SyncDir(name)
}

// TestUDPClaimCutAtEveryStep: a claim of a udp slot, as a new key beside a
// tcp key on the same number or as a key's move from tcp to udp, cut short
// after every step of its write by a crash of the process or by a power
// cut (every file written and not synced left empty; directory entries are
// kept as they are). What loads afterwards: the tcp key untouched; the
// claim there if it was acknowledged, with none of its records damaged;
// otherwise the state before it, the udp slot at worst held back; and
// every free slot claimable.
func TestUDPClaimCutAtEveryStep(t *testing.T) {
	tcp := storetest.Rec("t.web", 6001, "t")
	mover := storetest.Rec("m.web", 6002, "m")
	moved := storetest.UDPRec(mover.Key, 6002, "m")
	moved.AssignedAt = moved.AssignedAt.Add(time.Hour)
	cases := []struct {
		name   string
		claim  store.Claim
		before []store.Record // what loads if the claim did not land
		after  []store.Record // what loads if it did
	}{
		{"new key beside a tcp key", store.Claim{Want: storetest.UDPRec("u.dns", 6001, "u")},
			[]store.Record{tcp, mover}, []store.Record{tcp, mover, storetest.UDPRec("u.dns", 6001, "u")}},
		{"move from tcp to udp", store.Claim{Want: moved, Old: &mover, At: storetest.Base},
			[]store.Record{tcp, mover}, []store.Record{tcp, moved}},
	}
	for _, tc := range cases {
		for _, power := range []bool{false, true} {
			for n := 0; ; n++ {
				done := false
				t.Run(fmt.Sprintf("%s/power cut %v/after %d steps", tc.name, power, n), func(t *testing.T) {
					done = cutClaim(t, tc.claim, tc.before, tc.after, power, n)
				})
				if done || t.Failed() {
					break
				}
			}
		}
	}
}

// cutClaim runs one case of TestUDPClaimCutAtEveryStep and says whether
// the claim ran to its end before the cut.
func cutClaim(t *testing.T, c store.Claim, before, after []store.Record, power bool, n int) (ranToEnd bool) {
	dir := t.TempDir()
	ctx := context.Background()
	s, _ := openLoad(t, dir)
	for _, r := range before {
		if _, err := s.Claim(ctx, store.Claim{Want: r}); err != nil {
			t.Fatal(err)
		}
	}
	ops := &cutOps{n: n, unsynced: map[string]bool{}}
	s.WrapOps(func(inner Ops) Ops { ops.Ops = inner; return ops })
	_, err := s.Claim(ctx, c)
	acked := err == nil
	ranToEnd = ops.n > 0
	s.Crash()
	if power {
		for name, dirty := range ops.unsynced {
			if dirty {
				if err := os.Truncate(filepath.Join(dir, name), 0); err != nil && !errors.Is(err, fs.ErrNotExist) {
					t.Fatal(err)
				}
			}
		}
	}
	s, snap := openLoad(t, dir)
	defer s.Close()
	got := map[string]store.Record{}
	for _, r := range snap.Allocations {
		got[r.Key] = r
	}
	landed := store.SameRecord(got[c.Want.Key], c.Want)
	switch {
	case acked && !landed:
		t.Fatalf("an acknowledged claim (err %v) did not load: %+v", err, snap.Allocations)
	case landed:
		storetest.WantAllocations(t, "claim landed", snap, after...)
	default:
		storetest.WantAllocations(t, "claim did not land", snap, before...)
	}
	for slot := range snap.HeldBack {
		if acked || !power || slot != c.Want.Slot() {
			t.Fatalf("held back %v (acknowledged %v, power cut %v); want only the unacknowledged udp slot after a power cut", snap.HeldBack, acked, power)
		}
	}
	if acked {
		for _, p := range snap.Problems {
			if strings.Contains(p, RecordFile(local.PortName(c.Want.Slot()))) || strings.Contains(p, RecordFile(local.KeyName(c.Want.Key))) {
				t.Fatalf("an acknowledged claim's record was damaged: %q", snap.Problems)
			}
		}
	}
	if ranToEnd && !power {
		if len(snap.Problems) != 0 {
			t.Fatalf("a claim that ran to its end left repairs to the next start: %q", snap.Problems)
		}
		if old := c.Old; old != nil {
			if _, ok := snap.Freed[old.Slot()]; !ok {
				t.Fatalf("after a move that ran to its end: freed %v; want %s among them", snap.Freed, old.Slot())
			}
		}
	}
	// Every slot not held is free: a stranger gets each in turn.
	for i, slot := range []store.Slot{store.TCPPort(6001), store.UDPPort(6001), store.TCPPort(6002), store.UDPPort(6002)} {
		r := storetest.Rec(fmt.Sprintf("x%d.web", i), slot.Port, "x")
		r.ProxyType = string(slot.Space)
		_, held := snap.HeldBack[slot]
		taken := slices.ContainsFunc(snap.Allocations, func(a store.Record) bool { return a.Slot() == slot })
		if _, err := s.Claim(ctx, store.Claim{Want: r}); (err == nil) == (held || taken) {
			t.Fatalf("a stranger's claim of %s (held back %v, taken %v): %v", slot, held, taken, err)
		}
	}
	return ranToEnd
}

// TestLegacyUDPRecordBesideTCPKey: when the tcp slot of a legacy udp
// record's number has a key record of its own, the load writes that key's
// port record under the tcp name, and the move of the udp record must not
// remove it.
func TestLegacyUDPRecordBesideTCPKey(t *testing.T) {
	dir := t.TempDir()
	tcp, udp := storetest.Rec("t.web", 6001, "t"), storetest.UDPRec("u.dns", 6001, "u")
	writeRecords(t, dir, map[string]any{local.KeyName(tcp.Key): tcp, local.KeyName(udp.Key): udp, "port-06001": udp})
	s, snap := openLoad(t, dir)
	storetest.WantAllocations(t, "legacy udp record and a tcp key", snap, tcp, udp)
	for name, want := range map[string]store.Record{"port-06001": tcp, "port-udp-06001": udp} {
		var got store.Record
		data, err := os.ReadFile(filepath.Join(dir, RecordFile(name)))
		if err != nil || json.Unmarshal(data, &got) != nil || !store.SameRecord(got, want) {
			t.Fatalf("%s = %s (%v); want %+v", name, data, err, want)
		}
	}
	s.Crash()
	s, snap = openLoad(t, dir)
	defer s.Close()
	if len(snap.Problems) != 0 {
		t.Fatalf("the second load: problems %q; want none", snap.Problems)
	}
}

// TestLegacyDamagedUDPRecord: a directory of a version with one port
// space whose udp key's port record (port-06001) a power cut left empty.
// Its key record says whose it was (one holder per number then): the start
// rebuilds port-udp-06001 and sets the empty one aside, holding no tcp
// port back.
func TestLegacyDamagedUDPRecord(t *testing.T) {
	dir := t.TempDir()
	udp := storetest.UDPRec("u.dns", 6001, "u")
	writeRecords(t, dir, map[string]any{local.KeyName(udp.Key): udp, "port-06001": []byte{}})
	s, snap := openLoad(t, dir)
	defer s.Close()
	storetest.WantAllocations(t, "legacy", snap, udp)
	if why, held := snap.HeldBack[store.TCPPort(6001)]; held {
		t.Fatalf("6001/tcp held back (%s), though the only key on 6001 (udp) owns the damaged legacy record", why)
	}
	for name, want := range map[string]bool{"port-06001": false, "port-udp-06001": true} {
		if _, err := os.Stat(filepath.Join(dir, RecordFile(name))); (err == nil) != want {
			t.Errorf("%s there: %v; want %v", name, err == nil, want)
		}
	}
}

// roundOps lets every write through until the first fsync. From then on
// the process is taken to have died during that round of fsyncs: the
// fsyncs named in done complete, every other write fails, and synced
// names those that completed ("." is the directory).
type roundOps struct {
	Ops
	mu      sync.Mutex
	done    map[string]bool
	started bool
	// round names the fsyncs asked for once the round began; the first
	// of each waits (up to a few seconds) until want of them are in
	// flight together, and apart says some never were.
	round map[string]bool
	want  int
	all   chan struct{}
	apart bool
}

func (o *roundOps) cut() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.started {
		return errCut
	}
	return nil
}

func (o *roundOps) sync(name string, inner func(string) error) error {
	o.mu.Lock()
	o.started = true
	first := !o.round[name]
	o.round[name] = true
	if first && len(o.round) == o.want {
		close(o.all)
	}
	done := o.done[name]
	o.mu.Unlock()
	if first {
		select {
		case <-o.all:
		case <-time.After(3 * time.Second):
			o.mu.Lock()
			o.apart = true
			o.mu.Unlock()
		}
	}
	if !done {
		return errCut
	}
	return inner(name)
}

func (o *roundOps) WriteFile(name string, data []byte) error {
	if err := o.cut(); err != nil {
		return err
	}
	return o.Ops.WriteFile(name, data)
}

func (o *roundOps) CreateFile(name string, data []byte) error {
	if err := o.cut(); err != nil {
		return err
	}
	return o.Ops.CreateFile(name, data)
}

func (o *roundOps) Rename(from, to string) error {
	if err := o.cut(); err != nil {
		return err
	}
	return o.Ops.Rename(from, to)
}

func (o *roundOps) Remove(name string) error {
	if err := o.cut(); err != nil {
		return err
	}
	return o.Ops.Remove(name)
}

func (o *roundOps) SyncFile(name string) error { return o.sync(name, o.Ops.SyncFile) }
func (o *roundOps) SyncDir(name string) error  { return o.sync(name, o.Ops.SyncDir) }

// TestNewKeyCutInTheRound: a new key's claim makes its port record, its
// key record (created under its own name) and the directory durable in one
// round of parallel fsyncs. The process dies during that round, after each
// subset of the three fsyncs completed, and then the power goes: each
// file whose fsync did not complete is kept or left empty, and, unless
// the directory's fsync completed, each new directory entry is kept or
// lost (every combination is tried). The claim is acknowledged only if
// all three completed, and then it loads; otherwise what loads is the
// claim or nothing of it, the port at worst held back, never another
// key's; the key that was there before is untouched; and a second start
// finds nothing more to repair.
func TestNewKeyCutInTheRound(t *testing.T) {
	before := storetest.Rec("t.web", 6001, "t")
	for _, want := range []store.Record{storetest.Rec("k.web", 6002, "k"), storetest.UDPRec("k.dns", 6001, "k")} {
		port, key := RecordFile(local.PortName(want.Slot())), RecordFile(local.KeyName(want.Key))
		fsyncs := []string{port, key, "."}
		for subset := range 1 << len(fsyncs) {
			done := map[string]bool{}
			for i, name := range fsyncs {
				if subset&(1<<i) != 0 {
					done[name] = true
				}
			}
			// What a power cut may lose: the data of each file whose
			// fsync did not complete, and the two new entries unless
			// the directory's fsync did.
			var losable []string
			for _, f := range []string{port, key} {
				if !done[f] {
					losable = append(losable, "data "+f)
				}
				if !done["."] {
					losable = append(losable, "entry "+f)
				}
			}
			for lost := range 1 << len(losable) {
				var lose []string
				for i, l := range losable {
					if lost&(1<<i) != 0 {
						lose = append(lose, l)
					}
				}
				name := fmt.Sprintf("%s/synced %v/lost %v", want.Slot(), slices.Sorted(maps.Keys(done)), lose)
				t.Run(name, func(t *testing.T) { cutInRound(t, before, want, fsyncs, done, lose) })
			}
		}
	}
}

func cutInRound(t *testing.T, before, want store.Record, fsyncs []string, done map[string]bool, lose []string) {
	dir := t.TempDir()
	ctx := context.Background()
	s, _ := openLoad(t, dir)
	if _, err := s.Claim(ctx, store.Claim{Want: before}); err != nil {
		t.Fatal(err)
	}
	ops := &roundOps{done: done, round: map[string]bool{}, want: len(fsyncs), all: make(chan struct{})}
	s.WrapOps(func(inner Ops) Ops { ops.Ops = inner; return ops })
	_, err := s.Claim(ctx, store.Claim{Want: want, At: storetest.Base})
	acked := err == nil
	s.Crash()
	if got := slices.Sorted(maps.Keys(ops.round)); !slices.Equal(got, slices.Sorted(slices.Values(fsyncs))) || ops.apart {
		t.Errorf("the claim's fsyncs were %q (in flight together: %v); want %q, together", got, !ops.apart, fsyncs)
	}
	if acked != (len(done) == len(fsyncs)) {
		t.Fatalf("acknowledged %v (err %v) with %d of the round's %d fsyncs done", acked, err, len(done), len(fsyncs))
	}
	for _, l := range lose {
		what, file, _ := strings.Cut(l, " ")
		var err error
		if what == "data" {
			err = os.Truncate(filepath.Join(dir, file), 0)
		} else {
			err = os.Remove(filepath.Join(dir, file))
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
	}
	s, snap := openLoad(t, dir)
	var got []store.Record
	for _, r := range snap.Allocations {
		if r.Key != before.Key {
			got = append(got, r)
		}
	}
	landed := len(got) == 1 && store.SameRecord(got[0], want)
	switch {
	case acked && !landed:
		t.Fatalf("an acknowledged claim did not load: %+v", snap.Allocations)
	case landed:
		storetest.WantAllocations(t, "the claim landed", snap, before, want)
	default:
		storetest.WantAllocations(t, "the claim did not land", snap, before)
	}
	for slot := range snap.HeldBack {
		if acked || slot != want.Slot() {
			t.Fatalf("held back %v (acknowledged %v); want at most the unacknowledged claim's %s", snap.HeldBack, acked, want.Slot())
		}
	}
	if acked && snap.Damaged != 0 {
		t.Fatalf("an acknowledged claim's records were found damaged: %q", snap.Problems)
	}
	// Every slot is either held or free: a stranger's claim shows which.
	for i, slot := range []store.Slot{before.Slot(), want.Slot(), store.TCPPort(6003)} {
		r := storetest.Rec(fmt.Sprintf("x%d.web", i), slot.Port, "x")
		r.ProxyType = string(slot.Space)
		_, held := snap.HeldBack[slot]
		taken := slices.ContainsFunc(snap.Allocations, func(a store.Record) bool { return a.Slot() == slot })
		if _, err := s.Claim(ctx, store.Claim{Want: r}); (err == nil) == (held || taken) {
			t.Fatalf("a stranger's claim of %s (held back %v, taken %v): %v", slot, held, taken, err)
		}
	}
	// The key can claim again if it did not land.
	if !landed {
		again := want
		again.Port = 6004
		if _, err := s.Claim(ctx, store.Claim{Want: again}); err != nil {
			t.Fatalf("%s's claim after its unacknowledged one: %v", want.Key, err)
		}
	}
	s.Crash()
	s2, snap2 := openLoad(t, dir)
	defer s2.Close()
	for _, p := range snap2.Problems { // a held-back port's record stays until a release
		if _, held := snap.HeldBack[want.Slot()]; !held || !strings.HasPrefix(p, RecordFile(local.PortName(want.Slot()))+":") {
			t.Fatalf("a second start found more to repair: %q", snap2.Problems)
		}
	}
}

// noRemoveOps fails every delete of one file.
type noRemoveOps struct {
	Ops
	mu   sync.Mutex
	name string
}

func (o *noRemoveOps) Remove(name string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if name == o.name {
		return errCut
	}
	return o.Ops.Remove(name)
}

// TestNewKeyOverStaleKeyRecord: a key record of a key the store no longer
// holds can be left in the directory (a reclaimed key's record whose
// delete failed, kept to delete later). A new claim of that key finds its
// name taken, replaces the stale record whole as a move does, and the
// pending delete of the stale record does not then delete the new one.
func TestNewKeyOverStaleKeyRecord(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, _ := openLoad(t, dir)
	want := storetest.Rec("k.web", 6002, "k")
	stale := storetest.Rec("k.web", 6001, "k")
	keyFile := RecordFile(local.KeyName(want.Key))
	writeRecords(t, dir, map[string]any{local.KeyName(stale.Key): stale})
	ops := &noRemoveOps{name: keyFile}
	s.WrapOps(func(inner Ops) Ops { ops.Ops = inner; return ops })
	s.mu.Lock()
	s.leftovers[keyFile] = true // as a reclaim whose delete of key-K failed leaves it
	s.mu.Unlock()
	if _, err := s.Claim(ctx, store.Claim{Want: want}); err != nil {
		t.Fatalf("a new claim over a stale key record: %v", err)
	}
	ops.mu.Lock()
	ops.name = "" // deletes work again
	ops.mu.Unlock()
	if _, err := s.Claim(ctx, store.Claim{Want: storetest.Rec("o.web", 6003, "o")}); err != nil {
		t.Fatal(err)
	}
	s.Crash()
	s, snap := openLoad(t, dir)
	defer s.Close()
	storetest.WantAllocations(t, "after a crash", snap, want, storetest.Rec("o.web", 6003, "o"))
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Fatalf("%s left behind", e.Name())
		}
	}
}
