// Package etcd is the store several frps share: records under a key prefix of
// an etcd cluster, written in transactions, followed through a watch.
package etcd

// The etcd store: allocations in an etcd cluster that several frps servers
// (each with its own frp-port-keeper) share. Every write is one etcd
// transaction whose comparisons say "the records are still what I saw", so
// two instances can never give one port to two keys, nor one key two ports,
// and a user's key count (the quota) is exact across all of them.
//
// Layout under the prefix (default /frp-port-keeper/):
//
//	key/<url.PathEscape(key)>    the allocation (record JSON)
//	port/<%05d>                  the key that holds the tcp port
//	port/udp/<%05d>              the key that holds the udp port
//	user/<url.PathEscape(user)>  how many keys the user holds (decimal; absent: 0)
//	seen/<url.PathEscape(key)>   {"last_seen":…,"online":…} (touch; losing it is harmless)
//	freed/<%05d>                 since when the tcp port is free (RFC 3339); orders reuse
//	freed/udp/<%05d>             since when the udp port is free
//	history/<entry ID>           the history (see etcdHistory); load and watch skip it
//
// A key record and its port record are only ever written together, in one
// transaction, so there is no crash state to repair: etcd applies a
// transaction whole or not at all. A key record's proxy_type decides the
// space, hence which of the two names its port record has.
//
// Earlier versions: before tcp and udp were two spaces, every port record
// was port/<%05d>, a udp key's too, and freed/<%05d> any freed port. Load
// (a reset's reload too) moves a port/N that names a key whose record is
// udp on N to port/udp/N, in transactions comparing the ModRevisions of
// the key record and both port records, so a concurrent writer (another
// instance of the upgraded fleet migrating too) wins cleanly and load
// reads again. A freed/N of a udp port stays, as tcp's: it only orders
// reuse.
//
// Upgrade every instance of a fleet together. An instance of an earlier
// version checks and writes port/N alone, whatever the space: it does not
// see port/udp/N, so it can give N to a second udp key; it reports a
// port/udp/ record as "not a port", and its load writes port/N back for
// a udp key whose port/N is missing (which the next load here moves or
// removes again). Its udp claims under port/N are moved at this
// version's next load or reset; until then they hold their udp slot here
// (releases, moves and reclaims retire them), and a tcp claim of N moves
// such a record to port/udp/N in the claim's own transaction rather than
// refuse N or overwrite the udp key's record.
//
// An etcd that lost its data under running servers (restarted on an empty
// data directory, a backup restored) is written back from their memory.
// Each instance notices that etcd is not the one it loaded: an answer shows
// another cluster ID, or a revision below one an earlier answer showed (a
// linearizable answer never does); a check every etcdCheckInterval makes
// sure an idle instance notices too (etcd 3.7 lets a watch wait silently
// on a revision it has not reached).
// From then on it refuses every write (errStoreRestoring; sticky hits need
// none), and its watch writes back every allocation it held, in
// create-if-absent transactions (the key record and the port record must
// both be absent; the user's count is compared and moved as in a claim).
// A record another instance wrote back first is present, one another
// writer made first on the key or the port wins; then the watch reloads
// and hands the allocator the result as a reset, so an instance whose
// record lost follows what etcd holds. One warning gives the counts.

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"frp-port-keeper/internal/store"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultPrefix is where the allocations live unless -etcd-prefix says.
const DefaultPrefix = "/frp-port-keeper/"

const (
	// MaxTxnOps is etcd's default --max-txn-ops: no transaction (nor a
	// nested one) may hold more operations.
	MaxTxnOps = 128
	// etcdLateWrite bounds how long a write may still land after its
	// caller stopped waiting (the store keeps the request going, so its
	// outcome is settled by then and watch reports it if it landed).
	etcdLateWrite = 30 * time.Second
	// etcdClaimAttempts bounds the retries of a claim or release whose
	// transaction lost only on a derived record (a user's key count).
	etcdClaimAttempts = 16
	// etcdLoadPage is how many records one read of load returns.
	etcdLoadPage = 5000
	// etcdLoadAttempts bounds the reads of a load whose moves of port
	// records of an earlier version lose to other writers.
	etcdLoadAttempts = 4
	// etcdMigrateBatch is how many of those moves one transaction holds:
	// 3 compares each stay within MaxTxnOps.
	etcdMigrateBatch = MaxTxnOps / 3
	// etcdRetryDelay is how long the watch waits before reconnecting.
	etcdRetryDelay = 200 * time.Millisecond
	// etcdCheckInterval is how often an instance asks etcd whether it is
	// still the etcd it loaded, whatever else it asks.
	etcdCheckInterval = time.Second
	// etcdRestoreBatch is how many records one write-back transaction
	// holds: 3 writes each and a count per user stay within MaxTxnOps.
	etcdRestoreBatch = MaxTxnOps / 4
	// etcdHistoryDir holds the history under the prefix: no record kind
	// is named so, and load and watch skip it.
	etcdHistoryDir = "history/"
)

// Options configure Open.
type Options struct {
	Endpoints                 []string
	Prefix                    string // default DefaultPrefix
	CAFile, CertFile, KeyFile string
	Username, Password        string
	// Timeout bounds connecting and every call whose ctx has no deadline
	// of its own (default 2s).
	Timeout time.Duration
	Log     *slog.Logger
}

// Store implements store.Store on etcd.
//
// It remembers the key, port and user records it last saw (from load,
// watch, its own transactions and the reads a lost transaction makes), each
// with the ModRevision a transaction compares against. What it remembers
// only decides what to ask; etcd's comparisons decide what is written.
type Store struct {
	cli       *clientv3.Client
	prefix    string
	timeout   time.Duration
	log       *slog.Logger
	endpoints string // for messages
	eps       []string
	tls       *tls.Config // nil: plain

	mu  sync.Mutex
	mem map[string]etcdEntry // by name under the prefix: key/, port/ and user/ records

	// users serializes this instance's writes per user: every new key
	// moves its user's count record, which each transaction compares, so
	// concurrent claims of one user would only lose to each other.
	usersMu sync.Mutex
	users   map[string]*userLock

	// What the store knows of the etcd it loaded (guarded by mu): its
	// cluster ID, the highest revision an answer showed, and gen, which a
	// write-back bumps when memory is rebuilt from the new etcd.
	clusterID uint64
	highRev   int64
	gen       int64
	// lost, when set, says why etcd is not the etcd memory came from:
	// writes are refused until the watch has written back held, what
	// memory held then (guarded by mu). lostAgain: it happened again
	// during a write-back.
	lost      string
	lostAgain bool
	held      []store.Record
	lostc     chan struct{} // wakes the watch when lost is set
	// writeGate: claims and releases hold it shared, a write-back alone.
	writeGate sync.RWMutex
	// restored hears of every finished write-back (metrics).
	restored func(store.RestoreReport)
}

// userLock is one user's write lock, dropped when nobody holds or waits.
type userLock struct {
	sync.Mutex
	refs int
}

// lockUsers takes the write locks of users, in order, and returns what
// releases them.
func (s *Store) lockUsers(users ...string) func() {
	users = slices.Compact(slices.Sorted(slices.Values(users)))
	s.usersMu.Lock()
	if s.users == nil {
		s.users = map[string]*userLock{}
	}
	locks := make([]*userLock, len(users))
	for i, u := range users {
		l := s.users[u]
		if l == nil {
			l = &userLock{}
			s.users[u] = l
		}
		l.refs++
		locks[i] = l
	}
	s.usersMu.Unlock()
	for _, l := range locks {
		l.Lock()
	}
	return func() {
		for _, l := range locks {
			l.Unlock()
		}
		s.usersMu.Lock()
		for i, l := range locks {
			if l.refs--; l.refs == 0 {
				delete(s.users, users[i])
			}
		}
		s.usersMu.Unlock()
	}
}

// etcdEntry is what the store last saw of one record.
type etcdEntry struct {
	value  []byte
	modRev int64 // the record's ModRevision; 0: absent
	asOf   int64 // the revision this is known to be current at
}

// etcdSeen is the value of a seen/ record.
type etcdSeen struct {
	LastSeen time.Time `json:"last_seen"`
	Online   bool      `json:"online"`
}

// Record names, relative to the prefix.
// maxPort is the highest port number.
const maxPort = 65535

func KeyName(key string) string      { return "key/" + url.PathEscape(key) }
func UserName(user string) string    { return "user/" + url.PathEscape(user) }
func etcdSeenName(key string) string { return "seen/" + url.PathEscape(key) }

// PortName is the name of the record that says which key holds slot. tcp
// keeps the names of the versions before udp had a space of its own, so
// their data loads unchanged.
func PortName(slot store.Slot) string { return "port/" + slotName(slot) }

// freedName is the name of the record that says since when slot is free.
func freedName(slot store.Slot) string { return "freed/" + slotName(slot) }

func slotName(slot store.Slot) string {
	if slot.Space == store.UDP {
		return fmt.Sprintf("udp/%05d", slot.Port)
	}
	return fmt.Sprintf("%05d", slot.Port)
}

// parseSlot reads what follows port/ or freed/ in a record's name.
func parseSlot(rest string) (store.Slot, bool) {
	slot := store.Slot{Space: store.TCP}
	if num, ok := strings.CutPrefix(rest, "udp/"); ok {
		slot.Space, rest = store.UDP, num
	}
	port, err := strconv.Atoi(rest)
	if err != nil || port < 1 || port > maxPort {
		return store.Slot{}, false
	}
	slot.Port = port
	return slot, true
}

// Open connects to etcd and checks that it answers within
// o.timeout, so a wrong endpoint or certificate stops the start with one
// line instead of every later call timing out.
func Open(ctx context.Context, o Options) (*Store, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("-etcd-endpoints: no endpoint given")
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return nil, errors.New("-etcd-cert and -etcd-key go together")
	}
	var tlsConfig *tls.Config
	if o.CAFile != "" || o.CertFile != "" {
		tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		if o.CAFile != "" {
			pem, err := os.ReadFile(o.CAFile)
			if err != nil {
				return nil, fmt.Errorf("-etcd-ca: %v", err)
			}
			tlsConfig.RootCAs = x509.NewCertPool()
			if !tlsConfig.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("-etcd-ca %s: no PEM certificate in it", o.CAFile)
			}
		}
		if o.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("-etcd-cert/-etcd-key: %v", err)
			}
			tlsConfig.Certificates = []tls.Certificate{cert}
		}
	}
	for _, ep := range o.Endpoints {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("-etcd-endpoints: %q is not an http:// or https:// URL", ep)
		}
		if tlsConfig != nil && u.Scheme != "https" {
			return nil, fmt.Errorf("-etcd-endpoints: %q: TLS files are given, so use https://", ep)
		}
	}
	s := &Store{
		prefix:    o.Prefix,
		timeout:   o.Timeout,
		log:       o.Log,
		endpoints: strings.Join(o.Endpoints, ","),
		eps:       o.Endpoints,
		tls:       tlsConfig,
		mem:       map[string]etcdEntry{},
		lostc:     make(chan struct{}, 1),
		restored:  func(store.RestoreReport) {},
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   o.Endpoints,
		DialTimeout: o.Timeout,
		// Notice a dead connection (a host gone without closing it) even
		// while nothing is asked; etcd refuses pings more often than 5s.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		TLS:                  tlsConfig,
		Username:             o.Username,
		Password:             o.Password,
		Logger:               zap.NewNop(),
		DialOptions: []grpc.DialOption{
			// gRPC's default reconnect backoff grows to two minutes: after
			// an outage writes would wait that long. Retry every second at
			// most instead.
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: max(o.Timeout, 2*time.Second),
			}),
		},
	})
	if err != nil {
		// Only a log-in (username and password) talks to etcd here.
		return nil, s.describe("log in to", err)
	}
	s.cli = cli
	cctx, cancel := s.bound(ctx)
	defer cancel()
	if _, err := cli.Get(cctx, s.prefix, clientv3.WithCountOnly()); err != nil {
		cli.Close()
		return nil, s.unreachable("read from", err)
	}
	return s, nil
}

// describe makes one line of an etcd error, naming the endpoints.
func (s *Store) describe(what string, err error) error {
	return s.describeWhy(what, err, "")
}

// describeWhy is describe with why etcd did not answer, when known.
func (s *Store) describeWhy(what string, err error, why string) error {
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	msg = strings.Join(strings.Fields(msg), " ")
	switch {
	case errors.Is(err, context.DeadlineExceeded), status.Code(err) == codes.DeadlineExceeded:
		if why == "" {
			why = "is it running, and reachable with these URLs and certificates?"
		}
		return fmt.Errorf("cannot %s etcd at %s: no answer within %v (%s)", what, s.endpoints, s.timeout, why)
	case errors.Is(err, context.Canceled), status.Code(err) == codes.Canceled:
		return fmt.Errorf("cannot %s etcd at %s: canceled", what, s.endpoints)
	}
	return fmt.Errorf("cannot %s etcd at %s: %s", what, s.endpoints, msg)
}

// unreachable is describe, plus what dialing the endpoints by hand shows
// when etcd did not answer: gRPC only says that the deadline passed, not
// that the connection was refused or a certificate was not accepted.
func (s *Store) unreachable(what string, err error) error {
	var why string
	if errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded {
		why = s.probe(min(s.timeout, time.Second))
	}
	return s.describeWhy(what, err, why)
}

// probe dials each endpoint (TCP, then TLS for https) within d and returns
// the first failure, or "" when every endpoint connects.
func (s *Store) probe(d time.Duration) string {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for _, ep := range s.eps {
		u, err := url.Parse(ep)
		if err != nil {
			return err.Error()
		}
		var dialer net.Dialer
		conn, err := dialer.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return err.Error()
		}
		if u.Scheme == "https" {
			cfg := &tls.Config{MinVersion: tls.VersionTLS12}
			if s.tls != nil {
				cfg = s.tls.Clone()
			}
			cfg.ServerName, cfg.NextProtos = u.Hostname(), []string{"h2"}
			tc := tls.Client(conn, cfg)
			if dl, ok := ctx.Deadline(); ok {
				tc.SetDeadline(dl)
			}
			err := tc.HandshakeContext(ctx)
			if err == nil {
				// A client certificate the server refuses shows on the
				// first read (TLS 1.3); a timeout means it was accepted.
				tc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				_, err = tc.Read(make([]byte, 1))
				var ne net.Error
				if err == nil || errors.As(err, &ne) && ne.Timeout() {
					err = nil
				}
			}
			if err != nil {
				conn.Close()
				return fmt.Sprintf("%s: %v", ep, err)
			}
		}
		conn.Close()
	}
	return ""
}

// bound gives ctx the store's timeout unless it has a deadline already.
func (s *Store) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, s.timeout)
}

func (s *Store) Close() error { return s.cli.Close() }

// ReleaseDamaged: etcd's records are written whole or not at all, so none
// is ever found damaged.
func (s *Store) ReleaseDamaged(context.Context, store.Slot) error { return store.ErrNotHeldBack }

// OnRestore sets what hears of every finished write-back; call it before
// watch.
// Client is the store's etcd client, for tests and tools that look at
// etcd directly.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Prefix is the key prefix the store keeps its records under.
func (s *Store) Prefix() string { return s.prefix }

func (s *Store) OnRestore(f func(store.RestoreReport)) { s.restored = f }

// ---------------------------------------------------------------------------
// Is this the etcd memory came from?

// etcdFloor is what the store knew when it sent a request: an answer of
// the same etcd shows at least this revision, since etcd serves reads
// linearizably and revisions only grow.
type etcdFloor struct{ gen, rev int64 }

func (s *Store) floor() etcdFloor {
	s.mu.Lock()
	defer s.mu.Unlock()
	return etcdFloor{gen: s.gen, rev: s.highRev}
}

// sameEtcd checks the header of an answer to a request sent at f, and
// says whether memory may learn from it. An answer of another cluster, or
// one whose revision went back, means etcd lost its data: the store then
// refuses writes until the watch has written back what it held. An answer
// to a request sent before memory was rebuilt is not learned from either.
func (s *Store) sameEtcd(f etcdFloor, h *pb.ResponseHeader) bool {
	if h == nil {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.gen != s.gen {
		return false
	}
	switch {
	case s.clusterID == 0:
		s.clusterID = h.ClusterId
	case h.ClusterId != s.clusterID:
		s.lostLocked(fmt.Sprintf("its cluster ID changed from %x to %x", s.clusterID, h.ClusterId))
		return false
	}
	if h.Revision < f.rev {
		s.lostLocked(fmt.Sprintf("its revision went back from %d to %d", f.rev, h.Revision))
		return false
	}
	s.highRev = max(s.highRev, h.Revision)
	return true
}

// sameCluster checks the cluster ID of a watch answer (whose revision says
// nothing: a member may answer a watch before it caught up).
func (s *Store) sameCluster(h *pb.ResponseHeader) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h != nil && s.clusterID != 0 && h.ClusterId != 0 && h.ClusterId != s.clusterID {
		s.lostLocked(fmt.Sprintf("its cluster ID changed from %x to %x", s.clusterID, h.ClusterId))
		return false
	}
	return true
}

// lostLocked records that etcd lost its data, and what memory held then.
func (s *Store) lostLocked(why string) {
	if s.lost != "" {
		s.lostAgain = true
		return
	}
	s.lost = why
	if s.held == nil {
		s.held = s.heldLocked()
	}
	s.log.Info("etcd is not the etcd this server loaded: it lost its data; refusing writes until the allocations held are written back",
		"endpoints", s.endpoints, "why", why, "allocations", len(s.held))
	select {
	case s.lostc <- struct{}{}:
	default:
	}
}

// heldLocked is every allocation memory holds, as load would serve them:
// key records whose port record names them, oldest first.
func (s *Store) heldLocked() []store.Record {
	held := []store.Record{}
	for name := range s.mem {
		esc, ok := strings.CutPrefix(name, "key/")
		if !ok {
			continue
		}
		key, err := url.PathUnescape(esc)
		if err != nil {
			continue
		}
		if r, _, ok := s.recordLocked(key); ok && store.ValidRecord(r) {
			if _, _, own := s.ownPortLocked(r); own {
				held = append(held, r)
			}
		}
	}
	slices.SortFunc(held, func(a, b store.Record) int {
		return cmp.Or(a.AssignedAt.Compare(b.AssignedAt), cmp.Compare(a.Key, b.Key))
	})
	return held
}

// refusal is the error every write gets while etcd's lost data is being
// written back; nil otherwise.
func (s *Store) refusal() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lost == "" {
		return nil
	}
	return fmt.Errorf("%w: etcd at %s: %s; writes resume once every allocation this server holds is written back",
		store.ErrRestoring, s.endpoints, s.lost)
}

// enterWrite admits a claim or release unless a write-back is due or
// under way (it never waits for one), and returns what ends it.
func (s *Store) enterWrite() (func(), error) {
	if !s.writeGate.TryRLock() {
		return nil, cmp.Or(s.refusal(), fmt.Errorf("%w: etcd at %s", store.ErrRestoring, s.endpoints))
	}
	if err := s.refusal(); err != nil {
		s.writeGate.RUnlock()
		return nil, err
	}
	return s.writeGate.RUnlock, nil
}

// errEtcdChanged says an answer came from an etcd memory no longer
// follows (it was rebuilt meanwhile).
var errEtcdChanged = errors.New("etcd changed while the request was under way; try again")

// ---------------------------------------------------------------------------
// Memory.

// tracked says whether the store remembers records of this name.
func etcdTracked(name string) bool {
	return strings.HasPrefix(name, "key/") || strings.HasPrefix(name, "port/") || strings.HasPrefix(name, "user/")
}

// learnLocked records what a read, a watch event or a transaction showed
// of name as of revision asOf, unless the store already knows a later state.
func (s *Store) learnLocked(name string, value []byte, modRev, asOf int64) {
	if !etcdTracked(name) {
		return
	}
	if e, ok := s.mem[name]; ok && asOf < e.asOf {
		return
	}
	s.mem[name] = etcdEntry{value: value, modRev: modRev, asOf: asOf}
}

// recordLocked is the key's record as the store last saw it.
func (s *Store) recordLocked(key string) (store.Record, etcdEntry, bool) {
	e := s.mem[KeyName(key)]
	if e.modRev == 0 {
		return store.Record{}, e, false
	}
	var r store.Record
	if json.Unmarshal(e.value, &r) != nil || r.Key != key {
		return store.Record{}, e, false
	}
	return r, e, true
}

// holderLocked is the key slot's port record names ("" when none).
func (s *Store) holderLocked(slot store.Slot) (string, etcdEntry) {
	e := s.mem[PortName(slot)]
	if e.modRev == 0 {
		return "", e
	}
	return string(e.value), e
}

// legacyLocked is the key that holds port/udp by a port record of an
// earlier version (see "Earlier versions" above): port/N naming a key whose
// record is udp on N; "" when none.
func (s *Store) legacyLocked(port int) (string, etcdEntry) {
	h, e := s.holderLocked(store.TCPPort(port))
	if h == "" {
		return "", e
	}
	if r, _, ok := s.recordLocked(h); ok && r.Slot() == store.UDPPort(port) {
		return h, e
	}
	return "", e
}

// slotHolderLocked is the key that holds slot, by its port record or, for
// udp while no such record is there, by one of an earlier version.
func (s *Store) slotHolderLocked(slot store.Slot) string {
	h, _ := s.holderLocked(slot)
	if h == "" && slot.Space == store.UDP {
		h, _ = s.legacyLocked(slot.Port)
	}
	return h
}

// ownPortLocked is the name and entry of the port record by which r's key
// holds r's slot, if it does: the slot's own, or for udp one of an earlier
// version while the slot's own is absent.
func (s *Store) ownPortLocked(r store.Record) (string, etcdEntry, bool) {
	h, e := s.holderLocked(r.Slot())
	if h == r.Key {
		return PortName(r.Slot()), e, true
	}
	if h == "" && r.Space() == store.UDP {
		if l, le := s.legacyLocked(r.Port); l == r.Key {
			return PortName(store.TCPPort(r.Port)), le, true
		}
	}
	return "", e, false
}

// knowsSlotLocked says whether memory has seen slot's port record. One of
// an earlier version that memory never saw is taken to be absent: only an
// instance of an earlier version writes one after load migrated them all.
func (s *Store) knowsSlotLocked(slot store.Slot) bool {
	return s.mem[PortName(slot)].asOf != 0
}

// portNames are the names of every port record that may hold port, in
// either space.
func portNames(port int) []string {
	return []string{PortName(store.TCPPort(port)), PortName(store.UDPPort(port))}
}

// countLocked is the user's key count as the store last saw it.
func (s *Store) countLocked(user string) (int, etcdEntry) {
	e := s.mem[UserName(user)]
	if e.modRev == 0 {
		return 0, e
	}
	n, _ := strconv.Atoi(string(e.value))
	return n, e
}

// learnTxn records what a transaction wrote (it won) or read (it lost).
func (s *Store) learnTxn(resp *clientv3.TxnResponse, then, els []clientv3.Op) {
	rev := resp.Header.Revision
	s.mu.Lock()
	defer s.mu.Unlock()
	if resp.Succeeded {
		for _, op := range then {
			name, ok := strings.CutPrefix(string(op.KeyBytes()), s.prefix)
			switch {
			case !ok:
			case op.IsPut():
				s.learnLocked(name, op.ValueBytes(), rev, rev)
			case op.IsDelete():
				s.learnLocked(name, nil, 0, rev)
			}
		}
		return
	}
	for i, op := range els {
		if !op.IsGet() || i >= len(resp.Responses) {
			continue
		}
		s.learnRangeLocked(op, resp.Responses[i].GetResponseRange(), rev)
	}
}

// learnRangeLocked records the answer to a single-key read at rev.
func (s *Store) learnRangeLocked(op clientv3.Op, rr *pb.RangeResponse, rev int64) {
	name, ok := strings.CutPrefix(string(op.KeyBytes()), s.prefix)
	if !ok || rr == nil {
		return
	}
	if len(rr.Kvs) == 0 {
		s.learnLocked(name, nil, 0, rev)
		return
	}
	kv := rr.Kvs[0]
	s.learnLocked(name, kv.Value, kv.ModRevision, rev)
}

// ---------------------------------------------------------------------------
// Writes.

// commit runs a transaction. The request is not tied to ctx: when ctx ends
// first the caller gets errOutcomeUnknown while the request goes on (for at
// most etcdLateWrite), so a write etcd accepts late still lands whole and
// watch reports it, instead of being cut at a moment nobody can know.
func (s *Store) commit(ctx context.Context, cmps []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	type result struct {
		resp *clientv3.TxnResponse
		err  error
	}
	done := make(chan result, 1)
	go func() {
		lctx, cancel := context.WithTimeout(s.cli.Ctx(), etcdLateWrite)
		defer cancel()
		f := s.floor()
		resp, err := s.cli.Txn(lctx).If(cmps...).Then(then...).Else(els...).Commit()
		if err == nil && s.sameEtcd(f, resp.Header) {
			s.learnTxn(resp, then, els)
		}
		done <- result{resp, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			if etcdDefinite(r.err) {
				return nil, s.describe("write to", r.err)
			}
			return nil, fmt.Errorf("%w: %v", store.ErrOutcomeUnknown, s.describe("write to", r.err))
		}
		return r.resp, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("%w (etcd at %s: %v)", store.ErrOutcomeUnknown, s.endpoints, context.Cause(ctx))
	}
}

// etcdDefinite says whether a failed request surely wrote nothing (etcd
// refused it), as opposed to one that may have been applied.
func etcdDefinite(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated, codes.FailedPrecondition,
		codes.OutOfRange, codes.Unimplemented, codes.NotFound, codes.AlreadyExists, codes.ResourceExhausted:
		return true
	}
	return false
}

// refresh reads the named records in one consistent read and learns them.
func (s *Store) refresh(ctx context.Context, names []string) error {
	ops := make([]clientv3.Op, 0, len(names))
	for _, n := range names {
		ops = append(ops, clientv3.OpGet(s.prefix+n))
	}
	f := s.floor()
	resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return s.readError(err)
	}
	if !s.sameEtcd(f, resp.Header) {
		return cmp.Or(s.refusal(), errEtcdChanged)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, op := range ops {
		s.learnRangeLocked(op, resp.Responses[i].GetResponseRange(), resp.Header.Revision)
	}
	return nil
}

// readError describes a failed read (which changed nothing).
func (s *Store) readError(err error) error {
	return s.describe("read from", err)
}

// etcdPlan is one transaction and the changes it makes when it wins.
type etcdPlan struct {
	cmps    []clientv3.Cmp
	then    []clientv3.Op
	els     []clientv3.Op
	changes func(rev int64) []store.Change
}

// etcdVerdict says why no transaction can be planned from memory.
type etcdVerdict int

const (
	etcdPlanned etcdVerdict = iota
	etcdStale               // memory disagrees with what the caller saw
	etcdQuota               // the user holds maxKeys keys already
)

// names used in reads: the records a claim or release depends on.
func (s *Store) claimNames(c store.Claim) []string {
	set := map[string]bool{KeyName(c.Want.Key): true, UserName(c.Want.User): true}
	// Both spaces' port records of the number: a record of an earlier
	// version under the tcp name may hold it for udp.
	s.mu.Lock()
	for _, space := range store.Spaces {
		set[PortName(store.Slot{Space: space, Port: c.Want.Port})] = true
		if h, _ := s.holderLocked(store.Slot{Space: space, Port: c.Want.Port}); h != "" {
			set[KeyName(h)] = true
		}
	}
	s.mu.Unlock()
	if c.Old != nil {
		for _, n := range portNames(c.Old.Port) {
			set[n] = true
		}
		set[UserName(c.Old.User)] = true
	}
	if c.Victim != nil {
		set[KeyName(c.Victim.Key)] = true
		set[UserName(c.Victim.User)] = true
	}
	return slices.Sorted(maps.Keys(set))
}

// Claim writes c in one transaction; see portStore.
func (s *Store) Claim(ctx context.Context, c store.Claim) ([]store.Change, error) {
	if err := checkEtcdClaim(c); err != nil {
		return nil, err
	}
	if c.At.IsZero() {
		c.At = time.Now()
	}
	leave, err := s.enterWrite()
	if err != nil {
		return nil, err
	}
	defer leave()
	ctx, cancel := s.bound(ctx)
	defer cancel()
	users := []string{c.Want.User}
	if c.Old != nil {
		users = append(users, c.Old.User)
	}
	if c.Victim != nil {
		users = append(users, c.Victim.User)
	}
	defer s.lockUsers(users...)()
	return s.write(ctx, s.claimNames(c), func() (etcdPlan, etcdVerdict) { return s.planClaim(c) },
		func() *store.ConflictError {
			keys, believed := []string{c.Want.Key}, map[string]bool{c.Want.Key: c.Old != nil}
			if c.Victim != nil {
				keys, believed[c.Victim.Key] = append(keys, c.Victim.Key), true
			}
			return s.conflictLocked(keys, believed, c.Want.Slot())
		})
}

// Release deletes r in one transaction; see portStore.
func (s *Store) Release(ctx context.Context, r store.Record, at time.Time) ([]store.Change, error) {
	if !store.ValidRecord(r) {
		return nil, fmt.Errorf("release: invalid record for %q port %d", r.Key, r.Port)
	}
	if at.IsZero() {
		at = time.Now()
	}
	leave, err := s.enterWrite()
	if err != nil {
		return nil, err
	}
	defer leave()
	ctx, cancel := s.bound(ctx)
	defer cancel()
	names := append([]string{KeyName(r.Key), UserName(r.User)}, portNames(r.Port)...)
	defer s.lockUsers(r.User)()
	return s.write(ctx, names, func() (etcdPlan, etcdVerdict) { return s.planRelease(r, at) },
		func() *store.ConflictError {
			return s.conflictLocked([]string{r.Key}, map[string]bool{r.Key: true}, r.Slot())
		})
}

// write plans from memory, commits, and on a lost transaction learns the
// records its else branch read and plans again: it retries by itself while
// only derived records (user counts) moved, and returns a *conflictError
// once what the caller saw is no longer so (or the quota is reached) by a
// read no older than the caller's view. It never reports a change that its
// transaction did not make.
func (s *Store) write(ctx context.Context, names []string, plan func() (etcdPlan, etcdVerdict), conflict func() *store.ConflictError) ([]store.Change, error) {
	fresh := false // memory holds a read made during this call
	for range etcdClaimAttempts {
		if err := s.refusal(); err != nil {
			return nil, err // etcd lost its data: memory plans nothing
		}
		p, verdict := plan()
		if verdict != etcdPlanned {
			if !fresh {
				if err := s.refresh(ctx, names); err != nil {
					return nil, err
				}
				fresh = true
				continue
			}
			s.mu.Lock()
			cerr := conflict()
			s.mu.Unlock()
			cerr.Quota = verdict == etcdQuota
			if err := s.completeConflict(ctx, cerr); err != nil {
				return nil, err
			}
			return nil, cerr
		}
		if n := max(len(p.cmps), len(p.then), len(p.els)); n > MaxTxnOps {
			return nil, fmt.Errorf("etcd store: a transaction of %d operations exceeds etcd's limit of %d", n, MaxTxnOps)
		}
		resp, err := s.commit(ctx, p.cmps, p.then, p.els)
		if err != nil {
			return nil, err
		}
		if resp.Succeeded {
			return p.changes(resp.Header.Revision), nil
		}
		fresh = true
	}
	return nil, fmt.Errorf("etcd store: gave up after %d attempts: the records kept changing", etcdClaimAttempts)
}

// checkEtcdClaim refuses a claim that could not be meant.
func checkEtcdClaim(c store.Claim) error {
	switch {
	case !store.ValidRecord(c.Want):
		return fmt.Errorf("claim: invalid record for %q port %d", c.Want.Key, c.Want.Port)
	case c.Old != nil && c.Old.Key != c.Want.Key:
		return fmt.Errorf("claim: old record is of %q, not %q", c.Old.Key, c.Want.Key)
	case c.Victim != nil && (c.Victim.Slot() != c.Want.Slot() || c.Victim.Key == c.Want.Key):
		return fmt.Errorf("claim: victim %q on port %s cannot make way for %q on port %s", c.Victim.Key, c.Victim.Slot(), c.Want.Key, c.Want.Slot())
	}
	return nil
}

// countOps adds to p the compares and writes that move users' key counts
// by delta.
func (s *Store) countOpsLocked(p *etcdPlan, delta map[string]int) {
	for _, user := range slices.Sorted(maps.Keys(delta)) {
		d := delta[user]
		if d == 0 {
			continue
		}
		n, e := s.countLocked(user)
		name := s.prefix + UserName(user)
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(name), "=", e.modRev))
		if n+d <= 0 {
			p.then = append(p.then, clientv3.OpDelete(name))
		} else {
			p.then = append(p.then, clientv3.OpPut(name, strconv.Itoa(n+d)))
		}
		p.els = append(p.els, clientv3.OpGet(name))
	}
}

// planClaim builds the claim's transaction from memory.
func (s *Store) planClaim(c store.Claim) (etcdPlan, etcdVerdict) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var p etcdPlan
	slot := c.Want.Slot()
	key, port := s.prefix+KeyName(c.Want.Key), s.prefix+PortName(slot)
	delta := map[string]int{}
	// reads are what a lost transaction reads, for the retry or the
	// conflict: what it depended on.
	reads := []string{key, port}

	// The key's record is still what the caller saw.
	cur, ke, exists := s.recordLocked(c.Want.Key)
	switch {
	case c.Old == nil && exists, c.Old != nil && (!exists || !store.SameRecord(cur, *c.Old)):
		return p, etcdStale
	case c.Old == nil:
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		delta[c.Want.User]++
	default:
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(key), "=", ke.modRev))
		delta[c.Old.User]--
		delta[c.Want.User]++
	}

	// The slot is free, or held by the key itself or by the victim. Either
	// may hold a udp slot by a record of an earlier version, under the tcp
	// name: it goes, as want's record takes the slot's own name.
	holder, pe := s.holderLocked(slot)
	if holder != "" && holder != c.Want.Key {
		reads = append(reads, s.prefix+KeyName(holder))
	}
	retire := func(name string, e etcdEntry) {
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(s.prefix+name), "=", e.modRev))
		if name != PortName(slot) {
			p.cmps = append(p.cmps, clientv3.Compare(clientv3.CreateRevision(port), "=", 0))
			p.then = append(p.then, clientv3.OpDelete(s.prefix+name))
			reads = append(reads, s.prefix+name)
		}
	}
	var ownName string
	var own etcdEntry
	holdsIt := false
	if c.Old != nil && c.Old.Slot() == slot {
		ownName, own, holdsIt = s.ownPortLocked(*c.Old)
	}
	legacy, _ := s.legacyLocked(c.Want.Port)
	switch {
	case c.Victim != nil:
		v, ve, ok := s.recordLocked(c.Victim.Key)
		if !ok || !store.SameRecord(v, *c.Victim) {
			return p, etcdStale
		}
		name, e, held := s.ownPortLocked(v)
		if !held {
			return p, etcdStale
		}
		retire(name, e)
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(s.prefix+KeyName(v.Key)), "=", ve.modRev))
		p.then = append(p.then, clientv3.OpDelete(s.prefix+KeyName(v.Key)), clientv3.OpDelete(s.prefix+etcdSeenName(v.Key)))
		reads = append(reads, s.prefix+KeyName(v.Key))
		delta[v.User]--
	case holdsIt:
		retire(ownName, own)
	case slot.Space == store.TCP && legacy != "" && legacy == holder:
		// port/N is a udp port record of an earlier version (an instance
		// of one still running wrote it since this one loaded). The key
		// moving off it overwrites it; another key's is moved to its own
		// name first, in this transaction, so neither space loses a
		// holder. ModRevisions compared: whoever changed either first wins.
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(port), "=", pe.modRev))
		if legacy != c.Want.Key {
			_, lke, _ := s.recordLocked(legacy)
			udp := store.UDPPort(c.Want.Port)
			uh, ue := s.holderLocked(udp)
			p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(s.prefix+KeyName(legacy)), "=", lke.modRev),
				clientv3.Compare(clientv3.ModRevision(s.prefix+PortName(udp)), "=", ue.modRev))
			if uh == "" {
				p.then = append(p.then, clientv3.OpPut(s.prefix+PortName(udp), legacy))
			}
			reads = append(reads, s.prefix+PortName(udp))
		}
	case holder == "" && (slot.Space == store.TCP || legacy == ""):
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.CreateRevision(port), "=", 0))
	default:
		return p, etcdStale
	}

	// A new key must fit the user's quota: the count as remembered, and
	// its ModRevision compared, so the check is exact.
	if c.Old == nil && c.MaxKeys > 0 {
		if n, _ := s.countLocked(c.Want.User); n+delta[c.Want.User] > c.MaxKeys {
			return p, etcdQuota
		}
	}

	value, err := json.Marshal(c.Want)
	if err != nil {
		panic(err) // a record always marshals
	}
	p.then = append(p.then, clientv3.OpPut(key, string(value)), clientv3.OpPut(port, c.Want.Key),
		clientv3.OpDelete(s.prefix+freedName(slot)))
	moved := c.Old != nil && c.Old.Slot() != slot
	if moved {
		// The old slot's record goes only if it is still the key's (which
		// needs a read if the store never saw it), unless want's put
		// overwrites it (a udp record of an earlier version under the tcp
		// name, and the key moving to tcp on the same number).
		if !s.knowsSlotLocked(c.Old.Slot()) {
			return p, etcdStale
		}
		if name, oe, held := s.ownPortLocked(*c.Old); held && name != PortName(slot) {
			p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(s.prefix+name), "=", oe.modRev))
			p.then = append(p.then, clientv3.OpDelete(s.prefix+name))
			reads = append(reads, s.prefix+name)
		}
		for _, n := range portNames(c.Old.Port) {
			reads = append(reads, s.prefix+n)
		}
		p.then = append(p.then, clientv3.OpPut(s.prefix+freedName(c.Old.Slot()), c.At.UTC().Format(time.RFC3339Nano)))
	}
	s.countOpsLocked(&p, delta)
	slices.Sort(reads)
	for _, name := range slices.Compact(reads) {
		p.els = append(p.els, clientv3.OpGet(name))
	}

	want, victim, at := c.Want, c.Victim, c.At
	p.changes = func(rev int64) []store.Change {
		var out []store.Change
		if victim != nil {
			out = append(out, store.Change{Kind: store.ChangeDelete, Rev: rev, Key: victim.Key, At: at})
		}
		put := store.Change{Kind: store.ChangePut, Rev: rev, Key: want.Key, Rec: want}
		if moved {
			put.At = at
		}
		return append(out, put)
	}
	return p, etcdPlanned
}

// planRelease builds the release's transaction from memory.
func (s *Store) planRelease(r store.Record, at time.Time) (etcdPlan, etcdVerdict) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var p etcdPlan
	cur, ke, ok := s.recordLocked(r.Key)
	if !ok || !store.SameRecord(cur, r) {
		return p, etcdStale
	}
	key := s.prefix + KeyName(r.Key)
	p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(key), "=", ke.modRev))
	p.then = append(p.then, clientv3.OpDelete(key), clientv3.OpDelete(s.prefix+etcdSeenName(r.Key)))
	p.els = append(p.els, clientv3.OpGet(key))
	if !s.knowsSlotLocked(r.Slot()) {
		return p, etcdStale // never seen: read it first
	}
	if name, pe, held := s.ownPortLocked(r); held {
		port := s.prefix + name
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.ModRevision(port), "=", pe.modRev))
		p.then = append(p.then, clientv3.OpDelete(port),
			clientv3.OpPut(s.prefix+freedName(r.Slot()), at.UTC().Format(time.RFC3339Nano)))
		p.els = append(p.els, clientv3.OpGet(port))
	}
	s.countOpsLocked(&p, map[string]int{r.User: -1})
	key0 := r.Key
	p.changes = func(rev int64) []store.Change {
		return []store.Change{{Kind: store.ChangeDelete, Rev: rev, Key: key0, At: at}}
	}
	return p, etcdPlanned
}

// conflictLocked describes what the store holds now of keys and of the
// holder of slot, as changes. A key that is gone is reported as a delete
// when the caller believed it existed.
func (s *Store) conflictLocked(keys []string, believed map[string]bool, slot store.Slot) *store.ConflictError {
	cerr := &store.ConflictError{}
	seen := map[string]bool{}
	for _, k := range keys {
		if seen[k] {
			continue
		}
		seen[k] = true
		if r, e, ok := s.recordLocked(k); ok {
			cerr.Current = append(cerr.Current, store.Change{Kind: store.ChangePut, Rev: e.modRev, Key: k, Rec: r})
		} else if believed[k] {
			cerr.Current = append(cerr.Current, store.Change{Kind: store.ChangeDelete, Rev: e.asOf, Key: k, At: time.Now()})
		}
	}
	if h := s.slotHolderLocked(slot); h != "" && !seen[h] {
		// Filled in by completeConflict, from a read.
		cerr.Current = append(cerr.Current, store.Change{Kind: store.ChangePut, Key: h,
			Rec: store.Record{Key: h, Port: slot.Port, ProxyType: string(slot.Space)}})
	}
	return cerr
}

// completeConflict fills in the puts of ports' holders in cerr with the
// holders' records as they are now, read in one go.
func (s *Store) completeConflict(ctx context.Context, cerr *store.ConflictError) error {
	var names []string
	for _, ch := range cerr.Current {
		if ch.Rev == 0 {
			names = append(names, KeyName(ch.Key))
		}
	}
	if len(names) == 0 {
		return nil
	}
	if err := s.refresh(ctx, names); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, ch := range cerr.Current {
		if ch.Rev != 0 {
			continue
		}
		if r, e, ok := s.recordLocked(ch.Key); ok {
			cerr.Current[i] = store.Change{Kind: store.ChangePut, Rev: e.modRev, Key: ch.Key, Rec: r}
		} else {
			// The port record names a key without a record (a hand
			// edit): the port is held all the same.
			cerr.Current[i].Rev = e.asOf
		}
	}
	return nil
}

// Touch writes last-seen records, in batches of nested transactions that
// each write only while the key's record exists.
func (s *Store) Touch(ctx context.Context, marks []store.SeenMark) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	last := map[string]store.SeenMark{}
	for _, m := range marks {
		last[m.Key] = m
	}
	keys := slices.Sorted(maps.Keys(last))
	// etcd lets a nested transaction hold --max-txn-ops minus its
	// parent's count: half and half leaves room on both sides.
	for batch := range slices.Chunk(keys, MaxTxnOps/2) {
		ops := make([]clientv3.Op, 0, len(batch))
		for _, k := range batch {
			value, err := json.Marshal(etcdSeen{LastSeen: last[k].Seen.UTC(), Online: last[k].Online})
			if err != nil {
				return err
			}
			ops = append(ops, clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(s.prefix+KeyName(k)), ">", 0)},
				[]clientv3.Op{clientv3.OpPut(s.prefix+etcdSeenName(k), string(value))}, nil))
		}
		f := s.floor()
		resp, err := s.cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return s.describe("write last-seen times to", err)
		}
		s.sameEtcd(f, resp.Header)
	}
	return nil
}

// ---------------------------------------------------------------------------
// Reads.

// Load reads the whole prefix at one revision, in pages. It reads again
// when moving a port record of an earlier version lost to another writer
// (another instance moving it too, at the start of an upgraded fleet), so
// it serves what that writer left.
func (s *Store) Load(ctx context.Context) (store.Snapshot, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	for attempt := 1; ; attempt++ {
		snap, again, err := s.load(ctx, attempt < etcdLoadAttempts)
		if err != nil || !again {
			return snap, err
		}
	}
}

// load is one attempt of Load; again: a migration lost, and mayRetry.
func (s *Store) load(ctx context.Context, mayRetry bool) (snap store.Snapshot, again bool, err error) {
	f := s.floor()
	kvs, header, err := s.readAll(ctx)
	if err != nil {
		return store.Snapshot{}, false, s.unreachable("read from", err)
	}
	if !s.sameEtcd(f, header) {
		return store.Snapshot{}, false, cmp.Or(s.refusal(), errEtcdChanged)
	}
	rev := header.Revision
	snap = store.Snapshot{Rev: rev, LastSeen: map[string]time.Time{}, Online: map[string]bool{}, Freed: map[store.Slot]time.Time{}, From: "etcd"}
	keys := map[string]store.Record{}
	keyRevs := map[string]int64{} // ModRevision of each valid key record
	holders := map[store.Slot]string{}
	portRevs := map[store.Slot]int64{}
	counts := map[string]int{}
	stored := map[string]*mvccpb.KeyValue{} // user/ records
	for _, kv := range kvs {
		name := strings.TrimPrefix(string(kv.Key), s.prefix)
		kind, rest, _ := strings.Cut(name, "/")
		switch kind {
		case "key":
			var r store.Record
			k, err := url.PathUnescape(rest)
			if err != nil || json.Unmarshal(kv.Value, &r) != nil || r.Key != k || !store.ValidRecord(r) {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: not a valid allocation; ignored", name))
				continue
			}
			keys[k], keyRevs[k] = r, kv.ModRevision
			counts[r.User]++
		case "port":
			slot, ok := parseSlot(rest)
			if !ok {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: not a port; ignored", name))
				continue
			}
			holders[slot], portRevs[slot] = string(kv.Value), kv.ModRevision
		case "user":
			stored[rest] = kv
		case "seen":
			var seen etcdSeen
			k, err := url.PathUnescape(rest)
			if err != nil || json.Unmarshal(kv.Value, &seen) != nil {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: not a valid last-seen record; ignored", name))
				continue
			}
			snap.LastSeen[k] = seen.LastSeen
			snap.Online[k] = seen.Online
		case "freed":
			slot, ok := parseSlot(rest)
			at, err := time.Parse(time.RFC3339Nano, string(kv.Value))
			if !ok || err != nil {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: not a valid freed-port record; ignored", name))
				continue
			}
			snap.Freed[slot] = at
		}
	}
	s.mu.Lock()
	s.learnSnapshotLocked(kvs, rev)
	s.mu.Unlock()
	slots := slices.SortedFunc(maps.Keys(holders), func(a, b store.Slot) int {
		return cmp.Or(cmp.Compare(a.Space, b.Space), cmp.Compare(a.Port, b.Port))
	})

	// A port/N that names a key whose record is udp on N is that key's
	// port record as an earlier version wrote it (see "Earlier versions"
	// above): it moves to port/udp/N, in batches, each a transaction that
	// does nothing if any of its records changed since. A batch that lost
	// leaves the rest going on; load then reads what the winner left.
	type move struct {
		slot store.Slot
		key  string
		cmps []clientv3.Cmp
		ops  []clientv3.Op
	}
	var moves []move
	for _, slot := range slots {
		k := holders[slot]
		udp := store.UDPPort(slot.Port)
		if r, ok := keys[k]; slot.Space != store.TCP || !ok || r.Slot() != udp {
			continue
		}
		name, udpName := s.prefix+PortName(slot), s.prefix+PortName(udp)
		m := move{slot: slot, key: k, ops: []clientv3.Op{clientv3.OpDelete(name)}, cmps: []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(name), "=", portRevs[slot]),
			clientv3.Compare(clientv3.ModRevision(udpName), "=", portRevs[udp]),
			clientv3.Compare(clientv3.ModRevision(s.prefix+KeyName(k)), "=", keyRevs[k]),
		}}
		switch holders[udp] {
		case "":
			m.ops = append(m.ops, clientv3.OpPut(udpName, k))
		case k:
		default:
			// Another key's record holds the slot: this one names a key
			// that holds nothing, and goes below.
			continue
		}
		moves = append(moves, m)
	}
	var migrated int
	lost := false
	for batch := range slices.Chunk(moves, etcdMigrateBatch) {
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		for _, m := range batch {
			cmps, ops = append(cmps, m.cmps...), append(ops, m.ops...)
		}
		ok, err := s.repair(ctx, cmps, ops...)
		switch {
		case ok:
			for _, m := range batch {
				delete(holders, m.slot)
				holders[store.UDPPort(m.slot.Port)] = m.key
			}
			migrated += len(batch)
		case err == nil && mayRetry:
			lost = true
		default:
			for _, m := range batch {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: the port record of %q (udp) as an earlier version wrote it; not moved to %s (%v)",
					PortName(m.slot), m.key, PortName(store.UDPPort(m.slot.Port)), cmp.Or(err, errChanged)))
			}
		}
	}
	if lost {
		return store.Snapshot{}, true, nil
	}
	if migrated > 0 {
		snap.Problems = append(snap.Problems, fmt.Sprintf("port/: moved %d udp port records as earlier versions wrote them to port/udp/", migrated))
	}

	// Every write keeps a key record and its port record together, so a
	// record without its twin was made by hand. A port record that names
	// a key which does not hold that slot goes; a key record whose slot
	// has no record gets it back while the slot is free. Each repair is a
	// transaction that does nothing if either record changed since.
	for _, slot := range slots {
		k, held := holders[slot]
		if r, ok := keys[k]; !held || ok && r.Slot() == slot {
			continue
		}
		name := PortName(slot)
		ok, err := s.repair(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(s.prefix+name), "=", portRevs[slot]),
			clientv3.Compare(clientv3.ModRevision(s.prefix+KeyName(k)), "=", keyRevs[k]),
		}, clientv3.OpDelete(s.prefix+name))
		if ok {
			delete(holders, slot)
			snap.Problems = append(snap.Problems, fmt.Sprintf("%s: named %q, which does not hold it; removed", name, k))
		} else {
			snap.Problems = append(snap.Problems, fmt.Sprintf("%s: names %q, which does not hold it; not removed (%v): the port stays reserved", name, k, cmp.Or(err, errChanged)))
		}
	}
	byAssigned := slices.SortedFunc(maps.Values(keys), func(a, b store.Record) int {
		return cmp.Or(a.AssignedAt.Compare(b.AssignedAt), cmp.Compare(a.Key, b.Key))
	})
	for _, r := range byAssigned {
		switch holders[r.Slot()] {
		case r.Key:
		case "":
			name := PortName(r.Slot())
			ok, err := s.repair(ctx, []clientv3.Cmp{
				clientv3.Compare(clientv3.CreateRevision(s.prefix+name), "=", 0),
				clientv3.Compare(clientv3.ModRevision(s.prefix+KeyName(r.Key)), "=", keyRevs[r.Key]),
			}, clientv3.OpPut(s.prefix+name, r.Key))
			if !ok {
				snap.Problems = append(snap.Problems, fmt.Sprintf("%s: port %s has no record; not rebuilt (%v); ignored", KeyName(r.Key), r.Slot(), cmp.Or(err, errChanged)))
				continue
			}
			holders[r.Slot()] = r.Key
			snap.Problems = append(snap.Problems, fmt.Sprintf("%s: the record of port %s was missing; rebuilt", KeyName(r.Key), r.Slot()))
		default:
			snap.Problems = append(snap.Problems, fmt.Sprintf("%s: port %s belongs to %q; ignored", KeyName(r.Key), r.Slot(), holders[r.Slot()]))
			continue
		}
		snap.Allocations = append(snap.Allocations, r)
		delete(snap.Freed, r.Slot())
	}
	for k := range snap.LastSeen {
		if r, ok := keys[k]; !ok || holders[r.Slot()] != k {
			delete(snap.LastSeen, k)
			delete(snap.Online, k)
		}
	}
	snap.Problems = append(snap.Problems, s.repairCounts(ctx, rev, counts, stored)...)
	return snap, false, nil
}

// errChanged says a repair found its records changed since they were read.
var errChanged = errors.New("changed meanwhile")

// repair runs one guarded fix of load and learns what it wrote.
func (s *Store) repair(ctx context.Context, cmps []clientv3.Cmp, ops ...clientv3.Op) (bool, error) {
	f := s.floor()
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return false, s.describe("repair in", err)
	}
	if resp.Succeeded && s.sameEtcd(f, resp.Header) {
		s.learnTxn(resp, ops, nil)
	}
	return resp.Succeeded, nil
}

// readAll reads every record under the prefix at one revision, the
// history aside, and returns them with the header of the first answer.
func (s *Store) readAll(ctx context.Context) ([]*mvccpb.KeyValue, *pb.ResponseHeader, error) {
	var kvs []*mvccpb.KeyValue
	var header *pb.ResponseHeader
	hist := s.prefix + etcdHistoryDir
	for _, r := range [][2]string{{s.prefix, hist}, {clientv3.GetPrefixRangeEnd(hist), clientv3.GetPrefixRangeEnd(s.prefix)}} {
		from, end := r[0], r[1]
		for {
			opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(etcdLoadPage)}
			if header != nil {
				opts = append(opts, clientv3.WithRev(header.Revision))
			}
			resp, err := s.cli.Get(ctx, from, opts...)
			if err != nil {
				return nil, nil, err
			}
			if header == nil {
				header = resp.Header
			}
			kvs = append(kvs, resp.Kvs...)
			if !resp.More || len(resp.Kvs) == 0 {
				break
			}
			from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		}
	}
	return kvs, header, nil
}

// learnSnapshotLocked replaces memory with a whole read at rev: what it
// holds is current, and what it lacks was absent at rev.
func (s *Store) learnSnapshotLocked(kvs []*mvccpb.KeyValue, rev int64) {
	present := map[string]bool{}
	for _, kv := range kvs {
		name := strings.TrimPrefix(string(kv.Key), s.prefix)
		present[name] = true
		s.learnLocked(name, kv.Value, kv.ModRevision, rev)
	}
	for name := range s.mem {
		if !present[name] {
			s.learnLocked(name, nil, 0, rev)
		}
	}
}

// repairCounts corrects user records that disagree with the key records
// read at rev (they can only by a hand edit or an older writer), in
// transactions that fail harmlessly if anything changed since.
func (s *Store) repairCounts(ctx context.Context, rev int64, counts map[string]int, stored map[string]*mvccpb.KeyValue) []string {
	var problems []string
	users := map[string]bool{}
	for u := range counts {
		users[UserName(u)] = true
	}
	for esc := range stored {
		users["user/"+esc] = true
	}
	for _, name := range slices.Sorted(maps.Keys(users)) {
		esc := strings.TrimPrefix(name, "user/")
		user, err := url.PathUnescape(esc)
		if err != nil {
			continue
		}
		var have int
		var modRev int64
		if kv := stored[esc]; kv != nil {
			have, _ = strconv.Atoi(string(kv.Value))
			modRev = kv.ModRevision
		}
		want := counts[user]
		if have == want && (want > 0 || modRev == 0) {
			continue
		}
		full := s.prefix + name
		op := clientv3.OpPut(full, strconv.Itoa(want))
		if want == 0 {
			op = clientv3.OpDelete(full)
		}
		ok, err := s.repair(ctx, []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(full), "=", modRev),
			// No key record changed since the count was made.
			clientv3.Compare(clientv3.ModRevision(s.prefix+"key/"), "<", rev+1).WithPrefix(),
		}, op)
		if ok {
			problems = append(problems, fmt.Sprintf("%s: counted %d keys but %d exist; corrected", name, have, want))
		} else {
			problems = append(problems, fmt.Sprintf("%s: counts %d keys but %d exist; not corrected (%v)", name, have, want, cmp.Or(err, errChanged)))
		}
	}
	return problems
}

// Watch delivers every change after rev; see portStore. It returns
// ctx's error when ctx ends, or an error when the store is closed. It also
// checks that etcd is still the etcd memory came from, and when it is not
// writes back what memory held (restore).
func (s *Store) Watch(ctx context.Context, rev int64, apply func(store.Change)) error {
	checkCtx, stopChecks := context.WithCancel(ctx)
	defer stopChecks()
	go s.checkLoop(checkCtx)
	next := rev + 1
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if s.cli.Ctx().Err() != nil {
			return errors.New("etcd store closed")
		}
		if s.refusal() != nil {
			if rev, ok := s.restore(ctx, apply); ok {
				next = rev + 1
				continue
			}
			select {
			case <-ctx.Done():
			case <-s.cli.Ctx().Done():
			case <-time.After(etcdRetryDelay):
			}
			continue
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		ch := s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(next), clientv3.WithPrevKV())
		compacted, lost := false, false
	events:
		for {
			var resp clientv3.WatchResponse
			var ok bool
			select {
			case resp, ok = <-ch:
			case <-s.lostc:
				// A watch on a revision etcd has not reached waits silently.
				lost = true
				break events
			}
			if !ok {
				break
			}
			if resp.CompactRevision != 0 || errors.Is(resp.Err(), rpctypes.ErrCompacted) {
				compacted = true
				break
			}
			if err := resp.Err(); err != nil {
				s.log.Warn("etcd watch failed; reconnecting", "endpoints", s.endpoints, "err", err)
				break
			}
			if !s.sameCluster(resp.Header) {
				lost = true // none of another cluster's events is delivered
				break
			}
			next = s.deliver(resp.Events, next, apply)
		}
		cancel()
		if lost {
			continue
		}
		if compacted && ctx.Err() == nil {
			s.log.Warn("etcd watch fell behind a compaction; reloading", "endpoints", s.endpoints, "from_rev", next)
			snap, err := s.Load(ctx)
			if err == nil {
				apply(store.Change{Kind: store.ChangeReset, Rev: snap.Rev, Reset: &snap})
				next = snap.Rev + 1
				continue
			}
			s.log.Warn("etcd reload after compaction failed; retrying", "err", err)
		}
		select {
		case <-ctx.Done():
		case <-s.cli.Ctx().Done():
		case <-time.After(etcdRetryDelay):
		}
	}
}

// checkLoop asks etcd every etcdCheckInterval for a record that does not
// exist, for the answer's header alone, so an idle instance notices an etcd
// that lost its data too; until ctx ends.
func (s *Store) checkLoop(ctx context.Context) {
	tick := time.NewTicker(etcdCheckInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		f := s.floor()
		cctx, cancel := s.bound(ctx)
		resp, err := s.cli.Get(cctx, s.prefix)
		cancel()
		if err == nil {
			s.sameEtcd(f, resp.Header)
		}
	}
}

// restore writes back what memory held when etcd lost its data, then
// reloads and applies the result as a reset; it returns the revision to
// watch from and whether it finished (if not, it is tried again).
func (s *Store) restore(ctx context.Context, apply func(store.Change)) (int64, bool) {
	report, lostKeys, snap, err := s.writeBack(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("writing the allocations back to etcd failed; retrying", "endpoints", s.endpoints, "err", err)
		}
		return 0, false
	}
	apply(store.Change{Kind: store.ChangeReset, Rev: snap.Rev, Reset: &snap})
	s.mu.Lock()
	why := s.lost
	if s.lostAgain {
		// Lost again since the write-back: write back what it left.
		s.lostAgain, s.held = false, s.heldLocked()
	} else {
		s.lost, s.held = "", nil
	}
	s.mu.Unlock()
	attrs := []any{"endpoints", s.endpoints, "why", why, "restored", report.Restored, "present", report.Present, "lost", report.Lost}
	if len(lostKeys) > 0 {
		if len(lostKeys) > 20 {
			lostKeys = append(lostKeys[:20], fmt.Sprintf("and %d more", len(lostKeys)-20))
		}
		attrs = append(attrs, "lost_keys", strings.Join(lostKeys, "; "))
	}
	s.log.Warn("etcd lost its data; wrote back the allocations this server held (present: written back by another instance first; lost: another writer took the key or port first, and the key follows what etcd holds)", attrs...)
	s.restored(report)
	return snap.Rev, true
}

// writeBack rebuilds memory from what etcd holds now and writes back every
// allocation held before, in create-if-absent transactions, then loads.
func (s *Store) writeBack(ctx context.Context) (store.RestoreReport, []string, store.Snapshot, error) {
	var report store.RestoreReport
	s.writeGate.Lock() // waits for claims and releases under way
	defer s.writeGate.Unlock()
	rctx, cancel := s.bound(ctx)
	kvs, header, err := s.readAll(rctx)
	cancel()
	if err != nil {
		return report, nil, store.Snapshot{}, s.unreachable("read from", err)
	}
	s.mu.Lock()
	s.gen++ // answers to requests sent before are not learned from
	s.clusterID, s.highRev, s.lostAgain = header.ClusterId, header.Revision, false
	s.mem = map[string]etcdEntry{}
	s.learnSnapshotLocked(kvs, header.Revision)
	held := s.held
	s.mu.Unlock()

	var lostKeys []string
	restored := map[string]bool{} // by this call, so a retry counts them as restored
	pending := held
	for round := 0; len(pending) > 0; round++ {
		if round > len(held)+etcdClaimAttempts {
			return report, nil, store.Snapshot{}, errors.New("the records kept changing")
		}
		var todo []store.Record
		s.mu.Lock()
		for _, r := range pending {
			cur, _, has := s.recordLocked(r.Key)
			holder := s.slotHolderLocked(r.Slot())
			switch {
			case has && cur.Slot() == r.Slot() && holder == r.Key:
				if !restored[r.Key] {
					report.Present++
				}
			case has && cur.Slot() != r.Slot():
				report.Lost++
				lostKeys = append(lostKeys, fmt.Sprintf("%s: port %s, etcd now has it on %s", r.Key, r.Slot(), cur.Slot()))
			case has || holder != "":
				report.Lost++
				lostKeys = append(lostKeys, fmt.Sprintf("%s: port %s, which etcd now gives %q", r.Key, r.Slot(), holder))
			default:
				todo = append(todo, r)
			}
		}
		s.mu.Unlock()
		pending = nil
		for batch := range slices.Chunk(todo, etcdRestoreBatch) {
			p := s.planRestore(batch)
			wctx, cancel := s.bound(ctx)
			resp, err := s.commit(wctx, p.cmps, p.then, p.els)
			cancel()
			if err != nil {
				return report, nil, store.Snapshot{}, err
			}
			s.mu.Lock()
			again := s.lostAgain
			s.mu.Unlock()
			switch {
			case again:
				return report, nil, store.Snapshot{}, errors.New("etcd lost its data again")
			case resp.Succeeded:
				report.Restored += len(batch)
				for _, r := range batch {
					restored[r.Key] = true
				}
			default:
				// Another writer was first with one of them (or moved a
				// user's count): the else branch read what it wrote.
				pending = append(pending, batch...)
			}
		}
	}
	snap, err := s.Load(ctx)
	if err != nil {
		return report, nil, store.Snapshot{}, err
	}
	return report, lostKeys, snap, nil
}

// planRestore builds the transaction that writes back records whose key
// and port records are both absent, moving their users' counts.
func (s *Store) planRestore(batch []store.Record) etcdPlan {
	s.mu.Lock()
	defer s.mu.Unlock()
	var p etcdPlan
	delta := map[string]int{}
	for _, r := range batch {
		key, port := s.prefix+KeyName(r.Key), s.prefix+PortName(r.Slot())
		value, err := json.Marshal(r)
		if err != nil {
			panic(err) // a record always marshals
		}
		p.cmps = append(p.cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(port), "=", 0))
		p.then = append(p.then, clientv3.OpPut(key, string(value)), clientv3.OpPut(port, r.Key),
			clientv3.OpDelete(s.prefix+freedName(r.Slot())))
		p.els = append(p.els, clientv3.OpGet(key), clientv3.OpGet(port))
		delta[r.User]++
	}
	s.countOpsLocked(&p, delta)
	return p
}

// deliver turns watch events into changes, revision by revision, and
// returns the revision to watch from next. Within a revision, deletes come
// before puts (a reclaim deletes the victim, whose port the put takes).
func (s *Store) deliver(events []*clientv3.Event, next int64, apply func(store.Change)) int64 {
	for len(events) > 0 {
		rev := events[0].Kv.ModRevision
		n := 1
		for n < len(events) && events[n].Kv.ModRevision == rev {
			n++
		}
		group := events[:n]
		events = events[n:]
		if rev < next {
			continue
		}
		next = rev + 1
		freed := map[store.Slot]time.Time{}
		s.mu.Lock()
		for _, ev := range group {
			name := strings.TrimPrefix(string(ev.Kv.Key), s.prefix)
			if ev.Type == clientv3.EventTypeDelete {
				s.learnLocked(name, nil, 0, rev)
				continue
			}
			s.learnLocked(name, ev.Kv.Value, rev, rev)
			if rest, ok := strings.CutPrefix(name, "freed/"); ok {
				slot, ok := parseSlot(rest)
				at, err := time.Parse(time.RFC3339Nano, string(ev.Kv.Value))
				if ok && err == nil {
					freed[slot] = at
				}
			}
		}
		s.mu.Unlock()
		freedAt := func(prev *mvccpb.KeyValue) (time.Time, bool) {
			var old store.Record
			if prev == nil || json.Unmarshal(prev.Value, &old) != nil {
				return time.Time{}, false
			}
			at, ok := freed[old.Slot()]
			return at, ok
		}
		var deletes, puts, seens []store.Change
		for _, ev := range group {
			name := strings.TrimPrefix(string(ev.Kv.Key), s.prefix)
			kind, rest, _ := strings.Cut(name, "/")
			key, err := url.PathUnescape(rest)
			if err != nil {
				continue
			}
			switch {
			case kind == "key" && ev.Type == clientv3.EventTypeDelete:
				at, ok := freedAt(ev.PrevKv)
				if !ok {
					at = time.Now()
				}
				deletes = append(deletes, store.Change{Kind: store.ChangeDelete, Rev: rev, Key: key, At: at})
			case kind == "key":
				var r store.Record
				if json.Unmarshal(ev.Kv.Value, &r) != nil || r.Key != key || !store.ValidRecord(r) {
					s.log.Warn("etcd: ignoring an invalid allocation record", "name", name)
					continue
				}
				put := store.Change{Kind: store.ChangePut, Rev: rev, Key: key, Rec: r}
				if at, ok := freedAt(ev.PrevKv); ok {
					put.At = at
				}
				puts = append(puts, put)
			case kind == "seen" && ev.Type == clientv3.EventTypePut:
				var seen etcdSeen
				if json.Unmarshal(ev.Kv.Value, &seen) != nil {
					continue
				}
				seens = append(seens, store.Change{Kind: store.ChangeSeen, Rev: rev, Key: key, Seen: seen.LastSeen, Online: seen.Online})
			}
		}
		for _, ch := range slices.Concat(deletes, puts, seens) {
			apply(ch)
		}
	}
	return next
}

// The history lives under the prefix, in history/ (load reads around it,
// watch skips it), so an etcd role granted on the prefix covers it: one
// key per entry, named by the entry's ID, so keys sort by time. Entries are
// written once and never changed, so etcd's compaction (which drops old
// revisions of keys) takes nothing from them; only -history-keep's pruning
// deletes them. Earlier versions wrote it beside the prefix
// ("/frp-port-keeper-history/" next to "/frp-port-keeper/"): reading and
// pruning take in what is there too, unless etcd denies it (a role
// granted on the prefix alone); nothing is written there any more.
type History struct{ s *Store }

func (s *Store) History() store.HistoryLog { return History{s} }

func (h History) prefix() string { return h.s.prefix + etcdHistoryDir }

// legacyPrefix is where earlier versions wrote the history.
func (h History) legacyPrefix() string { return strings.TrimSuffix(h.s.prefix, "/") + "-history/" }

// legacyDenied says a read or delete where earlier versions wrote the
// history was refused: there is nothing this user may see or prune there.
func legacyDenied(err error) bool {
	return errors.Is(err, rpctypes.ErrPermissionDenied) || status.Code(err) == codes.PermissionDenied
}

func (h History) Append(ctx context.Context, entries []store.HistoryEntry) error {
	ctx, cancel := h.s.bound(ctx)
	defer cancel()
	// Batches within etcd's default --max-txn-ops (128).
	for i := 0; i < len(entries); i += 100 {
		var ops []clientv3.Op
		for _, e := range entries[i:min(i+100, len(entries))] {
			data, err := json.Marshal(e)
			if err != nil {
				return err
			}
			ops = append(ops, clientv3.OpPut(h.prefix()+e.ID, string(data)))
		}
		if _, err := h.s.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return h.s.describe("write the history", err)
		}
	}
	return nil
}

func (h History) Entries(ctx context.Context, q store.HistoryQuery) ([]store.HistoryEntry, error) {
	ctx, cancel := h.s.bound(ctx)
	defer cancel()
	out, err := h.entriesUnder(ctx, h.prefix(), q)
	if err != nil {
		return nil, h.s.describe("read the history", err)
	}
	old, err := h.entriesUnder(ctx, h.legacyPrefix(), q)
	switch {
	case legacyDenied(err):
		return out, nil
	case err != nil:
		return nil, h.s.describe("read the history", err)
	case len(old) == 0:
		return out, nil
	}
	// Each holds the newest entries q selects of its prefix: the newest
	// of both are among them.
	out = append(out, old...)
	slices.SortStableFunc(out, func(a, b store.HistoryEntry) int { return cmp.Compare(b.ID, a.ID) })
	if q.Limit > 0 && len(out) > q.Limit {
		out = out[:q.Limit]
	}
	return out, nil
}

// entriesUnder returns the entries q selects under prefix, newest first.
func (h History) entriesUnder(ctx context.Context, prefix string, q store.HistoryQuery) ([]store.HistoryEntry, error) {
	end := clientv3.GetPrefixRangeEnd(prefix)
	if q.Before != "" {
		end = prefix + q.Before
	}
	var out []store.HistoryEntry
	for {
		resp, err := h.s.cli.Get(ctx, prefix, clientv3.WithRange(end), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend), clientv3.WithLimit(500))
		if err != nil {
			return nil, err
		}
		for _, kv := range resp.Kvs {
			var e store.HistoryEntry
			if json.Unmarshal(kv.Value, &e) != nil {
				continue
			}
			if !q.Since.IsZero() && e.Time.Before(q.Since) {
				return out, nil
			}
			if q.Match(e) {
				out = append(out, e)
				if q.Limit > 0 && len(out) >= q.Limit {
					return out, nil
				}
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		end = string(resp.Kvs[len(resp.Kvs)-1].Key)
	}
}

func (h History) Prune(ctx context.Context, before time.Time) (int, error) {
	ctx, cancel := h.s.bound(ctx)
	defer cancel()
	var n int
	for _, prefix := range []string{h.prefix(), h.legacyPrefix()} {
		resp, err := h.s.cli.Delete(ctx, prefix, clientv3.WithRange(prefix+fmt.Sprintf("%019d", before.UnixNano())))
		switch {
		case prefix == h.legacyPrefix() && legacyDenied(err):
		case err != nil:
			return n, h.s.describe("prune the history", err)
		default:
			n += int(resp.Deleted)
		}
	}
	return n, nil
}
