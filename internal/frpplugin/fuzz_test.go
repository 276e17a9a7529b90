package frpplugin

import (
	"encoding/json"
	"strings"
	"testing"

	"frp-port-keeper/internal/frpplugin/frpplugintest"
)

const fuzzPort = 12345

// FuzzDecode: decoding never panics; an allowing answer built from a
// decoded NewProxy is valid JSON that keeps every content member but
// remote_port, byte for byte, and sets remote_port.
func FuzzDecode(f *testing.F) {
	bodies, ops := frpplugintest.Captures(f)
	for i := range bodies {
		f.Add(bodies[i], ops[i])
	}
	for _, s := range frpplugintest.HostileSeeds {
		f.Add([]byte(s), "NewProxy")
	}
	f.Fuzz(func(t *testing.T, body []byte, op string) {
		req, err := Decode(body, op)
		if err == nil && req.Op == "NewProxy" && req.HasPort {
			checkAllowedAnswer(t, req.RawContent)
		}
	})
}

// checkAllowedAnswer checks appendAllowed's answer for content.
func checkAllowedAnswer(t *testing.T, content []byte) {
	t.Helper()
	out := AppendAllowed(nil, content, fuzzPort)
	if !json.Valid(out) {
		t.Fatalf("appendAllowed(%q): %q is not valid JSON", content, out)
	}
	var ans struct {
		Reject   *bool           `json:"reject"`
		Unchange *bool           `json:"unchange"`
		Content  json.RawMessage `json:"content"`
	}
	if err := json.Unmarshal(out, &ans); err != nil {
		t.Fatalf("appendAllowed(%q) = %q: %v", content, out, err)
	}
	if ans.Reject == nil || *ans.Reject || ans.Unchange == nil || *ans.Unchange {
		t.Fatalf("appendAllowed(%q) = %q: want reject and unchange false", content, out)
	}
	var port struct {
		RemotePort *int `json:"remote_port"`
	}
	if err := json.Unmarshal(ans.Content, &port); err != nil || port.RemotePort == nil || *port.RemotePort != fuzzPort {
		t.Fatalf("appendAllowed(%q) content %q: remote_port %v (%v); want %d", content, ans.Content, ptrString(port.RemotePort), err, fuzzPort)
	}
	// Every member named remote_port in any case and spelling is the port.
	var members map[string]json.RawMessage
	json.Unmarshal(ans.Content, &members)
	for k, v := range members {
		if strings.EqualFold(k, "remote_port") && string(v) != "12345" {
			t.Fatalf("appendAllowed(%q): member %q = %s; want %d", content, k, v, fuzzPort)
		}
	}
	if err := frpplugintest.SameContentExceptPort(content, ans.Content); err != nil {
		t.Fatalf("appendAllowed(%q) = %q: %v", content, out, err)
	}
}

func ptrString(p *int) string {
	if p == nil {
		return "absent"
	}
	b, _ := json.Marshal(*p)
	return string(b)
}
