package main

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"frp-port-keeper/internal/store"
)

// describePins lists history entries with their reasons, one a line.
func describePins(es []store.HistoryEntry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%s %s port=%d old=%d reason=%q\n", e.Change, e.Key, e.Port, e.OldPort, e.Reason)
	}
	return b.String()
}

// decisionLines are the msg=decision lines of a text log.
func decisionLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "msg=decision") {
			out = append(out, l)
		}
	}
	return out
}

// TestPinMovesDevice (issue 17): a device that asks for its own
// remote_port while an operator has pinned its key to another port is
// answered the pinned port, not refused; the decision log names the port it
// asked for, the history says so once per asked port, and the record stays
// as the operator left it. A registration without remote_port gets the pin
// as a plain hit.
func TestPinMovesDevice(t *testing.T) {
	h := newHistoryAllocator(t, "file", "30000-30009", allocatorOptions{})
	var logBuf syncBuffer
	srv := newServer(h.allocator, slog.New(slog.NewTextHandler(&logBuf, nil)), serverOptions{})
	register := func(remotePort string) (int, string) {
		t.Helper()
		body := newProxyBody("myiphone", "myiphone.ssh", "tcp", `"use_encryption":true`+remotePort)
		before := len(decisionLines(logBuf.String()))
		code, ans := post(t, srv, "NewProxy", body)
		if code != http.StatusOK {
			t.Fatalf("NewProxy%s = %d %s; want 200", remotePort, code, ans)
		}
		assertSameContent(t, body, ans)
		lines := decisionLines(logBuf.String())
		if len(lines) != before+1 {
			t.Fatalf("NewProxy%s logged %d decision lines; want 1:\n%s", remotePort, len(lines)-before, logBuf.String())
		}
		return portOf(t, ans), lines[len(lines)-1]
	}

	// The device runs with remotePort = 30007 and gets it.
	if p, _ := register(`,"remote_port":30007`); p != 30007 {
		t.Fatalf("first registration = %d; want 30007, the port it asked for", p)
	}
	// The operator moves it to 30003.
	if _, err := h.assign("myiphone.ssh", 30003, "", operatorChange{by: "admin test"}); err != nil {
		t.Fatal(err)
	}
	pinned, _ := h.current("myiphone.ssh")

	// It reconnects still asking for 30007, several times: 30003 each time.
	for i := range 5 {
		p, line := register(`,"remote_port":30007`)
		if p != 30003 {
			t.Fatalf("registration %d asking for 30007 while pinned to 30003 = %d; want 30003", i, p)
		}
		for _, want := range []string{"outcome=pinned", "asked=30007", "port=30003", "level=INFO"} {
			if !strings.Contains(line, want) {
				t.Fatalf("decision line %q; want %s in it", line, want)
			}
		}
	}
	// Its config changes to 30008: still 30003.
	if p, line := register(`,"remote_port":30008`); p != 30003 || !strings.Contains(line, "asked=30008") {
		t.Fatalf("asking for 30008 while pinned to 30003 = %d, %q; want 30003 and asked=30008", p, line)
	}
	// Without remote_port (0 or none): a plain hit on the pin.
	for _, rp := range []string{`,"remote_port":0`, ``} {
		p, line := register(rp)
		if p != 30003 || !strings.Contains(line, "outcome=hit") || strings.Contains(line, "asked=") {
			t.Fatalf("registration%s while pinned to 30003 = %d, %q; want a hit on 30003", rp, p, line)
		}
	}

	if now, _ := h.current("myiphone.ssh"); now != pinned {
		t.Fatalf("record after the device's requests = %+v; want it as assigned, %+v", now, pinned)
	}
	got := describePins(h.all(t))
	want := strings.Join([]string{
		`requested myiphone.ssh port=30007 old=0 reason=""`,
		`assigned myiphone.ssh port=30003 old=30007 reason=""`,
		`pinned myiphone.ssh port=30003 old=0 reason="asked for 30007; pinned to 30003 by an operator"`,
		`pinned myiphone.ssh port=30003 old=0 reason="asked for 30008; pinned to 30003 by an operator"`,
	}, "\n") + "\n"
	if got != want {
		t.Fatalf("history:\n%s\nwant:\n%s", got, want)
	}
}

// TestPinBeforeFirstRegistration: a key assigned before its device ever
// registered, whose device asks for another port, gets the pin; the
// filled_in entry says what it asked for, and its reconnects add nothing.
// A new assign (another port) is a new pin: the next request is recorded
// again.
func TestPinBeforeFirstRegistration(t *testing.T) {
	h := newHistoryAllocator(t, "file", "30000-30009", allocatorOptions{})
	if _, err := h.assign("myiphone.ssh", 30003, "", operatorChange{by: "admin test"}); err != nil {
		t.Fatal(err)
	}
	asks := req("myiphone", "myiphone.ssh", "tcp")
	asks.RemotePort = 30007
	for range 3 {
		if p, how := mustAllocate(t, h.allocator, asks); p != 30003 || how != outcomePinned {
			t.Fatalf("asking for 30007 while pinned to 30003 = %d %s; want 30003 pinned", p, how)
		}
	}
	if p, how := mustAllocate(t, h.allocator, req("myiphone", "myiphone.ssh", "tcp")); p != 30003 || how != outcomeHit {
		t.Fatalf("plain registration = %d %s; want a hit on 30003", p, how)
	}
	if _, err := h.assign("myiphone.ssh", 30005, "", operatorChange{by: "admin test"}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if p, how := mustAllocate(t, h.allocator, asks); p != 30005 || how != outcomePinned {
			t.Fatalf("asking for 30007 while pinned to 30005 = %d %s; want 30005 pinned", p, how)
		}
	}
	v, _ := h.find("myiphone.ssh")
	if !v.Pinned || v.Port != 30005 || v.User != "myiphone" || v.ProxyType != "tcp" {
		t.Fatalf("record = %+v; want pinned to 30005 with the device's details", v)
	}
	got := describePins(h.all(t))
	want := strings.Join([]string{
		`assigned myiphone.ssh port=30003 old=0 reason=""`,
		`filled_in myiphone.ssh port=30003 old=0 reason="asked for 30007; pinned to 30003 by an operator"`,
		`assigned myiphone.ssh port=30005 old=30003 reason=""`,
		`pinned myiphone.ssh port=30005 old=0 reason="asked for 30007; pinned to 30005 by an operator"`,
	}, "\n") + "\n"
	if got != want {
		t.Fatalf("history:\n%s\nwant:\n%s", got, want)
	}
}
