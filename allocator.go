package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// The reasons an allocation is refused. The handler turns each into the
// reject_reason frps shows the client, in one place (rejectReason).
var (
	errPoolExhausted = errors.New("no free port left")
	errPortReserved  = errors.New("reserved for another proxy")
	errPortOutside   = errors.New("outside the allowed ports")
	errPortInUse     = errors.New("in use by another program on the server")
	errPortInvalid   = errors.New("not a valid port number")
	errPortForFrps   = errors.New("used by frps itself")
	errNoAllocation  = errors.New("no allocation for this key")
	errStoreTimedOut = errors.New("the port store did not answer in time")
	errStoreFailed   = errors.New("the port store failed")
	errKeyBusy       = errors.New("another change to this key is still being stored")
)

// portError is a refusal about one specific port.
type portError struct {
	port int
	err  error
	// detail adds what the port is used for, when known (errPortForFrps).
	detail string
}

func (e *portError) Error() string {
	s := fmt.Sprintf("port %d is %v", e.port, e.err)
	if e.detail != "" {
		s += " (" + e.detail + ")"
	}
	return s
}
func (e *portError) Unwrap() error { return e.err }

// poolError says which pool ran dry.
type poolError struct{ pool string }

func (e *poolError) Error() string { return fmt.Sprintf("no free port left in pool %s", e.pool) }
func (e *poolError) Unwrap() error { return errPoolExhausted }

// storeError wraps what the store said, so logs have it while the client
// only sees which kind of failure it was.
type storeError struct {
	kind error // errStoreTimedOut or errStoreFailed
	err  error
}

func (e *storeError) Error() string {
	if e.err == nil {
		return e.kind.Error()
	}
	return e.kind.Error() + ": " + e.err.Error()
}
func (e *storeError) Unwrap() error { return e.kind }

// proxyRequest is what the allocation rules need from a NewProxy.
type proxyRequest struct {
	User       string
	ProxyName  string
	ProxyType  string
	Group      string
	RemotePort int // 0: any port
}

// groupKeyPrefix marks keys that stand for a load-balancing group: frps
// insists that every member of a group listens on the same port.
const groupKeyPrefix = "group:"

// key is the name a sticky port is remembered under.
func (r proxyRequest) key() string {
	if r.Group != "" {
		return groupKeyPrefix + r.Group
	}
	return r.ProxyName
}

// validUTF8 replaces each invalid byte with U+FFFD, as encoding/json does
// when it stores a string: a key must read back as the same key.
func validUTF8(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		b.WriteRune(r)
		i += size
	}
	return b.String()
}

// outcome says how a port was decided; it is logged and counted.
type outcome string

const (
	outcomeHit       outcome = "hit"       // the key's sticky port
	outcomeNew       outcome = "new"       // a fresh port from the pool
	outcomeRequested outcome = "requested" // the port the client asked for
)

// allocation is a record held in memory, with the fields that change
// without a store write.
type allocation struct {
	record
	lastSeen atomic.Int64 // unix nanoseconds
	// storedSeen and seenWrittenAt (unix nanoseconds) keep last_seen writes
	// to one per key per seenInterval. Guarded by allocator.flushMu.
	storedSeen, seenWrittenAt int64
	// settled is non-nil while the store has not yet answered for this
	// allocation; it is closed when it has. Guarded by allocator.mu.
	settled chan struct{}
}

// allocator holds the allocation rules. Every allocation lives in memory,
// so a sticky hit touches no disk; the store is written before a new port
// is announced, and no lock is held while the store works.
type allocator struct {
	store   portStore
	pool    *portSet
	poolStr string
	// excluded names ports taken out of the pool for a reason a client
	// should hear (frps's own listeners, the plugin's port).
	excluded map[int]string
	probe    func(port int) error // nil: no bind test
	timeout  time.Duration
	now      func() time.Time
	log      *slog.Logger
	// storeFailed hears of every store call that failed or timed out.
	storeFailed func(error)

	flushMu sync.Mutex // one last_seen flush at a time
	mu      sync.RWMutex
	byKey   map[string]*allocation
	byPort  map[int]*allocation
	held    portSet // ports of byPort
}

// allocatorOptions are the allocator's tunables; zero values are defaults.
type allocatorOptions struct {
	excluded     map[int]string
	probe        func(port int) error
	storeTimeout time.Duration
	now          func() time.Time
	log          *slog.Logger
	storeFailed  func(error)
}

// newAllocator loads every allocation from store and serves from pool.
func newAllocator(store portStore, pool *portSet, opts allocatorOptions) (*allocator, loaded, error) {
	a := &allocator{
		store:       store,
		pool:        pool,
		poolStr:     pool.String(),
		excluded:    opts.excluded,
		probe:       opts.probe,
		timeout:     opts.storeTimeout,
		now:         opts.now,
		log:         opts.log,
		storeFailed: opts.storeFailed,
		byKey:       map[string]*allocation{},
		byPort:      map[int]*allocation{},
	}
	if a.timeout <= 0 {
		a.timeout = 2 * time.Second
	}
	if a.now == nil {
		a.now = time.Now
	}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.storeFailed == nil {
		a.storeFailed = func(error) {}
	}
	got, err := store.load()
	if err != nil {
		return nil, got, fmt.Errorf("load allocations: %w", err)
	}
	for _, r := range got.allocations {
		al := &allocation{record: r}
		seen := r.CreatedAt
		if t, ok := got.lastSeen[r.Key]; ok && t.After(seen) {
			seen = t
		}
		al.lastSeen.Store(seen.UnixNano())
		al.storedSeen = seen.UnixNano()
		a.byKey[r.Key] = al
		a.byPort[r.Port] = al
		a.held.add(r.Port)
	}
	return a, got, nil
}

// allocate returns the port for req's key: its sticky port, the port it
// asked for, or a fresh one. A new port is stored before it is returned.
func (a *allocator) allocate(req proxyRequest) (int, outcome, error) {
	req.User, req.ProxyName, req.Group = validUTF8(req.User), validUTF8(req.ProxyName), validUTF8(req.Group)
	req.ProxyType = validUTF8(req.ProxyType)
	key := req.key()
	now := a.now()
	a.mu.RLock()
	if cur := a.byKey[key]; cur != nil && cur.settled == nil && (req.RemotePort == 0 || req.RemotePort == cur.Port) {
		cur.lastSeen.Store(now.UnixNano())
		a.mu.RUnlock()
		return cur.Port, outcomeHit, nil
	}
	a.mu.RUnlock()

	deadline := time.NewTimer(a.timeout)
	defer deadline.Stop()
	for {
		a.mu.Lock()
		cur := a.byKey[key]
		if cur != nil && cur.settled != nil {
			// Another request is storing this key: wait for its answer.
			wait := cur.settled
			a.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-deadline.C:
				return 0, "", &storeError{kind: errStoreTimedOut, err: errKeyBusy}
			}
		}
		if cur != nil && (req.RemotePort == 0 || req.RemotePort == cur.Port) {
			cur.lastSeen.Store(now.UnixNano())
			a.mu.Unlock()
			return cur.Port, outcomeHit, nil
		}
		port, how, err := a.choosePort(key, req.RemotePort)
		if err != nil {
			a.mu.Unlock()
			return 0, "", err
		}
		n := &allocation{record: record{
			Key: key, Port: port, User: req.User, ProxyName: req.ProxyName,
			ProxyType: req.ProxyType, Group: req.Group, CreatedAt: now, AssignedAt: now,
		}}
		if cur != nil {
			n.CreatedAt = cur.CreatedAt
		}
		n.lastSeen.Store(now.UnixNano())
		n.storedSeen = now.UnixNano()
		a.begin(n, cur)
		a.mu.Unlock()
		if err := a.persist(deadline.C, n, cur, func() error { return a.store.claim(n.record, recordOf(cur)) }); err != nil {
			return 0, "", err
		}
		return port, how, nil
	}
}

// assign pins key to port on an operator's word: a new key or a move.
func (a *allocator) assign(key string, port int) (record, error) {
	key = validUTF8(key)
	now := a.now()
	deadline := time.NewTimer(a.timeout)
	defer deadline.Stop()
	for {
		a.mu.Lock()
		cur := a.byKey[key]
		if cur != nil && cur.settled != nil {
			wait := cur.settled
			a.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-deadline.C:
				return record{}, &storeError{kind: errStoreTimedOut, err: errKeyBusy}
			}
		}
		if cur != nil && cur.Port == port {
			r := cur.record
			a.mu.Unlock()
			return r, nil
		}
		if err := a.checkRequested(key, port, false); err != nil {
			a.mu.Unlock()
			return record{}, err
		}
		n := &allocation{record: record{Key: key, Port: port, CreatedAt: now, AssignedAt: now}}
		seen := now.UnixNano()
		switch name, isGroup := cutGroupKey(key); {
		case cur != nil:
			n.record = cur.record
			n.Port, n.AssignedAt = port, now
			seen = cur.lastSeen.Load()
		case isGroup:
			n.Group = name
		default:
			n.ProxyName = key
		}
		n.lastSeen.Store(seen)
		n.storedSeen = seen
		a.begin(n, cur)
		a.mu.Unlock()
		if err := a.persist(deadline.C, n, cur, func() error { return a.store.claim(n.record, recordOf(cur)) }); err != nil {
			return record{}, err
		}
		return n.record, nil
	}
}

// release forgets key's allocation; its port becomes free once stored.
func (a *allocator) release(key string) error {
	key = validUTF8(key)
	deadline := time.NewTimer(a.timeout)
	defer deadline.Stop()
	for {
		a.mu.Lock()
		cur := a.byKey[key]
		if cur == nil {
			a.mu.Unlock()
			return errNoAllocation
		}
		if cur.settled != nil {
			wait := cur.settled
			a.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-deadline.C:
				return &storeError{kind: errStoreTimedOut, err: errKeyBusy}
			}
		}
		cur.settled = make(chan struct{})
		a.mu.Unlock()
		return a.await(deadline.C, func() error { return a.store.release(cur.record) }, func(err error) {
			if err == nil {
				delete(a.byKey, key)
				delete(a.byPort, cur.Port)
				a.held.remove(cur.Port)
			}
			close(cur.settled)
			cur.settled = nil
		})
	}
}

// begin puts n in memory, marked unsettled, in place of cur. Called with mu held.
func (a *allocator) begin(n, cur *allocation) {
	n.settled = make(chan struct{})
	a.byKey[n.Key] = n
	a.byPort[n.Port] = n
	a.held.add(n.Port)
}

// persist runs write and settles n: kept when the store said yes, rolled
// back to cur when it said no. When the deadline passes first the caller
// hears a timeout, and n stays reserved until the store answers, so a late
// write can never land on a port that was meanwhile given to someone else.
func (a *allocator) persist(deadline <-chan time.Time, n, cur *allocation, write func() error) error {
	return a.await(deadline, write, func(err error) {
		if err == nil {
			if cur != nil && a.byPort[cur.Port] == cur {
				delete(a.byPort, cur.Port)
				a.held.remove(cur.Port)
			}
		} else {
			delete(a.byPort, n.Port)
			a.held.remove(n.Port)
			if cur != nil {
				a.byKey[n.Key] = cur
			} else {
				delete(a.byKey, n.Key)
			}
		}
		close(n.settled)
		n.settled = nil
	})
}

// await runs a store call with a deadline and applies its result under mu
// whenever it arrives.
func (a *allocator) await(deadline <-chan time.Time, call func() error, apply func(error)) error {
	done := make(chan error, 1)
	go func() { done <- call() }()
	settle := func(err error) {
		a.mu.Lock()
		apply(err)
		a.mu.Unlock()
	}
	select {
	case err := <-done:
		settle(err)
		if err != nil {
			err = &storeError{kind: errStoreFailed, err: err}
			a.storeFailed(err)
		}
		return err
	case <-deadline:
		go func() {
			err := <-done
			settle(err)
			if err != nil {
				a.log.Warn("late store call failed", "err", err)
			}
		}()
		err := &storeError{kind: errStoreTimedOut}
		a.storeFailed(err)
		return err
	}
}

// seenInterval is how often at most a key's last_seen is written: sticky
// hits stay free of disk I/O, and a crash loses at most an hour of it.
const seenInterval = time.Hour

// flushSeen writes last_seen for keys seen since it was last written, and
// not written within minGap. The server calls it every minute with
// seenInterval and once at shutdown with 0.
func (a *allocator) flushSeen(minGap time.Duration) (int, error) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	now := a.now().UnixNano()
	a.mu.RLock()
	var due []*allocation
	for _, al := range a.byKey {
		if al.settled == nil && al.lastSeen.Load() > al.storedSeen && now-al.seenWrittenAt >= int64(minGap) {
			due = append(due, al)
		}
	}
	a.mu.RUnlock()
	var firstErr error
	written := 0
	for _, al := range due {
		seen := al.lastSeen.Load()
		timer := time.NewTimer(a.timeout)
		err := a.await(timer.C, func() error { return a.store.touch(al.Key, time.Unix(0, seen).UTC()) }, func(error) {})
		timer.Stop()
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		al.storedSeen, al.seenWrittenAt = seen, now
		written++
	}
	return written, firstErr
}

// choosePort applies the rules for a key that needs a new port. Called with mu held.
func (a *allocator) choosePort(key string, requested int) (int, outcome, error) {
	if requested != 0 {
		if err := a.checkRequested(key, requested, true); err != nil {
			return 0, "", err
		}
		return requested, outcomeRequested, nil
	}
	var busy portSet // ports the bind test refused during this search
	taken := &a.held
	for p := a.pool.nextFrom(0, taken); p >= 0; p = a.pool.nextFrom(p+1, taken) {
		if a.probe == nil {
			return p, outcomeNew, nil
		}
		err := a.probe(p)
		if err == nil {
			return p, outcomeNew, nil
		}
		a.log.Debug("port failed the bind test", "port", p, "err", err)
		if taken == &a.held {
			busy = a.held
			taken = &busy
		}
		busy.add(p)
	}
	return 0, "", &poolError{pool: a.poolStr}
}

// checkRequested says whether key may have port. Called with mu held.
func (a *allocator) checkRequested(key string, port int, probe bool) error {
	switch holder := a.byPort[port]; {
	case port < 1 || port > maxPort:
		return &portError{port: port, err: errPortInvalid}
	case holder != nil && holder.Key != key:
		return &portError{port: port, err: errPortReserved}
	case a.excluded[port] != "":
		return &portError{port: port, err: errPortForFrps, detail: a.excluded[port]}
	case !a.pool.has(port):
		return &portError{port: port, err: errPortOutside, detail: "allowed: " + a.poolStr}
	case holder == nil && probe && a.probe != nil && a.probe(port) != nil:
		return &portError{port: port, err: errPortInUse}
	}
	return nil
}

// lookup returns key's allocation.
func (a *allocator) lookup(key string) (record, time.Time, bool) {
	key = validUTF8(key)
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[key]
	if al == nil {
		return record{}, time.Time{}, false
	}
	return al.record, time.Unix(0, al.lastSeen.Load()), true
}

// poolStats counts the pool: size, allocated ports inside it, and free.
type poolStats struct {
	Size int `json:"size"`
	Used int `json:"used"`
	Free int `json:"free"`
}

func (a *allocator) stats() poolStats {
	a.mu.RLock()
	defer a.mu.RUnlock()
	s := poolStats{Size: a.pool.len()}
	for p := range a.byPort {
		if a.pool.has(p) {
			s.Used++
		}
	}
	s.Free = s.Size - s.Used
	return s
}

// snapshot lists every settled allocation, sorted by port.
func (a *allocator) snapshot() []allocationView {
	a.mu.RLock()
	out := make([]allocationView, 0, len(a.byPort))
	for _, al := range a.byPort {
		if al.settled != nil {
			continue
		}
		out = append(out, allocationView{record: al.record, LastSeen: time.Unix(0, al.lastSeen.Load())})
	}
	a.mu.RUnlock()
	slices.SortFunc(out, func(x, y allocationView) int { return x.Port - y.Port })
	return out
}

// allocationView is an allocation as operators see it.
type allocationView struct {
	record
	LastSeen time.Time `json:"last_seen"`
}

func recordOf(al *allocation) *record {
	if al == nil {
		return nil
	}
	r := al.record
	return &r
}

func cutGroupKey(key string) (string, bool) {
	if len(key) > len(groupKeyPrefix) && key[:len(groupKeyPrefix)] == groupKeyPrefix {
		return key[len(groupKeyPrefix):], true
	}
	return "", false
}

// bindProbe test-binds a port for tcp and udp on addr the way frps does
// before it listens, so a port frps could not bind is never handed out.
func bindProbe(addr string) func(port int) error {
	return func(port int) error {
		hostport := net.JoinHostPort(addr, strconv.Itoa(port))
		l, err := net.Listen("tcp", hostport)
		if err != nil {
			return err
		}
		l.Close()
		pc, err := net.ListenPacket("udp", hostport)
		if err != nil {
			return err
		}
		return pc.Close()
	}
}

// outsidePolicy says whether key's port lies outside what the pool would
// give it today (the pool changed since it was allocated).
func (a *allocator) outsidePolicy(key string) bool {
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[key]
	return al != nil && !a.pool.has(al.Port)
}
