package main

import (
	"bytes"
	_ "embed"
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"frp-port-keeper/internal/store"
)

//go:embed page.html
var pageHTML string

// pageTemplate renders GET /: one server-side page that works without
// JavaScript, so it opens on any router's browser.
var pageTemplate = template.Must(template.New("page").Parse(pageHTML))

//go:embed history.html
var historyHTML string

// historyTemplate renders GET /history: a key's or a port's changes.
// It shares the page's style.
var historyTemplate = template.Must(template.Must(pageTemplate.Clone()).New("history").Parse(historyHTML))

// historyPageData is everything the history page shows.
type historyPageData struct {
	Key     string
	Port    int
	Proto   store.Space // with Port: one space; "": both
	Limit   int
	Entries []store.HistoryEntry
	Error   string
}

// servePageHistory renders the history of ?key= or ?port=, newest first.
func (s *server) servePageHistory(w http.ResponseWriter, r *http.Request) {
	data := historyPageData{Key: strings.TrimSpace(r.URL.Query().Get("key")), Limit: 200}
	if v := r.URL.Query().Get("port"); v != "" {
		p, err := strconv.Atoi(v)
		if err != nil || p < 1 || p > maxPort {
			http.Error(w, "port must be 1-65535", http.StatusBadRequest)
			return
		}
		data.Port = p
	}
	proto, err := store.ParseSpace(r.URL.Query().Get("proto"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	data.Proto = proto
	switch {
	case s.history == nil:
		data.Error = "This store keeps no history."
	case data.Key == "" && data.Port == 0:
		data.Error = "Name a key or a port."
	default:
		got, err := s.history.Entries(r.Context(), store.HistoryQuery{Key: data.Key, Port: data.Port, Space: data.Proto, Limit: data.Limit})
		if err != nil {
			data.Error = "The history could not be read: " + err.Error()
		}
		data.Entries = got
	}
	var buf bytes.Buffer
	if err := historyTemplate.Execute(&buf, data); err != nil {
		s.log.Error("history page", "err", err)
		http.Error(w, "page failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Write(buf.Bytes())
}

// pageSize is how many allocations one page of GET / shows.
const pageSize = 200

// pageData is everything the page shows.
type pageData struct {
	Version     string
	Uptime      string
	PoolSpec    string
	Pool        poolStats
	UsedPercent int
	Query       string
	Allocations []apiAllocation
	// Total counts every allocation, Matching those the filter keeps;
	// First and Last number the rows shown among Matching (from 1).
	Total, Matching, First, Last int
	// PrevURL and NextURL are the neighbouring pages, "" when there is none.
	PrevURL, NextURL string
}

// servePage renders one page of pageSize allocations, those after the
// cursor ?after=PORT that the filter ?q= keeps. One walk over the
// allocations (under a heavy-work slot and paced like a listing, the read
// lock taken a chunk at a time) counts them, finds the page's rows and the
// cursor of the page before, keeping at most pageSize+1 ports besides the
// rows.
func (s *server) servePage(w http.ResponseWriter, r *http.Request) {
	q := strings.TrimSpace(r.URL.Query().Get("q"))
	after := 0
	if v := r.URL.Query().Get("after"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > maxPort {
			http.Error(w, "after must be a port number", http.StatusBadRequest)
			return
		}
		after = n
	}
	if !s.enterHeavy(w, r, writeBusyPage) {
		return
	}
	defer s.leaveHeavy()

	data := pageData{
		Version:     version,
		Uptime:      time.Since(s.started).Round(time.Second).String(),
		PoolSpec:    s.alloc.poolStr,
		Query:       q,
		Allocations: make([]apiAllocation, 0, pageSize),
	}
	lower := strings.ToLower(q)
	var before [pageSize + 2]int // the ports of the last pageSize+2 matching rows up to the cursor
	seen, more := 0, false       // seen: matches up to the cursor
	// The visitor takes what it needs from each allocation, and accepts
	// one every listChunk only to end listPage's walk there, so the walk
	// can rest between slices like a listing does.
	walked := 0
	visit := func(v allocationView) bool {
		data.Total++
		walked++
		if q == "" || matches(v, lower) {
			data.Matching++
			switch {
			case v.Port <= after:
				before[seen%len(before)] = v.Port
				seen++
			case len(data.Allocations) < pageSize,
				// A port's tcp and udp rows share a page: the cursor is a port.
				!more && data.Allocations[len(data.Allocations)-1].Port == v.Port:
				data.Allocations = append(data.Allocations, s.toAPI(v))
			default:
				more = true
			}
		}
		return walked%listChunk == 0
	}
	pace := s.newPacer()
	for from := 0; ; {
		_, next := s.alloc.listPage(from, 1, visit)
		if next == 0 {
			break
		}
		if from = next; pace.pause(r.Context()) != nil {
			return
		}
	}
	data.Pool = s.alloc.stats()
	if data.Pool.Size > 0 {
		data.UsedPercent = data.Pool.Used * 100 / data.Pool.Size
	}
	data.First, data.Last = seen+1, seen+len(data.Allocations)
	if seen > 0 {
		prev := 0 // the first page needs no cursor
		if i := seen - pageSize - 1; i >= 0 {
			prev = before[i%len(before)]
			// A port whose tcp and udp rows straddle the previous page's
			// start is on that page whole: its cursor is the port before.
			if before[(i+1)%len(before)] == prev {
				prev = 0
				if i > 0 {
					prev = before[(i-1)%len(before)]
				}
			}
		}
		data.PrevURL = pageURL(q, prev)
	}
	if more {
		data.NextURL = pageURL(q, data.Allocations[len(data.Allocations)-1].Port)
	}
	var buf bytes.Buffer
	if err := pageTemplate.Execute(&buf, data); err != nil {
		s.log.Error("page", "err", err)
		http.Error(w, "page failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Write(buf.Bytes())
}

// pageURL is the address of the page after the cursor, with the filter q.
func pageURL(q string, after int) string {
	v := url.Values{}
	if q != "" {
		v.Set("q", q)
	}
	if after > 0 {
		v.Set("after", strconv.Itoa(after))
	}
	if len(v) == 0 {
		return "/"
	}
	return "/?" + v.Encode()
}

// writeBusyPage is the page's answer when every heavy-work slot stays taken.
func writeBusyPage(w http.ResponseWriter) {
	http.Error(w, busyMessage, http.StatusServiceUnavailable)
}

// matches is the page filter: a substring of key, user or proxy, the
// port, the port with its protocol (53/udp), or the protocol. lowerQ is
// the filter in lower case.
func matches(v allocationView, lowerQ string) bool {
	return strings.Contains(strings.ToLower(v.Key), lowerQ) || strings.Contains(strings.ToLower(v.User), lowerQ) ||
		strings.Contains(strings.ToLower(v.ProxyName), lowerQ) || strconv.Itoa(v.Port) == lowerQ ||
		v.Slot().String() == lowerQ || string(v.Proto) == lowerQ
}
