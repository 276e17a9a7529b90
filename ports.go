package main

import (
	"fmt"
	"math/bits"
	"strconv"
	"strings"
)

// maxPort is the highest TCP/UDP port number.
const maxPort = 65535

// portSet is a set of port numbers as a fixed bitmap: 8 KiB covers every
// port, membership is one shift, and finding the next member skips 64 ports
// per word, so pool operations cost the same whatever the pool's fill.
type portSet [(maxPort + 1) / 64]uint64

func (s *portSet) add(p int)           { s[p>>6] |= 1 << (p & 63) }
func (s *portSet) remove(p int)        { s[p>>6] &^= 1 << (p & 63) }
func (s *portSet) has(p int) bool      { return p >= 0 && p <= maxPort && s[p>>6]&(1<<(p&63)) != 0 }
func (s *portSet) addRange(lo, hi int) { forRange(lo, hi, func(p int) { s.add(p) }) }

func forRange(lo, hi int, fn func(int)) {
	for p := lo; p <= hi; p++ {
		fn(p)
	}
}

// nextFree returns the lowest member >= from that is in none of taken, or -1.
func (s *portSet) nextFree(from int, taken ...*portSet) int {
	if from < 0 {
		from = 0
	}
	for i := from >> 6; i < len(s); i++ {
		w := s[i]
		for _, t := range taken {
			w &^= t[i]
		}
		if i == from>>6 {
			w &= ^uint64(0) << (from & 63)
		}
		if w != 0 {
			return i<<6 | bits.TrailingZeros64(w)
		}
	}
	return -1
}

// len counts the members.
func (s *portSet) len() int {
	n := 0
	for _, w := range s {
		n += bits.OnesCount64(w)
	}
	return n
}

// nextFrom returns the lowest member >= from that is not in taken, or -1.
func (s *portSet) nextFrom(from int, taken *portSet) int {
	if from < 0 {
		from = 0
	}
	for i := from >> 6; i < len(s); i++ {
		w := s[i] &^ taken[i]
		if i == from>>6 {
			w &= ^uint64(0) << (from & 63)
		}
		if w != 0 {
			return i<<6 | bits.TrailingZeros64(w)
		}
	}
	return -1
}

// String renders the set in frps's allowPorts syntax ("6000-7000,8080").
func (s *portSet) String() string {
	var b strings.Builder
	for p := s.nextFrom(0, &portSet{}); p >= 0; {
		end := p
		for end < maxPort && s.has(end+1) {
			end++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		if end == p {
			b.WriteString(strconv.Itoa(p))
		} else {
			fmt.Fprintf(&b, "%d-%d", p, end)
		}
		if end == maxPort {
			break
		}
		p = s.nextFrom(end+1, &portSet{})
	}
	return b.String()
}

// parsePorts reads frps's port list syntax: comma-separated single ports
// and inclusive ranges, "6000-7000,8080". Spaces around items are allowed,
// as frps allows them.
func parsePorts(spec string) (*portSet, error) {
	set := &portSet{}
	if strings.TrimSpace(spec) == "" {
		return nil, fmt.Errorf("empty port list")
	}
	for _, item := range strings.Split(spec, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return nil, fmt.Errorf("port list %q has an empty item", spec)
		}
		lo, hi, isRange := strings.Cut(item, "-")
		start, err := parsePort(strings.TrimSpace(lo))
		if err != nil {
			return nil, fmt.Errorf("port list item %q: %w", item, err)
		}
		end := start
		if isRange {
			if end, err = parsePort(strings.TrimSpace(hi)); err != nil {
				return nil, fmt.Errorf("port list item %q: %w", item, err)
			}
			if end < start {
				return nil, fmt.Errorf("port list item %q: range end is below its start", item)
			}
		}
		set.addRange(start, end)
	}
	return set, nil
}

func parsePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > maxPort {
		return 0, fmt.Errorf("%q is not a port number (1-65535)", s)
	}
	return n, nil
}
