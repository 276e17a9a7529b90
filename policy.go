package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// policy is how a shared pool is divided: per-user sub-pools and quotas,
// and when an abandoned port may be taken back. Rules are matched in order
// on the user name; the first match decides.
type policy struct {
	rules []policyRule
	// shared is the pool minus every rule's range: where users without a
	// range of their own get ports.
	shared     *portSet
	sharedSpec string // shared, rendered once
	// maxPorts is the quota for users whose rule does not set one; 0: none.
	maxPorts int
	// reclaimAfter is how long a key must be unseen before its port may be
	// taken back when its pool is full; 0: never.
	reclaimAfter time.Duration
}

// policyRule is one [[rule]] of the policy file.
type policyRule struct {
	index    int // 1-based position in the file, for messages
	users    []string
	ports    *portSet // nil: the shared pool
	portSpec string
	maxPorts *int // nil: the global default
}

// name identifies a rule in messages: "rule 2 (lab-*)".
func (r *policyRule) name() string {
	return fmt.Sprintf("rule %d (%s)", r.index, strings.Join(r.users, ", "))
}

func (r *policyRule) matches(user string) bool {
	for _, pattern := range r.users {
		if ok, _ := path.Match(pattern, user); ok {
			return true
		}
	}
	return false
}

// userPolicy is what the policy says for one user.
type userPolicy struct {
	rule     *policyRule // nil: no rule matched
	ports    *portSet    // where the user's fresh ports come from
	portSpec string
	maxPorts int // 0: unlimited
}

// forUser applies the rules to user.
func (p *policy) forUser(user string) userPolicy {
	up := userPolicy{ports: p.shared, portSpec: p.sharedSpec, maxPorts: p.maxPorts}
	for i := range p.rules {
		r := &p.rules[i]
		if !r.matches(user) {
			continue
		}
		up.rule = r
		if r.ports != nil {
			up.ports, up.portSpec = r.ports, r.portSpec
		}
		if r.maxPorts != nil {
			up.maxPorts = *r.maxPorts
		}
		break
	}
	return up
}

// reservedFor names the rule whose range holds port, if any.
func (p *policy) reservedFor(port int) *policyRule {
	for i := range p.rules {
		if r := &p.rules[i]; r.ports != nil && r.ports.has(port) {
			return r
		}
	}
	return nil
}

// policyFile is the TOML shape of -policy.
type policyFile struct {
	Rule []struct {
		Users    []string `toml:"users"`
		Ports    string   `toml:"ports"`
		MaxPorts *int     `toml:"max_ports"`
	} `toml:"rule"`
}

// loadPolicy reads and checks a policy file against the pool. Every error
// is one line that names the file and the rule.
func loadPolicy(file string, pool *portSet, maxPorts int, reclaimAfter time.Duration) (*policy, error) {
	p := &policy{shared: pool, sharedSpec: pool.String(), maxPorts: maxPorts, reclaimAfter: reclaimAfter}
	if maxPorts < 0 {
		return nil, fmt.Errorf("-max-ports-per-user %d: must be 0 (unlimited) or more", maxPorts)
	}
	if reclaimAfter < 0 {
		return nil, fmt.Errorf("-reclaim-after %v: must be 0 (off) or more", reclaimAfter)
	}
	if file == "" {
		return p, nil
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("-policy: %v", err)
	}
	var pf policyFile
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&pf); err != nil {
		var de *toml.DecodeError
		var sm *toml.StrictMissingError
		switch {
		case errors.As(err, &de):
			row, col := de.Position()
			return nil, fmt.Errorf("policy %s: line %d column %d: %s", file, row, col, de.Error())
		case errors.As(err, &sm):
			return nil, fmt.Errorf("policy %s: unknown setting: %s", file, strings.ReplaceAll(strings.TrimSpace(sm.String()), "\n", " "))
		}
		return nil, fmt.Errorf("policy %s: %v", file, err)
	}
	shared := *pool
	for i, fr := range pf.Rule {
		r := policyRule{index: i + 1, users: fr.Users, maxPorts: fr.MaxPorts}
		fail := func(format string, args ...any) error {
			return fmt.Errorf("policy %s: %s: %s", file, r.name(), fmt.Sprintf(format, args...))
		}
		if len(r.users) == 0 {
			return nil, fail("users is empty: name at least one user or pattern")
		}
		for _, u := range r.users {
			if _, err := path.Match(u, ""); err != nil {
				return nil, fail("user pattern %q is not a valid glob", u)
			}
		}
		if r.maxPorts != nil && *r.maxPorts < 0 {
			return nil, fail("max_ports %d: must be 0 (unlimited) or more", *r.maxPorts)
		}
		if fr.Ports != "" {
			set, err := parsePorts(fr.Ports)
			if err != nil {
				return nil, fail("ports: %v", err)
			}
			var outside portSet
			for w := range set {
				outside[w] = set[w] &^ pool[w]
			}
			if outside.len() > 0 {
				return nil, fail("ports %s are outside the pool (%s)", outside.String(), pool.String())
			}
			// Ranges reserve ports for their rule's users; two rules sharing
			// some ports but not all cannot both hold that promise.
			for j := range p.rules {
				o := &p.rules[j]
				if o.ports == nil || *o.ports == *set {
					continue
				}
				var both portSet
				for w := range set {
					both[w] = set[w] & o.ports[w]
				}
				if both.len() > 0 {
					return nil, fail("ports %s overlap %s's ports %s", both.String(), o.name(), o.portSpec)
				}
			}
			r.ports, r.portSpec = set, set.String()
			for w := range set {
				shared[w] &^= set[w]
			}
		}
		p.rules = append(p.rules, r)
	}
	p.shared, p.sharedSpec = &shared, shared.String()
	return p, nil
}
