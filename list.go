package main

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"runtime"
	"strconv"
	"time"
	"unicode/utf8"

	"frp-port-keeper/internal/store"
)

// The listing side of the admin API: GET /api/allocations pages through
// the allocations with a cursor, looks one up by port or key, and without
// a limit streams every one, encoded and written a chunk at a time, so a
// listing of 64,000 allocations allocates about 0.1 MB, not 100 MB. Heavy
// admin work (listings and the page) is bounded by a few slots and paced,
// and never touches the plugin path: frps's answers do not wait on
// operators, and their CPU stays mostly free for frps.

// maxListLimit bounds one page of GET /api/allocations.
const maxListLimit = 5000

// listFlushAt is how much encoded JSON a listing gathers before it writes.
const listFlushAt = 32 << 10

// Defaults of the heavy-work bound (serverOptions.heavySlots, heavyWait).
const (
	defaultHeavySlots = 2
	defaultHeavyWait  = time.Second
)

// listQuery is what GET /api/allocations asks for. Every filter narrows
// the others: ?user=alice&after=30000&limit=100 is alice's next 100.
type listQuery struct {
	limit int // 0: every allocation, streamed
	after int // the cursor: only ports above it
	user  string
	port  int         // 0: any port
	proto store.Space // "": both spaces
	key   string
	// byUser and byKey say the filter was given (an empty user is a user).
	byUser, byKey bool
}

// parseListQuery reads and checks the query of GET /api/allocations.
func parseListQuery(q url.Values) (listQuery, error) {
	var lq listQuery
	number := func(name string, lo, hi int, into *int) error {
		if _, ok := q[name]; !ok {
			return nil
		}
		n, err := strconv.Atoi(q.Get(name))
		if err != nil || n < lo || n > hi {
			return errors.New(name + " must be a number from " + strconv.Itoa(lo) + " to " + strconv.Itoa(hi))
		}
		*into = n
		return nil
	}
	if err := errors.Join(number("limit", 1, maxListLimit, &lq.limit), number("after", 0, maxPort, &lq.after),
		number("port", 1, maxPort, &lq.port)); err != nil {
		return lq, err
	}
	var err error
	if lq.proto, err = store.ParseSpace(q.Get("proto")); err != nil {
		return lq, err
	}
	_, lq.byUser = q["user"]
	_, lq.byKey = q["key"]
	lq.user, lq.key = q.Get("user"), validUTF8(q.Get("key"))
	return lq, nil
}

// keeps says whether v passes the query's filters.
func (q listQuery) keeps(v allocationView) bool {
	return v.Port > q.after && (!q.byUser || v.User == q.user) && (!q.byKey || v.Key == q.key) &&
		(q.port == 0 || v.Port == q.port) && (q.proto == "" || v.Proto == q.proto)
}

// serveList answers GET /api/allocations. A lookup (?port= or ?key=)
// costs one map access and answers at once; every other listing takes a
// heavy-work slot first.
func (s *server) serveList(w http.ResponseWriter, r *http.Request) {
	q, err := parseListQuery(r.URL.Query())
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if q.byKey || q.port != 0 {
		s.serveLookup(w, q)
		return
	}
	if !s.enterHeavy(w, r, writeBusyJSON) {
		return
	}
	defer s.leaveHeavy()
	s.streamList(r.Context(), w, q)
}

// serveLookup answers a listing by port or key: the same shape as any
// listing, with the allocations found (one, or a port's tcp and udp ones)
// or none (200 either way, like a user filter that matches nothing), and
// never a next cursor.
func (s *server) serveLookup(w http.ResponseWriter, q listQuery) {
	out := allocationList{Allocations: []apiAllocation{}}
	var found []allocationView
	if q.byKey {
		if v, ok := s.alloc.find(q.key); ok {
			found = append(found, v)
		}
	} else {
		found = s.alloc.atPort(q.port, q.proto)
	}
	for _, v := range found {
		if q.keeps(v) {
			out.Allocations = append(out.Allocations, s.toAPI(v))
		}
	}
	out.Pool = s.alloc.stats()
	writeValue(w, http.StatusOK, out)
}

// streamList writes the listing q asks for chunk by chunk: it keeps no
// allocation and buffers about listFlushAt bytes, whatever the number of
// allocations. Between chunks it paces itself (see heavySlice) and stops
// when the client has gone. Without a limit it lists everything and has
// no next.
func (s *server) streamList(ctx context.Context, w http.ResponseWriter, q listQuery) {
	w.Header()["Content-Type"] = jsonContentType
	w.WriteHeader(http.StatusOK)
	buf := make([]byte, 0, listFlushAt+4<<10)
	buf = append(buf, `{"allocations":[`...)
	// The visitor encodes each allocation the query keeps as listPage
	// walks past it, and accepts one only to end the walk: when the buffer
	// is due to be written, the limit is reached, or listChunk allocations
	// were looked at (a filter may keep few), so the work pauses often.
	// listPage then returns that one, already encoded if kept, and the
	// cursor after it; no allocation is copied into a page, so a listing
	// makes next to no garbage.
	left, rows, visited := q.limit, 0, 0
	encode := func(v allocationView) bool {
		visited++
		if !q.keeps(v) {
			return visited%listChunk == 0
		}
		if rows > 0 {
			buf = append(buf, ',')
		}
		buf = appendAPIAllocation(buf, s.toAPI(v))
		rows++
		left--
		return left == 0 || len(buf) >= listFlushAt || visited%listChunk == 0
	}
	after, next := q.after, 0
	pace := s.newPacer()
	for {
		_, more := s.alloc.listPage(after, 1, encode)
		if more == 0 {
			break
		}
		if after = more; q.limit > 0 && left <= 0 {
			next = more
			break
		}
		if len(buf) >= listFlushAt {
			if _, err := w.Write(buf); err != nil {
				return
			}
			buf = buf[:0]
		}
		if pace.pause(ctx) != nil {
			return
		}
	}
	pool := s.alloc.stats()
	buf = append(buf, `],"pool":{"size":`...)
	buf = strconv.AppendInt(buf, int64(pool.Size), 10)
	buf = append(buf, `,"used":`...)
	buf = strconv.AppendInt(buf, int64(pool.Used), 10)
	buf = append(buf, `,"free":`...)
	buf = strconv.AppendInt(buf, int64(pool.Free), 10)
	for _, sp := range []struct {
		name  string
		stats *spaceStats
	}{{"tcp", pool.TCP}, {"udp", pool.UDP}} {
		buf = append(buf, `,"`+sp.name+`":{"size":`...)
		buf = strconv.AppendInt(buf, int64(sp.stats.Size), 10)
		buf = append(buf, `,"used":`...)
		buf = strconv.AppendInt(buf, int64(sp.stats.Used), 10)
		buf = append(buf, `,"free":`...)
		buf = strconv.AppendInt(buf, int64(sp.stats.Free), 10)
		buf = append(buf, '}')
	}
	buf = append(buf, '}')
	if next != 0 {
		buf = append(buf, `,"next":`...)
		buf = strconv.AppendInt(buf, int64(next), 10)
	}
	buf = append(buf, "}\n"...)
	w.Write(buf)
}

// enterHeavy takes one of the few heavy-work slots, waiting at most
// heavyWait; when none frees up in time it answers 503 with Retry-After
// through busy and returns false. A caller that got a slot must call
// leaveHeavy. However many operators (or scripts) list at once, only
// heavySlots listings run, so memory and CPU for them stay bounded.
func (s *server) enterHeavy(w http.ResponseWriter, r *http.Request, busy func(http.ResponseWriter)) bool {
	select {
	case s.heavy <- struct{}{}:
		return true
	default:
	}
	wait := time.NewTimer(s.heavyWait)
	defer wait.Stop()
	select {
	case s.heavy <- struct{}{}:
		return true
	case <-wait.C:
	case <-r.Context().Done():
	}
	w.Header().Set("Retry-After", "1")
	busy(w)
	return false
}

// leaveHeavy gives back the slot enterHeavy took.
func (s *server) leaveHeavy() { <-s.heavy }

// Heavy admin work is paced: it works in slices of about heavySlice and
// then rests, heavyRest times as long as it worked in total, so that all
// listings and pages together keep at most 1/(1+heavyRest) of one core
// busy, however many run, and never hold a core for longer than a slice
// at a time: frps's requests find the CPU free, or free again within a
// tenth of a millisecond. A listing of 64,000 allocations (12 MiB) then
// takes about 0.4 s. Under 100 clients listing in a loop, slices of 1 ms
// made the plugin's p99 2.4× its p99 alone, slices of 250 µs 1.96×, and
// slices of 100 µs 1.41× (BENCHMARKS.md, section 6).
const (
	heavySlice = 100 * time.Microsecond
	heavyRest  = 3
)

// pacer spreads one piece of heavy work out in time.
type pacer struct {
	since  time.Time  // when the work last resumed
	active func() int // heavy requests running, this one included
	off    bool       // serverOptions.unpaced
	timer  *time.Timer
}

// newPacer paces one listing or page of s.
func (s *server) newPacer() *pacer {
	return &pacer{since: time.Now(), active: func() int { return len(s.heavy) }, off: s.unpaced}
}

// pause is called between steps of the work (each well under a slice): it
// lets waiting goroutines run, rests once a slice of work has gathered
// (longer while other heavy requests run too, so that their sum keeps to
// the bound), and returns ctx's error when the client has gone.
func (p *pacer) pause(ctx context.Context) error {
	d := time.Since(p.since)
	if d < heavySlice || p.off {
		runtime.Gosched()
		return ctx.Err()
	}
	if p.timer == nil {
		p.timer = time.NewTimer(restAfter(d, p.active()))
	} else {
		p.timer.Reset(restAfter(d, p.active()))
	}
	select {
	case <-ctx.Done():
		p.timer.Stop()
		return ctx.Err()
	case <-p.timer.C:
	}
	p.since = time.Now()
	return nil
}

// restAfter is how long a piece of heavy work rests after working for d
// while active pieces run (itself included). n pieces, each running
// 1/(1+r) of the time, keep n/(1+r) of a core busy; r = n(1+heavyRest)-1
// makes that 1/(1+heavyRest).
func restAfter(d time.Duration, active int) time.Duration {
	return d * time.Duration(max(1, active)*(1+heavyRest)-1)
}

// busyMessage is what a listing hears when every heavy-work slot stays taken.
const busyMessage = "the server is busy with other listings; try again shortly"

// writeBusyJSON is the API's answer when every heavy-work slot stays taken.
func writeBusyJSON(w http.ResponseWriter) {
	writeError(w, http.StatusServiceUnavailable, busyMessage)
}

// appendAPIAllocation appends a's JSON, byte for byte what json.Marshal
// writes (TestAppendAPIAllocation checks), without allocating.
func appendAPIAllocation(b []byte, a apiAllocation) []byte {
	b = append(b, `{"key":`...)
	b = appendJSONString(b, a.Key)
	b = append(b, `,"proxy_name":`...)
	b = appendJSONString(b, a.ProxyName)
	b = append(b, `,"user":`...)
	b = appendJSONString(b, a.User)
	b = append(b, `,"proxy_type":`...)
	b = appendJSONString(b, a.ProxyType)
	b = append(b, `,"group":`...)
	b = appendJSONString(b, a.Group)
	b = append(b, `,"port":`...)
	b = strconv.AppendInt(b, int64(a.Port), 10)
	b = append(b, `,"proto":`...)
	b = appendJSONString(b, string(a.Proto))
	b = append(b, `,"created_at":"`...)
	b = a.CreatedAt.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","last_seen":"`...)
	b = a.LastSeen.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","pinned":`...)
	b = strconv.AppendBool(b, a.Pinned)
	if a.Note != "" {
		b = append(b, `,"note":`...)
		b = appendJSONString(b, a.Note)
	}
	if a.HeldBack != "" {
		b = append(b, `,"held_back":`...)
		b = appendJSONString(b, a.HeldBack)
	}
	b = append(b, `,"outside_pool":`...)
	b = strconv.AppendBool(b, a.OutsidePool)
	b = append(b, `,"outside_policy":`...)
	b = strconv.AppendBool(b, a.OutsidePolicy)
	return append(b, '}')
}

// appendJSONString appends s as a JSON string the way encoding/json does:
// HTML-safe (<, >, & escaped), U+2028 and U+2029 escaped, and each invalid
// UTF-8 byte written as U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
