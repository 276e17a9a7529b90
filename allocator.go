package main

import (
	"cmp"
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
	errQuota         = errors.New("quota reached")
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

// Key prefixes. Group keys stand for a load-balancing group (frps insists
// that every member of a group listens on the same port). A proxy whose
// own name starts with one of these prefixes is keyed as "proxy:NAME", so
// no proxy name can pass for a group.
const (
	groupKeyPrefix = "group:"
	proxyKeyPrefix = "proxy:"
)

// key is the name a sticky port is remembered under.
func (r proxyRequest) key() string {
	if r.Group != "" {
		return groupKeyPrefix + r.Group
	}
	if strings.HasPrefix(r.ProxyName, groupKeyPrefix) || strings.HasPrefix(r.ProxyName, proxyKeyPrefix) {
		return proxyKeyPrefix + r.ProxyName
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
	reclaimed   func(victim record)

	flushMu sync.Mutex // one last_seen flush at a time
	mu      sync.RWMutex
	byKey   map[string]*allocation
	byPort  map[int]*allocation
	held    portSet // ports of byPort
	policy  *policy
	// perUser counts keys by user, for quotas.
	perUser map[string]int
	// freed holds ports that were given back, since freedAt (unix
	// nanoseconds); freeQueue orders them, longest free first. Entries of
	// ports reused since are skipped and dropped lazily.
	freed     portSet
	freedAt   map[int]int64
	freeQueue []freedPort
}

// freedPort is an entry of the free queue; it is stale once the port's
// freedAt differs.
type freedPort struct {
	port int
	at   int64
}

// allocatorOptions are the allocator's tunables; zero values are defaults.
type allocatorOptions struct {
	excluded     map[int]string
	probe        func(port int) error
	storeTimeout time.Duration
	now          func() time.Time
	log          *slog.Logger
	storeFailed  func(error)
	// policy divides the pool; nil: one shared pool, no quota, no reclaim.
	policy *policy
	// reclaimed hears of every port taken back from an abandoned key.
	reclaimed func(victim record)
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
		reclaimed:   opts.reclaimed,
		policy:      opts.policy,
		byKey:       map[string]*allocation{},
		byPort:      map[int]*allocation{},
		perUser:     map[string]int{},
		freedAt:     map[int]int64{},
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
	if a.reclaimed == nil {
		a.reclaimed = func(record) {}
	}
	if a.policy == nil {
		a.policy = &policy{shared: pool, sharedSpec: a.poolStr}
	}
	got, err := store.load()
	if err != nil {
		return nil, got, fmt.Errorf("load allocations: %w", err)
	}
	intern := map[string]string{}
	share := func(s string) string {
		if v, ok := intern[s]; ok {
			return v
		}
		intern[s] = s
		return s
	}
	for _, r := range got.allocations {
		// Tens of thousands of records repeat a few users and types, and a
		// proxy's name is usually its key: share those strings.
		r.User, r.ProxyType = share(r.User), share(r.ProxyType)
		if r.ProxyName == r.Key {
			r.ProxyName = r.Key
		}
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
		a.perUser[r.User]++
	}
	freed := make([]int, 0, len(got.freed))
	for port, t := range got.freed {
		if !a.held.has(port) {
			freed = append(freed, port)
			a.freedAt[port] = t.UnixNano()
		}
	}
	slices.SortFunc(freed, func(x, y int) int { return cmp.Compare(a.freedAt[x], a.freedAt[y]) })
	for _, port := range freed {
		a.markFreed(port, a.freedAt[port])
	}
	return a, got, nil
}

// setPolicy replaces the policy (SIGHUP). Allocations it would not make
// stay where they are.
func (a *allocator) setPolicy(p *policy) {
	a.mu.Lock()
	a.policy = p
	a.mu.Unlock()
}

// lockSettled takes mu and returns key's allocation once no store call is
// in flight for it, or a timeout when the deadline passes first.
func (a *allocator) lockSettled(key string, deadline <-chan time.Time) (*allocation, error) {
	for {
		a.mu.Lock()
		cur := a.byKey[key]
		if cur == nil || cur.settled == nil {
			return cur, nil
		}
		wait := cur.settled
		a.mu.Unlock()
		select {
		case <-wait:
		case <-deadline:
			return nil, &storeError{kind: errStoreTimedOut, err: errKeyBusy}
		}
	}
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
	cur, err := a.lockSettled(key, deadline.C)
	if err != nil {
		return 0, "", err
	}
	if cur != nil && (req.RemotePort == 0 || req.RemotePort == cur.Port) {
		cur.lastSeen.Store(now.UnixNano())
		a.mu.Unlock()
		return cur.Port, outcomeHit, nil
	}
	port, how, victim, err := a.choosePort(key, req, cur == nil)
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
	if victim != nil {
		victim.settled = make(chan struct{})
	}
	a.begin(n, cur)
	a.mu.Unlock()

	write := func() error { return a.store.claim(n.record, recordOf(cur)) }
	var victimReleased bool // set before write returns, read after
	if victim != nil {
		write = func() error {
			if err := a.store.release(victim.record, now); err != nil {
				return err
			}
			victimReleased = true
			return a.store.claim(n.record, nil)
		}
	}
	if err := a.persist(deadline.C, n, cur, victim, &victimReleased, write); err != nil {
		return 0, "", err
	}
	if victim != nil {
		a.log.Warn("port reclaimed", "port", port, "from", victim.Key, "from_user", victim.User,
			"last_seen", time.Unix(0, victim.lastSeen.Load()).UTC(), "to", key)
		a.reclaimed(victim.record)
	}
	return port, how, nil
}

// assign pins key to port on an operator's word: a new key or a move. The
// operator may use any port of the pool, whatever the policy says.
func (a *allocator) assign(key string, port int) (record, error) {
	key = validUTF8(key)
	now := a.now()
	deadline := time.NewTimer(a.timeout)
	defer deadline.Stop()
	cur, err := a.lockSettled(key, deadline.C)
	if err != nil {
		return record{}, err
	}
	if cur != nil && cur.Port == port {
		r := cur.record
		a.mu.Unlock()
		return r, nil
	}
	if err := a.checkRequested(key, port); err != nil {
		a.mu.Unlock()
		return record{}, err
	}
	n := &allocation{record: record{Key: key, Port: port, CreatedAt: now, AssignedAt: now}}
	seen := now.UnixNano()
	if cur != nil {
		n.record = cur.record
		n.Port, n.AssignedAt = port, now
		seen = cur.lastSeen.Load()
	} else {
		n.ProxyName, n.Group = keyNames(key)
	}
	n.lastSeen.Store(seen)
	n.storedSeen = seen
	a.begin(n, cur)
	a.mu.Unlock()
	if err := a.persist(deadline.C, n, cur, nil, nil, func() error { return a.store.claim(n.record, recordOf(cur)) }); err != nil {
		return record{}, err
	}
	return n.record, nil
}

// release forgets key's allocation; its port becomes free once stored.
func (a *allocator) release(key string) error {
	key = validUTF8(key)
	now := a.now()
	deadline := time.NewTimer(a.timeout)
	defer deadline.Stop()
	cur, err := a.lockSettled(key, deadline.C)
	if err != nil {
		return err
	}
	if cur == nil {
		a.mu.Unlock()
		return errNoAllocation
	}
	cur.settled = make(chan struct{})
	a.mu.Unlock()
	return a.await(deadline.C, func() error { return a.store.release(cur.record, now) }, func(err error) {
		if err == nil {
			a.forget(cur)
			a.markFreed(cur.Port, now.UnixNano())
		}
		close(cur.settled)
		cur.settled = nil
	})
}

// begin puts n in memory, marked unsettled, in place of cur. Called with mu held.
func (a *allocator) begin(n, cur *allocation) {
	n.settled = make(chan struct{})
	a.byKey[n.Key] = n
	a.byPort[n.Port] = n
	a.held.add(n.Port)
	if cur == nil {
		a.perUser[n.User]++
	}
}

// forget drops al from memory. Called with mu held.
func (a *allocator) forget(al *allocation) {
	if a.byKey[al.Key] == al {
		delete(a.byKey, al.Key)
	}
	if a.byPort[al.Port] == al {
		delete(a.byPort, al.Port)
		a.held.remove(al.Port)
	}
	if a.perUser[al.User]--; a.perUser[al.User] <= 0 {
		delete(a.perUser, al.User)
	}
}

// markFreed queues a port that was given back, for reuse after every
// never-used port. Called with mu held.
func (a *allocator) markFreed(port int, at int64) {
	a.freedAt[port] = at
	a.freed.add(port)
	a.freeQueue = append(a.freeQueue, freedPort{port, at})
}

// unmarkFreed takes a port that is in use again off the free queue, in
// constant time: its queue entry goes stale. Called with mu held.
func (a *allocator) unmarkFreed(port int) {
	if !a.freed.has(port) {
		return
	}
	delete(a.freedAt, port)
	a.freed.remove(port)
	if stale := len(a.freeQueue) - len(a.freedAt); stale > 64 && stale > len(a.freedAt) {
		a.freeQueue = slices.DeleteFunc(a.freeQueue, a.staleFreed)
	}
}

func (a *allocator) staleFreed(f freedPort) bool {
	at, ok := a.freedAt[f.port]
	return !ok || at != f.at
}

// persist runs write and settles n: kept when the store said yes, rolled
// back to cur (and to victim, unless victimReleased) when it said no. When the deadline passes first
// the caller hears a timeout, and n stays reserved until the store answers,
// so a late write can never land on a port that was meanwhile given to
// someone else.
func (a *allocator) persist(deadline <-chan time.Time, n, cur, victim *allocation, victimReleased *bool, write func() error) error {
	return a.await(deadline, write, func(err error) {
		switch {
		case err == nil:
			if cur != nil && a.byPort[cur.Port] == cur {
				delete(a.byPort, cur.Port)
				a.held.remove(cur.Port)
				a.markFreed(cur.Port, n.AssignedAt.UnixNano())
			}
			if victim != nil {
				if a.byKey[victim.Key] == victim {
					delete(a.byKey, victim.Key)
				}
				if a.perUser[victim.User]--; a.perUser[victim.User] <= 0 {
					delete(a.perUser, victim.User)
				}
			}
			a.unmarkFreed(n.Port)
		case victim != nil && *victimReleased:
			// The victim's release reached the store but the new claim did
			// not: the victim has lost its port, which is free again.
			a.forget(n)
			a.forget(victim)
			a.markFreed(n.Port, n.AssignedAt.UnixNano())
		case victim != nil:
			// Nothing was stored: the victim keeps its port.
			a.forget(n)
			a.byPort[victim.Port] = victim
			a.held.add(victim.Port)
		default:
			a.forget(n)
			if cur != nil {
				a.byKey[n.Key] = cur
				a.perUser[cur.User]++
			}
		}
		if victim != nil {
			close(victim.settled)
			victim.settled = nil
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

// saveCheckpoint hands the store everything in memory, for a fast next
// start. It holds mu throughout, so no store write can begin meanwhile, and
// skips the checkpoint while a late store write is still unsettled.
func (a *allocator) saveCheckpoint() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	l := loaded{lastSeen: make(map[string]time.Time, len(a.byKey)), freed: make(map[int]time.Time, len(a.freedAt))}
	for _, al := range a.byPort {
		if al.settled != nil {
			return errors.New("a store write is still in flight")
		}
		l.allocations = append(l.allocations, al.record)
		l.lastSeen[al.Key] = time.Unix(0, al.lastSeen.Load()).UTC()
	}
	for port, at := range a.freedAt {
		l.freed[port] = time.Unix(0, at).UTC()
	}
	slices.SortFunc(l.allocations, func(x, y record) int { return cmp.Compare(x.Port, y.Port) })
	return a.store.saveCheckpoint(l)
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

// choosePort applies the rules for a key that needs a port: quota, then
// the requested port or a fresh one from the user's pool: never-used ports
// first (lowest first), then given-back ports (longest free first), then,
// with reclaim on, the port of the key unseen for longest. victim is that
// key. Called with mu held.
func (a *allocator) choosePort(key string, req proxyRequest, newKey bool) (port int, how outcome, victim *allocation, err error) {
	up := a.policy.forUser(req.User)
	if newKey && up.maxPorts > 0 && a.perUser[req.User] >= up.maxPorts {
		return 0, "", nil, &quotaError{user: req.User, max: up.maxPorts, rule: up.rule}
	}
	if req.RemotePort != 0 {
		if err := a.checkRequested(key, req.RemotePort); err != nil {
			return 0, "", nil, err
		}
		if err := a.checkPolicy(req.User, up, req.RemotePort); err != nil {
			return 0, "", nil, err
		}
		if a.byPort[req.RemotePort] == nil && a.probe != nil && a.probe(req.RemotePort) != nil {
			return 0, "", nil, &portError{port: req.RemotePort, err: errPortInUse}
		}
		return req.RemotePort, outcomeRequested, nil, nil
	}
	var busy portSet // ports the bind test refused during this search
	usable := func(p int) bool {
		if a.probe == nil {
			return true
		}
		if err := a.probe(p); err != nil {
			a.log.Debug("port failed the bind test", "port", p, "err", err)
			busy.add(p)
			return false
		}
		return true
	}
	for p := up.ports.nextFree(0, &a.held, &a.freed, &busy); p >= 0; p = up.ports.nextFree(p+1, &a.held, &a.freed, &busy) {
		if usable(p) {
			return p, outcomeNew, nil, nil
		}
	}
	for _, f := range a.freeQueue {
		if p := f.port; up.ports.has(p) && !a.held.has(p) && !a.staleFreed(f) && usable(p) {
			return p, outcomeNew, nil, nil
		}
	}
	if victim := a.abandoned(up.ports); victim != nil {
		return victim.Port, outcomeNew, victim, nil
	}
	spec := up.portSpec
	if spec == "" {
		spec = "(empty)"
	}
	if up.rule != nil && up.rule.ports != nil {
		spec += " of " + up.rule.name()
	}
	return 0, "", nil, &poolError{pool: spec}
}

// abandoned returns the allocation in ports unseen for longest, if it has
// been unseen for longer than the policy's reclaimAfter. Called with mu held.
func (a *allocator) abandoned(ports *portSet) *allocation {
	if a.policy.reclaimAfter <= 0 {
		return nil
	}
	cutoff := a.now().Add(-a.policy.reclaimAfter).UnixNano()
	var oldest *allocation
	for port, al := range a.byPort {
		seen := al.lastSeen.Load()
		if al.settled == nil && ports.has(port) && seen < cutoff && (oldest == nil || seen < oldest.lastSeen.Load()) {
			oldest = al
		}
	}
	return oldest
}

// checkRequested says whether key may have port as far as the pool goes.
// Called with mu held.
func (a *allocator) checkRequested(key string, port int) error {
	switch holder := a.byPort[port]; {
	case port < 1 || port > maxPort:
		return &portError{port: port, err: errPortInvalid}
	case holder != nil && holder.Key != key:
		return &portError{port: port, err: errPortReserved}
	case a.excluded[port] != "":
		return &portError{port: port, err: errPortForFrps, detail: a.excluded[port]}
	case !a.pool.has(port):
		return &portError{port: port, err: errPortOutside, detail: "allowed: " + a.poolStr}
	}
	return nil
}

// checkPolicy says whether user may ask for port: inside the user's own
// range, and not inside a range another rule reserves.
func (a *allocator) checkPolicy(user string, up userPolicy, port int) error {
	if up.ports.has(port) {
		return nil
	}
	if up.rule != nil && up.rule.ports != nil {
		return &portError{port: port, err: errPortOutside, detail: fmt.Sprintf("user %q may use %s, by %s", user, up.portSpec, up.rule.name())}
	}
	if r := a.policy.reservedFor(port); r != nil {
		return &portError{port: port, err: errPortReserved, detail: "by " + r.name()}
	}
	return nil
}

// quotaError says a user has as many keys as the policy allows.
type quotaError struct {
	user string
	max  int
	rule *policyRule
}

func (e *quotaError) Error() string {
	by := "-max-ports-per-user"
	if e.rule != nil && e.rule.maxPorts != nil {
		by = e.rule.name()
	}
	return fmt.Sprintf("user %q has reached its quota of %d ports (%s)", e.user, e.max, by)
}
func (e *quotaError) Unwrap() error { return errQuota }

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
		out = append(out, a.view(al))
	}
	a.mu.RUnlock()
	slices.SortFunc(out, func(x, y allocationView) int { return x.Port - y.Port })
	return out
}

// allocationView is an allocation as operators see it.
type allocationView struct {
	record
	LastSeen time.Time `json:"last_seen"`
	// OutsidePolicy marks a sticky port that today's policy would not give
	// this user (the policy changed since); it stays until an operator moves it.
	OutsidePolicy bool `json:"outside_policy"`
}

// view describes al. Called with mu held.
func (a *allocator) view(al *allocation) allocationView {
	return allocationView{record: al.record, LastSeen: time.Unix(0, al.lastSeen.Load()),
		OutsidePolicy: !a.policy.forUser(al.User).ports.has(al.Port)}
}

// find returns key's settled allocation as operators see it.
func (a *allocator) find(key string) (allocationView, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[validUTF8(key)]
	if al == nil || al.settled != nil {
		return allocationView{}, false
	}
	return a.view(al), true
}

func recordOf(al *allocation) *record {
	if al == nil {
		return nil
	}
	r := al.record
	return &r
}

// keyNames returns the proxy or group name a key stands for.
func keyNames(key string) (proxyName, group string) {
	if g, ok := strings.CutPrefix(key, groupKeyPrefix); ok {
		return "", g
	}
	if p, ok := strings.CutPrefix(key, proxyKeyPrefix); ok {
		return p, ""
	}
	return key, ""
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
