package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"frp-port-keeper/internal/frpplugin"
	"frp-port-keeper/internal/store"
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
	errNoteTooLong   = fmt.Errorf("a note is at most %d bytes", maxNoteBytes)
	errWrongSpace    = errors.New("the protocol is not the key's")
)

// checkNote refuses a note over maxNoteBytes, on every path that sets one.
func checkNote(note string) error {
	if len(note) > maxNoteBytes {
		return fmt.Errorf("the note is %d bytes; %w", len(note), errNoteTooLong)
	}
	return nil
}

// portError is a refusal about one specific port.
type portError struct {
	slot store.Slot
	err  error
	// detail adds what the port is used for, when known (errPortForFrps).
	detail string
}

func (e *portError) Error() string {
	s := fmt.Sprintf("port %s is %v", portName(e.slot), e.err)
	if e.detail != "" {
		s += " (" + e.detail + ")"
	}
	return s
}
func (e *portError) Unwrap() error { return e.err }

// portName is how clients and logs are told of a port: the number alone
// for tcp, as frps names ports, and 53/udp for udp.
func portName(s store.Slot) string {
	if s.Space == store.UDP {
		return s.String()
	}
	return strconv.Itoa(s.Port)
}

// poolError says which pool ran dry, and in which space.
type poolError struct {
	pool  string
	space store.Space
}

func (e *poolError) Error() string {
	if e.space == store.UDP {
		return fmt.Sprintf("no free udp port left in pool %s", e.pool)
	}
	return fmt.Sprintf("no free port left in pool %s", e.pool)
}
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
func (e *storeError) Unwrap() []error { return []error{e.kind, e.err} }

// Key prefixes. Group keys stand for a load-balancing group (frps insists
// that every member of a group listens on the same port). A proxy whose
// own name starts with one of these prefixes is keyed as "proxy:NAME", so
// no proxy name can pass for a group.
const (
	groupKeyPrefix = "group:"
	proxyKeyPrefix = "proxy:"
)

// keyOf is the name a sticky port is remembered under.
func keyOf(r frpplugin.Proxy) string {
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
	// outcomePinned: the key's pinned port, answered to a client that
	// asked for another one (an operator's assign moves the device).
	outcomePinned outcome = "pinned"
	// outcomeAdopted: the port the client asked for, outside the pool,
	// taken over during -adopt-requests.
	outcomeAdopted outcome = "adopted"
)

// allocation is a record the store holds, in memory, with the fields that
// change without a store write.
type allocation struct {
	// *record is shared, never changed: a change makes a new allocation.
	// At start it points into the snapshot the store's index points into
	// too, so tens of thousands of records are held once.
	*store.Record
	rev      int64        // the store's revision of record (0: a store without revisions)
	lastSeen atomic.Int64 // unix nanoseconds
	// storedSeen and seenWrittenAt (unix nanoseconds) keep last_seen writes
	// to one per key per seenInterval. Guarded by allocator.mu.
	storedSeen, seenWrittenAt int64
	// pinAsked is the other port the device of a pinned key last asked for
	// that the history recorded (see hit), so a reconnect storm adds
	// nothing; it lives in memory, for as long as the pin is unchanged.
	pinAsked atomic.Int64
}

// allocator holds the allocation rules. Every allocation the store holds
// lives in memory, so a sticky hit touches no disk. byKey, perUser and each
// space's byPort, held and free queue change only through apply, whether
// the change is this instance's own store write or one that watch brought
// in from another instance, so none of them can drift from the records.
type allocator struct {
	store store.Store
	// pool is the ports frps allows, in each space alike (frps's
	// allowPorts is one list for tcp and udp); each space keeps its own
	// listeners out of it (portSpace.excluded).
	pool    *portSet
	poolStr string
	probe   func(store.Slot) error // nil: no bind test
	timeout time.Duration
	now     func() time.Time
	log     *slog.Logger
	// storeFailed hears of every store call that failed or timed out.
	storeFailed func(error)
	reclaimed   func(victim store.Record)
	changed     func(store.HistoryEntry)
	adoptUntil  time.Time // see allocatorOptions.adoptUntil

	flushMu sync.Mutex // one last_seen flush at a time
	mu      sync.RWMutex
	byKey   map[string]*allocation
	// tcp and udp are the two port spaces, kept apart as frps keeps them:
	// a tcp key and a udp key may hold one number. Reach them through in.
	tcp, udp portSpace
	policy   *policy
	// perUser counts keys by user, for quotas: a user's keys in both
	// spaces count, as frps's maxPortsPerClient counts tcp and udp alike.
	perUser map[string]int

	// busy marks keys with a store call in flight (closed when it ends);
	// pendingUser, new keys in flight per user (for quotas).
	busy        map[string]chan struct{}
	pendingUser map[string]int
	// tombs remembers the revision of deletes a watch may still echo an
	// older put for; watchRev is how far the watch has delivered.
	tombs    map[string]int64
	watchRev int64
	rev      int64 // the newest revision applied

	online onlineProxies
}

// portSpace is what the allocator holds of one port space. Guarded by
// allocator.mu.
type portSpace struct {
	space  store.Space
	byPort map[int]*allocation
	held   portSet // ports of byPort, and those heldBack
	// heldBack are ports a damaged record keeps from fresh allocation
	// (snapshot.heldBack), with the reason, until an operator releases them.
	heldBack map[int]string
	// freed holds ports that were given back, since freedAt (unix
	// nanoseconds); freeQueue orders them, longest free first. Entries of
	// ports reused since are skipped and dropped lazily.
	freed     portSet
	freedAt   map[int]int64
	freeQueue []freedPort
	// reserved are the ports store calls in flight or a bind test are
	// about to take.
	reserved portSet
	// excluded names ports kept out of the pool for a reason a client
	// should hear (frps's own listeners of this protocol, the plugin's
	// port); excludedSet holds the same ports for the pool's walk.
	excluded    map[int]string
	excludedSet portSet
}

// in returns the port space s.
func (a *allocator) in(s store.Space) *portSpace {
	if s == store.UDP {
		return &a.udp
	}
	return &a.tcp
}

// freedPort is an entry of the free queue; it is stale once the port's
// freedAt differs.
type freedPort struct {
	port int
	at   int64
}

// allocatorOptions are the allocator's tunables; zero values are defaults.
type allocatorOptions struct {
	excluded     map[store.Slot]string
	probe        func(store.Slot) error
	storeTimeout time.Duration
	now          func() time.Time
	log          *slog.Logger
	storeFailed  func(error)
	// policy divides the pool; nil: one shared pool, no quota, no reclaim.
	policy *policy
	// reclaimed hears of every port taken back from an abandoned key.
	reclaimed func(victim store.Record)
	// changed hears of every change this instance made (history, events).
	changed func(store.HistoryEntry)
	// adoptUntil: before then, a device's own remote_port outside the
	// pool (or its policy range) is adopted rather than refused, when an
	// operator could put it there (-adopt-requests).
	adoptUntil time.Time
}

// maxClaimAttempts bounds how often a claim that lost a race to another
// instance is decided again with the winner's state (the request's
// deadline bounds it too).
const maxClaimAttempts = 16

// newAllocator loads every allocation from store and serves from pool.
func newAllocator(st store.Store, pool *portSet, opts allocatorOptions) (*allocator, store.Snapshot, error) {
	a := &allocator{
		store:       st,
		pool:        pool,
		poolStr:     pool.String(),
		probe:       opts.probe,
		timeout:     opts.storeTimeout,
		now:         opts.now,
		log:         opts.log,
		storeFailed: opts.storeFailed,
		reclaimed:   opts.reclaimed,
		changed:     opts.changed,
		adoptUntil:  opts.adoptUntil,
		policy:      opts.policy,
		busy:        map[string]chan struct{}{},
		pendingUser: map[string]int{},
		tombs:       map[string]int64{},
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
		a.reclaimed = func(store.Record) {}
	}
	if a.changed == nil {
		a.changed = func(store.HistoryEntry) {}
	}
	if a.policy == nil {
		a.policy = &policy{shared: pool, sharedSpec: a.poolStr}
	}
	a.tcp.space, a.udp.space = store.TCP, store.UDP
	for _, sp := range []*portSpace{&a.tcp, &a.udp} {
		sp.excluded = map[int]string{}
		sp.byPort, sp.heldBack, sp.freedAt = map[int]*allocation{}, map[int]string{}, map[int]int64{}
	}
	for slot, why := range opts.excluded {
		sp := a.in(slot.Space)
		sp.excluded[slot.Port] = why
		sp.excludedSet.add(slot.Port)
	}
	a.online.init()
	// A first load may read every record of a large directory, or wait for
	// an etcd cluster to answer: more than one store call's deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 5*a.timeout)
	defer cancel()
	got, err := st.Load(ctx)
	if err != nil {
		return nil, got, fmt.Errorf("load allocations: %w", err)
	}
	a.mu.Lock()
	a.reset(got)
	a.mu.Unlock()
	return a, got, nil
}

// reset replaces what memory holds with snap: at start, and when a watch
// fell too far behind. Called with mu held.
func (a *allocator) reset(snap store.Snapshot) {
	old := a.byKey
	a.byKey = make(map[string]*allocation, len(snap.Allocations))
	for _, sp := range []*portSpace{&a.tcp, &a.udp} {
		sp.byPort = map[int]*allocation{}
		sp.held, sp.heldBack = portSet{}, map[int]string{}
		sp.freed, sp.freedAt, sp.freeQueue = portSet{}, map[int]int64{}, nil
	}
	a.perUser = map[string]int{}
	a.tombs = map[string]int64{}
	a.rev, a.watchRev = snap.Rev, snap.Rev
	now := a.now().UnixNano()
	store.ShareStrings(snap.Allocations) // a no-op when the store did it already
	for i := range snap.Allocations {
		r := &snap.Allocations[i]
		al := &allocation{Record: r, rev: snap.Rev}
		// A time from the future (a clock that was ahead) would pin the
		// key as seen forever: no time from disk is later than now.
		seen := r.CreatedAt.UnixNano()
		if t, ok := snap.LastSeen[r.Key]; ok && t.UnixNano() > seen {
			seen = t.UnixNano()
		}
		seen = min(seen, now)
		if prev := old[r.Key]; prev != nil {
			seen = max(seen, prev.lastSeen.Load())
		}
		al.lastSeen.Store(seen)
		al.storedSeen = seen
		a.add(al)
		if snap.Online[r.Key] {
			a.online.restore(r.Key)
		}
	}
	freed := make([]store.Slot, 0, len(snap.Freed))
	freedAt := make(map[store.Slot]int64, len(snap.Freed))
	for slot, t := range snap.Freed {
		if !a.in(slot.Space).held.has(slot.Port) {
			freed = append(freed, slot)
			freedAt[slot] = min(t.UnixNano(), now)
		}
	}
	slices.SortFunc(freed, func(x, y store.Slot) int { return cmp.Compare(freedAt[x], freedAt[y]) })
	for _, slot := range freed {
		a.in(slot.Space).markFreed(slot.Port, freedAt[slot])
	}
	for slot, why := range snap.HeldBack {
		if sp := a.in(slot.Space); !sp.held.has(slot.Port) {
			sp.heldBack[slot.Port] = why
			sp.held.add(slot.Port)
		}
	}
}

// follow applies the changes the store's watch delivers until ctx ends.
func (a *allocator) follow(ctx context.Context) error {
	a.mu.RLock()
	rev := a.rev
	a.mu.RUnlock()
	return a.store.Watch(ctx, rev, func(c store.Change) {
		a.mu.Lock()
		a.apply(c)
		if c.Rev > a.watchRev {
			a.watchRev = c.Rev
		}
		a.mu.Unlock()
	})
}

// apply brings memory in line with one change of the store. Local outcomes
// and watched changes both come through here; a change older than what
// memory already holds for its key or port is an echo and is skipped.
// Called with mu held.
func (a *allocator) apply(c store.Change) {
	if c.Rev > a.rev {
		a.rev = c.Rev
	}
	switch c.Kind {
	case store.ChangePut:
		r := c.Rec
		cur := a.byKey[r.Key]
		if c.Rev != 0 && ((cur != nil && c.Rev <= cur.rev) || c.Rev <= a.tombs[r.Key]) {
			return
		}
		if h := a.in(r.Space()).byPort[r.Port]; h != nil && h.Key != r.Key {
			if c.Rev != 0 && c.Rev <= h.rev {
				return
			}
			// The holder's own delete or move is on its way; it lost the port.
			a.drop(h, r.AssignedAt.UnixNano())
		}
		n := &allocation{Record: &r, rev: c.Rev}
		seen := min(r.AssignedAt.UnixNano(), a.now().UnixNano())
		if cur != nil {
			seen = max(seen, cur.lastSeen.Load())
			n.storedSeen, n.seenWrittenAt = cur.storedSeen, cur.seenWrittenAt
			if cur.Pinned && r.Pinned && cur.Port == r.Port {
				n.pinAsked.Store(cur.pinAsked.Load())
			}
			freedAt := r.AssignedAt
			if !c.At.IsZero() {
				freedAt = c.At
			}
			a.drop(cur, freedAt.UnixNano())
		} else {
			n.storedSeen = seen
		}
		n.lastSeen.Store(seen)
		a.add(n)
		delete(a.tombs, r.Key)
	case store.ChangeDelete:
		cur := a.byKey[c.Key]
		if c.Rev != 0 {
			if cur != nil && c.Rev <= cur.rev {
				return
			}
			a.tombs[c.Key] = max(a.tombs[c.Key], c.Rev)
			a.pruneTombs()
		}
		if cur != nil {
			at := c.At
			if at.IsZero() {
				at = a.now()
			}
			a.drop(cur, at.UnixNano())
		}
	case store.ChangeSeen:
		if cur := a.byKey[c.Key]; cur != nil {
			seen := min(c.Seen.UnixNano(), a.now().UnixNano())
			for old := cur.lastSeen.Load(); seen > old && !cur.lastSeen.CompareAndSwap(old, seen); old = cur.lastSeen.Load() {
			}
			if seen > cur.storedSeen {
				cur.storedSeen, cur.seenWrittenAt = seen, a.now().UnixNano()
			}
		}
	case store.ChangeReset:
		if c.Reset != nil {
			a.reset(*c.Reset)
		}
	}
}

// pruneTombs forgets deletes older than what the watch has delivered: no
// echo older than them can arrive any more. Called with mu held.
func (a *allocator) pruneTombs() {
	if len(a.tombs) < 1024 {
		return
	}
	for k, rev := range a.tombs {
		if rev <= a.watchRev {
			delete(a.tombs, k)
		}
	}
}

// add puts al in memory. Called with mu held.
func (a *allocator) add(al *allocation) {
	a.byKey[al.Key] = al
	sp := a.in(al.Space())
	sp.byPort[al.Port] = al
	sp.held.add(al.Port)
	a.perUser[al.User]++
	sp.unmarkFreed(al.Port)
}

// drop takes al out of memory; its port is free as of at unless another
// key holds it. Called with mu held.
func (a *allocator) drop(al *allocation, at int64) {
	if a.byKey[al.Key] == al {
		delete(a.byKey, al.Key)
	}
	if sp := a.in(al.Space()); sp.byPort[al.Port] == al {
		delete(sp.byPort, al.Port)
		sp.held.remove(al.Port)
		sp.markFreed(al.Port, at)
	}
	if a.perUser[al.User]--; a.perUser[al.User] <= 0 {
		delete(a.perUser, al.User)
	}
}

// setPolicy replaces the policy (SIGHUP). Allocations it would not make
// stay where they are.
func (a *allocator) setPolicy(p *policy) {
	a.mu.Lock()
	a.policy = p
	a.mu.Unlock()
}

// lockKey takes mu and returns key's allocation once no store call is in
// flight for it, or a timeout when ctx ends first.
func (a *allocator) lockKey(ctx context.Context, key string) (*allocation, error) {
	for {
		a.mu.Lock()
		wait := a.busy[key]
		if wait == nil {
			return a.byKey[key], nil
		}
		a.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, &storeError{kind: errStoreTimedOut, err: errKeyBusy}
		}
	}
}

// markBusy marks key as having a store call in flight and returns what
// ends it. Called with mu held; the returned func takes mu itself.
func (a *allocator) markBusy(key string) (settled func()) {
	ch := make(chan struct{})
	a.busy[key] = ch
	return func() {
		if a.busy[key] == ch {
			delete(a.busy, key)
		}
		close(ch)
	}
}

// allocate returns the port for req's key: its sticky port, the port it
// asked for, or a fresh one. A new port is stored before it is returned.
// A key an operator pinned gets its pinned port whatever port it asks for
// (outcomePinned when it asked for another one).
func (a *allocator) allocate(req frpplugin.Proxy) (int, outcome, error) {
	req.User, req.ProxyName, req.Group = validUTF8(req.User), validUTF8(req.ProxyName), validUTF8(req.Group)
	req.ProxyType = validUTF8(req.ProxyType)
	key := keyOf(req)
	now := a.now()
	a.mu.RLock()
	if cur := a.byKey[key]; cur != nil && a.busy[key] == nil && sticks(cur, req) && !unfilled(cur, req) {
		cur.lastSeen.Store(now.UnixNano())
		a.mu.RUnlock()
		return cur.Port, a.hit(cur, req, now), nil
	}
	a.mu.RUnlock()

	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		port, how, err := a.allocateOnce(ctx, key, req, now, attempt)
		var lost *store.ConflictError
		if !errors.As(err, &lost) {
			return port, how, err
		}
		if attempt == maxClaimAttempts || ctx.Err() != nil {
			err = &storeError{kind: errStoreFailed, err: fmt.Errorf("lost %d races to other instances: %w", attempt, err)}
			a.storeFailed(err)
			return 0, "", err
		}
	}
}

// allocateOnce decides and claims once; a *conflictError means another
// instance won a race and memory now holds its result.
func (a *allocator) allocateOnce(ctx context.Context, key string, req frpplugin.Proxy, now time.Time, attempt int) (int, outcome, error) {
	cur, err := a.lockKey(ctx, key)
	if err != nil {
		return 0, "", err
	}
	if cur != nil && sticks(cur, req) {
		cur.lastSeen.Store(now.UnixNano())
		if unfilled(cur, req) {
			return a.fillIn(ctx, cur, req, now)
		}
		a.mu.Unlock()
		return cur.Port, a.hit(cur, req, now), nil
	}
	// A pinned key whose device turns out to be of the other protocol (an
	// operator assigned it before it was seen, or its type changed) keeps
	// its number, in the device's space.
	asked := req.RemotePort
	pinnedMove := cur != nil && cur.Pinned
	if pinnedMove {
		req.RemotePort = cur.Port
	}
	up := a.policy.forUser(req.User)
	newKey := cur == nil
	if newKey && up.maxPorts > 0 && a.perUser[req.User]+a.pendingUser[req.User] >= up.maxPorts {
		a.mu.Unlock()
		return 0, "", &quotaError{user: req.User, max: up.maxPorts, rule: up.rule}
	}
	settled := a.markBusy(key)
	if newKey {
		a.pendingUser[req.User]++
	}
	a.mu.Unlock()
	done := func() {
		settled()
		if newKey {
			if a.pendingUser[req.User]--; a.pendingUser[req.User] <= 0 {
				delete(a.pendingUser, req.User)
			}
		}
	}

	var port int
	var how outcome
	var victim *reclaimVictim
	if cur != nil && !pinnedMove && req.RemotePort == 0 && cur.Space() != store.SpaceOf(req.ProxyType) {
		// A proxy that changed protocol keeps its number when it is free
		// in its new space, else gets a fresh port there.
		keep := req
		keep.RemotePort = cur.Port
		if port, _, victim, err = a.choose(key, keep, up, now, attempt, false); err == nil {
			how = outcomeNew
		}
	}
	if port == 0 {
		port, how, victim, err = a.choose(key, req, up, now, attempt, pinnedMove)
	}
	if err != nil {
		a.mu.Lock()
		done()
		a.mu.Unlock()
		return 0, "", err
	}
	want := store.Record{Key: key, Port: port, User: req.User, ProxyName: req.ProxyName,
		ProxyType: req.ProxyType, Group: req.Group, CreatedAt: now, AssignedAt: now}
	c := store.Claim{Want: want, At: now}
	if cur != nil {
		c.Want.CreatedAt, c.Want.Note, c.Want.Pinned = cur.CreatedAt, cur.Note, cur.Pinned
		c.Old = cur.Record
	} else {
		c.MaxKeys = up.maxPorts
	}
	var victimDone func()
	if victim != nil {
		c.Victim = &victim.rec
		victimDone = victim.settled
	}
	sp := a.in(c.Want.Space())
	_, err = a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Claim(ctx, c) }, func() {
		done()
		sp.reserved.remove(port)
		if victimDone != nil {
			victimDone()
		}
	})
	var lost *store.ConflictError
	if errors.As(err, &lost) && lost.Quota {
		// The quota the claim was made under, not a policy reloaded since.
		return 0, "", &quotaError{user: req.User, max: up.maxPorts, rule: up.rule}
	}
	if err != nil {
		return 0, "", err
	}
	e := store.HistoryEntry{Time: now, Key: key, User: req.User, ProxyType: req.ProxyType, Port: port, Change: store.HistNew, By: "frps reqid=" + req.ReqID, Note: c.Want.Note}
	switch {
	case cur != nil:
		e.Change, e.OldPort = store.HistMoved, cur.Port
		if cur.Space() != c.Want.Space() {
			e.OldProxyType = cmp.Or(cur.ProxyType, string(store.TCP))
			e.Reason = fmt.Sprintf("the proxy is %s now; it was on %s", c.Want.Space(), cur.Slot())
			if cur.ProxyType == "" {
				// An operator's assign of a key not seen yet, whose device
				// is a udp proxy: its first registration fills in the space.
				e.Change = store.HistFilledIn
				e.Reason = fmt.Sprintf("the device is a %s proxy; assigned as %s", c.Want.Space(), cur.Slot())
			}
		}
		if pinnedMove && asked != 0 && asked != port {
			e.Reason = joinReasons(e.Reason, pinnedReason(asked, port))
			how = outcomePinned
		}
	case how == outcomeRequested:
		e.Change = store.HistRequested
	case how == outcomeAdopted:
		e.Change, e.By = store.HistAdopted, e.By+" (-adopt-requests)"
		e.Reason = fmt.Sprintf("asked for %d, outside the pool %s, while -adopt-requests lasts (until %s)", port, a.poolStr,
			a.adoptUntil.UTC().Format(time.RFC3339))
	}
	if victim != nil {
		lastSeen := time.Unix(0, victim.lastSeen).UTC()
		a.log.Warn("port reclaimed", "port", port, "proto", c.Want.Space(), "from", victim.rec.Key, "from_user", victim.rec.User,
			"last_seen", lastSeen, "to", key)
		a.reclaimed(victim.rec)
		e.Change, e.Victim = store.HistReclaimed, victim.rec.Key
		e.Reason = fmt.Sprintf("%s (user %q) unseen since %s, longer than -reclaim-after %s", victim.rec.Key, victim.rec.User,
			lastSeen.Format(time.RFC3339), victim.after)
	}
	a.changed(e)
	return port, how, nil
}

// sticks says whether req keeps the key of cur on its port: a proxy of
// its port's protocol that asks for no port, its own port, or any port
// when an operator pinned it.
func sticks(cur *allocation, req frpplugin.Proxy) bool {
	port := req.RemotePort
	return cur.Space() == store.SpaceOf(req.ProxyType) && (port == 0 || port == cur.Port || cur.Pinned)
}

// unfilled says whether cur lacks details its device's registration
// brings: the type of a key an operator assigned before its device was
// seen, or the user of one imported without it.
func unfilled(cur *allocation, req frpplugin.Proxy) bool {
	return cur.ProxyType == "" || cur.User == "" && req.User != ""
}

// joinReasons joins two reasons for the history, either may be empty.
func joinReasons(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "; " + b
}

// hit is the outcome of answering cur's port to req: outcomePinned when
// req asked for another port, which the history records the first time
// that port is asked for under this pin.
func (a *allocator) hit(cur *allocation, req frpplugin.Proxy, now time.Time) outcome {
	if !pinnedAway(cur, req.RemotePort) {
		return outcomeHit
	}
	if cur.pinAsked.Swap(int64(req.RemotePort)) != int64(req.RemotePort) {
		r := cur.Record
		a.changed(store.HistoryEntry{Time: now, Key: r.Key, User: req.User, ProxyType: req.ProxyType, Port: r.Port,
			Change: store.HistPinned, By: "frps reqid=" + req.ReqID, Note: r.Note, Reason: pinnedReason(req.RemotePort, r.Port)})
	}
	return outcomePinned
}

// pinnedAway says whether a request for port is for another port than the
// one cur's key is pinned to.
func pinnedAway(cur *allocation, port int) bool {
	return cur.Pinned && port != 0 && port != cur.Port
}

// pinnedReason is what the history says of a device that asked for
// another port than its pin.
func pinnedReason(asked, port int) string {
	return fmt.Sprintf("asked for %d; pinned to %d by an operator", asked, port)
}

// fillIn completes a key an operator assigned before its device ever
// registered: user, type and proxy name come from the first registration.
// The port stays; if the write fails the device still gets its port (the
// details are filled in at its next registration). A lost race is not a
// failed write: the key may have moved or gone, so it is decided again.
// Called with mu held; returns with it released.
func (a *allocator) fillIn(ctx context.Context, cur *allocation, req frpplugin.Proxy, now time.Time) (int, outcome, error) {
	c := store.Claim{Want: *cur.Record, Old: cur.Record, At: now}
	c.Want.User, c.Want.ProxyName, c.Want.ProxyType, c.Want.Group = req.User, req.ProxyName, req.ProxyType, req.Group
	how := outcomeHit
	away := pinnedAway(cur, req.RemotePort)
	if away {
		// The filled_in entry says what the device asked for; the stored
		// record carries pinAsked over, so its reconnects add nothing.
		how = outcomePinned
		cur.pinAsked.Store(int64(req.RemotePort))
	}
	settled := a.markBusy(cur.Key)
	a.mu.Unlock()
	_, err := a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Claim(ctx, c) }, settled)
	if err != nil && away {
		cur.pinAsked.CompareAndSwap(int64(req.RemotePort), 0) // recorded when the fill-in is retried
	}
	var lost *store.ConflictError
	if errors.As(err, &lost) {
		return 0, "", err
	} else if err != nil {
		a.log.Warn("could not fill in the details of an assigned key; its port stands", "key", cur.Key, "err", err)
	} else {
		e := store.HistoryEntry{Time: now, Key: c.Want.Key, User: req.User, ProxyType: req.ProxyType, Port: c.Want.Port,
			Change: store.HistFilledIn, By: "frps reqid=" + req.ReqID, Note: c.Want.Note}
		if away {
			e.Reason = pinnedReason(req.RemotePort, c.Want.Port)
		}
		a.changed(e)
	}
	return cur.Port, how, nil
}

// reclaimVictim is an abandoned key chosen to give up its port; its key is
// kept busy (no hit for it is answered) until the claim settles.
type reclaimVictim struct {
	rec      store.Record
	lastSeen int64
	settled  func()
	after    time.Duration // the policy's reclaimAfter that chose it
}

// choose picks key's port in the space of req's protocol, with mu not
// held: the requested one, else a fresh one from the user's pool
// (never-used ports first, lowest first, then given-back ports, longest
// free first), else, with reclaim on, the port of the key unseen for
// longest. Candidates are test-bound outside the lock, so sticky hits
// never wait on bind syscalls. The port comes back reserved. After a lost
// race (attempt > 1) it steps over a few of the lowest free ports at
// random: instances sharing a store all want the lowest one, and would
// otherwise keep colliding on it. pinned: the requested port is an
// operator's pin, which follows the operators' rule (checkOperatorPort).
func (a *allocator) choose(key string, req frpplugin.Proxy, up userPolicy, now time.Time, attempt int, pinned bool) (int, outcome, *reclaimVictim, error) {
	sp := a.in(store.SpaceOf(req.ProxyType))
	if port := req.RemotePort; port != 0 {
		slot := store.Slot{Space: sp.space, Port: port}
		a.mu.Lock()
		how := outcomeRequested
		var err error
		if pinned {
			how = outcomeHit
			err = a.checkOperatorPort(key, slot)
		} else {
			err = a.checkRequested(key, slot)
			if err == nil {
				err = a.checkPolicy(req.User, up, slot)
			}
			if errors.Is(err, errPortOutside) && now.Before(a.adoptUntil) {
				// A migration: the rule an operator's adopt follows decides.
				if err = a.checkOperatorPort(key, slot); err == nil {
					how = outcomeAdopted
				}
			}
		}
		if err == nil && sp.reserved.has(port) {
			err = &portError{slot: slot, err: errPortReserved}
		}
		probe := err == nil && sp.byPort[port] == nil && a.probe != nil
		if err == nil {
			sp.reserved.add(port)
		}
		a.mu.Unlock()
		if err != nil {
			return 0, "", nil, err
		}
		if probe && a.probe(slot) != nil {
			a.unreserve(slot)
			return 0, "", nil, &portError{slot: slot, err: errPortInUse}
		}
		return port, how, nil, nil
	}
	var refused portSet // ports the bind test refused during this search
	var stepped portSet // ports stepped over to spread racing instances
	skip := 0
	if attempt > 1 {
		skip = rand.IntN(min(1<<attempt, 64))
	}
	for {
		a.mu.Lock()
		p := sp.nextCandidate(up, &refused, &stepped)
		if p < 0 && skip >= 0 && stepped.len() > 0 { // fewer free ports than steps
			stepped, skip = portSet{}, -1
			p = sp.nextCandidate(up, &refused, &stepped)
		}
		if p >= 0 && skip > 0 {
			skip--
			stepped.add(p)
			a.mu.Unlock()
			continue
		}
		if p >= 0 {
			sp.reserved.add(p)
			a.mu.Unlock()
			if a.probe == nil {
				return p, outcomeNew, nil, nil
			}
			if err := a.probe(store.Slot{Space: sp.space, Port: p}); err != nil {
				a.log.Debug("port failed the bind test", "port", p, "proto", sp.space, "err", err)
				a.mu.Lock()
				sp.reserved.remove(p)
				refused.add(p)
				a.mu.Unlock()
				continue
			}
			return p, outcomeNew, nil, nil
		}
		v := a.abandoned(sp, up.ports, &refused)
		if v == nil {
			a.mu.Unlock()
			break
		}
		victim := &reclaimVictim{rec: *v.Record, lastSeen: v.lastSeen.Load(), settled: a.markBusy(v.Key), after: a.policy.reclaimAfter}
		sp.reserved.add(v.Port)
		a.mu.Unlock()
		// A port frps still listens on belongs to a proxy that is online,
		// whatever last_seen says: not abandoned.
		if a.probe != nil {
			if err := a.probe(v.Slot()); err != nil {
				a.log.Info("reclaim skipped: the port is still in use", "port", v.Port, "proto", sp.space, "key", v.Key, "err", err)
				a.mu.Lock()
				v.lastSeen.Store(now.UnixNano())
				sp.reserved.remove(v.Port)
				refused.add(v.Port)
				victim.settled()
				a.mu.Unlock()
				continue
			}
		}
		return v.Port, outcomeNew, victim, nil
	}
	spec := up.portSpec
	if spec == "" {
		spec = "(empty)"
	}
	if up.rule != nil && up.rule.ports != nil {
		spec += " of " + up.rule.name()
	}
	return 0, "", nil, &poolError{pool: spec, space: sp.space}
}

func (a *allocator) unreserve(slot store.Slot) {
	a.mu.Lock()
	a.in(slot.Space).reserved.remove(slot.Port)
	a.mu.Unlock()
}

// nextCandidate is the first port of up's pool that nobody holds or is
// about to take in this space. Called with mu held.
func (sp *portSpace) nextCandidate(up userPolicy, refused, stepped *portSet) int {
	if p := up.ports.nextFree(0, &sp.held, &sp.freed, &sp.reserved, &sp.excludedSet, refused, stepped); p >= 0 {
		return p
	}
	for _, f := range sp.freeQueue {
		if p := f.port; up.ports.has(p) && !sp.held.has(p) && !sp.reserved.has(p) && !sp.excludedSet.has(p) && !refused.has(p) &&
			!stepped.has(p) && !sp.staleFreed(f) {
			return p
		}
	}
	return -1
}

// abandoned returns the allocation of sp in ports unseen for longest, if
// it has been unseen for longer than the policy's reclaimAfter and its
// proxy is not online. Called with mu held.
func (a *allocator) abandoned(sp *portSpace, ports, refused *portSet) *allocation {
	if a.policy.reclaimAfter <= 0 {
		return nil
	}
	cutoff := a.now().Add(-a.policy.reclaimAfter).UnixNano()
	var oldest *allocation
	for port, al := range sp.byPort {
		seen := al.lastSeen.Load()
		if ports.has(port) && !sp.excludedSet.has(port) && seen < cutoff && !refused.has(port) && !sp.reserved.has(port) && a.busy[al.Key] == nil &&
			(oldest == nil || seen < oldest.lastSeen.Load()) && !a.online.has(al.Key) {
			oldest = al
		}
	}
	return oldest
}

// operatorChange is what an operator's assign or note carries besides
// the key: a note to set (nil: keep it), and who asked, for the history.
type operatorChange struct {
	note   *string
	by     string
	change store.HistoryChange // histAssigned unless an import or adopt
}

// assign pins key to port on an operator's word: a new key or a move. The
// operator may use any port of the pool, whatever the policy says. space
// is the protocol the operator named: "" means the key's own, or tcp for a
// key not seen yet; naming the other protocol than a known key's is an
// error (its device's type decides).
func (a *allocator) assign(key string, port int, space store.Space, op operatorChange) (store.Record, error) {
	if op.note != nil {
		if err := checkNote(*op.note); err != nil {
			return store.Record{}, err
		}
	}
	key = validUTF8(key)
	now := a.now()
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		rec, err := a.assignOnce(ctx, key, port, space, now, op)
		var lost *store.ConflictError
		if !errors.As(err, &lost) {
			return rec, err
		}
		if attempt == maxClaimAttempts {
			return store.Record{}, &storeError{kind: errStoreFailed, err: err}
		}
	}
}

func (a *allocator) assignOnce(ctx context.Context, key string, port int, space store.Space, now time.Time, op operatorChange) (store.Record, error) {
	cur, err := a.lockKey(ctx, key)
	if err != nil {
		return store.Record{}, err
	}
	if cur != nil && space != "" && space != cur.Space() && cur.ProxyType != "" {
		a.mu.Unlock()
		return store.Record{}, &spaceError{key: key, proxyType: cur.ProxyType, asked: space}
	}
	if cur != nil && cur.Port == port && cur.Pinned && (space == "" || space == cur.Space()) && (op.note == nil || *op.note == cur.Note) {
		r := *cur.Record
		a.mu.Unlock()
		return r, nil
	}
	if space == "" && cur != nil {
		space = cur.Space()
	}
	slot := store.Slot{Space: cmp.Or(space, store.TCP), Port: port}
	if err := a.checkOperatorPort(key, slot); err != nil {
		a.mu.Unlock()
		return store.Record{}, err
	}
	c := store.Claim{Want: store.Record{Key: key, Port: port, CreatedAt: now, AssignedAt: now}, At: now}
	if space == store.UDP {
		// The key's space lives in its type; the device's registration
		// fills in the rest.
		c.Want.ProxyType = string(store.UDP)
	}
	if cur != nil {
		c.Old = cur.Record
		c.Want = *cur.Record
		c.Want.Port, c.Want.AssignedAt = port, now
		if cur.ProxyType == "" && space == store.UDP {
			c.Want.ProxyType = string(store.UDP)
		}
	} else {
		c.Want.ProxyName, c.Want.Group = keyNames(key)
	}
	c.Want.Pinned = true
	if op.note != nil {
		c.Want.Note = *op.note
	}
	settled := a.markBusy(key)
	sp := a.in(slot.Space)
	sp.reserved.add(port)
	a.mu.Unlock()
	_, err = a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Claim(ctx, c) }, func() {
		settled()
		sp.reserved.remove(port)
	})
	if err != nil {
		return store.Record{}, err
	}
	e := store.HistoryEntry{Time: now, Key: key, User: c.Want.User, ProxyType: c.Want.ProxyType, Port: port, Change: store.HistAssigned, By: op.by, Note: c.Want.Note}
	if op.change != "" {
		e.Change = op.change
	}
	if cur != nil {
		e.OldPort = cur.Port
		if cur.Space() != slot.Space {
			e.OldProxyType = cmp.Or(cur.ProxyType, string(store.TCP))
		} else if cur.Port == port {
			e.Change = store.HistNoted
		}
	}
	a.changed(e)
	return c.Want, nil
}

// spaceError refuses an operator's protocol that is not the key's.
type spaceError struct {
	key, proxyType string
	asked          store.Space
}

func (e *spaceError) Error() string {
	return fmt.Sprintf("%q is a %s proxy: its port is a %s port, not %s", e.key, e.proxyType, store.SpaceOf(e.proxyType), e.asked)
}
func (e *spaceError) Unwrap() error { return errWrongSpace }

// setNote changes the note of key's allocation, keeping its port.
func (a *allocator) setNote(key, note, by string) (store.Record, error) {
	if err := checkNote(note); err != nil {
		return store.Record{}, err
	}
	key = validUTF8(key)
	now := a.now()
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		rec, err := a.setNoteOnce(ctx, key, note, by, now)
		var lost *store.ConflictError
		if !errors.As(err, &lost) {
			return rec, err
		}
		if attempt == maxClaimAttempts {
			return store.Record{}, &storeError{kind: errStoreFailed, err: err}
		}
	}
}

// setNoteOnce sets the note on the key's record as memory holds it; a
// *conflictError means another instance changed it first.
func (a *allocator) setNoteOnce(ctx context.Context, key, note, by string, now time.Time) (store.Record, error) {
	cur, err := a.lockKey(ctx, key)
	if err != nil {
		return store.Record{}, err
	}
	if cur == nil {
		a.mu.Unlock()
		return store.Record{}, errNoAllocation
	}
	c := store.Claim{Want: *cur.Record, Old: cur.Record, At: now}
	c.Want.Note = note
	settled := a.markBusy(cur.Key)
	a.mu.Unlock()
	if _, err := a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Claim(ctx, c) }, settled); err != nil {
		return store.Record{}, err
	}
	a.changed(store.HistoryEntry{Time: now, Key: c.Want.Key, User: c.Want.User, ProxyType: c.Want.ProxyType, Port: c.Want.Port,
		Change: store.HistNoted, By: by, Note: note})
	return c.Want, nil
}

// current returns key's record.
func (a *allocator) current(key string) (store.Record, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[validUTF8(key)]
	if al == nil {
		return store.Record{}, false
	}
	return *al.Record, true
}

// heldBackDetail is what a device asking for a held-back port is told.
const heldBackDetail = "held back: its record was damaged (a crash?) and its key is unknown; an operator can release it"

// releaseHeldBack frees a port that a damaged record held back, on an
// operator's word that no device still counts on it.
func (a *allocator) releaseHeldBack(slot store.Slot, by string) error {
	port, sp := slot.Port, a.in(slot.Space)
	a.mu.Lock()
	why, ok := sp.heldBack[port]
	if !ok {
		a.mu.Unlock()
		return errNoAllocation
	}
	if sp.reserved.has(port) {
		a.mu.Unlock()
		return &portError{slot: slot, err: errPortReserved}
	}
	sp.reserved.add(port)
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	err := a.store.ReleaseDamaged(ctx, slot)
	now := a.now()
	a.mu.Lock()
	sp.reserved.remove(port)
	if err == nil || errors.Is(err, store.ErrNotHeldBack) {
		delete(sp.heldBack, port)
		sp.held.remove(port)
		sp.markFreed(port, now.UnixNano())
	}
	a.mu.Unlock()
	if err != nil && !errors.Is(err, store.ErrNotHeldBack) {
		a.storeFailed(err)
		return &storeError{kind: errStoreFailed, err: err}
	}
	e := store.HistoryEntry{Time: now, OldPort: port, Change: store.HistReleased, By: by, Note: "held back: " + why}
	if slot.Space == store.UDP {
		e.ProxyType = string(store.UDP)
	}
	a.changed(e)
	return nil
}

// release forgets key's allocation; its port becomes free once stored.
func (a *allocator) release(key, by string) error {
	key = validUTF8(key)
	now := a.now()
	ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		cur, err := a.lockKey(ctx, key)
		if err != nil {
			return err
		}
		if cur == nil {
			a.mu.Unlock()
			return errNoAllocation
		}
		settled := a.markBusy(key)
		a.mu.Unlock()
		r := *cur.Record
		_, err = a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Release(ctx, r, now) }, settled)
		if err == nil {
			a.changed(store.HistoryEntry{Time: now, Key: r.Key, User: r.User, ProxyType: r.ProxyType, OldPort: r.Port,
				Change: store.HistReleased, By: by, Note: r.Note})
		}
		var lost *store.ConflictError
		if !errors.As(err, &lost) {
			return err
		}
		if attempt == maxClaimAttempts {
			return &storeError{kind: errStoreFailed, err: err}
		}
	}
}

// write runs one store call bounded by ctx. Its outcome is applied under
// mu whenever it arrives, and then settle runs (freeing the key and the
// port the call held): a call that outlives its caller's deadline keeps
// them until the store has answered, so a late write can never land on a
// port that was meanwhile given to someone else. The caller hears a
// timeout in that case; a conflict comes back as *conflictError, with
// memory already brought up to date.
func (a *allocator) write(ctx context.Context, call func(context.Context) ([]store.Change, error), settle func()) ([]store.Change, error) {
	type result struct {
		changes []store.Change
		err     error
	}
	done := make(chan result, 1)
	go func() {
		changes, err := call(ctx)
		done <- result{changes, err}
	}()
	finish := func(r result) {
		a.mu.Lock()
		defer a.mu.Unlock()
		var lost *store.ConflictError
		switch {
		case r.err == nil:
			for _, c := range r.changes {
				a.apply(c)
			}
		case errors.As(r.err, &lost):
			for _, c := range lost.Current {
				a.apply(c)
			}
		}
		settle()
	}
	select {
	case r := <-done:
		finish(r)
		var lost *store.ConflictError
		switch {
		case r.err == nil, errors.As(r.err, &lost):
			return r.changes, r.err
		case errors.Is(r.err, store.ErrOutcomeUnknown), errors.Is(r.err, context.DeadlineExceeded):
			err := &storeError{kind: errStoreTimedOut, err: r.err}
			a.storeFailed(err)
			return nil, err
		}
		err := &storeError{kind: errStoreFailed, err: r.err}
		a.storeFailed(err)
		return nil, err
	case <-ctx.Done():
		go func() {
			r := <-done
			finish(r)
			if r.err != nil {
				a.log.Warn("late store call failed", "err", r.err)
			}
		}()
		err := &storeError{kind: errStoreTimedOut}
		a.storeFailed(err)
		return nil, err
	}
}

// markFreed queues a port that was given back, for reuse after every
// never-used port. Called with mu held.
func (sp *portSpace) markFreed(port int, at int64) {
	sp.freedAt[port] = at
	sp.freed.add(port)
	sp.freeQueue = append(sp.freeQueue, freedPort{port, at})
}

// unmarkFreed takes a port that is in use again off the free queue, in
// constant time: its queue entry goes stale. Called with mu held.
func (sp *portSpace) unmarkFreed(port int) {
	if !sp.freed.has(port) {
		return
	}
	delete(sp.freedAt, port)
	sp.freed.remove(port)
	if stale := len(sp.freeQueue) - len(sp.freedAt); stale > 64 && stale > len(sp.freedAt) {
		sp.freeQueue = slices.DeleteFunc(sp.freeQueue, sp.staleFreed)
	}
}

func (sp *portSpace) staleFreed(f freedPort) bool {
	at, ok := sp.freedAt[f.port]
	return !ok || at != f.at
}

// seenInterval is how often at most a key's last_seen is written: sticky
// hits stay free of store writes, and a crash loses at most an hour of it.
const seenInterval = time.Hour

// flushSeen writes last_seen for keys seen since it was last written, and
// not written within minGap, in batches. A key whose proxy is online counts
// as seen now: a proxy connected for longer than -reclaim-after is in use,
// not abandoned. The server calls it every minute with seenInterval and
// once at shutdown with 0.
func (a *allocator) flushSeen(minGap time.Duration) (int, error) {
	a.flushMu.Lock()
	defer a.flushMu.Unlock()
	now := a.now().UnixNano()
	a.mu.RLock()
	var marks []store.SeenMark
	var due []*allocation
	for key, al := range a.byKey {
		online := a.online.has(key)
		if online {
			al.lastSeen.Store(max(al.lastSeen.Load(), now))
		}
		if a.busy[key] == nil && al.lastSeen.Load() > al.storedSeen && now-al.seenWrittenAt >= int64(minGap) {
			due = append(due, al)
			marks = append(marks, store.SeenMark{Key: key, Seen: time.Unix(0, al.lastSeen.Load()).UTC(), Online: online})
		}
	}
	a.mu.RUnlock()
	var firstErr error
	written := 0
	const batch = 256
	for i := 0; i < len(marks); i += batch {
		j := min(i+batch, len(marks))
		ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
		err := a.store.Touch(ctx, marks[i:j])
		cancel()
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		a.mu.Lock()
		for k := i; k < j; k++ {
			due[k].storedSeen, due[k].seenWrittenAt = marks[k].Seen.UnixNano(), now
		}
		a.mu.Unlock()
		written += j - i
	}
	return written, firstErr
}

// proxyID names one proxy of one client, as CloseProxy names it.
type proxyID struct{ user, name string }

// onlineProxies tracks which proxies frps reported as registered and not
// yet closed (NewProxy allowed, CloseProxy not seen), per key: a group key
// is online while any member is. restored keys were online when the
// previous run last wrote their last_seen; they stay online until their
// proxy closes or registers again (frps re-sends nothing for proxies that
// stayed connected through a restart of this plugin).
type onlineProxies struct {
	mu       sync.RWMutex
	proxies  map[proxyID]string // -> key
	keys     map[string]int     // key -> proxies online
	restored map[string]bool
}

func (o *onlineProxies) init() {
	o.proxies, o.keys, o.restored = map[proxyID]string{}, map[string]int{}, map[string]bool{}
}

// opened records that frps registered req's proxy under key.
func (o *onlineProxies) opened(id proxyID, key string) {
	o.mu.RLock()
	known := o.proxies[id] == key && !o.restored[key]
	o.mu.RUnlock()
	if known { // a sticky hit of a proxy already online: the usual case
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	delete(o.restored, key)
	if old, ok := o.proxies[id]; ok {
		if old == key {
			return
		}
		o.closeKey(old)
	}
	o.proxies[id] = key
	o.keys[key]++
}

// closed records frps's CloseProxy of id.
func (o *onlineProxies) closed(id proxyID) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if key, ok := o.proxies[id]; ok {
		delete(o.proxies, id)
		o.closeKey(key)
		return
	}
	// A proxy registered before this plugin restarted: CloseProxy carries
	// no group, so only a proxy keyed by its own name can be matched.
	delete(o.restored, keyOf(frpplugin.Proxy{User: id.user, ProxyName: id.name}))
}

func (o *onlineProxies) closeKey(key string) {
	if o.keys[key]--; o.keys[key] <= 0 {
		delete(o.keys, key)
	}
}

func (o *onlineProxies) restore(key string) {
	o.mu.Lock()
	o.restored[key] = true
	o.mu.Unlock()
}

func (o *onlineProxies) has(key string) bool {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.keys[key] > 0 || o.restored[key]
}

// proxyOpened and proxyClosed are what the handler tells of frps's
// NewProxy (once allowed) and CloseProxy.
func (a *allocator) proxyOpened(req frpplugin.Proxy) {
	a.online.opened(proxyID{validUTF8(req.User), validUTF8(req.ProxyName)}, keyOf(frpplugin.Proxy{User: validUTF8(req.User),
		ProxyName: validUTF8(req.ProxyName), Group: validUTF8(req.Group)}))
}

func (a *allocator) proxyClosed(user, name string) {
	a.online.closed(proxyID{validUTF8(user), validUTF8(name)})
}

// checkRequested says whether key may have port as far as the pool goes.
// Called with mu held.
func (a *allocator) checkRequested(key string, slot store.Slot) error {
	if err := a.checkOperatorPort(key, slot); err != nil {
		return err
	}
	if !a.pool.has(slot.Port) {
		return &portError{slot: slot, err: errPortOutside, detail: "allowed: " + a.poolStr}
	}
	return nil
}

// checkOperatorPort says whether an operator may put key on port (assign,
// import, adopt). The rule for ports outside the pool is one for every
// operator action: allowed, since an operator may keep a device on the
// port it had before the plugin (frps's allowPorts still has the last
// word), and shown as "outside pool"; frps's own ports and another key's
// port never. Called with mu held.
func (a *allocator) checkOperatorPort(key string, slot store.Slot) error {
	port, sp := slot.Port, a.in(slot.Space)
	switch holder := sp.byPort[port]; {
	case port < 1 || port > maxPort:
		return &portError{slot: slot, err: errPortInvalid}
	case holder != nil && holder.Key != key, sp.reserved.has(port):
		return &portError{slot: slot, err: errPortReserved}
	case sp.heldBack[port] != "":
		return &portError{slot: slot, err: errPortReserved, detail: heldBackDetail}
	case sp.excluded[port] != "":
		return &portError{slot: slot, err: errPortForFrps, detail: sp.excluded[port]}
	}
	return nil
}

// checkPolicy says whether user may ask for slot: inside the user's own
// range, and not inside a range another rule reserves. A rule's range is
// the same numbers in both spaces.
func (a *allocator) checkPolicy(user string, up userPolicy, slot store.Slot) error {
	if up.ports.has(slot.Port) {
		return nil
	}
	if up.rule != nil && up.rule.ports != nil {
		return &portError{slot: slot, err: errPortOutside, detail: fmt.Sprintf("user %q may use %s, by %s", user, up.portSpec, up.rule.name())}
	}
	if r := a.policy.reservedFor(slot.Port); r != nil {
		return &portError{slot: slot, err: errPortReserved, detail: "by " + r.name()}
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
func (a *allocator) lookup(key string) (store.Record, time.Time, bool) {
	key = validUTF8(key)
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[key]
	if al == nil {
		return store.Record{}, time.Time{}, false
	}
	return *al.Record, time.Unix(0, al.lastSeen.Load()), true
}

// poolStats counts the pool: size, allocated ports inside it, and free,
// over both spaces (a port number counts once in each), and each space's.
type poolStats struct {
	Size int `json:"size"`
	Used int `json:"used"`
	Free int `json:"free"`
	// TCP and UDP count each space alone.
	TCP *spaceStats `json:"tcp,omitempty"`
	UDP *spaceStats `json:"udp,omitempty"`
}

// spaceStats counts one space of the pool.
type spaceStats struct {
	Size int `json:"size"`
	Used int `json:"used"`
	Free int `json:"free"`
}

func (a *allocator) stats() poolStats {
	a.mu.RLock()
	defer a.mu.RUnlock()
	count := func(sp *portSpace) *spaceStats {
		s := &spaceStats{Size: a.pool.len()}
		for p := range sp.excluded {
			if a.pool.has(p) {
				s.Size--
			}
		}
		for p := range sp.byPort {
			if a.pool.has(p) && sp.excluded[p] == "" {
				s.Used++
			}
		}
		for p := range sp.heldBack {
			if a.pool.has(p) && sp.excluded[p] == "" {
				s.Used++
			}
		}
		s.Free = s.Size - s.Used
		return s
	}
	tcp, udp := count(&a.tcp), count(&a.udp)
	return poolStats{Size: tcp.Size + udp.Size, Used: tcp.Used + udp.Used, Free: tcp.Free + udp.Free, TCP: tcp, UDP: udp}
}

// snapshot lists every allocation, sorted by port, tcp before udp.
func (a *allocator) snapshot() []allocationView {
	a.mu.RLock()
	out := make([]allocationView, 0, len(a.byKey))
	for _, al := range a.byKey {
		out = append(out, a.view(al))
	}
	a.mu.RUnlock()
	slices.SortFunc(out, compareViews)
	return out
}

// compareViews orders allocations by port, tcp before udp.
func compareViews(x, y allocationView) int {
	return cmp.Or(x.Port-y.Port, cmp.Compare(x.Space(), y.Space()))
}

// allocationView is an allocation as operators see it.
type allocationView struct {
	store.Record
	// Proto is the space of its port, tcp or udp (by its proxy type).
	Proto    store.Space `json:"proto"`
	LastSeen time.Time   `json:"last_seen"`
	// HeldBack, set on a row of no key, says why the port is held back
	// (a damaged record of an unknown key).
	HeldBack string `json:"held_back,omitempty"`
	// OutsidePool marks a port outside the pool (an operator put it there,
	// or the pool shrank); it stays until an operator moves it.
	OutsidePool bool `json:"outside_pool"`
	// OutsidePolicy marks a port of the pool that today's policy would not
	// give this user (the policy changed since).
	OutsidePolicy bool `json:"outside_policy"`
}

// inPool says whether port is one the pool hands out in sp: allowed, and
// not one of frps's own listeners of sp's protocol (nor the plugin's).
func (a *allocator) inPool(sp *portSpace, port int) bool {
	return a.pool.has(port) && !sp.excludedSet.has(port)
}

// view describes al. Called with mu held.
func (a *allocator) view(al *allocation) allocationView {
	inPool := a.inPool(a.in(al.Space()), al.Port)
	return allocationView{Record: *al.Record, Proto: al.Space(), LastSeen: time.Unix(0, al.lastSeen.Load()),
		OutsidePool: !inPool, OutsidePolicy: inPool && !a.policy.forUser(al.User).ports.has(al.Port)}
}

// find returns key's allocation as operators see it.
func (a *allocator) find(key string) (allocationView, bool) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	al := a.byKey[validUTF8(key)]
	if al == nil {
		return allocationView{}, false
	}
	return a.view(al), true
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

// bindProbe test-binds a port on addr the way frps does before it
// listens, in the port's own protocol (a tcp listener for tcp, a udp
// socket for udp), so a port frps could not bind is never handed out.
func bindProbe(addr string) func(store.Slot) error {
	return func(slot store.Slot) error {
		hostport := net.JoinHostPort(addr, strconv.Itoa(slot.Port))
		if slot.Space == store.UDP {
			pc, err := net.ListenPacket("udp", hostport)
			if err != nil {
				return err
			}
			return pc.Close()
		}
		l, err := net.Listen("tcp", hostport)
		if err != nil {
			return err
		}
		return l.Close()
	}
}

// importAll records recs as allocations on an operator's word (import,
// adopt), all or nothing: everything is checked first, and if a write
// fails midway the ones made are undone. Ports outside the pool follow the
// operators' rule (checkOperatorPort). It returns how many were new or
// moved; the rest were there already.
func (a *allocator) importAll(recs []store.Record, how store.HistoryChange, by string) (int, error) {
	n, _, err := a.importWith(recs, how, by, importMode{})
	return n, err
}

// importMode: dryRun checks everything and writes nothing; skipConflicts
// takes the records it can and names the rest, instead of refusing all.
type importMode struct{ dryRun, skipConflicts bool }

// importRefusal is a record an import or adopt cannot take, and why.
type importRefusal struct {
	Key    string      `json:"key"`
	Port   int         `json:"port"`
	Proto  store.Space `json:"proto"`
	Reason string      `json:"reason"`
}

// importError refuses a whole import, naming every record it cannot take.
type importError struct {
	refused []importRefusal
	errs    []error
}

func (e *importError) Error() string {
	if len(e.errs) == 1 {
		return e.errs[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d records cannot be taken:", len(e.errs))
	for i, err := range e.errs {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(" " + err.Error())
	}
	return b.String()
}

func (e *importError) Unwrap() []error { return e.errs }

// importWith is importAll with a mode; it also returns the records it
// refused (with skipConflicts, or for a dry run).
func (a *allocator) importWith(recs []store.Record, how store.HistoryChange, by string, mode importMode) (int, []importRefusal, error) {
	now := a.now()
	a.mu.RLock()
	seen, slots := map[string]bool{}, map[store.Slot]string{}
	var todo []store.Record
	refusals := &importError{}
	for _, r := range recs {
		var err error
		r.Key = validUTF8(r.Key)
		switch {
		case !store.ValidRecord(r):
			err = fmt.Errorf("allocation %q on port %d is not valid", r.Key, r.Port)
		case seen[r.Key]:
			err = fmt.Errorf("key %q appears twice", r.Key)
		case slots[r.Slot()] != "":
			err = fmt.Errorf("port %s is given to both %q and %q", portName(r.Slot()), slots[r.Slot()], r.Key)
		case checkNote(r.Note) != nil:
			err = fmt.Errorf("%q: %w", r.Key, checkNote(r.Note))
		default:
			err = a.checkOperatorPort(r.Key, r.Slot())
			if err != nil {
				err = fmt.Errorf("%q: %w", r.Key, err)
			}
		}
		if err != nil {
			refusals.refused = append(refusals.refused, importRefusal{Key: r.Key, Port: r.Port, Proto: r.Space(), Reason: err.Error()})
			refusals.errs = append(refusals.errs, err)
			continue
		}
		seen[r.Key], slots[r.Slot()] = true, r.Key
		if cur := a.byKey[r.Key]; cur == nil || cur.Slot() != r.Slot() {
			if r.CreatedAt.IsZero() {
				r.CreatedAt = now
			}
			if r.AssignedAt.IsZero() {
				r.AssignedAt = now
			}
			todo = append(todo, r)
		}
	}
	a.mu.RUnlock()
	if len(refusals.errs) > 0 && !mode.skipConflicts {
		return 0, refusals.refused, refusals
	}
	if mode.dryRun {
		return len(todo), refusals.refused, nil
	}
	var done []store.Claim
	undo := func() {
		for i := len(done) - 1; i >= 0; i-- {
			c := done[i]
			ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
			var changes []store.Change
			var uerr error
			if c.Old == nil {
				changes, uerr = a.store.Release(ctx, c.Want, now)
			} else {
				changes, uerr = a.store.Claim(ctx, store.Claim{Want: *c.Old, Old: &c.Want, At: now})
			}
			cancel()
			a.mu.Lock()
			for _, ch := range changes {
				a.apply(ch)
			}
			a.mu.Unlock()
			if uerr != nil {
				a.log.Error("import: could not undo a write after a failure; check this key", "key", c.Want.Key, "err", uerr)
			}
		}
	}
	for _, r := range todo {
		ctx, cancel := context.WithTimeout(context.Background(), a.timeout)
		cur, lerr := a.lockKey(ctx, r.Key)
		if lerr != nil {
			cancel()
			undo()
			return 0, nil, lerr
		}
		if err := a.checkOperatorPort(r.Key, r.Slot()); err != nil {
			a.mu.Unlock()
			cancel()
			undo()
			return 0, nil, fmt.Errorf("%q: %w", r.Key, err)
		}
		c := store.Claim{Want: r, At: now}
		if cur != nil {
			c.Old = cur.Record
			c.Want.CreatedAt = cur.CreatedAt
		}
		settled := a.markBusy(r.Key)
		sp := a.in(r.Space())
		sp.reserved.add(r.Port)
		a.mu.Unlock()
		port := r.Port
		_, err := a.write(ctx, func(ctx context.Context) ([]store.Change, error) { return a.store.Claim(ctx, c) }, func() {
			settled()
			sp.reserved.remove(port)
		})
		cancel()
		if err != nil {
			undo()
			return 0, nil, fmt.Errorf("%q: %w (nothing imported)", r.Key, err)
		}
		done = append(done, c)
	}
	for _, c := range done {
		e := store.HistoryEntry{Time: now, Key: c.Want.Key, User: c.Want.User, ProxyType: c.Want.ProxyType, Port: c.Want.Port,
			Change: how, By: by, Note: c.Want.Note}
		if c.Old != nil {
			e.OldPort = c.Old.Port
			if c.Old.Space() != c.Want.Space() {
				e.OldProxyType = cmp.Or(c.Old.ProxyType, string(store.TCP))
			}
		}
		a.changed(e)
	}
	return len(done), refusals.refused, nil
}
