package main

import (
	"bytes"
	_ "embed"
	"html/template"
	"net/http"
	"strconv"
	"strings"
	"time"
)

//go:embed page.html
var pageHTML string

// pageTemplate renders GET /: one server-side page that works without
// JavaScript, so it opens on any router's browser.
var pageTemplate = template.Must(template.New("page").Parse(pageHTML))

// pageData is everything the page shows.
type pageData struct {
	Version     string
	Uptime      string
	PoolSpec    string
	Pool        poolStats
	UsedPercent int
	Query       string
	Allocations []apiAllocation
	Total       int
}

func (s *server) servePage(w http.ResponseWriter, r *http.Request) {
	q := strings.TrimSpace(r.URL.Query().Get("q"))
	list := s.listAllocations("", false)
	data := pageData{
		Version:  version,
		Uptime:   time.Since(s.started).Round(time.Second).String(),
		PoolSpec: s.alloc.poolStr,
		Pool:     list.Pool,
		Query:    q,
		Total:    len(list.Allocations),
	}
	if list.Pool.Size > 0 {
		data.UsedPercent = list.Pool.Used * 100 / list.Pool.Size
	}
	for _, a := range list.Allocations {
		if q == "" || matches(a, q) {
			data.Allocations = append(data.Allocations, a)
		}
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

// matches is the page filter: a substring of key, user or proxy, or the port.
func matches(a apiAllocation, q string) bool {
	q = strings.ToLower(q)
	return strings.Contains(strings.ToLower(a.Key), q) || strings.Contains(strings.ToLower(a.User), q) ||
		strings.Contains(strings.ToLower(a.ProxyName), q) || strconv.Itoa(a.Port) == q
}
