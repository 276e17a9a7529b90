package bolt

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"
	"frp-port-keeper/internal/store/storetest"

	"go.etcd.io/bbolt"
)

func TestContract(t *testing.T) {
	storetest.Run(t, storetest.Backend{Kind: "bbolt", New: func(t *testing.T) func(t *testing.T) store.Store {
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

// writeBucket writes records into a fresh bbolt file in dir, by record
// name, as any version of the bbolt store wrote them.
func writeBucket(t *testing.T, dir string, recs map[string]any) {
	t.Helper()
	db, err := bbolt.Open(filepath.Join(dir, FileName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(boltBucket)
		if err != nil {
			return err
		}
		for name, v := range recs {
			data, ok := v.([]byte)
			if !ok {
				if data, err = json.Marshal(v); err != nil {
					return err
				}
			}
			if err := b.Put([]byte(name), data); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// names lists the records s holds.
func names(t *testing.T, s *Store) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	err := s.db.View(func(tx *bbolt.Tx) error {
		return tx.Bucket(boltBucket).ForEach(func(k, _ []byte) error { out[string(k)] = true; return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
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
// record's port record port-NNNNN too; the load moves it to its udp name.
func TestLegacyUDPRecordsMoved(t *testing.T) {
	dir := t.TempDir()
	tcp, udp := storetest.Rec("t.web", 6000, "t"), storetest.UDPRec("u.dns", 6001, "u")
	freedAt := storetest.Base.Add(-time.Hour)
	writeBucket(t, dir, map[string]any{
		local.KeyName(tcp.Key): tcp,
		"port-06000":           tcp,
		local.KeyName(udp.Key): udp,
		"port-06001":           udp,
		"freed-06002":          map[string]any{"port": 6002, "freed_at": freedAt},
	})
	s, snap := openLoad(t, dir)
	storetest.WantAllocations(t, "old layout", snap, tcp, udp)
	if got := snap.Freed[store.TCPPort(6002)]; !got.Equal(freedAt) {
		t.Errorf("freed[6002/tcp] = %v; want %v (an old freed record is tcp's)", got, freedAt)
	}
	if snap.Damaged != 0 || !slices.ContainsFunc(snap.Problems, func(p string) bool { return strings.Contains(p, "moved to port-udp-06001") }) {
		t.Errorf("old layout: damaged %d, problems %q; want no damage and the move reported", snap.Damaged, snap.Problems)
	}
	if n := names(t, s); !n["port-udp-06001"] || n["port-06001"] {
		t.Fatalf("after the load: records %v; want port-06001 moved to port-udp-06001", n)
	}
	other := storetest.Rec("o.web", 6001, "o")
	if _, err := s.Claim(context.Background(), store.Claim{Want: other}); err != nil {
		t.Fatalf("tcp claim of 6001 beside the moved udp record: %v", err)
	}
	s.Close()
	s, snap = openLoad(t, dir)
	defer s.Close()
	storetest.WantAllocations(t, "after a restart", snap, tcp, udp, other)
	if len(snap.Problems) != 0 {
		t.Errorf("after a restart: problems %q; want none", snap.Problems)
	}
}

// TestHeldBackPerSlot: a damaged port record holds back the slot its name
// gives, and only that one.
func TestHeldBackPerSlot(t *testing.T) {
	dir := t.TempDir()
	tcp := storetest.Rec("t.web", 6001, "t")
	writeBucket(t, dir, map[string]any{local.KeyName(tcp.Key): tcp, "port-06001": tcp, "port-udp-06001": []byte{}})
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
	if n := names(t, s); n["port-udp-06001"] || !n["port-06001"] {
		t.Fatalf("after the release: records %v; want port-udp-06001 gone and port-06001 kept", n)
	}
	if _, err := s.Claim(ctx, store.Claim{Want: udp}); err != nil {
		t.Fatalf("claim of released 6001/udp: %v", err)
	}
}
