package main

import "frp-port-keeper/internal/store"

// listChunk is how many held ports listPage looks at per hold of the read
// lock. A sticky hit never waits on a listing (both are readers); a fresh
// allocation or a release waits at most for one chunk, a few tens of
// microseconds, however many allocations there are.
const listChunk = 256

// listPage returns, in port order (tcp before udp on one number), the
// allocations of up to limit ports above after that keep accepts (nil
// keeps every one), and next: the last port returned when more
// allocations may follow, else 0. Pass next as after to get the page that
// follows. A port's tcp and udp rows are never split across pages, so a
// page holds up to two rows per port and a port number stays a cursor.
//
// It walks the held-port bitmaps under the read lock, listChunk ports per
// hold, so a listing of any size never holds the lock for long and never
// copies more than the page. Allocations are read as they are when their
// chunk is: one that exists throughout a listing is returned exactly once
// across its pages, one that is added, released or moved meanwhile may be
// missed or, when moved past the cursor, seen twice.
//
// keep runs with the read lock held: it must be quick and must not call
// the allocator. keep may also be a visitor that takes what it needs from
// each allocation itself: with limit 1, the first port of which it accepts
// a row ends the walk (the server's listings and page walk this way, a
// slice at a time, resting between slices and building no page).
func (a *allocator) listPage(after, limit int, keep func(allocationView) bool) (page []allocationView, next int) {
	if limit <= 0 {
		return nil, 0
	}
	from, ports := max(after+1, 0), 0
	for from <= maxPort {
		a.mu.RLock()
		for walked := 0; walked < listChunk; walked++ {
			p := a.nextHeld(from)
			if p < 0 {
				from = maxPort + 1
				break
			}
			if ports == limit {
				// A further held port: more may follow this page.
				a.mu.RUnlock()
				return page, page[len(page)-1].Port
			}
			from = p + 1
			accepted := false
			for _, sp := range []*portSpace{&a.tcp, &a.udp} {
				var v allocationView
				if al := sp.byPort[p]; al != nil {
					v = a.view(al)
				} else if why := sp.heldBack[p]; why != "" {
					v = a.heldBackView(sp, p, why)
				} else {
					continue
				}
				if keep != nil && !keep(v) {
					continue
				}
				if page == nil {
					page = make([]allocationView, 0, min(2*limit, listChunk))
				}
				page = append(page, v)
				accepted = true
			}
			if accepted {
				ports++
			}
		}
		a.mu.RUnlock()
	}
	return page, 0
}

// nextHeld is the lowest port >= from held in either space, or -1.
// Called with mu held.
func (a *allocator) nextHeld(from int) int {
	t, u := a.tcp.held.nextFree(from), a.udp.held.nextFree(from)
	if t < 0 || (u >= 0 && u < t) {
		return u
	}
	return t
}

// atPort returns what holds port, tcp before udp: allocations and ports
// held back by a damaged record; space "" looks in both spaces.
func (a *allocator) atPort(port int, space store.Space) []allocationView {
	if port < 1 || port > maxPort {
		return nil
	}
	a.mu.RLock()
	defer a.mu.RUnlock()
	var out []allocationView
	for _, sp := range []*portSpace{&a.tcp, &a.udp} {
		if space != "" && sp.space != space {
			continue
		}
		if al := sp.byPort[port]; al != nil {
			out = append(out, a.view(al))
		} else if why := sp.heldBack[port]; why != "" {
			out = append(out, a.heldBackView(sp, port, why))
		}
	}
	return out
}

// heldBackView is the row of a port a damaged record holds back. Called
// with mu held.
func (a *allocator) heldBackView(sp *portSpace, port int, why string) allocationView {
	v := allocationView{Record: store.Record{Port: port}, Proto: sp.space, HeldBack: why, OutsidePool: !a.inPool(sp, port)}
	if sp.space == store.UDP {
		v.ProxyType = string(store.UDP)
	}
	return v
}
