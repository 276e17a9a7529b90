// Package frpplugin speaks frp's server-plugin protocol: it decodes what
// frps sends (NewProxy, CloseProxy) and writes the answers, patching
// remote_port into the proxy's content byte for byte.
package frpplugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"unicode/utf8"
)

// This file speaks frp's server-plugin protocol (frp's doc/server_plugin.md,
// pkg/plugin/server/types.go). frps replaces the client's whole proxy
// configuration with the content we return, so content is never decoded
// into a struct and encoded again: the request's bytes are copied and only
// remote_port is spliced in, and every field, known or not, comes back as
// it was received.

// The fixed answers of the protocol.
var (
	AnswerUnchanged = []byte(`{"reject":false,"unchange":true}`)
	AnswerInvalid   = []byte(`{"error":"VALIDATEERR","message":"Invalid inputs. Please check your frpc.ini config"}`)
)

// ErrInvalid marks a request frps should not have sent: the answer is 400
// VALIDATEERR.
var ErrInvalid = errors.New("invalid plugin request")

// maxPort is the highest port number.
const maxPort = 65535

// proxyTypesWithPort are the proxy types frps publishes on a remote port.
var proxyTypesWithPort = map[string]bool{"tcp": true, "udp": true}

// Request is a decoded plugin call: its op and, for NewProxy, what
// the allocation rules need plus the raw content to patch.
type Request struct {
	Op         string
	Proxy      Proxy
	HasPort    bool // proxy_type has a remote port
	BadPort    bool // remote_port was an integer outside 0-65535
	RawContent []byte
}

// Decode reads a plugin request body. Any op but NewProxy is
// returned with only op set; queryOp is used when the body names none.
func Decode(body []byte, queryOp string) (Request, error) {
	var req Request
	if !json.Valid(body) {
		return req, ErrInvalid
	}
	var members [8]member
	env, ok := objectMembers(body, members[:0])
	if !ok {
		return req, ErrInvalid
	}
	var content []byte
	req.Op = queryOp
	for _, m := range env {
		switch {
		case nameIs(m.name, "op"):
			op, ok := decodeString(body[m.start:m.end])
			if !ok {
				return req, ErrInvalid
			}
			if op != "" {
				req.Op = op
			}
		case nameIs(m.name, "content"):
			content = body[m.start:m.end]
		}
	}
	if req.Op == "CloseProxy" {
		decodeCloseProxy(content, &req)
		return req, nil
	}
	if req.Op != "NewProxy" {
		return req, nil
	}
	if err := decodeNewProxy(content, &req); err != nil {
		return req, err
	}
	return req, nil
}

// decodeNewProxy reads the fields the rules need from NewProxy content. A
// field that appears twice counts with its last value, as in frps's own
// decoder; names match case-insensitively for the same reason.
func decodeNewProxy(content []byte, req *Request) error {
	var members [32]member
	fields, ok := objectMembers(content, members[:0])
	if !ok {
		return ErrInvalid
	}
	req.RawContent = content
	var haveUser, haveName, haveType bool
	for _, m := range fields {
		raw := content[m.start:m.end]
		switch {
		case nameIs(m.name, "user"):
			user, found, ok := userName(raw)
			if !ok {
				return ErrInvalid
			}
			req.Proxy.User, haveUser = user, found
		case nameIs(m.name, "proxy_name"):
			s, ok := decodeString(raw)
			if !ok {
				return ErrInvalid
			}
			req.Proxy.ProxyName, haveName = s, s != ""
		case nameIs(m.name, "proxy_type"):
			s, ok := decodeString(raw)
			if !ok {
				return ErrInvalid
			}
			req.Proxy.ProxyType, haveType = s, s != ""
		case nameIs(m.name, "group"):
			s, ok := decodeString(raw)
			if !ok && string(raw) != "null" {
				return ErrInvalid
			}
			req.Proxy.Group = s
		case nameIs(m.name, "remote_port"):
			port, ok := decodePort(raw)
			if !ok {
				return ErrInvalid
			}
			if int64(int(port)) != port { // beyond int on 32-bit platforms
				port = -1
			}
			req.BadPort = port < 0 || port > maxPort
			req.Proxy.RemotePort = int(port)
		}
	}
	if !haveUser || !haveName || !haveType {
		return ErrInvalid
	}
	req.HasPort = proxyTypesWithPort[req.Proxy.ProxyType]
	return nil
}

// decodeCloseProxy reads who closed which proxy. CloseProxy only feeds
// the online state, so a body it cannot read is passed through unchanged:
// req.proxy.ProxyName stays empty.
func decodeCloseProxy(content []byte, req *Request) {
	var members [16]member
	fields, ok := objectMembers(content, members[:0])
	if !ok {
		return
	}
	var user, name string
	for _, m := range fields {
		raw := content[m.start:m.end]
		switch {
		case nameIs(m.name, "user"):
			if u, _, ok := userName(raw); ok {
				user = u
			}
		case nameIs(m.name, "proxy_name"):
			if s, ok := decodeString(raw); ok {
				name = s
			}
		}
	}
	req.Proxy.User, req.Proxy.ProxyName = user, name
}

// userName reads content.user, an object {user, metas, run_id} in NewProxy.
// found is false when the object has no user field; an empty user is valid
// (frpc without `user` sends one).
func userName(raw []byte) (name string, found, ok bool) {
	var members [8]member
	fields, isObj := objectMembers(raw, members[:0])
	if !isObj {
		return "", false, false
	}
	for _, m := range fields {
		if nameIs(m.name, "user") {
			s, ok := decodeString(raw[m.start:m.end])
			if !ok {
				return "", false, false
			}
			name, found = s, true
		}
	}
	return name, found, true
}

// decodePort reads remote_port: absent, null and 0 all mean "any port".
// Only integer literals are accepted, as frps's decoder would.
func decodePort(raw []byte) (int64, bool) {
	if string(raw) == "null" {
		return 0, true
	}
	n, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil {
		return 0, false
	}
	return n, true
}

// PatchRemotePort returns content with every remote_port member set to
// port, or one added when it has none. Nothing else changes.
func PatchRemotePort(dst, content []byte, port int) []byte {
	var members [32]member
	fields, _ := objectMembers(content, members[:0])
	value := strconv.AppendInt(nil, int64(port), 10)
	at := 0
	replaced := false
	for _, m := range fields {
		if nameIs(m.name, "remote_port") {
			dst = append(dst, content[at:m.start]...)
			dst = append(dst, value...)
			at = m.end
			replaced = true
		}
	}
	if replaced {
		return append(dst, content[at:]...)
	}
	closing := bytes.LastIndexByte(content, '}')
	dst = append(dst, content[:closing]...)
	if len(fields) > 0 {
		dst = append(dst, ',')
	}
	dst = append(dst, `"remote_port":`...)
	dst = append(dst, value...)
	return append(dst, content[closing:]...)
}

// AppendAllowed appends the answer that lets the proxy register on port.
func AppendAllowed(dst, content []byte, port int) []byte {
	dst = append(dst, `{"reject":false,"unchange":false,"content":`...)
	dst = PatchRemotePort(dst, content, port)
	return append(dst, '}')
}

// RejectAnswer is the answer that refuses the proxy, with a reason frps
// shows the client.
func RejectAnswer(reason string) []byte {
	b, _ := json.Marshal(struct {
		Reject       bool   `json:"reject"`
		RejectReason string `json:"reject_reason"`
	}{true, reason})
	return b
}

// member is one member of a JSON object: its raw name (between the quotes,
// escapes untouched) and the span of its raw value.
type member struct {
	name       []byte
	start, end int
}

// objectMembers lists the members of the JSON object data, which must
// already be valid JSON. ok is false when data is not an object.
func objectMembers(data []byte, dst []member) ([]member, bool) {
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return dst, false
	}
	i++
	for {
		i = skipSpace(data, i)
		if i >= len(data) {
			return dst, false
		}
		switch data[i] {
		case '}':
			return dst, true
		case ',':
			i = skipSpace(data, i+1)
		}
		if i >= len(data) || data[i] != '"' {
			return dst, false
		}
		nameEnd := skipString(data, i)
		if nameEnd < 0 {
			return dst, false
		}
		name := data[i+1 : nameEnd-1]
		i = skipSpace(data, nameEnd)
		if i >= len(data) || data[i] != ':' {
			return dst, false
		}
		i = skipSpace(data, i+1)
		end := skipValue(data, i)
		if end < 0 {
			return dst, false
		}
		dst = append(dst, member{name: name, start: i, end: end})
		i = end
	}
}

func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index just past the string starting at data[i].
func skipString(data []byte, i int) int {
	for j := i + 1; j < len(data); j++ {
		switch data[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return -1
}

// skipValue returns the index just past the value starting at data[i].
func skipValue(data []byte, i int) int {
	if i >= len(data) {
		return -1
	}
	switch data[i] {
	case '"':
		return skipString(data, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(data); j++ {
			switch data[j] {
			case '"':
				j = skipString(data, j)
				if j < 0 {
					return -1
				}
				j--
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(data) && !strings.ContainsRune(",}] \t\r\n", rune(data[j])) {
		j++
	}
	return j
}

// nameIs matches a raw member name the way encoding/json matches struct
// fields: escapes decoded, case folded.
func nameIs(raw []byte, want string) bool {
	if bytes.IndexByte(raw, '\\') < 0 {
		return strings.EqualFold(string(raw), want)
	}
	var name string
	if err := json.Unmarshal(append(append([]byte{'"'}, raw...), '"'), &name); err != nil {
		return false
	}
	return strings.EqualFold(name, want)
}

// decodeString decodes a raw JSON string value. Invalid UTF-8 becomes
// U+FFFD exactly as frps's encoder would have made it.
func decodeString(raw []byte) (string, bool) {
	if len(raw) < 2 || raw[0] != '"' {
		return "", false
	}
	inner := raw[1 : len(raw)-1]
	if bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
		return string(inner), true
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", false
	}
	return s, true
}

// Proxy is what the allocation rules need from a NewProxy (and who closed
// which proxy, from a CloseProxy).
type Proxy struct {
	User       string
	ProxyName  string
	ProxyType  string
	Group      string
	RemotePort int // 0: any port
	// ReqID is frps's X-Frp-Reqid, for the history; not part of the key.
	ReqID string
}
