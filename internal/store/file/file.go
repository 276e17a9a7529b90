// Package file is the default store: every record a JSON file in the data
// directory, in gokv's file layout, committed durably (see Store).
package file

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"frp-port-keeper/internal/store"
	"frp-port-keeper/internal/store/local"
)

// Store keeps every record as a JSON file in the data directory, laid
// out as gokv's file store lays them out (url.PathEscape(name)+".json"), so
// a person can read them and gokv can still open them. It does its own
// writes, through a handle on the directory it loaded (os.Root): a key
// record is replaced whole (temporary file, fsync, rename, fsync of the
// directory), which makes it the commit point of every change, and a
// directory removed or replaced while the server runs is never written to.
// A new key's key record replaces nothing: it is created under its own
// name, and it, its port record and the directory are fsync'd in one
// round (see below).
//
// What is on disk after each step of each write, and what a start makes of
// it (local.Resolve is the rule). Nothing is acknowledged before the
// step marked "ack" is on stable storage; a power cut may leave any record
// written without an fsync empty or missing, which the rule allows for. P
// and Q are slots: port-P is port-06001 for 6001/tcp, port-udp-06001 for
// 6001/udp (freed-P likewise), so a move between spaces is a move like
// any other:
//
//	new key K on P:  1 port-P{K}, key-K{P} created
//	                   under its name (O_EXCL)         -> K on P, or (key-K lost) port-P dropped, P free
//	                 2 fsync port-P, key-K and dir
//	                   together; all three done        -> K on P (ack)
//	move K, P to Q:  1 port-Q{K}, key-K.tmp{Q}       -> K on P; port-Q dropped (left empty: Q held back)
//	                 2 fsync both                      -> as 1
//	                 3 rename to key-K, fsync dir      -> K on Q; port-P dropped (ack)
//	                 4 port-P deleted, freed-P         -> K on Q
//	reclaim V's P:   1 port-P{K}, key-K.tmp{P}       -> V on P; port-P rewritten for V
//	                 2 fsync both                      -> as 1
//	                 3 rename to key-K, key-V deleted,
//	                   fsync dir                       -> K on P (ack; before the unlink lands, the synced port-P names K)
//	release K on P:  1 key-K deleted, fsync dir       -> P free; port-P dropped (ack)
//	                 2 port-P deleted, freed-P         -> P free
//
// A power cut during step 2 of a new key may keep any part of step 1
// (Resolve decides each; none of it was acknowledged, so the claim may
// land or not, and P goes to nobody else either way):
//
//	key-K{P} kept; port-P kept, lost or left empty -> K on P (port-P rewritten)
//	key-K left empty; port-P{K} kept                -> K on P (key-K rebuilt from port-P)
//	key-K lost; port-P{K} kept                      -> port-P dropped, P free
//	key-K lost or left empty; port-P lost           -> P free (an empty key-K quarantined)
//	key-K lost or left empty; port-P left empty     -> P held back: whose it is cannot be told
//
// The entries are durable only once the directory is fsync'd, so the
// answer waits for that as for the two files; the files' fsyncs keep
// either record from being found empty after an acknowledged claim. If a
// key-K is there already (a reclaimed key's record whose delete failed),
// the claim replaces it whole as a move does.
//
// A leftover key-K.tmp is deleted at the start. Freed-port and last-seen
// records are written without an fsync: a power cut can lose how long a
// port has been free or when a key was last seen, never an allocation. A
// step that fails leaves the state of the step before it (a failed
// directory fsync puts the old key records back; a new key's failed round
// deletes its records and fsyncs the directory again), and leftovers of
// later steps are deleted at the next write or start.
//
// Versions with one port space named a udp record's port record port-P
// too; a start that reads the records moves each to its udp name (see
// Load).
//
// Writes are committed in batches (group commit): while one batch waits
// for the disk, the writes that arrive queue up, and the next batch makes
// all of them durable with one round of parallel fsyncs and one fsync of
// the directory, so a burst of registrations does not pay an fsync each
// in series. A batch of new keys only does it in one round: the directory
// is fsync'd alongside the files.
type Store struct {
	dir    string
	root   *os.Root
	unlock func() // the directory's lock
	ops    Ops    // the root's writes; tests wrap it to inject faults
	log    *slog.Logger

	mu  sync.Mutex
	idx local.Index
	// leftovers are record files of finished writes still to delete.
	leftovers map[string]bool
	loaded    bool
	goneNoted bool
	hist      *History

	// queueMu guards the writes waiting for a batch; committing says a
	// caller is leading one (see commit).
	queueMu    sync.Mutex
	queue      []*pendingWrite
	committing bool
}

// Ops are the writes a file store makes, relative to its directory.
type Ops interface {
	WriteFile(name string, data []byte) error
	// CreateFile writes a file that must not exist yet (O_EXCL): an error
	// matching fs.ErrExist says it did, and nothing was written.
	CreateFile(name string, data []byte) error
	Rename(from, to string) error
	Remove(name string) error
	// SyncFile makes a file's data stable; syncDir a directory's entries.
	SyncFile(name string) error
	SyncDir(name string) error
}

type rootOps struct {
	root *os.Root
}

func (r rootOps) WriteFile(name string, data []byte) error {
	return r.root.WriteFile(name, data, 0o600)
}
func (r rootOps) CreateFile(name string, data []byte) error {
	f, err := r.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (r rootOps) Rename(from, to string) error { return r.root.Rename(from, to) }
func (r rootOps) Remove(name string) error {
	if err := r.root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func (r rootOps) SyncFile(name string) error {
	f, err := r.root.Open(name)
	if err != nil {
		return err
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (r rootOps) SyncDir(name string) error {
	if runtime.GOOS == "windows" { // Windows cannot open a directory to flush it
		return nil
	}
	return r.SyncFile(name)
}

// QuarantineDir is where unreadable files are moved, inside the data directory.
const QuarantineDir = "quarantine"

// CheckpointDir holds the shutdown checkpoint, inside the data directory.
const CheckpointDir = "checkpoint"

// CheckpointName is the checkpoint file, relative to the data directory.
var CheckpointName = filepath.Join(CheckpointDir, "file.json")

// Open opens the file store in dir, creating dir if need be, and locks
// the directory until Close: two servers on one directory would hand out
// the same ports. A directory that cannot be written is opened all the
// same, so the allocations it holds are still served.
func Open(dir string, log *slog.Logger) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("-data-dir: %v", err)
	}
	unlock, err := local.LockDir(dir)
	if err != nil {
		return nil, err
	}
	s, err := OpenUnlocked(dir, log)
	if err != nil {
		unlock()
		return nil, err
	}
	s.unlock = unlock
	return s, nil
}

// OpenUnlocked opens the file store in dir without its lock: for tests
// that reopen a directory as a crashed process would have left it.
func OpenUnlocked(dir string, log *slog.Logger) (*Store, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("open file store: %v", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Store{dir: dir, root: root, unlock: func() {}, ops: rootOps{root: root}, log: log, leftovers: map[string]bool{}}, nil
}

// WrapOps puts wrap around the directory writes: tests inject faults and
// watch the order of writes and fsyncs with it, benchmarks skip fsyncs.
// Call it before the first write.
func (s *Store) WrapOps(wrap func(Ops) Ops) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ops = wrap(s.ops)
}

// Waiting says how many writes wait for the next batch (tests).
func (s *Store) Waiting() int {
	s.queueMu.Lock()
	defer s.queueMu.Unlock()
	return len(s.queue)
}

// Crash drops the store as a crash would: no checkpoint, no last writes,
// the directory handle and its lock let go (tests).
func (s *Store) Crash() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = false
	s.root.Close()
	s.unlock()
}

func RecordFile(name string) string { return url.PathEscape(name) + ".json" }

func (s *Store) Load(ctx context.Context) (store.Snapshot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var problems []string
	if snap, ok, why := s.loadCheckpoint(); ok {
		s.idx, s.loaded = local.NewIndex(snap), true
		snap.From = "checkpoint"
		return snap, nil
	} else if why != "" {
		problems = append(problems, why)
	}
	raw, readProblems, err := s.readRecords()
	if err != nil {
		return store.Snapshot{}, err
	}
	damaged := len(readProblems)
	problems = append(problems, readProblems...)
	res := local.Resolve(raw)
	// Repairs make the records say what resolve decided; the decision
	// stands whether or not they can be written.
	var failed []string
	note := func(what string, err error) {
		if err != nil {
			failed = append(failed, fmt.Sprintf("could not %s: %v", what, err))
		}
	}
	for slot, why := range raw.DamagedPorts {
		if _, held := res.HeldBack[slot]; !held { // its key record says whose it is: rewritten below
			note("quarantine "+local.PortName(slot), s.quarantine(RecordFile(local.PortName(slot)), why))
		}
	}
	unwritten := map[store.Slot]bool{}
	for _, r := range res.Rewrite {
		err := s.writeRecord(local.PortName(r.Slot()), r)
		note("rewrite "+local.PortName(r.Slot()), err)
		unwritten[r.Slot()] = err != nil
	}
	for _, r := range res.RewriteKeys {
		note("rebuild "+local.KeyName(r.Key), s.commitRecord(local.KeyName(r.Key), r))
	}
	for _, slot := range res.Drop {
		note("delete "+local.PortName(slot), s.ops.Remove(RecordFile(local.PortName(slot))))
	}
	if len(res.Legacy) > 0 {
		// The udp names and rebuilt key records must be in the directory
		// before the last copies under the old names go.
		note("sync the data directory", s.ops.SyncDir("."))
	}
	for _, port := range res.Legacy {
		if !unwritten[store.UDPPort(port)] { // else it is still the udp slot's only port record
			note("remove "+local.PortName(store.TCPPort(port)), s.removeLegacy(port))
		}
	}
	for _, key := range res.SetAside {
		note("set aside "+local.KeyName(key), s.quarantine(RecordFile(local.KeyName(key)), "in conflict with another record"))
	}
	if len(res.RewriteKeys)+len(res.SetAside) > 0 {
		note("sync the data directory", s.ops.SyncDir("."))
	}
	snap := res.Snapshot(raw)
	snap.Problems = append(problems, snap.Problems...)
	snap.Problems = append(snap.Problems, failed...)
	if why := s.writable(); why != nil {
		snap.Degraded = why.Error()
	}
	snap.From = "records"
	snap.Damaged = damaged
	s.idx, s.loaded = local.NewIndex(snap), true
	return snap, nil
}

// removeLegacy removes the udp record under port's tcp name once its copy
// under the udp name is on stable storage (with a damaged key record it may
// be the only word on whose the slot is), and only while it still holds the
// udp record: a rewrite of the tcp slot may have put its record there.
func (s *Store) removeLegacy(port int) error {
	if err := s.ops.SyncFile(RecordFile(local.PortName(store.UDPPort(port)))); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	file := RecordFile(local.PortName(store.TCPPort(port)))
	data, err := s.root.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	var r store.Record
	if json.Unmarshal(data, &r) != nil || r.Slot() != store.UDPPort(port) {
		return nil
	}
	return s.ops.Remove(file)
}

// writable says why the directory cannot take writes, if it cannot.
func (s *Store) writable() error {
	const probe = ".write-test.tmp"
	if err := s.ops.WriteFile(probe, []byte("x")); err != nil {
		return local.Classify(err)
	}
	return s.ops.Remove(probe)
}

// readRecords reads every record file (the allocator has not started yet,
// so nothing writes meanwhile). Damaged files go to the quarantine folder.
func (s *Store) readRecords() (local.RawRecords, []string, error) {
	raw := local.NewRawRecords()
	var problems []string
	d, err := s.root.Open(".")
	if err != nil {
		return raw, nil, fmt.Errorf("read data directory: %v", err)
	}
	entries, err := d.ReadDir(-1)
	d.Close()
	if err != nil {
		return raw, nil, fmt.Errorf("read data directory: %v", err)
	}
	files := make(chan string, 256)
	results := make(chan fileResult, 256)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) * 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for file := range files {
				results <- s.readRecordFile(file)
			}
		}()
	}
	go func() {
		for _, e := range entries {
			name := e.Name()
			if !e.Type().IsRegular() {
				continue
			}
			if strings.HasSuffix(name, ".tmp") { // a write that never finished
				s.ops.Remove(name)
				continue
			}
			if strings.HasSuffix(name, ".json") {
				files <- name
			}
		}
		close(files)
		wg.Wait()
		close(results)
	}()
	loadedAt := time.Now().UTC()
	for r := range results {
		if r.problem != "" {
			problems = append(problems, r.problem)
			switch {
			case strings.HasPrefix(r.name, local.KeyPrefix):
				raw.DamagedKeys[r.name] = true
			case r.slot.Port > 0 && strings.HasPrefix(r.name, local.PortPrefix):
				// Left in place: it holds its slot back, at this start
				// and the next, until resolve finds its owner or an
				// operator releases it.
				raw.DamagedPorts[r.slot] = r.problem
				continue
			case r.slot.Port > 0 && strings.HasPrefix(r.name, local.FreedPrefix):
				// Freed, since when is lost: as of now, so it is
				// reused last rather than first.
				raw.Freed[r.slot] = loadedAt
			}
			if err := s.quarantine(r.file, r.problem); err != nil {
				problems = append(problems, fmt.Sprintf("could not quarantine %s: %v", r.file, err))
			}
			continue
		}
		switch {
		case r.slot.Port == 0: // not a record of ours, or no record at all
		case r.legacy:
			raw.LegacyUDP[r.slot.Port] = r.rec
		case strings.HasPrefix(r.name, local.PortPrefix):
			raw.Ports[r.slot] = r.rec
		case strings.HasPrefix(r.name, local.FreedPrefix):
			raw.Freed[r.slot] = r.freed.FreedAt
		}
		switch {
		case strings.HasPrefix(r.name, local.KeyPrefix):
			raw.Keys[r.rec.Key] = r.rec
		case strings.HasPrefix(r.name, local.SeenPrefix):
			raw.Seen[r.seen.Key] = r.seen
		}
	}
	slices.Sort(problems)
	return raw, problems, nil
}

// fileResult is what reading one file of the store directory found.
type fileResult struct {
	file    string
	name    string
	rec     store.Record
	seen    local.SeenRecord
	freed   local.FreedRecord
	problem string     // set when the file is damaged
	slot    store.Slot // the slot a port or freed-port record's name gives
	// legacy: a udp record under its tcp name (see local.RawRecords.LegacyUDP).
	legacy bool
}

// readRecordFile reads and checks one file of the store directory.
func (s *Store) readRecordFile(file string) (r fileResult) {
	r.file = file
	name, err := url.PathUnescape(strings.TrimSuffix(file, ".json"))
	if err != nil {
		return r // not a name we wrote; leave it alone
	}
	r.name = name
	data, err := s.root.ReadFile(file)
	if err != nil {
		r.problem = fmt.Sprintf("%s: unreadable: %v", file, err)
		return r
	}
	bad := func(why string) fileResult {
		r.problem = fmt.Sprintf("%s: %s", file, why)
		return r
	}
	switch {
	case strings.HasPrefix(name, local.PortPrefix):
		slot, ok := local.ParseSlotName(local.PortPrefix, name)
		if !ok {
			return r // not ours
		}
		r.slot = slot
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.rec); err != nil {
			return bad("not a valid record: " + err.Error())
		}
		switch {
		case !store.ValidRecord(r.rec) || r.rec.Port != slot.Port:
			return bad("record does not match its name")
		case r.rec.Space() == slot.Space:
		case slot.Space == store.TCP:
			r.legacy = true
		default:
			return bad("record does not match its name")
		}
	case strings.HasPrefix(name, local.KeyPrefix):
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.rec); err != nil {
			return bad("not a valid record: " + err.Error())
		}
		if !store.ValidRecord(r.rec) || local.KeyName(r.rec.Key) != name {
			return bad("record does not match its name")
		}
	case strings.HasPrefix(name, local.SeenPrefix):
		if len(data) == 0 {
			return bad("empty file")
		}
		if err := json.Unmarshal(data, &r.seen); err != nil || local.SeenName(r.seen.Key) != name {
			return bad("not a valid last-seen record")
		}
	case strings.HasPrefix(name, local.FreedPrefix):
		slot, ok := local.ParseSlotName(local.FreedPrefix, name)
		if !ok {
			return r // not ours
		}
		r.slot = slot
		if err := json.Unmarshal(data, &r.freed); err != nil || local.FreedName(r.freed.Slot()) != name {
			return bad("not a valid freed-port record")
		}
	}
	return r
}

// quarantine moves a damaged file out of the store, keeping it for a person
// to look at.
func (s *Store) quarantine(file, why string) error {
	if err := s.root.MkdirAll(QuarantineDir, 0o700); err != nil {
		return err
	}
	dst := filepath.Join(QuarantineDir, fmt.Sprintf("%s.%s", file, time.Now().UTC().Format("20060102T150405.000000000")))
	if err := s.ops.Rename(file, dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("quarantine %s (%s): %w", file, why, err)
	}
	return nil
}

// writeRecord writes a record file in place: for records whose loss or
// tearing resolve repairs (port, seen and freed records).
func (s *Store) writeRecord(name string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return local.Classify(s.ops.WriteFile(RecordFile(name), data))
}

// commitRecord replaces a record file whole and durably (temporary file,
// fsync, rename): a key record is either the old one or the new one,
// whatever happens meanwhile. The caller fsyncs the directory.
func (s *Store) commitRecord(name string, v any) error {
	tmp, err := s.stageRecord(name, v)
	if err != nil {
		return err
	}
	if err := s.ops.SyncFile(tmp); err != nil {
		s.ops.Remove(tmp)
		return local.Classify(err)
	}
	return s.renameStaged(name)
}

// stageRecord writes name's next content to its temporary file.
func (s *Store) stageRecord(name string, v any) (tmp string, err error) {
	data, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	tmp = RecordFile(name) + ".tmp"
	if err := s.ops.WriteFile(tmp, data); err != nil {
		s.ops.Remove(tmp)
		return "", local.Classify(err)
	}
	return tmp, nil
}

// renameStaged puts name's temporary file in its place.
func (s *Store) renameStaged(name string) error {
	file := RecordFile(name)
	if err := s.ops.Rename(file+".tmp", file); err != nil {
		s.ops.Remove(file + ".tmp")
		return local.Classify(err)
	}
	return nil
}

// ready checks that the store may write: loaded, and its directory is still
// the one it loaded. Called with mu held.
func (s *Store) ready() error {
	if !s.loaded {
		return errors.New("store not loaded")
	}
	if err := s.sameDir(); err != nil {
		if !s.goneNoted {
			s.goneNoted = true
			s.log.Error("the data directory was removed or replaced: new keys are refused and no checkpoint will be written; restart frp-port-keeper",
				"dir", s.dir, "err", err)
		}
		return err
	}
	s.sweep()
	return nil
}

// sameDir says whether s.dir is still the directory the store opened.
func (s *Store) sameDir() error {
	opened, err := s.root.Stat(".")
	if err != nil {
		return fmt.Errorf("%w: %v", store.ErrGone, err)
	}
	now, err := os.Stat(s.dir)
	if err != nil || !os.SameFile(opened, now) {
		return fmt.Errorf("%w (%s)", store.ErrGone, s.dir)
	}
	return nil
}

// sweep deletes leftovers of finished writes. Called with mu held.
func (s *Store) sweep() {
	for name := range s.leftovers {
		if s.ops.Remove(name) == nil {
			delete(s.leftovers, name)
		}
	}
}

// retire deletes a file that a committed write left behind, or remembers
// it for later. Called with mu held.
func (s *Store) retire(name string) {
	if s.ops.Remove(RecordFile(name)) != nil {
		s.leftovers[RecordFile(name)] = true
	}
}

func (s *Store) Claim(_ context.Context, c store.Claim) ([]store.Change, error) {
	return s.commit(&pendingWrite{claim: &c})
}

func (s *Store) Release(_ context.Context, r store.Record, at time.Time) ([]store.Change, error) {
	return s.commit(&pendingWrite{release: &r, at: at})
}

func (s *Store) ReleaseDamaged(_ context.Context, slot store.Slot) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ready(); err != nil {
		return err
	}
	if _, ok := s.idx.Damaged[slot]; !ok {
		return store.ErrNotHeldBack
	}
	if err := s.ops.Remove(RecordFile(local.PortName(slot))); err != nil {
		return local.Classify(err)
	}
	if err := s.ops.SyncDir("."); err != nil {
		return local.Classify(err)
	}
	delete(s.idx.Damaged, slot)
	return nil
}

// pendingWrite is a claim or a release waiting for its batch.
type pendingWrite struct {
	claim   *store.Claim
	release *store.Record
	at      time.Time // release: when the port became free
	// done receives the outcome, or lead: the caller is to commit the
	// next batch.
	done chan writeOutcome
	// staged is the key record's temporary file, once written; for a
	// direct write, the key record itself.
	staged string
	// direct: a new key's claim whose key record was created under its
	// own name (see stage), so that nothing is left to rename.
	direct bool
}

type writeOutcome struct {
	changes []store.Change
	err     error
	lead    bool
}

// commit queues w and returns its outcome. Whoever finds no batch in
// progress leads: it commits everything queued as one batch, then hands
// the lead to the first writer that queued meanwhile, so the writes that
// arrive while the disk is busy share the next round of fsyncs, and no
// goroutine outlives the callers.
func (s *Store) commit(w *pendingWrite) ([]store.Change, error) {
	w.done = make(chan writeOutcome, 1)
	s.queueMu.Lock()
	s.queue = append(s.queue, w)
	lead := !s.committing
	s.committing = true
	s.queueMu.Unlock()
	for {
		if !lead {
			out := <-w.done
			if !out.lead {
				return out.changes, out.err
			}
		}
		s.queueMu.Lock()
		batch := s.queue
		s.queue = nil
		s.queueMu.Unlock()
		deferred := s.commitBatch(batch)
		s.queueMu.Lock()
		s.queue = append(deferred, s.queue...)
		if len(s.queue) > 0 {
			s.queue[0].done <- writeOutcome{lead: true}
		} else {
			s.committing = false
		}
		s.queueMu.Unlock()
		lead = false
	}
}

// maxBatch bounds how many writes share one round of fsyncs.
const maxBatch = 256

// commitBatch commits batch and answers each write, except those touching
// a key or slot an earlier write of the batch touches: it returns them,
// to be committed in the next batch against what this one left.
func (s *Store) commitBatch(batch []*pendingWrite) (deferred []*pendingWrite) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ready(); err != nil {
		for _, w := range batch {
			w.done <- writeOutcome{err: err}
		}
		return nil
	}
	keys, slots := map[string]bool{}, map[store.Slot]bool{}
	var staged []*pendingWrite
	for _, w := range batch {
		wk, ws := w.touches()
		if len(staged) >= maxBatch || slices.ContainsFunc(wk, func(k string) bool { return keys[k] }) ||
			slices.ContainsFunc(ws, func(p store.Slot) bool { return slots[p] }) {
			deferred = append(deferred, w)
			continue
		}
		for _, k := range wk {
			keys[k] = true
		}
		for _, p := range ws {
			slots[p] = true
		}
		if err := s.stage(w); err != nil {
			w.done <- writeOutcome{err: err}
			continue
		}
		staged = append(staged, w)
	}
	// The new key records and their port records reach the disk before
	// they replace anything: a port record is then never found empty after
	// a power cut unless its write was never acknowledged, and a reclaim's
	// names the new owner while the old key record may still be there.
	//
	// A batch of new keys only (direct writes: nothing to rename) needs one
	// round: their records and the directory are fsync'd together, and
	// each is answered once all three are on stable storage.
	var syncs []string
	oneRound := len(staged) > 0
	for _, w := range staged {
		if w.claim != nil {
			syncs = append(syncs, w.staged, RecordFile(local.PortName(w.claim.Want.Slot())))
		}
		oneRound = oneRound && w.direct
	}
	if oneRound {
		syncs = append([]string{"."}, syncs...) // first: not behind a queue of files
	}
	failed := s.syncFiles(syncs)
	var committed []*pendingWrite
	// undone: a direct write's key record was deleted after a directory
	// fsync may have made it durable; a directory fsync makes the delete so.
	undone := false
	for _, w := range staged {
		err := failed[w.staged]
		if w.claim != nil && err == nil {
			err = failed[RecordFile(local.PortName(w.claim.Want.Slot()))]
		}
		if err == nil {
			err = failed["."]
		}
		if err == nil {
			err = s.switchOver(w)
		}
		if err != nil {
			s.unstage(w)
			undone = undone || w.direct
			w.done <- writeOutcome{err: local.Classify(err)}
			continue
		}
		committed = append(committed, w)
	}
	if oneRound {
		if undone {
			if err := s.ops.SyncDir("."); err != nil {
				s.log.Error("the data directory could not be synced; the next start repairs what a crash leaves", "err", err)
			}
		}
		for _, w := range committed {
			w.done <- writeOutcome{changes: s.finish(w)}
		}
		return deferred
	}
	if len(committed) == 0 {
		if undone {
			if err := s.ops.SyncDir("."); err != nil {
				s.log.Error("the data directory could not be synced; the next start repairs what a crash leaves", "err", err)
			}
		}
		return deferred
	}
	if err := s.ops.SyncDir("."); err != nil {
		// Whether the renames reached the disk is unknown: put the old
		// records back so that memory, disk and every answer agree on the
		// state before the batch.
		for _, w := range committed {
			s.revert(w)
			w.done <- writeOutcome{err: local.Classify(err)}
		}
		if serr := s.ops.SyncDir("."); serr != nil {
			s.log.Error("the data directory could not be synced; the next start repairs what a crash leaves", "err", serr)
		}
		return deferred
	}
	for _, w := range committed {
		w.done <- writeOutcome{changes: s.finish(w)}
	}
	return deferred
}

// touches names the keys and slots w writes.
func (w *pendingWrite) touches() (keys []string, slots []store.Slot) {
	if w.release != nil {
		return []string{w.release.Key}, []store.Slot{w.release.Slot()}
	}
	c := w.claim
	keys, slots = []string{c.Want.Key}, []store.Slot{c.Want.Slot()}
	if c.Old != nil {
		slots = append(slots, c.Old.Slot())
	}
	if c.Victim != nil {
		keys = append(keys, c.Victim.Key)
	}
	return keys, slots
}

// stage checks w against the index and writes what precedes its commit:
// for a claim the port record and the key record's temporary file.
func (s *Store) stage(w *pendingWrite) error {
	if r := w.release; r != nil {
		if cur, ok := s.idx.Get(r.Key); !ok || !store.SameRecord(cur, *r) {
			return &store.ConflictError{Current: s.idx.Current(r.Key, r.Slot())}
		}
		return nil
	}
	c := *w.claim
	if err := s.idx.Check(c); err != nil {
		return err
	}
	delete(s.leftovers, RecordFile(local.PortName(c.Want.Slot())))
	if err := s.writeRecord(local.PortName(c.Want.Slot()), c.Want); err != nil {
		s.undoPort(c)
		return err
	}
	if c.Old == nil && c.Victim == nil {
		// A new key: there is no key record to keep whole, so it is
		// created under its own name and made durable in the same round
		// of fsyncs as its port record and the directory.
		done, err := s.createRecord(local.KeyName(c.Want.Key), c.Want)
		if err != nil {
			s.undoPort(c)
			return err
		}
		if done {
			w.staged, w.direct = RecordFile(local.KeyName(c.Want.Key)), true
			return nil
		}
	}
	tmp, err := s.stageRecord(local.KeyName(c.Want.Key), c.Want)
	if err != nil {
		s.undoPort(c)
		return err
	}
	w.staged = tmp
	return nil
}

// createRecord writes a record file that is not there yet. done is false,
// with nothing written, if a file of that name is there (a key record
// whose delete failed: the caller replaces it whole instead).
func (s *Store) createRecord(name string, v any) (done bool, err error) {
	data, err := json.Marshal(v)
	if err != nil {
		return false, err
	}
	file := RecordFile(name)
	if err := s.ops.CreateFile(file, data); errors.Is(err, fs.ErrExist) {
		return false, nil
	} else if err != nil {
		s.ops.Remove(file)
		return false, local.Classify(err)
	}
	return true, nil
}

// switchOver makes w's change in the directory: the rename that commits a
// claim (and the reclaimed key's delete), or a release's delete.
func (s *Store) switchOver(w *pendingWrite) error {
	if r := w.release; r != nil {
		return s.ops.Remove(RecordFile(local.KeyName(r.Key)))
	}
	if w.direct {
		return nil // in place already
	}
	if err := s.renameStaged(local.KeyName(w.claim.Want.Key)); err != nil {
		return err
	}
	if v := w.claim.Victim; v != nil {
		if err := s.ops.Remove(RecordFile(local.KeyName(v.Key))); err != nil {
			// The synced port record names the new owner: resolve
			// keeps it, and the next start deletes key-V.
			s.leftovers[RecordFile(local.KeyName(v.Key))] = true
		}
	}
	return nil
}

// unstage cleans up after a write that did not commit. Called with mu held.
func (s *Store) unstage(w *pendingWrite) {
	if w.claim == nil {
		return
	}
	if w.staged != "" {
		s.ops.Remove(w.staged)
	}
	s.undoPort(*w.claim)
}

// revert puts back the records w replaced, after a directory fsync that
// failed. Called with mu held.
func (s *Store) revert(w *pendingWrite) {
	restore := func(r store.Record) {
		if err := s.commitRecord(local.KeyName(r.Key), r); err != nil {
			s.log.Error("could not restore a key record after a failed sync; the next start resolves it", "key", r.Key, "err", err)
		}
	}
	if r := w.release; r != nil {
		restore(*r)
		return
	}
	c := *w.claim
	if c.Old != nil {
		restore(*c.Old)
	} else if err := s.ops.Remove(RecordFile(local.KeyName(c.Want.Key))); err != nil {
		s.log.Error("could not remove a key record after a failed sync; the next start resolves it", "key", c.Want.Key, "err", err)
	}
	if c.Victim != nil {
		restore(*c.Victim)
	}
	s.undoPort(c)
}

// finish applies a committed write to the index and tidies up what it
// left behind; none of that needs to be durable. Called with mu held.
func (s *Store) finish(w *pendingWrite) []store.Change {
	if r := w.release; r != nil {
		s.retire(local.PortName(r.Slot()))
		s.retire(local.SeenName(r.Key))
		s.writeRecord(local.FreedName(r.Slot()), local.NewFreedRecord(r.Slot(), w.at))
		return s.idx.Released(*r, w.at)
	}
	c := *w.claim
	// A stale key record left to delete (a reclaimed key's) is this
	// key's record now.
	delete(s.leftovers, RecordFile(local.KeyName(c.Want.Key)))
	if c.Victim != nil {
		s.retire(local.SeenName(c.Victim.Key))
	}
	if old := c.Old; old != nil && old.Slot() != c.Want.Slot() {
		s.retire(local.PortName(old.Slot()))
		s.writeRecord(local.FreedName(old.Slot()), local.NewFreedRecord(old.Slot(), c.At))
	}
	s.retire(local.FreedName(c.Want.Slot()))
	return s.idx.Claimed(c)
}

// syncFiles fsyncs files in parallel (so one journal commit or device
// flush can serve several) and returns the errors by file; "." is the
// directory.
func (s *Store) syncFiles(files []string) map[string]error {
	failed := map[string]error{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	next := make(chan string)
	for range min(len(files), 16) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range next {
				sync := s.ops.SyncFile
				if f == "." {
					sync = s.ops.SyncDir
				}
				if err := sync(f); err != nil {
					mu.Lock()
					failed[f] = err
					mu.Unlock()
				}
			}
		}()
	}
	for _, f := range files {
		next <- f
	}
	close(next)
	wg.Wait()
	return failed
}

// undoPort puts the port record back as the index holds it after a claim
// that did not commit, so no unfinished write lingers. Called with mu held.
func (s *Store) undoPort(c store.Claim) {
	slot := c.Want.Slot()
	if holder, ok := s.idx.Holder(slot); ok {
		r, _ := s.idx.Get(holder)
		if s.writeRecord(local.PortName(slot), r) != nil {
			s.log.Warn("could not restore a port record; the next start repairs it", "port", slot.String())
		}
		return
	}
	s.retire(local.PortName(slot))
}

func (s *Store) Touch(_ context.Context, marks []store.SeenMark) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ready(); err != nil {
		return err
	}
	var firstErr error
	for _, m := range marks {
		if _, ok := s.idx.Get(m.Key); !ok {
			continue
		}
		rec := local.SeenRecord{Key: m.Key, LastSeen: m.Seen.UTC(), Online: m.Online}
		if err := s.writeRecord(local.SeenName(m.Key), rec); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		s.idx.Seen(m.Key, rec.LastSeen, rec.Online)
	}
	return firstErr
}

// Watch has nothing to deliver: only this process writes the directory,
// and each write's outcome reaches its caller.
func (s *Store) Watch(ctx context.Context, _ int64, _ func(store.Change)) error {
	<-ctx.Done()
	return ctx.Err()
}

// Close writes the checkpoint of a clean stop, unless the directory is no
// longer the one that was loaded.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.unlock()
	defer s.root.Close()
	if !s.loaded {
		return nil
	}
	s.loaded = false
	if err := s.sameDir(); err != nil {
		s.log.Warn("checkpoint not written", "err", err)
		return nil
	}
	if err := s.saveCheckpoint(); err != nil {
		s.log.Warn("checkpoint not written; the next start reads every record", "err", err)
	}
	return nil
}

// A checkpoint holds every allocation in one file, written at a clean
// stop: reading one file instead of two per allocation is what makes a
// start with tens of thousands of allocations fast. It is good for one
// start only: the start that uses it deletes it before any write can
// follow, so no write after it can ever be hidden by it (a start that
// cannot delete it reads the records instead). It also carries the
// directory's mtime, so records changed by hand after the stop are read.
type checkpointHeader struct {
	Version    int   `json:"version"`
	WatchMtime int64 `json:"watch_mtime_ns"`
}

// checkpointVersion 3 keeps freed and held-back ports by space. Older
// files are never used: version 1 was trusted by mtime alone, and version 2
// comes from a version with one port space, whose directory may hold udp
// records under tcp names that only reading the records moves (see Load).
const checkpointVersion = 3

// checkpointRecord is one allocation in a checkpoint; its JSON is what
// export writes, so a checkpoint can be read as an export by hand.
type checkpointRecord struct {
	store.Record
	LastSeen time.Time `json:"last_seen,omitzero"`
	Online   bool      `json:"online,omitempty"`
}

// checkpointFile is the second line of a checkpoint, after its header.
// Each record's space is its proxy type's; freed and held-back ports are
// by space, then port.
type checkpointFile struct {
	Allocations []checkpointRecord                `json:"allocations"`
	Freed       map[store.Space]map[int]time.Time `json:"freed,omitempty"`
	HeldBack    map[store.Space]map[int]string    `json:"held_back,omitempty"`
}

// bySpace is m as a checkpoint keeps it.
func bySpace[V any](m map[store.Slot]V) map[store.Space]map[int]V {
	out := map[store.Space]map[int]V{}
	for slot, v := range m {
		if out[slot.Space] == nil {
			out[slot.Space] = map[int]V{}
		}
		out[slot.Space][slot.Port] = v
	}
	return out
}

// bySlot is m from a checkpoint as a snapshot keeps it; ok is false when
// it names a space there is not.
func bySlot[V any](m map[store.Space]map[int]V) (out map[store.Slot]V, ok bool) {
	out = map[store.Slot]V{}
	for space, ports := range m {
		if !slices.Contains(store.Spaces, space) {
			return nil, false
		}
		for port, v := range ports {
			out[store.Slot{Space: space, Port: port}] = v
		}
	}
	return out, true
}

func (s *Store) dirMtime() (int64, error) {
	fi, err := s.root.Stat(".")
	if err != nil {
		return 0, err
	}
	return fi.ModTime().UnixNano(), nil
}

// loadCheckpoint returns the checkpoint when it still describes the store
// and could be deleted; why says why an existing one was not used.
func (s *Store) loadCheckpoint() (snap store.Snapshot, ok bool, why string) {
	data, err := s.root.ReadFile(CheckpointName)
	if err != nil {
		return snap, false, ""
	}
	mtime, err := s.dirMtime()
	if err != nil {
		return snap, false, ""
	}
	header, body, _ := bytes.Cut(data, []byte("\n"))
	var h checkpointHeader
	if json.Unmarshal(header, &h) != nil || h.Version != checkpointVersion || h.WatchMtime != mtime {
		s.ops.Remove(CheckpointName)
		return snap, false, ""
	}
	var cp checkpointFile
	if json.Unmarshal(body, &cp) != nil {
		return snap, false, "checkpoint unreadable; read every record"
	}
	freed, okFreed := bySlot(cp.Freed)
	heldBack, okHeld := bySlot(cp.HeldBack)
	if !okFreed || !okHeld {
		return store.Snapshot{}, false, "checkpoint names an unknown port space; read every record"
	}
	snap = store.Snapshot{LastSeen: make(map[string]time.Time, len(cp.Allocations)), Online: map[string]bool{}, Freed: freed}
	snap.Allocations = make([]store.Record, 0, len(cp.Allocations))
	for _, r := range cp.Allocations {
		if !store.ValidRecord(r.Record) {
			return store.Snapshot{}, false, "checkpoint holds an invalid record; read every record"
		}
		snap.Allocations = append(snap.Allocations, r.Record)
		if !r.LastSeen.IsZero() {
			snap.LastSeen[r.Key] = r.LastSeen
		}
		if r.Online {
			snap.Online[r.Key] = true
		}
	}
	if len(heldBack) > 0 {
		snap.HeldBack = heldBack
	}
	// Deleted for good before any write: a power cut must not bring it back.
	err = s.root.Remove(CheckpointName)
	if err == nil {
		err = s.ops.SyncDir(CheckpointDir)
	}
	if err != nil {
		return store.Snapshot{}, false, fmt.Sprintf("checkpoint not used: it cannot be deleted (%v), and a checkpoint is good for one start only", err)
	}
	return snap, true, ""
}

// saveCheckpoint writes the index atomically (temporary file, fsync,
// rename). Called with mu held, when no write can follow.
func (s *Store) saveCheckpoint() error {
	// The folder first: creating it moves the directory's mtime.
	if err := s.root.MkdirAll(CheckpointDir, 0o700); err != nil {
		return err
	}
	mtime, err := s.dirMtime()
	if err != nil {
		return err
	}
	if mtime%int64(time.Second) == 0 {
		// Whole seconds: a file system whose timestamps are too coarse for
		// a change by hand to be sure to move them.
		return errors.New("the file system's timestamps are too coarse to vouch for a checkpoint")
	}
	snap := s.idx.Snapshot()
	cp := checkpointFile{Allocations: make([]checkpointRecord, 0, len(snap.Allocations)), Freed: bySpace(snap.Freed), HeldBack: bySpace(snap.HeldBack)}
	for _, r := range snap.Allocations {
		cp.Allocations = append(cp.Allocations, checkpointRecord{Record: r, LastSeen: snap.LastSeen[r.Key], Online: snap.Online[r.Key]})
	}
	header, err := json.Marshal(checkpointHeader{Version: checkpointVersion, WatchMtime: mtime})
	if err != nil {
		return err
	}
	body, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	tmp := CheckpointName + ".tmp"
	f, err := s.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(append(header, '\n'), body...))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		s.root.Remove(tmp)
		return err
	}
	if err := s.root.Rename(tmp, CheckpointName); err != nil {
		return err
	}
	return s.ops.SyncDir(CheckpointDir)
}

// HistoryDir holds the history, one file a month ("2026-03.jsonl"), one
// JSON line an entry, appended to (each batch synced) and never
// rewritten: a crash can only tear the last line, which reading skips, and
// an append that fails part-way is cut off; either way the next append
// starts on a line of its own.
const HistoryDir = "history"

// History is the file store's history log.
type History struct {
	s       *Store
	mu      sync.Mutex
	checked map[string]bool // files whose last byte was checked since the start or their last failed append
	// open opens a month file for append (or a directory, to sync it);
	// tests replace it to inject faults and to watch the syncs.
	OpenFile func(name string, flag int) (FileHandle, error)
}

// FileHandle is an open month file as appends use it; *os.File is one.
type FileHandle interface {
	io.Writer
	io.ReaderAt
	Stat() (fs.FileInfo, error)
	Truncate(size int64) error
	Sync() error
	Close() error
}

func (s *Store) History() store.HistoryLog {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hist == nil {
		s.hist = &History{s: s, checked: map[string]bool{}, OpenFile: func(name string, flag int) (FileHandle, error) {
			f, err := s.root.OpenFile(name, flag, 0o600)
			if err != nil {
				return nil, err // not a nil *os.File in a non-nil interface
			}
			return f, nil
		}}
	}
	return s.hist
}

func historyFile(t time.Time) string { return t.UTC().Format("2006-01") + ".jsonl" }

func (h *History) Append(_ context.Context, entries []store.HistoryEntry) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.s.sameDir(); err != nil {
		return err
	}
	_, missing := h.s.root.Stat(HistoryDir)
	if err := h.s.root.MkdirAll(HistoryDir, 0o700); err != nil {
		return local.Classify(err)
	}
	if errors.Is(missing, fs.ErrNotExist) {
		if err := h.syncDir("."); err != nil {
			return local.Classify(err)
		}
	}
	byFile := map[string][]byte{}
	lines := map[string]int{}
	var order []string
	for _, e := range entries {
		line, err := json.Marshal(e)
		if err != nil {
			return err
		}
		name := filepath.Join(HistoryDir, historyFile(e.Time))
		if _, ok := byFile[name]; !ok {
			order = append(order, name)
		}
		byFile[name] = append(append(byFile[name], line...), '\n')
		lines[name]++
	}
	written := 0
	for _, name := range order {
		if err := h.appendFile(name, byFile[name]); err != nil {
			return &store.HistoryAppendError{Written: written, Err: local.Classify(err)}
		}
		written += lines[name]
	}
	return nil
}

// appendFile appends whole lines to a month file and syncs it: once it
// returns, they survive a power cut. When that fails (a full disk tears a
// write part-way) it cuts the file back to its size before, so the next
// append starts on a line of its own; if even that fails, the next append
// checks the last byte again and ends the torn line first.
func (h *History) appendFile(name string, data []byte) error {
	_, missing := h.s.root.Stat(name)
	f, err := h.OpenFile(name, os.O_RDWR|os.O_APPEND|os.O_CREATE)
	if err != nil {
		return err
	}
	defer f.Close()
	if errors.Is(missing, fs.ErrNotExist) {
		if err := h.syncDir(HistoryDir); err != nil {
			return err
		}
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	if !h.checked[name] && size > 0 {
		last := make([]byte, 1)
		if _, err := f.ReadAt(last, size-1); err != nil {
			return err
		}
		if last[0] != '\n' { // a line torn by a crash or a failed append: end it
			h.s.log.Warn("history: the last line of a month file was torn (its entry is lost); ending it", "file", name)
			data = append([]byte{'\n'}, data...)
		}
	}
	h.checked[name] = true
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if err != nil {
		delete(h.checked, name) // whatever is left, check the last byte again
		if terr := f.Truncate(size); terr != nil {
			return fmt.Errorf("%w (and the torn append could not be cut off: %v; the next append ends it)", err, terr)
		}
	}
	return err
}

// syncDir makes the entries of a directory durable: a new file or
// directory survives a power cut only once its parent is synced.
func (h *History) syncDir(name string) error {
	if runtime.GOOS == "windows" { // Windows cannot open a directory to flush it
		return nil
	}
	d, err := h.OpenFile(name, os.O_RDONLY)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// files lists the history's month files, newest first.
func (h *History) files() ([]string, error) {
	d, err := h.s.root.Open(HistoryDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	names = slices.DeleteFunc(names, func(n string) bool { return !strings.HasSuffix(n, ".jsonl") })
	slices.Sort(names)
	slices.Reverse(names)
	return names, nil
}

// monthOf is the first instant of a month file's month.
func monthOf(name string) (time.Time, bool) {
	t, err := time.Parse("2006-01", strings.TrimSuffix(name, ".jsonl"))
	return t, err == nil
}

// read returns the entries of one month file; lines that do not decode
// (a torn last line) are skipped.
func (h *History) read(name string) ([]store.HistoryEntry, int) {
	data, err := h.s.root.ReadFile(filepath.Join(HistoryDir, name))
	if err != nil {
		return nil, 0
	}
	var out []store.HistoryEntry
	skipped := 0
	for line := range bytes.SplitSeq(data, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var e store.HistoryEntry
		if json.Unmarshal(line, &e) != nil || e.ID == "" {
			skipped++
			continue
		}
		out = append(out, e)
	}
	return out, skipped
}

func (h *History) Entries(_ context.Context, q store.HistoryQuery) ([]store.HistoryEntry, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	names, err := h.files()
	if err != nil {
		return nil, err
	}
	var out []store.HistoryEntry
	for _, name := range names {
		month, ok := monthOf(name)
		if !ok {
			continue
		}
		if !q.Until.IsZero() && month.After(q.Until) {
			continue
		}
		if !q.Since.IsZero() && month.AddDate(0, 1, 0).Before(q.Since) {
			break
		}
		got, _ := h.read(name)
		var keep []store.HistoryEntry
		for _, e := range got {
			if q.Match(e) {
				keep = append(keep, e)
			}
		}
		slices.SortFunc(keep, func(a, b store.HistoryEntry) int { return strings.Compare(b.ID, a.ID) })
		out = append(out, keep...)
		if q.Limit > 0 && len(out) >= q.Limit {
			return out[:q.Limit], nil
		}
	}
	return out, nil
}

func (h *History) Prune(_ context.Context, before time.Time) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	names, err := h.files()
	if err != nil {
		return 0, err
	}
	pruned := 0
	for _, name := range names {
		month, ok := monthOf(name)
		if !ok || !month.AddDate(0, 1, 0).Before(before) {
			continue
		}
		got, skipped := h.read(name)
		if err := h.s.ops.Remove(filepath.Join(HistoryDir, name)); err != nil {
			return pruned, err
		}
		pruned += len(got) + skipped
	}
	return pruned, nil
}
