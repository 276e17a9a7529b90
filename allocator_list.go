package main

import "frp-port-keeper/internal/store"

// listChunk is how many held ports listPage looks at per hold of the read
// lock. A sticky hit never waits on a listing (both are readers); a fresh
// allocation or a release waits at most for one chunk, a few tens of
// microseconds, however many allocations there are.
const listChunk = 256

// listPage returns, in port order, up to limit allocations with a
// port above after that keep accepts (nil keeps every one), and next: the
// last port returned when more allocations may follow, else 0. Pass next as
// after to get the page that follows.
//
// It walks the held-port bitmap under the read lock, listChunk ports per
// hold, so a listing of any size never holds the lock for long and never
// copies more than the page. Allocations are read as they are when their
// chunk is: one that exists throughout a listing is returned exactly once
// across its pages, one that is added, released or moved meanwhile may be
// missed or, when moved past the cursor, seen twice.
//
// keep runs with the read lock held: it must be quick and must not call
// the allocator. keep may also be a visitor that takes what it needs from
// each allocation itself: with limit 1, the first one it accepts ends the
// walk (the server's listings and page walk this way, a slice at a time,
// resting between slices and building no page).
func (a *allocator) listPage(after, limit int, keep func(allocationView) bool) (page []allocationView, next int) {
	if limit <= 0 {
		return nil, 0
	}
	from := max(after+1, 0)
	for from <= maxPort {
		a.mu.RLock()
		for walked := 0; walked < listChunk; walked++ {
			p := a.held.nextFree(from)
			if p < 0 {
				from = maxPort + 1
				break
			}
			if len(page) == limit {
				// A further held port: more may follow this page.
				a.mu.RUnlock()
				return page, page[len(page)-1].Port
			}
			from = p + 1
			var v allocationView
			if al := a.byPort[p]; al != nil {
				v = a.view(al)
			} else if why := a.heldBack[p]; why != "" {
				v = allocationView{Record: store.Record{Port: p}, HeldBack: why, OutsidePool: !a.pool.has(p)}
			} else {
				continue
			}
			if keep != nil && !keep(v) {
				continue
			}
			if page == nil {
				page = make([]allocationView, 0, min(limit, listChunk))
			}
			page = append(page, v)
		}
		a.mu.RUnlock()
	}
	return page, 0
}
